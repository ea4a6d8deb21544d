/**
 * Linear layer with a LoRA adapter (PEFT `lora.Linear`): frozen W, trainable lora_A and lora_B.
 *
 * T = tokens, K = in features, N = out features, r = LoRA rank, s = scaling (lora_alpha / r, or
 * lora_alpha / sqrt(r) with rslora), p = dropout probability, keep[T,K] the seeded mask.
 * Forward:
 *   z[T,K]   = x ⊙ keep / (1 − p)         `lora_dropout` (z = x when p = 0; a scratch, not kept)
 *   xa[T,r]  = z · Aᵀ                     matmul NT; the only activation the backward needs
 *   y[T,N] (+)= x·Wᵀ (+ b) + s·xa·Bᵀ      one matmul NT (W f32 or f16, may be split into row
 *                                         chunks) with the low-rank term (xa, B, s) inside
 * Backward (dA and dB are added into, for gradient accumulation):
 *   dB[N,r] += s · dyᵀ · xa               matmul TN
 *   dxa[T,r] = s · dy · B                 matmul NN
 *   dA[r,K] += dxaᵀ · z                   matmul TN (z recomputed from x and the seed)
 *   dx[T,K] (+)= dy · W + dxa · A         p = 0: one matmul NN with the low-rank term (dxa, A, 1)
 *   dx[T,K] (+)= dy · W + (dxa · A) ⊙ keep / (1 − p)    p > 0: matmul NN, matmul NN into a
 *                                         scratch, then `lora_dropout` accumulating
 * The mask is keep[i] = pcg_hash(i ^ pcg_hash(seed)) >= floor(p·2³²) over the flat [T,K] index,
 * bit-identical to the reference's `dropout_mask(seed, T·K, p)`; the caller gives one seed per
 * (step, layer, module) and passes the same seed to the backward.
 *
 * Fused and unfused. A low-rank term (`MatmulOptions.lowRank`) continues the projection matmul's
 * accumulators over the r values of the rank: against a second matmul accumulating into y (or dx),
 * it saves a dispatch and a read and a write of y (dx), and adds r/K of the projection's
 * multiply-adds to its kernel. The second matmul (`fuse: false`) remains where the term cannot go
 * inside: W null, the backward with dropout (the mask stands between dxa·A and dx), and xa, dxa, A
 * or B split into row chunks (which takes a binding limit below T·r·4 or N·r·4 bytes). Everywhere
 * else the term goes inside, on every adapter, because that paid at every shape measured (`deno
 * task bench lora`, docs/benchmarks.md): on lavapipe and llvmpipe GL, the tiny Llamas' projections
 * (T 1024, K and N 32–256, r 8), T 256 with K = N = 512, r 16, and r/K up to 1 (K = r = 64) ran
 * 1.00–1.17× as fast per pass fused (most near 1.03×), the term's own pass costing 0.9–3.5 ms
 * there against mostly 0.2–1.7 ms added to the projection; none was slower beyond the noise. On
 * GPUs the trade should go the same way (unmeasured so far): inside, the term's multiply-adds read
 * A2 and B2 from cache with as many loads per multiply-add as the main loop has, while its own
 * pass is a dispatch plus 2·T·N elements of memory traffic; `deno task bench lora` on a GPU times
 * both sides at 7B projection shapes (T 2048, K = N = 4096, r 16 and others).
 *
 * Precision. The two forms add in a different order: fused, an element of y is (Σ_k x·W + Σ_q
 * (s·xa)·B) (+ b) (+ y) rounded once to y's dtype; unfused, x·Wᵀ (+ b) (+ y) is rounded to y's
 * dtype, then s·Σ_q xa·B is added and rounded again. Both stay within |gpu − ref| ≤ 1e-5·max|ref|
 * + 1e-4·|ref| of the f64 reference (f32; f16 x and W: 1e-3·max|ref| + 1e-2·|ref|),
 * tests/kernels/lora_test.ts; fused and unfused differ by ≤ 3e-7 of max|y| in f32, by up to one
 * f16 rounding of y in f16 (≈ 8e-4 relative; fused, rounding once, has a 10–15 % smaller mean
 * error). Each form gives the same bits on every run, and for every tile the tuner may pick.
 *
 * With W = null only the adapter's terms are computed (the frozen product comes from another
 * kernel, e.g. a dequantizing matmul): the forward adds into `out`, the backward into `dx`.
 * This file is the only place the dropout kernel's workgroup size is written.
 * @module
 */
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { chunkPairs, grid } from "./_grid.ts";
import { type FloatDType, matmul } from "./matmul.ts";

/** Invocations per workgroup of `lora_dropout`. */
const WG = 256;
/** Bytes of the uniform block of `lora_dropout`. */
const DROPOUT_UNIFORM_BYTES = 32;

/** A LoRA adapter on one linear layer (PEFT names: lora_A, lora_B, scaling, lora_dropout). */
export interface LoraWeights {
  /** lora_A.weight[r,K], f32. */
  A: Tensor;
  /** lora_B.weight[N,r], f32. */
  B: Tensor;
  /** s: see {@link loraScaling}. */
  scaling: number;
  /** Dropout probability p in [0, 1) on the adapter's input (default 0). */
  dropout?: number;
  /** u32 seed of the dropout mask for this (step, layer, module); needed when dropout > 0. */
  seed?: number;
}

/** Options of {@link loraForward}. */
export interface LoraForwardOptions {
  /** bias[N] of the frozen layer (needs W). */
  bias?: Tensor;
  /** y[T,N] to write (needed when W is null). */
  out?: Tensor;
  /** Add x·Wᵀ into `out` instead of overwriting it (always the case when W is null). */
  accumulate?: boolean;
  /** dtype of a created y (default: f16 when x and W are f16, else f32). */
  outDtype?: FloatDType;
  /** Label of a created y. */
  label?: string;
  /**
   * Add s·xa·Bᵀ inside y's matmul (its `lowRank` term) where the matmul can take it (W given, xa
   * and B whole), as pays everywhere measured (see the module documentation); `false` adds it
   * with a second matmul accumulating into y. Default true.
   */
  fuse?: boolean;
}

/** What {@link loraForward} returns. */
export interface LoraForwardResult {
  /** y[T,N]. */
  y: Tensor;
  /** xa[T,r] f32 = dropout(x)·Aᵀ, kept for the backward. */
  xa: Tensor;
}

/** Options of {@link loraBackward}. */
export interface LoraBackwardOptions {
  /** dA[r,K] f32 to add into (created and written `=` when absent). */
  dA?: Tensor;
  /** dB[N,r] f32 to add into (created and written `=` when absent). */
  dB?: Tensor;
  /** dx[T,K] to write (created as f32 when absent). */
  dx?: Tensor;
  /** Add into `dx` instead of overwriting it. */
  accumulateDx?: boolean;
  /** Skip dx (the first layer's input needs no gradient). */
  skipDx?: boolean;
  /**
   * Add dxa·A inside dx's matmul (its `lowRank` term) where the matmul can take it (W given, no
   * dropout, dxa and A whole), as pays everywhere measured (see the module documentation);
   * `false` adds it with a second matmul accumulating into dx. Default true.
   */
  fuse?: boolean;
}

/** What {@link loraBackward} returns. */
export interface LoraGrads {
  /** dx[T,K], or null with `skipDx`. */
  dx: Tensor | null;
  dA: Tensor;
  dB: Tensor;
}

/**
 * PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rslora.
 *
 * @example
 * ```ts
 * loraScaling(16, 8); // 2
 * loraScaling(16, 16, true); // 4
 * ```
 */
export function loraScaling(alpha: number, r: number, rslora = false): number {
  if (!Number.isInteger(r) || r <= 0) {
    throw new RangeError(`Cannot scale LoRA: rank r "${r}" must be a positive integer`);
  }
  return rslora ? alpha / Math.sqrt(r) : alpha / r;
}

/**
 * y = x·Wᵀ (+ b) + s · dropout(x)·Aᵀ·Bᵀ.
 *
 * @param x x[T,K] (f32 or f16)
 * @param W W[N,K], frozen (f32 or f16), or null to add only the adapter's term into `out`
 * @example
 * ```ts
 * const { y, xa } = loraForward(x, W, { A, B, scaling: loraScaling(16, 8), dropout: 0.1, seed });
 * ```
 */
export function loraForward(
  x: Tensor,
  W: Tensor | null,
  lora: LoraWeights,
  options: LoraForwardOptions = {},
): LoraForwardResult {
  const { T, N } = dims(x, W, lora, "forward");
  if (W === null) {
    if (options.out === undefined) {
      throw new TypeError("Cannot run the LoRA forward without W: `out` is needed");
    }
    if (options.bias !== undefined) throw new TypeError("Cannot add a bias in the LoRA forward without W");
  }
  const out = options.out;
  if (out !== undefined && out.shape.join() !== `${T},${N}`) {
    throw new RangeError(`Cannot write y "${out.label}" [${out.shape}]: [${T},${N}] expected`);
  }
  const z = dropoutInput(x, lora);
  const xa = matmul(z, lora.A, { layout: "NT", outDtype: "f32", label: "lora_xa" });
  if (z !== x) z.destroy();
  const term = { a: xa, b: lora.B, scale: lora.scaling };
  if (W === null) {
    matmul(xa, lora.B, { layout: "NT", alpha: lora.scaling, out, accumulate: true });
    return { y: out!, xa };
  }
  const fused = (options.fuse ?? true) && fusable(term);
  const y = matmul(x, W, {
    layout: "NT",
    bias: options.bias,
    out,
    accumulate: options.accumulate,
    outDtype: options.outDtype,
    label: options.label ?? "lora_y",
    lowRank: fused ? term : undefined,
  });
  if (!fused) matmul(xa, lora.B, { layout: "NT", alpha: lora.scaling, out: y, accumulate: true });
  return { y, xa };
}

/**
 * Gradients of {@link loraForward} w.r.t. x, lora_A and lora_B (W and b are frozen).
 *
 * @param dy dy[T,N]
 * @param x x[T,K], the forward's input
 * @param W W[N,K], or null to add only the adapter's term into `dx`
 * @param xa xa[T,r] from the forward
 * @example
 * ```ts
 * const { dx } = loraBackward(dy, x, W, lora, xa, { dA: grads.A, dB: grads.B });
 * ```
 */
export function loraBackward(
  dy: Tensor,
  x: Tensor,
  W: Tensor | null,
  lora: LoraWeights,
  xa: Tensor,
  options: LoraBackwardOptions = {},
): LoraGrads {
  const { T, K, N, r } = dims(x, W, lora, "backward");
  const gpu = x.gpu;
  if (dy.shape.join() !== `${T},${N}`) {
    throw new RangeError(`Cannot use dy "${dy.label}" [${dy.shape}]: [${T},${N}] expected`);
  }
  if (xa.shape.join() !== `${T},${r}`) {
    throw new RangeError(`Cannot use xa "${xa.label}" [${xa.shape}]: [${T},${r}] expected`);
  }
  if (options.accumulateDx && options.dx === undefined) {
    throw new TypeError("Cannot accumulate dx in the LoRA backward: `accumulateDx` needs a `dx` tensor");
  }
  const s = lora.scaling;
  const dB = matmul(dy, xa, {
    layout: "TN",
    alpha: s,
    out: options.dB,
    accumulate: options.dB !== undefined,
    label: "lora_dB",
  });
  const dxa = matmul(dy, lora.B, { layout: "NN", alpha: s, outDtype: "f32", label: "lora_dxa" });
  const z = dropoutInput(x, lora);
  const dA = matmul(dxa, z, {
    layout: "TN",
    out: options.dA,
    accumulate: options.dA !== undefined,
    label: "lora_dA",
  });
  let dx: Tensor | null = null;
  if (!options.skipDx) {
    let started = options.accumulateDx ?? false;
    // Without dropout the mask is the identity: dxa·A is a low-rank term of dx's matmul.
    const term = { a: dxa, b: lora.A, scale: 1 };
    const fused = W !== null && (lora.dropout ?? 0) === 0 && (options.fuse ?? true) && fusable(term);
    if (W !== null) {
      dx = matmul(dy, W, {
        layout: "NN",
        out: options.dx,
        accumulate: started,
        outDtype: "f32",
        label: "lora_dx",
        lowRank: fused ? term : undefined,
      });
      started = true;
    } else {
      dx = options.dx ?? Tensor.empty(gpu, [T, K], "f32", { label: "lora_dx" });
    }
    if (dx.shape.join() !== `${T},${K}`) {
      throw new RangeError(`Cannot write dx "${dx.label}" [${dx.shape}]: [${T},${K}] expected`);
    }
    if (!fused && (lora.dropout ?? 0) === 0) {
      matmul(dxa, lora.A, { layout: "NN", out: dx, accumulate: started });
    } else if (!fused) {
      // dz = dxa·A reuses z's scratch (z is no longer needed once dA is recorded).
      const dz = z !== x ? z : Tensor.empty(gpu, [T, K], "f32", { label: "lora_dz" });
      matmul(dxa, lora.A, { layout: "NN", out: dz });
      loraDropout(dz, lora.dropout!, lora.seed!, { out: dx, accumulate: started });
      dz.destroy();
    }
  }
  if (z !== x && !z.destroyed) z.destroy();
  dxa.destroy();
  return { dx, dA, dB };
}

/** Options of {@link loraDropout}. */
export interface LoraDropoutOptions {
  /** f32 output of x's shape (created when absent). */
  out?: Tensor;
  /** Add into `out` instead of overwriting it. */
  accumulate?: boolean;
}

/**
 * out (+)= x ⊙ keep / (1 − p) with keep = the reference's `dropout_mask(seed, x.size, p)`.
 *
 * @param x x (f32, or f16 with shader-f16); the mask index is the flat element index
 * @param p drop probability in [0, 1)
 * @param seed u32 seed
 * @example
 * ```ts
 * const z = loraDropout(x, 0.1, seed); // f32, x's shape
 * ```
 */
export function loraDropout(x: Tensor, p: number, seed: number, options: LoraDropoutOptions = {}): Tensor {
  checkDropout(p, seed);
  const gpu = x.gpu;
  if (x.dtype !== "f32" && x.dtype !== "f16") {
    throw new TypeError(`Cannot apply dropout to "${x.label}": dtype ${x.dtype}`);
  }
  if (x.dtype === "f16" && !gpu.f16) {
    throw new TypeError(`Cannot apply dropout to f16 "${x.label}": this adapter has no shader-f16`);
  }
  if (options.accumulate && options.out === undefined) {
    throw new TypeError("Cannot accumulate dropout: `accumulate` needs an `out` tensor");
  }
  const out = options.out ?? Tensor.empty(gpu, x.shape, "f32", { label: `${x.label}_dropout` });
  if (out.dtype !== "f32" || out.shape.join() !== x.shape.join()) {
    throw new RangeError(
      `Cannot write dropout of "${x.label}" [${x.shape}] to "${out.label}" ${out.dtype}[${out.shape}]`,
    );
  }
  const kernel = getKernel(gpu, {
    name: "lora_dropout",
    params: { src: x.dtype },
    code: () => dropoutWgsl(x.dtype === "f16"),
    bindings: ["read", "write"],
    uniformBytes: DROPOUT_UNIFORM_BYTES,
    constants: { WG },
  });
  const u = new Uint32Array(DROPOUT_UNIFORM_BYTES / 4);
  u[4] = seed;
  u[5] = Math.floor(p * 4294967296);
  new Float32Array(u.buffer)[6] = 1 - p;
  u[7] = options.accumulate ? 1 : 0;
  const rec = recorder(gpu);
  const rowSize = x.rowSize;
  for (const pair of chunkPairs(x, out)) {
    const n = pair.rows * rowSize;
    u.set([n, pair.aOffset, pair.bOffset, pair.row * rowSize]);
    rec.dispatch(kernel, [pair.a, pair.b], u, grid(gpu, Math.ceil(n / WG)));
  }
  return out;
}

function dropoutWgsl(f16: boolean): string {
  const code = Deno.readTextFileSync(new URL("../wgsl/lora_dropout.wgsl", import.meta.url));
  if (!f16) return code;
  const line = "alias Src = f32;";
  if (!code.includes(line)) throw new Error(`Cannot specialise lora_dropout.wgsl: "${line}" is missing`);
  return `enable f16;\n${code.replace(line, "alias Src = f16;")}`;
}

/** A low-rank term the matmul can take: both operands whole (not split into row chunks). */
function fusable(term: { a: Tensor; b: Tensor }): boolean {
  return !term.a.chunked && !term.b.chunked;
}

/** z = dropout(x) as an f32 scratch, or x itself when p = 0. */
function dropoutInput(x: Tensor, lora: LoraWeights): Tensor {
  const p = lora.dropout ?? 0;
  if (p === 0) return x;
  return loraDropout(x, p, lora.seed!, {});
}

function checkDropout(p: number, seed: number | undefined): void {
  if (!(p >= 0 && p < 1)) throw new RangeError(`Cannot apply LoRA dropout: p "${p}" is not in [0, 1)`);
  if (seed === undefined || !Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
    throw new RangeError(`Cannot apply LoRA dropout: seed "${seed}" must be an integer in [0, 2³²)`);
  }
}

function dims(x: Tensor, W: Tensor | null, lora: LoraWeights, what: string) {
  const { A, B } = lora;
  const fail = (why: string): never => {
    throw new RangeError(
      `Cannot run the LoRA ${what} on x "${x.label}" [${x.shape}] with lora_A [${A.shape}], lora_B [${B.shape}]: ${why}`,
    );
  };
  if (x.shape.length !== 2) fail("x must be [T,K]");
  if (A.shape.length !== 2 || B.shape.length !== 2) fail("lora_A must be [r,K] and lora_B [N,r]");
  const [T, K] = x.shape;
  const [r, KA] = A.shape;
  const [N, rB] = B.shape;
  if (KA !== K) fail(`lora_A has ${KA} in features, x has ${K}`);
  if (rB !== r) fail(`the ranks differ (${r} vs ${rB})`);
  if (W !== null && (W.shape.length !== 2 || W.shape[0] !== N || W.shape[1] !== K)) {
    fail(`W [${W.shape}] must be [${N},${K}]`);
  }
  if (A.dtype !== "f32" || B.dtype !== "f32") fail("lora_A and lora_B must be f32");
  if (!Number.isFinite(lora.scaling)) fail(`scaling "${lora.scaling}" must be finite`);
  if ((lora.dropout ?? 0) !== 0) checkDropout(lora.dropout!, lora.seed);
  return { T, K, N, r };
}
