/**
 * KV-cache decoding: the attention of one new query per sequence against that sequence's cached
 * keys and values (kernels/wgsl/attention_decode.wgsl has the formula and the tiling), and the
 * cache itself.
 *
 * B = sequences, H = query heads, Hkv = kv heads, hd = head dim, L = cache slots per sequence.
 * The cache of one layer is K, V[B, L, Hkv, hd] in the activation dtype; slot j of sequence b holds
 * the key and value of its token at position j (after RoPE for K), written by
 * {@link KvCache.write}. The reference is kernels/reference/attention.ts `attention_decode`.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { type FloatDType, grid, loadWgsl, specializeWgsl } from "./_rowwise.ts";

const UNIFORM_BYTES = 24;

/** The keys and values of every layer of B sequences of up to L tokens. */
export class KvCache implements Disposable {
  readonly gpu: Gpu;
  readonly B: number;
  readonly L: number;
  readonly Hkv: number;
  readonly hd: number;
  readonly dtype: FloatDType;
  /** K and V of each layer, [B, L, Hkv, hd]. */
  readonly k: Tensor[];
  readonly v: Tensor[];

  constructor(gpu: Gpu, layers: number, B: number, L: number, Hkv: number, hd: number, dtype: FloatDType) {
    const bytes = B * L * Hkv * hd * (dtype === "f16" ? 2 : 4);
    if (bytes > gpu.maxBindingBytes) {
      throw new RangeError(
        `Cannot hold a KV cache of ${B} sequences × ${L} tokens: one layer's keys take ${bytes} bytes, ` +
          `above the adapter's storage binding limit of ${gpu.maxBindingBytes} bytes (generate fewer ` +
          "sequences at once, or shorter ones)",
      );
    }
    this.gpu = gpu;
    this.B = B;
    this.L = L;
    this.Hkv = Hkv;
    this.hd = hd;
    this.dtype = dtype;
    this.k = Array.from(
      { length: layers },
      (_, l) => Tensor.empty(gpu, [B, L, Hkv, hd], dtype, { label: `k_cache${l}` }),
    );
    this.v = Array.from(
      { length: layers },
      (_, l) => Tensor.empty(gpu, [B, L, Hkv, hd], dtype, { label: `v_cache${l}` }),
    );
  }

  /**
   * Copies rows of `k` and `v` ([rows·S, Hkv, hd], row-major by sequence) into layer `layer`'s
   * slots: for sequence b, its rows [b·S + from_b, b·S + from_b + count_b) go to slots
   * [at_b, at_b + count_b). A prefill writes count_b = prompt length at slot 0; a decode step
   * (S = 1) one row at slot n_b − 1.
   */
  write(
    layer: number,
    k: Tensor,
    v: Tensor,
    S: number,
    spans: readonly { at: number; count: number }[],
  ): void {
    const row = this.Hkv * this.hd * (this.dtype === "f16" ? 2 : 4);
    const rec = recorder(this.gpu);
    for (const [src, dst] of [[k, this.k[layer]], [v, this.v[layer]]] as const) {
      if (src.dtype !== this.dtype || src.chunks.length !== 1) {
        throw new RangeError(`Cannot write "${src.label}" (${src.dtype}) into the ${this.dtype} KV cache`);
      }
      spans.forEach((s, b) => {
        if (s.count === 0) return;
        if (s.at + s.count > this.L) {
          throw new RangeError(`Cannot write ${s.count} tokens at slot ${s.at} of a ${this.L}-slot KV cache`);
        }
        rec.copyBuffer(src.buffer, b * S * row, dst.buffer, (b * this.L + s.at) * row, s.count * row);
      });
    }
  }

  [Symbol.dispose](): void {
    for (const t of [...this.k, ...this.v]) t.destroy();
  }
}

/**
 * out[B,H,hd] = softmax(q·Kᵀ/√hd)·V over each sequence's first len_b cache slots (the last
 * `window` of them with a sliding window).
 *
 * @param q q[B,H,hd] after RoPE (f32 or f16; out has its dtype)
 * @param k K[B,L,Hkv,hd] of {@link KvCache}
 * @param lens len[B] u32, 1 ≤ len_b ≤ L
 */
export function attentionDecode(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  lens: Tensor,
  options: { window?: number | null; label?: string } = {},
): Tensor {
  const fail = (why: string): never => {
    throw new RangeError(`Cannot run the decode attention on q "${q.label}" [${q.shape}]: ${why}`);
  };
  if (q.shape.length !== 3) fail("q must be [B,H,hd]");
  const [B, H, hd] = q.shape;
  if (k.shape.length !== 4 || k.shape[0] !== B || k.shape[3] !== hd) {
    fail(`K [${k.shape}] is not [${B},L,Hkv,${hd}]`);
  }
  if (v.shape.join() !== k.shape.join() || v.dtype !== k.dtype) fail("V differs from K");
  const [, L, Hkv] = k.shape;
  if (H % Hkv !== 0) fail(`${H} heads are not a multiple of ${Hkv} kv heads`);
  if (hd > 256 || hd % 2 !== 0) fail(`head dim ${hd} must be even and at most 256`);
  if (lens.dtype !== "u32" || lens.shape.join() !== `${B}`) fail(`lens must be u32 [${B}]`);
  for (const t of [q, k, v]) {
    if ((t.dtype !== "f32" && t.dtype !== "f16") || (t.dtype === "f16" && !q.gpu.f16)) {
      fail(`"${t.label}" has dtype ${t.dtype}`);
    }
    if (t.chunks.length !== 1) fail(`"${t.label}" is split into chunks`);
  }
  const gpu = q.gpu;
  const out = Tensor.empty(gpu, [B, H, hd], q.dtype, { label: options.label ?? "attention_decode_out" });
  const kernel = getKernel(gpu, {
    name: "attention_decode",
    params: { q: q.dtype, kv: k.dtype },
    code: () =>
      specializeWgsl(loadWgsl("attention_decode"), { Q: q.dtype as FloatDType, KV: k.dtype as FloatDType }),
    bindings: ["read", "read", "read", "read", "write"],
    uniformBytes: UNIFORM_BYTES,
    constants: { HD: hd },
  });
  const u = new Uint32Array(6);
  u.set([B, H, Hkv, L, options.window ?? 0]);
  new Float32Array(u.buffer)[5] = 1 / Math.sqrt(hd);
  recorder(gpu).dispatch(
    kernel,
    [q.buffer, k.buffer, v.buffer, lens.buffer, out.buffer],
    u,
    grid(gpu, B * H),
  );
  return out;
}
