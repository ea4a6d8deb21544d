/**
 * Causal grouped-query attention on the GPU, flash-style: forward (out and the log-sum-exp per
 * query) and backward (dq, dk, dv), with an optional sliding window and per-document masks for
 * packed rows. Memory is linear in the sequence length: scores live only as tiles in workgroup
 * memory. The kernels are described in attention_wgsl.ts; this file is the only place their
 * tile sizes are chosen.
 *
 * B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads (divides H),
 * hd = head dim (a multiple of 4), W = sliding window.
 * Tensors: q[T,H,hd], k[T,Hkv,hd], v[T,Hkv,hd], out[T,H,hd], lse[T,H] (f32), docs[T] (u32/i32).
 * Query i of a row attends key j of the same row iff j <= i, j > i − W (when W is set) and
 * docs[i] == docs[j] (when docs are given); head h reads kv head ⌊h·Hkv / H⌋.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import {
  ATTENTION_STATS_WORKGROUP,
  ATTENTION_UNIFORM_BYTES,
  attentionDkdvWgsl,
  attentionDqWgsl,
  type AttentionFloat,
  attentionForwardWgsl,
  type AttentionKernel,
  attentionSharedBytes,
  attentionStatsWgsl,
  attentionThreads,
  type AttentionTile,
  attentionUniforms,
  type BackwardVariant,
  checkAttentionTile,
  type DocDType,
  type ForwardVariant,
} from "./attention_wgsl.ts";

export type { AttentionFloat, AttentionKernel, AttentionTile };

/** Masks and sizes shared by the forward and the backward. */
export interface AttentionMaskOptions {
  /** Tokens per row S (T = B·S); default T (one row). */
  S?: number;
  /** Sliding window W: key j is allowed for query i iff j > i − W; null or absent: none. */
  window?: number | null;
  /** docs[T]: document id per token (u32 or i32); a query attends keys of its own document only. */
  docs?: Tensor | null;
  /** Score scale (default 1/sqrt(hd)). */
  scale?: number;
  /** Tile overrides per kernel (default: {@link chooseAttentionTile} for this adapter). */
  tiles?: Partial<Record<AttentionKernel, AttentionTile>>;
}

/** Options of {@link attentionForward}. */
export interface AttentionForwardOptions extends AttentionMaskOptions {
  /** Output out[T,H,hd] (written `=`); created when absent. */
  out?: Tensor;
  /** Output lse[T,H] f32 (written `=`); created when absent. */
  lse?: Tensor;
  /** dtype of a created `out` (default: q's dtype). */
  outDtype?: AttentionFloat;
}

/** Options of {@link attentionBackward}. */
export interface AttentionBackwardOptions extends AttentionMaskOptions {
  /** Outputs (written `=`); created when absent. */
  dq?: Tensor;
  dk?: Tensor;
  dv?: Tensor;
  /** dtype of created gradients (default f32). */
  gradDtype?: AttentionFloat;
}

/** Tile sizes: powers of two tried, largest first. */
const TILE_SIZES = [64, 32, 16, 8, 4, 2] as const;
/** Threads per query row (forward, dq) or key (dkdv): at most this many, dividing hd/4. */
const MAX_TPR = 16;
/** Invocations per workgroup at most (WebGPU's default limit). */
const MAX_THREADS = 256;

/**
 * Workgroup memory the GL backend is first asked to fit, in bytes. Naga's GLSL output
 * zero-initialises workgroup memory, and llvmpipe's GL compile time grows about quadratically
 * with its size (measured: 1 K words ≈ 5 s, 4 K words ≈ 2 min per kernel), so GL gets small tiles.
 */
const GL_STORAGE_BYTES = 2048;

/**
 * The tile of one attention kernel for head dim `hd` on this adapter: TPR = the largest power of
 * two ≤ 16 dividing hd/4; then the (Br, Bc) pair of powers of two ≤ 64 that fits the workgroup
 * memory budget and invocation limit with the largest min(Br, Bc), then the largest Br·Bc, then
 * the largest thread-row dimension (Br for forward and dq, Bc for dkdv). The budget is the
 * adapter's limit, or on the GL backend {@link GL_STORAGE_BYTES}, doubled until a tile fits.
 *
 * @example
 * ```ts
 * chooseAttentionTile(gpu, "forward", 64, { storageBytes: 16384 }); // { BR: 16, BC: 16, TPR: 16 }
 * ```
 * @throws {RangeError} when hd is not a multiple of 4 or no tile fits the adapter's limits.
 */
export function chooseAttentionTile(
  gpu: Gpu,
  kernel: AttentionKernel,
  hd: number,
  limits: { storageBytes?: number; threads?: number } = {},
): AttentionTile {
  if (!Number.isInteger(hd) || hd <= 0 || hd % 4 !== 0) {
    throw new RangeError(`Cannot run attention with head dim ${hd}: it must be a positive multiple of 4`);
  }
  let TPR = 1;
  while (TPR * 2 <= MAX_TPR && (hd / 4) % (TPR * 2) === 0) TPR *= 2;
  const storage = limits.storageBytes ?? gpu.limits.maxComputeWorkgroupStorageSize;
  const threads = Math.min(
    limits.threads ?? MAX_THREADS,
    gpu.limits.maxComputeInvocationsPerWorkgroup,
    gpu.limits.maxComputeWorkgroupSizeX,
  );
  const rank = (t: AttentionTile) => [Math.min(t.BR, t.BC), t.BR * t.BC, kernel === "dkdv" ? t.BC : t.BR];
  const best = (budget: number): AttentionTile | null => {
    let found: AttentionTile | null = null;
    for (const BR of TILE_SIZES) {
      for (const BC of TILE_SIZES) {
        const tile = { BR, BC, TPR };
        if (attentionThreads(kernel, tile) > threads || attentionSharedBytes(kernel, hd, tile) > budget) {
          continue;
        }
        if (found === null || greater(rank(tile), rank(found))) found = tile;
      }
    }
    return found;
  };
  const gl = limits.storageBytes === undefined && gpu.info.backend.split(",")[0] === "gl";
  for (let budget = gl ? Math.min(GL_STORAGE_BYTES, storage) : storage; budget <= storage; budget *= 2) {
    const tile = best(budget);
    if (tile !== null) return tile;
    if (budget === storage) break;
    if (budget * 2 > storage) budget = storage / 2;
  }
  throw new RangeError(
    `Cannot run attention ${kernel} with head dim ${hd}: no tile fits ${storage} bytes of workgroup memory`,
  );
}

function greater(a: number[], b: number[]): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] > b[i];
  return false;
}

/** Shapes and masks of one call, validated. */
interface Problem {
  gpu: Gpu;
  B: number;
  S: number;
  T: number;
  H: number;
  Hkv: number;
  hd: number;
  /** 0: no window. */
  window: number;
  scale: number;
  docs: Tensor | null;
}

function fail(what: string, why: string): never {
  throw new RangeError(`Cannot run ${what}: ${why}`);
}

function floatOf(what: string, t: Tensor, gpu: Gpu): AttentionFloat {
  if (t.gpu !== gpu) fail(what, `"${t.label}" belongs to a different device`);
  if (t.dtype !== "f32" && t.dtype !== "f16") {
    fail(what, `"${t.label}" has dtype ${t.dtype}; f32 or f16 expected`);
  }
  if (t.dtype === "f16" && !gpu.f16) fail(what, `"${t.label}" is f16 but this adapter has no shader-f16`);
  if (t.chunked) fail(what, `"${t.label}" is split into row chunks (call attention per row range)`);
  return t.dtype;
}

function expectShape(what: string, t: Tensor, shape: number[]): void {
  if (t.shape.join() !== shape.join()) fail(what, `"${t.label}" has shape [${t.shape}], expected [${shape}]`);
}

function problem(what: string, q: Tensor, k: Tensor, v: Tensor, options: AttentionMaskOptions): Problem {
  const gpu = q.gpu;
  if (q.shape.length !== 3) fail(what, `q "${q.label}" must be [T,H,hd], got [${q.shape}]`);
  const [T, H, hd] = q.shape;
  if (k.shape.length !== 3) fail(what, `k "${k.label}" must be [T,Hkv,hd], got [${k.shape}]`);
  const Hkv = k.shape[1];
  expectShape(what, k, [T, Hkv, hd]);
  expectShape(what, v, [T, Hkv, hd]);
  if (Hkv === 0 || H % Hkv !== 0) fail(what, `H "${H}" is not a multiple of Hkv "${Hkv}"`);
  if (hd % 4 !== 0) fail(what, `head dim "${hd}" is not a multiple of 4`);
  const S = options.S ?? T;
  if (!Number.isInteger(S) || S <= 0 || T % S !== 0) fail(what, `S "${S}" does not divide T "${T}"`);
  const window = options.window ?? null;
  if (window !== null && (!Number.isInteger(window) || window <= 0)) {
    fail(what, `window "${window}" must be a positive integer`);
  }
  const docs = options.docs ?? null;
  if (docs !== null) {
    if (docs.dtype !== "u32" && docs.dtype !== "i32") fail(what, `docs "${docs.label}" must be u32 or i32`);
    expectShape(what, docs, [T]);
    if (docs.chunked) fail(what, `docs "${docs.label}" is split into row chunks`);
  }
  const B = T / S;
  const maxGroups = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (B > maxGroups || H > maxGroups) fail(what, `B "${B}" or H "${H}" exceeds ${maxGroups} workgroups`);
  return {
    gpu,
    B,
    S,
    T,
    H,
    Hkv,
    hd,
    // A window of S or more masks nothing: dropping it keeps j + W within u32.
    window: window === null || window >= S ? 0 : window,
    scale: options.scale ?? 1 / Math.sqrt(hd),
    docs,
  };
}

function tileFor(p: Problem, kernel: AttentionKernel, options: AttentionMaskOptions): AttentionTile {
  const tile = options.tiles?.[kernel] ?? chooseAttentionTile(p.gpu, kernel, p.hd);
  checkAttentionTile(p.hd, tile);
  const limits = p.gpu.limits;
  if (
    attentionThreads(kernel, tile) >
      Math.min(limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX) ||
    attentionSharedBytes(kernel, p.hd, tile) > limits.maxComputeWorkgroupStorageSize
  ) {
    throw new RangeError(
      `Cannot run attention ${kernel} with tile ${JSON.stringify(tile)}: it exceeds this adapter's limits`,
    );
  }
  return tile;
}

function output(
  what: string,
  gpu: Gpu,
  given: Tensor | undefined,
  shape: number[],
  dtype: AttentionFloat,
  label: string,
): Tensor {
  if (given === undefined) return Tensor.empty(gpu, shape, dtype, { label });
  expectShape(what, given, shape);
  floatOf(what, given, gpu);
  return given;
}

function uniforms(p: Problem, n = 0): Uint32Array {
  return attentionUniforms({ S: p.S, H: p.H, Hkv: p.Hkv, window: p.window, scale: p.scale, n });
}

/**
 * out = softmax(scale·q·kᵀ + mask)·v per head, and lse = log Σ_j exp(scale·q·k_j) over the allowed
 * keys, both per query. Inputs f32 or f16 (f16 needs shader-f16); accumulation f32.
 *
 * @example
 * ```ts
 * // 2 packed rows of 128 tokens, 8 query heads sharing 2 kv heads, Mistral-style window
 * const { out, lse } = attentionForward(q, k, v, { S: 128, window: 4096, docs });
 * ```
 */
export function attentionForward(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  options: AttentionForwardOptions = {},
): { out: Tensor; lse: Tensor } {
  const what = "attention forward";
  const p = problem(what, q, k, v, options);
  const { gpu, T, H, hd } = p;
  const variant: ForwardVariant = {
    hd,
    tile: tileFor(p, "forward", options),
    q: floatOf(what, q, gpu),
    k: floatOf(what, k, gpu),
    v: floatOf(what, v, gpu),
    out: options.out?.dtype as AttentionFloat | undefined ?? options.outDtype ?? (q.dtype as AttentionFloat),
    docs: p.docs?.dtype as DocDType | undefined ?? null,
  };
  const out = output(what, gpu, options.out, [T, H, hd], variant.out, "attention_out");
  const lse = options.lse ?? Tensor.empty(gpu, [T, H], "f32", { label: "attention_lse" });
  expectShape(what, lse, [T, H]);
  if (lse.dtype !== "f32" || lse.chunked) fail(what, `lse "${lse.label}" must be one f32 buffer`);
  const { BR, BC, TPR } = variant.tile;
  const kernel = getKernel(gpu, {
    name: "attention_forward",
    params: {
      hd,
      tile: `${BR}x${BC}/${TPR}`,
      dtypes: `${variant.q}${variant.k}${variant.v}${variant.out}`,
      docs: variant.docs ?? "none",
    },
    code: () => attentionForwardWgsl(variant),
    bindings: p.docs
      ? ["read", "read", "read", "read", "write", "write"]
      : ["read", "read", "read", "write", "write"],
    uniformBytes: ATTENTION_UNIFORM_BYTES,
  });
  const buffers = [q.buffer, k.buffer, v.buffer, ...(p.docs ? [p.docs.buffer] : []), out.buffer, lse.buffer];
  recorder(gpu).dispatch(kernel, buffers, uniforms(p), [Math.ceil(p.S / BR), H, p.B]);
  return { out, lse };
}

/**
 * Gradients of {@link attentionForward}, FlashAttention-2 style: D = rowsum(dout ⊙ out), then dq
 * (one workgroup per query tile) and dk, dv (one workgroup per key tile and kv head, summing the
 * query heads that share it). `out` and `lse` are the forward's; the masks must be the same.
 *
 * @example
 * ```ts
 * const { out, lse } = attentionForward(q, k, v, { S });
 * const { dq, dk, dv } = attentionBackward(dout, q, k, v, out, lse, { S });
 * ```
 */
export function attentionBackward(
  dout: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  options: AttentionBackwardOptions = {},
): { dq: Tensor; dk: Tensor; dv: Tensor } {
  const what = "attention backward";
  const p = problem(what, q, k, v, options);
  const { gpu, T, H, Hkv, hd } = p;
  expectShape(what, dout, [T, H, hd]);
  expectShape(what, out, [T, H, hd]);
  expectShape(what, lse, [T, H]);
  if (lse.dtype !== "f32" || lse.chunked) fail(what, `lse "${lse.label}" must be one f32 buffer`);
  const grad = options.gradDtype ?? "f32";
  const dtypes = {
    q: floatOf(what, q, gpu),
    k: floatOf(what, k, gpu),
    v: floatOf(what, v, gpu),
    dout: floatOf(what, dout, gpu),
  };
  const outDtype = floatOf(what, out, gpu);
  const dq = output(
    what,
    gpu,
    options.dq,
    [T, H, hd],
    options.dq?.dtype as AttentionFloat ?? grad,
    "attention_dq",
  );
  const dk = output(
    what,
    gpu,
    options.dk,
    [T, Hkv, hd],
    options.dk?.dtype as AttentionFloat ?? grad,
    "attention_dk",
  );
  const dv = output(
    what,
    gpu,
    options.dv,
    [T, Hkv, hd],
    options.dv?.dtype as AttentionFloat ?? grad,
    "attention_dv",
  );
  if (dk.dtype !== dv.dtype) fail(what, `dk "${dk.label}" and dv "${dv.label}" must have the same dtype`);
  const docs = p.docs?.dtype as DocDType | undefined ?? null;
  const rec = recorder(gpu);
  const u = uniforms(p, T * H);

  // stats[T,H] = (lse, D): one f32 pair per query row, read by both gradient kernels.
  const stats = Tensor.empty(gpu, [T, H, 2], "f32", { label: "attention_stats" });
  const statsKernel = getKernel(gpu, {
    name: "attention_stats",
    params: { hd, dtypes: `${dtypes.dout}${outDtype}` },
    code: () => attentionStatsWgsl({ hd, dout: dtypes.dout, out: outDtype }),
    bindings: ["read", "read", "read", "write"],
    uniformBytes: ATTENTION_UNIFORM_BYTES,
  });
  rec.dispatch(statsKernel, [dout.buffer, out.buffer, lse.buffer, stats.buffer], u, groups(gpu, T * H));

  const inputs = [
    q.buffer,
    k.buffer,
    v.buffer,
    dout.buffer,
    stats.buffer,
    ...(p.docs ? [p.docs.buffer] : []),
  ];
  const reads = inputs.map(() => "read" as const);
  const base = `${dtypes.q}${dtypes.k}${dtypes.v}${dtypes.dout}`;

  // One backward kernel: its variant (tile by kind, gradient dtype) and its compiled pipeline.
  const backwardKernel = (
    kind: "dq" | "dkdv",
    grad: Tensor,
    code: (v: BackwardVariant) => string,
    outputs: number,
  ) => {
    const variant: BackwardVariant = {
      hd,
      tile: tileFor(p, kind, options),
      ...dtypes,
      grad: grad.dtype as AttentionFloat,
      docs,
    };
    const { BR, BC, TPR } = variant.tile;
    const kernel = getKernel(gpu, {
      name: `attention_${kind}`,
      params: { hd, tile: `${BR}x${BC}/${TPR}`, dtypes: `${base}${variant.grad}`, docs: docs ?? "none" },
      code: () => code(variant),
      bindings: [...reads, ...Array.from({ length: outputs }, () => "write" as const)],
      uniformBytes: ATTENTION_UNIFORM_BYTES,
    });
    return { kernel, tile: variant.tile };
  };
  const dqPass = backwardKernel("dq", dq, attentionDqWgsl, 1);
  rec.dispatch(dqPass.kernel, [...inputs, dq.buffer], u, [Math.ceil(p.S / dqPass.tile.BR), H, p.B]);
  const kvPass = backwardKernel("dkdv", dk, attentionDkdvWgsl, 2);
  rec.dispatch(kvPass.kernel, [...inputs, dk.buffer, dv.buffer], u, [
    Math.ceil(p.S / kvPass.tile.BC),
    Hkv,
    p.B,
  ]);
  stats.destroy(); // back to the pool; the recorded dispatches still use it
  return { dq, dk, dv };
}

/** Workgroups of the stats kernel for `rows` = T·H: x up to the per-dimension limit, then y. */
function groups(gpu: Gpu, rows: number): [number, number] {
  const total = Math.ceil(rows / ATTENTION_STATS_WORKGROUP);
  const max = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (total <= max) return [total, 1];
  const y = Math.ceil(total / max);
  return [Math.ceil(total / y), y];
}
