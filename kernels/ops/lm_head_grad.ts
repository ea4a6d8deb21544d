/**
 * The weight gradient of the lm_head fused with cross-entropy (full fine-tuning trains the
 * lm_head, or the tied embedding table), chunked over the vocabulary like the loss: neither the
 * [T,V] logits nor their gradient is ever held at once.
 *
 * T = tokens, D = hidden, V = vocab, C = vocabulary rows per chunk, N = normaliser.
 *
 *   dW[v,:] += Σ_{t trained} g[t]·(softmax(x_t·Wᵀ)[v] − [v = y[t]])·x_t        dW[V,D] f32
 *   g[t] = dloss / N, or dloss / N · w[t] with per-token weights (a sequence objective's, DPO)
 * Tokens with y[t] = -100 add nothing. Per chunk [v0, v0 + C), with lse[T] from the forward:
 *   dz[T,C]   = g·(e^(x·W[v0:v0+C]ᵀ − lse) − onehot(y))   `crossEntropyChunkGrad`: the same
 *               matmul and `cross_entropy_grad` dispatch as crossEntropyBackward, so the same bits
 *   part[C,D] = dzᵀ · x                                   matmul TN, f32
 *   dW[v0:v0+C, :] += part                                kernels/wgsl/lm_head_dw.wgsl
 * and, with `dh`, dh[T,D] (+)= dz · W[v0:v0+C, :] (matmul NN), the input gradient from the same
 * dz: crossEntropyBackward's result bit for bit when the chunks are the same, without a second
 * pass over the vocabulary.
 * Chunks never straddle a row chunk of W or of dW. The sum over tokens is inside the matmul and
 * the chunks write disjoint rows of dW: deterministic, no atomics. The CPU reference is
 * kernels/reference/cross_entropy.ts `lm_head_cross_entropy_backward(..., wantDW = true)`.
 * This file is the only place the add kernel's workgroup size and the chunk budget are written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { grid } from "./_grid.ts";
import { crossEntropyChunkGrad } from "./cross_entropy.ts";
import { matmul } from "./matmul.ts";

/** Invocations per workgroup of `lm_head_dw`. */
const WG = 256;
/** Bytes the chunk's dz[T,C] and part[C,D] (both f32) may take together unless `scratchBytes` is set. */
const DEFAULT_SCRATCH_BYTES = 32 * 1024 * 1024;
/** Largest automatic chunk, and the multiple an automatic chunk is rounded down to. */
const MAX_CHUNK = 32768;
const CHUNK_MULTIPLE = 256;

/** Options of {@link lmHeadWeightGrad}. */
export interface LmHeadWeightGradOptions {
  /** dW[V,D] f32: the lm_head's (or the tied embedding table's) gradient, added to (`+=`). */
  dW: Tensor;
  /** N > 0: the normaliser of the forward's loss (trained tokens of the whole accumulated batch). */
  n: number;
  /** Upstream gradient of the loss (default 1). */
  dloss?: number;
  /** w[T] f32: per-token weights multiplying dloss / N, as crossEntropyBackward's `weights`. */
  weights?: Tensor;
  /** C: vocabulary rows per chunk (default: {@link lmHeadWeightGradChunk}). */
  chunk?: number;
  /** Bytes dz[T,C] and part[C,D] may take together when `chunk` is not given (default 32 MiB). */
  scratchBytes?: number;
  /** dh[T,D] (f32 or f16): also write the input gradient from the same dz (see the module doc). */
  dh?: Tensor;
  /** Add into `dh` instead of overwriting it. */
  accumulateDh?: boolean;
}

/**
 * Adds the lm_head's weight gradient of the fused cross-entropy to `dW`, a chunk of the
 * vocabulary at a time (see the module doc for the math):
 *   dW[V,D] += Σ_{t: y[t] ≠ -100} g[t]·(softmax(x_t·Wᵀ) − onehot(y[t]))ᵀ·x_t
 * with g[t] = dloss / N (SFT's mean loss) or dloss / N · w[t] (`weights`). `lse` is the one
 * crossEntropyForward wrote for the same x, W and targets.
 *
 * @param x hidden[T,D] after the final norm (f32 or f16)
 * @param W lm_head W[V,D] (f32 or f16; may be split into row chunks)
 * @param targets y[T] i32, -100 for tokens that are not trained
 * @param lse lse[T] f32 from the forward
 * @returns options.dW
 * @example
 * ```ts
 * const { loss, lse } = crossEntropyForward(x, lmHead, targets, { n: trainedTokens });
 * const dx = crossEntropyBackward(x, lmHead, targets, lse, { n: trainedTokens });
 * lmHeadWeightGrad(x, lmHead, targets, lse, { dW: lmHeadGrad, n: trainedTokens });
 * // or both gradients in one pass over the vocabulary:
 * const dh = Tensor.empty(gpu, [T, D], "f32");
 * lmHeadWeightGrad(x, lmHead, targets, lse, { dW: lmHeadGrad, n: trainedTokens, dh });
 * ```
 */
export function lmHeadWeightGrad(
  x: Tensor,
  W: Tensor,
  targets: Tensor,
  lse: Tensor,
  options: LmHeadWeightGradOptions,
): Tensor {
  const { gpu, T, D } = check(x, W, targets, lse, options);
  const { dW, dh, weights } = options;
  if (T === 0) return dW; // nothing to add; a dh[0,D] holds nothing
  const chunk = lmHeadWeightGradChunk(x, W, options);
  const scale = (options.dloss ?? 1) / options.n;
  const add = getKernel(gpu, {
    name: "lm_head_dw",
    code: () => Deno.readTextFileSync(new URL("../wgsl/lm_head_dw.wgsl", import.meta.url)),
    bindings: ["read", "write"],
    uniformBytes: 8,
    constants: { WG },
  });
  const rec = recorder(gpu);
  for (const { v0, C } of chunksOf(W, dW, chunk)) {
    // dz[T,C] f32
    const dz = crossEntropyChunkGrad(x, W, targets, lse, v0, C, scale, weights);
    if (dh !== undefined) {
      // dh[T,D] (+)= dz[T,C] · W[v0:v0+C, D], as crossEntropyBackward
      const accumulate = (options.accumulateDh ?? false) || v0 > 0;
      matmul(dz, W, { layout: "NN", bRows: { start: v0, count: C }, out: dh, accumulate });
    }
    // part[C,D] = dz[T,C]ᵀ · x[T,D]
    const part = matmul(dz, x, {
      layout: "TN",
      out: Tensor.empty(gpu, [C, D], "f32", { label: "lm_head_dw_part" }),
    });
    // dW[v0:v0+C, D] += part[C,D], in the row chunk of dW that holds the range
    const c = dW.chunks.find((c) => v0 >= c.rowStart && v0 < c.rowStart + c.rows)!;
    rec.dispatch(
      add,
      [part.buffer, c.buffer],
      new Uint32Array([C * D, (v0 - c.rowStart) * D]),
      grid(gpu, Math.ceil((C * D) / WG)),
    );
    dz.destroy(); // back to the pool; the recorded commands run first
    part.destroy();
  }
  return dW;
}

/**
 * C for {@link lmHeadWeightGrad}: `chunk` when given; else all of V when dz[T,V] and part[V,D]
 * (f32) fit `scratchBytes` together (default 32 MiB), or the largest multiple of 256 (at least
 * 256, at most 32768) whose dz[T,C] and part[C,D] fit it. Never more rows than one storage
 * binding holds of dz or of part. The chunks actually run are cut further at the row-chunk
 * boundaries of W and dW.
 *
 * @param x hidden[T,D]
 * @param W lm_head W[V,D]
 * @example
 * ```ts
 * lmHeadWeightGradChunk(x, W); // 2048 for T = 2048, D = 2048 (32 MiB of scratch)
 * ```
 */
export function lmHeadWeightGradChunk(
  x: Tensor,
  W: Tensor,
  options: { chunk?: number; scratchBytes?: number } = {},
): number {
  const gpu = x.gpu;
  const T = Math.max(1, x.rows);
  const D = W.shape[1];
  const V = W.rows;
  const bindRows = Math.min(
    Math.floor(gpu.maxBindingBytes / (4 * T)),
    Math.floor(gpu.maxBindingBytes / (4 * D)),
  );
  if (bindRows === 0) {
    throw new RangeError(
      `Cannot chunk the vocabulary for ${T} tokens and hidden size ${D}: one row of the f32 scratch ` +
        `(${4 * Math.max(T, D)} bytes) exceeds the storage binding limit of ${gpu.maxBindingBytes} bytes`,
    );
  }
  let chunk: number;
  if (options.chunk !== undefined) {
    if (!Number.isInteger(options.chunk) || options.chunk <= 0) {
      throw new RangeError(
        `Cannot chunk the vocabulary: chunk "${options.chunk}" must be a positive integer`,
      );
    }
    chunk = options.chunk;
  } else {
    const budget = options.scratchBytes ?? DEFAULT_SCRATCH_BYTES;
    const rowBytes = 4 * (T + D);
    if (rowBytes * V <= budget) {
      chunk = V;
    } else {
      chunk = Math.min(Math.floor(budget / rowBytes), MAX_CHUNK);
      chunk = Math.max(CHUNK_MULTIPLE, Math.floor(chunk / CHUNK_MULTIPLE) * CHUNK_MULTIPLE);
    }
  }
  return Math.min(chunk, V, bindRows);
}

/** Checks the operands; T, D and the device. */
function check(
  x: Tensor,
  W: Tensor,
  targets: Tensor,
  lse: Tensor,
  options: LmHeadWeightGradOptions,
): { gpu: Gpu; T: number; D: number } {
  const fail = (why: string): never => {
    throw new RangeError(
      `Cannot compute the lm_head weight gradient of x "${x.label}" [${x.shape}] and W "${W.label}" ` +
        `[${W.shape}]: ${why}`,
    );
  };
  const gpu = x.gpu;
  if (x.shape.length !== 2) fail("x must be [T,D]");
  if (W.shape.length !== 2) fail("W must be [V,D]");
  const [T, D] = x.shape;
  const V = W.shape[0];
  if (W.shape[1] !== D) fail(`the hidden sizes differ (${D} vs ${W.shape[1]})`);
  if (V === 0) fail("the vocabulary is empty");
  for (const t of [x, W]) {
    if (t.gpu !== gpu) fail(`"${t.label}" belongs to another device`);
    if (t.dtype !== "f32" && t.dtype !== "f16") {
      fail(`"${t.label}" has dtype ${t.dtype}; f32 or f16 expected`);
    }
    if (t.dtype === "f16" && !gpu.f16) fail(`"${t.label}" is f16 but this adapter has no shader-f16`);
  }
  const expect = (t: Tensor | undefined, name: string, dtype: string, shape: number[]) => {
    if (t === undefined) return;
    if (t.gpu !== gpu) fail(`${name} "${t.label}" belongs to another device`);
    if (t.dtype !== dtype || t.shape.join() !== shape.join()) {
      fail(`${name} "${t.label}" is ${t.dtype}[${t.shape}]; ${dtype} [${shape}] expected`);
    }
  };
  if (options.dW === undefined) fail("the dW tensor to add to is missing");
  expect(targets, "targets", "i32", [T]);
  expect(lse, "lse", "f32", [T]);
  expect(options.weights, "weights", "f32", [T]);
  expect(options.dW, "dW", "f32", [V, D]);
  const dh = options.dh;
  if (dh !== undefined) {
    expect(dh, "dh", dh.dtype === "f16" ? "f16" : "f32", [T, D]);
    if (dh.dtype === "f16" && !gpu.f16) fail(`dh "${dh.label}" is f16 but this adapter has no shader-f16`);
  }
  if (!(options.n > 0)) fail(`the normaliser N "${options.n}" must be positive`);
  if (options.dloss !== undefined && !Number.isFinite(options.dloss)) {
    fail(`the upstream gradient dloss "${options.dloss}" must be finite`);
  }
  return { gpu, T, D };
}

/** One vocabulary chunk: rows [v0, v0 + C), inside one row chunk of W and one of dW. */
interface VocabularyChunk {
  v0: number;
  C: number;
}

/** Rows of W and dW in chunks of at most `chunk`, cut at every row-chunk boundary of either. */
function* chunksOf(W: Tensor, dW: Tensor, chunk: number): Generator<VocabularyChunk> {
  const cuts = [...new Set([...W.chunks, ...dW.chunks].map((c) => c.rowStart).concat(W.rows))]
    .sort((a, b) => a - b);
  for (let i = 0; i + 1 < cuts.length; i++) {
    const end = cuts[i + 1];
    for (let v0 = cuts[i]; v0 < end; v0 += chunk) yield { v0, C: Math.min(chunk, end - v0) };
  }
}
