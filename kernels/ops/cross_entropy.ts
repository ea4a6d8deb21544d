/**
 * Cross-entropy fused with the lm_head, chunked over the vocabulary: logits[T,V] are never held
 * at once, only a [T,Vc] f32 scratch for one chunk of Vc vocabulary rows.
 *
 * T = tokens, D = hidden, V = vocab, Vc = vocabulary rows per chunk, N = normaliser.
 *
 * Forward, per chunk [v0, v0 + Vc):   z[T,Vc] = h[T,D] · W[v0:v0+Vc, D]ᵀ   (matmul NT)
 *   then `cross_entropy_stats` merges the chunk into each token's running (max, Σ e^(z − max),
 *   argmax) and picks the target's logit; `cross_entropy_finish` writes lse[T],
 *   loss = Σ_{t trained} (lse[t] − z[t, y[t]]) / N and the count of trained tokens whose
 *   argmax_v z[t, v] (lowest index on ties, as torch.argmax) is y[t]: the numerator of trl's
 *   `mean_token_accuracy`, read back with the loss.
 * Backward, per chunk (logits recomputed):   dz = dloss/N · (softmax − onehot(y)) on trained tokens,
 *   0 on ignored ones (`cross_entropy_grad`, in place), then dh[T,D] += dz[T,Vc] · W[v0:v0+Vc, D]
 *   (matmul NN).
 * Targets are already shifted (y[t] is the token after t); -100 marks a token that is not trained.
 * Sequence objectives (DPO): `keepState` hands back the per-token state, from which
 * logp[t] = z[t, y[t]] − lse[t] is read on the host, and the backward's `weights` w[T] replace
 * dloss / N per token (dz = w[t]·(softmax − onehot(y))).
 * N is the number of trained tokens of the whole optimizer step, so the losses of its
 * micro-batches add up to the step's mean loss (`accumulateLoss`), as transformers'
 * `num_items_in_batch`.
 *
 * W (f32 or f16) may be split into row chunks. Vocabulary chunks never straddle them: each W
 * chunk is cut into chunks of at most Vc rows, and the two products are `matmul` calls that
 * read W's rows v0..v0+Vc in place (`bRows`, within one W chunk), so W is never copied. They
 * take the adapter's tuned tile like any product (every tile gives the same bits) and, on
 * GPUs, split K where `matmul` does (dh = dz·W of a micro-batch of few tokens and a long
 * chunk), its partial sums (at most 64 MiB) alive only while the product runs. The forward
 * and the backward compute each chunk's logits with the same call, so the same bits.
 * The running state[T,4] (16 bytes a token) is split into row chunks only past the storage binding
 * limit; the two state kernels then run once per chunk with its first token in a uniform, the
 * later chunks adding into loss and count (one chunk: one dispatch each, the loss summed in one
 * tree). targets[T] and lse[T] must fit one binding.
 * This file is the only place the loss kernels' workgroup sizes are written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel, type Kernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { grid } from "./_grid.ts";
import { matmul } from "./matmul.ts";

/** Targets equal to this are not trained (PyTorch's ignore_index). */
export const IGNORE_INDEX = -100;

/** Invocations per workgroup of the three kernels (a power of two). */
const WG = 256;
/** Bytes of the chunk's [T,Vc] f32 logits unless the caller sets `scratchBytes`. */
const DEFAULT_SCRATCH_BYTES = 64 * 1024 * 1024;
/** Largest automatic chunk, and the multiple an automatic chunk is rounded down to. */
const MAX_CHUNK = 32768;
const CHUNK_MULTIPLE = 256;

/** Options shared by {@link crossEntropyForward} and {@link crossEntropyBackward}. */
export interface CrossEntropyOptions {
  /** N > 0: the summed loss is divided by N (trained tokens of the whole accumulated batch). */
  n: number;
  /** Vc: vocabulary rows per chunk (default: the largest that fits `scratchBytes`, at most 32768). */
  chunk?: number;
  /** Bytes the chunk's logits may take when `chunk` is not given (default 64 MiB). */
  scratchBytes?: number;
}

/** Options of {@link crossEntropyForward}. */
export interface CrossEntropyForwardOptions extends CrossEntropyOptions {
  /** loss[1] f32 to write (created when absent). */
  loss?: Tensor;
  /** Add this call's loss to `loss` instead of overwriting it (micro-batches of one step). */
  accumulateLoss?: boolean;
  /** lse[T] f32 to write (created when absent). */
  lse?: Tensor;
  /**
   * correct[1] u32 to write (created when absent): trained tokens whose argmax logit is the
   * target. With `accumulateLoss` the count is added to it too.
   */
  correct?: Tensor;
  /**
   * Hand back the per-token state[T,4] (m, s, z_target, argmax as u32 bits; f32 rows of 16
   * bytes) instead of freeing it: lse = m + log s, logp = z_target − lse for trained tokens.
   */
  keepState?: boolean;
}

/** What {@link crossEntropyForward} returns. */
export interface CrossEntropyForwardResult {
  /** loss[1] f32: Σ over trained tokens of −log softmax(h·Wᵀ)[y] / N. */
  loss: Tensor;
  /** lse[T] f32: log Σ_v e^(h_t·W_v), kept for the backward. */
  lse: Tensor;
  /** correct[1] u32: Σ over trained tokens of [argmax_v h_t·W_v = y[t]] (ties: the lowest v). */
  correct: Tensor;
  /** With `keepState`: state[T,4] (see the option); the caller destroys it. */
  state?: Tensor;
}

/** Options of {@link crossEntropyBackward}. */
export interface CrossEntropyBackwardOptions extends CrossEntropyOptions {
  /** dh[T,D] to write (created as f32 when absent). */
  dh?: Tensor;
  /** Add into `dh` instead of overwriting it. */
  accumulate?: boolean;
  /** Upstream gradient of the loss (default 1). */
  dloss?: number;
  /** w[T] f32: per-token weights multiplying dloss / N (a sequence objective's ∂loss/∂(−logp[t])). */
  weights?: Tensor;
}

interface Problem {
  gpu: Gpu;
  T: number;
  D: number;
  V: number;
  chunk: number;
}

/**
 * The loss of logits = h·Wᵀ against `targets`, a chunk of the vocabulary at a time.
 *
 * @param h hidden[T,D] after the final norm (f32 or f16)
 * @param W lm_head W[V,D] (f32 or f16; may be split into row chunks)
 * @param targets y[T] i32, -100 for tokens that are not trained
 * @example
 * ```ts
 * const { loss, lse, correct } = crossEntropyForward(h, lmHead, targets, { n: trainedTokens });
 * const dh = crossEntropyBackward(h, lmHead, targets, lse, { n: trainedTokens });
 * const [[value], [hits]] = await readTensors([loss, correct]); // one readback
 * ```
 */
export function crossEntropyForward(
  h: Tensor,
  W: Tensor,
  targets: Tensor,
  options: CrossEntropyForwardOptions,
): CrossEntropyForwardResult {
  const p = prepare(h, W, targets, options, "forward");
  const { gpu, T, V } = p;
  if (options.accumulateLoss && options.loss === undefined) {
    throw new TypeError("Cannot accumulate the cross-entropy loss: `accumulateLoss` needs a `loss` tensor");
  }
  const loss = options.loss ?? Tensor.empty(gpu, [1], "f32", { label: "ce_loss" });
  checkOut(loss, [1], "loss");
  const lse = options.lse ?? Tensor.empty(gpu, [T], "f32", { label: "ce_lse" });
  checkOut(lse, [T], "lse");
  const correct = options.correct ?? Tensor.empty(gpu, [1], "u32", { label: "ce_correct" });
  if (correct.dtype !== "u32" || correct.shape.join() !== "1") {
    throw new RangeError(
      `Cannot write correct "${correct.label}" ${correct.dtype}[${correct.shape}]: u32 [1] expected`,
    );
  }
  // A count created here starts from zero even when the loss accumulates.
  const accumulateCount = (options.accumulateLoss ?? false) && options.correct !== undefined;
  if (T === 0) {
    if (!options.accumulateLoss) recorder(gpu).clearBuffer(loss.buffer, 0, 4);
    if (!accumulateCount) recorder(gpu).clearBuffer(correct.buffer, 0, 4);
    return { loss, lse, correct, ...(options.keepState ? { state: Tensor.empty(gpu, [0, 4], "f32") } : {}) };
  }
  const rec = recorder(gpu);
  const stats = kernel(gpu, "cross_entropy_stats", ["read", "read", "write"], 20);
  // Per token (m, s, z_target, argmax): three f32 and a u32, 16 bytes, never read on the host.
  // Split into row chunks only past the binding limit; each chunk is its own dispatch.
  const state = Tensor.empty(gpu, [T, 4], "f32", { label: "ce_state" });
  for (const { v0, C } of vocabularyChunks(W, p.chunk)) {
    const z = logits(p, h, W, v0, C, "ce_logits");
    for (const part of state.chunks) {
      rec.dispatch(
        stats,
        [z.buffer, targets.buffer, part.buffer],
        new Uint32Array([part.rows, C, v0, v0 === 0 ? 1 : 0, part.rowStart]),
        grid(gpu, part.rows),
      );
    }
    z.destroy();
  }
  const finish = kernel(gpu, "cross_entropy_finish", ["read", "read", "write", "write", "write"], 20);
  const accumulate = (options.accumulateLoss ? 1 : 0) | (accumulateCount ? 2 : 0);
  for (const [i, part] of state.chunks.entries()) {
    const u = new Uint32Array(5);
    u[0] = part.rows;
    u[1] = V;
    new Float32Array(u.buffer)[2] = options.n;
    // Later state chunks add to what the first wrote.
    u[3] = i === 0 ? accumulate : 3;
    u[4] = part.rowStart;
    rec.dispatch(finish, [part.buffer, targets.buffer, lse.buffer, loss.buffer, correct.buffer], u, [1]);
  }
  if (options.keepState) return { loss, lse, correct, state };
  state.destroy();
  return { loss, lse, correct };
}

/**
 * dh of {@link crossEntropyForward}, recomputing each chunk's logits. Tokens with target -100
 * get a zero gradient.
 *
 * @param h hidden[T,D]
 * @param W lm_head W[V,D]
 * @param targets y[T] i32
 * @param lse lse[T] from the forward
 * @returns dh[T,D]
 */
export function crossEntropyBackward(
  h: Tensor,
  W: Tensor,
  targets: Tensor,
  lse: Tensor,
  options: CrossEntropyBackwardOptions,
): Tensor {
  const p = prepare(h, W, targets, options, "backward");
  const { gpu, T, D } = p;
  checkOut(lse, [T], "lse");
  if (options.accumulate && options.dh === undefined) {
    throw new TypeError("Cannot accumulate the cross-entropy gradient: `accumulate` needs a `dh` tensor");
  }
  const dh = options.dh ?? Tensor.empty(gpu, [T, D], "f32", { label: "ce_dh" });
  if (dh.shape.join() !== `${T},${D}` || (dh.dtype !== "f32" && dh.dtype !== "f16")) {
    throw new RangeError(
      `Cannot write dh "${dh.label}" ${dh.dtype}[${dh.shape}]: f32 or f16 [${T},${D}] expected`,
    );
  }
  const weights = options.weights;
  if (weights !== undefined && (weights.dtype !== "f32" || weights.shape.join() !== `${T}`)) {
    throw new RangeError(
      `Cannot weight the cross-entropy gradient: weights "${weights.label}" ` +
        `${weights.dtype}[${weights.shape}] is not f32 [${T}]`,
    );
  }
  if (T === 0) return dh;
  const rec = recorder(gpu);
  const grad = kernel(gpu, "cross_entropy_grad", ["write", "read", "read", "read"], 20);
  const u = new Uint32Array(5);
  u[4] = weights ? 1 : 0;
  const scale = (options.dloss ?? 1) / options.n;
  // dh = Σ over chunks of dz·W[v0:v0+C]: a product per chunk, added in vocabulary order.
  for (const { v0, C } of vocabularyChunks(W, p.chunk)) {
    const z = logits(p, h, W, v0, C, "ce_dlogits");
    u.set([T, C, v0]);
    new Float32Array(u.buffer)[3] = scale;
    // Unweighted, lse stands in for the weights binding (never read).
    const w = weights ?? lse;
    rec.dispatch(
      grad,
      [z.buffer, targets.buffer, lse.buffer, w.buffer],
      u,
      grid(gpu, Math.ceil((T * C) / WG)),
    );
    // dh[T,D] (+)= dz[T,C] · W[v0:v0+C, D]
    const accumulate = (options.accumulate ?? false) || v0 > 0;
    matmul(z, W, { layout: "NN", bRows: { start: v0, count: C }, out: dh, accumulate });
    z.destroy();
  }
  return dh;
}

/**
 * Vc for the product h[T,D]·W[V,D]ᵀ: `chunk` when given; else all of V when the [T,V] f32
 * logits fit `scratchBytes`, or the largest multiple of 256 (at most 32768) whose [T,Vc] f32
 * logits fit it. Never more rows than one storage binding holds for T tokens. The chunks
 * actually run are cut further at W's row-chunk boundaries.
 *
 * @example
 * ```ts
 * crossEntropyChunk(h, W, { scratchBytes: 2 ** 26 }); // 4096 for T = 4096
 * ```
 */
export function crossEntropyChunk(
  h: Tensor,
  W: Tensor,
  options: { chunk?: number; scratchBytes?: number } = {},
): number {
  const gpu = h.gpu;
  const T = Math.max(1, h.rows);
  const V = W.rows;
  const bindRows = Math.floor(gpu.maxBindingBytes / (4 * T));
  if (bindRows === 0) {
    throw new RangeError(
      `Cannot chunk the vocabulary for ${T} tokens: one logits column of ${4 * T} bytes exceeds the ` +
        `storage binding limit of ${gpu.maxBindingBytes} bytes`,
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
    if (4 * T * V <= budget) {
      chunk = V;
    } else {
      chunk = Math.min(Math.floor(budget / (4 * T)), MAX_CHUNK);
      chunk = Math.max(CHUNK_MULTIPLE, Math.floor(chunk / CHUNK_MULTIPLE) * CHUNK_MULTIPLE);
    }
  }
  return Math.min(chunk, V, bindRows);
}

function prepare(
  h: Tensor,
  W: Tensor,
  targets: Tensor,
  options: CrossEntropyOptions,
  what: string,
): Problem {
  const fail = (why: string): never => {
    throw new RangeError(
      `Cannot run the cross-entropy ${what} on h "${h.label}" [${h.shape}], W "${W.label}" [${W.shape}]: ${why}`,
    );
  };
  if (h.shape.length !== 2) fail("h must be [T,D]");
  if (W.shape.length !== 2) fail("W must be [V,D]");
  const [T, D] = h.shape;
  const V = W.shape[0];
  if (W.shape[1] !== D) fail(`the hidden sizes differ (${D} vs ${W.shape[1]})`);
  if (V === 0) fail("the vocabulary is empty");
  for (const t of [h, W]) {
    if (t.dtype !== "f32" && t.dtype !== "f16") {
      fail(`"${t.label}" has dtype ${t.dtype}; f32 or f16 expected`);
    }
    if (t.dtype === "f16" && !h.gpu.f16) fail(`"${t.label}" is f16 but this adapter has no shader-f16`);
  }
  if (targets.dtype !== "i32" || targets.shape.join() !== `${T}`) {
    fail(`targets "${targets.label}" is ${targets.dtype}[${targets.shape}]; i32 [${T}] expected`);
  }
  if (!(options.n > 0)) fail(`the normaliser N "${options.n}" must be positive`);
  const chunk = crossEntropyChunk(h, W, options);
  return { gpu: h.gpu, T, D, V, chunk };
}

function checkOut(t: Tensor, shape: number[], what: string): void {
  if (t.dtype !== "f32" || t.shape.join() !== shape.join()) {
    throw new RangeError(`Cannot write ${what} "${t.label}" ${t.dtype}[${t.shape}]: f32 [${shape}] expected`);
  }
}

function kernel(gpu: Gpu, name: string, bindings: ("read" | "write")[], uniformBytes: number): Kernel {
  return getKernel(gpu, {
    name,
    code: () => Deno.readTextFileSync(new URL(`../wgsl/${name}.wgsl`, import.meta.url)),
    bindings,
    uniformBytes,
    constants: { WG },
  });
}

/** One vocabulary chunk: rows [v0, v0 + C) of W, all inside one row chunk of W. */
interface VocabularyChunk {
  v0: number;
  C: number;
}

/** W's rows in chunks of at most `chunk`, cut at every row-chunk boundary of W. */
function* vocabularyChunks(W: Tensor, chunk: number): Generator<VocabularyChunk> {
  for (const wChunk of W.chunks) {
    const end = wChunk.rowStart + wChunk.rows;
    for (let v0 = wChunk.rowStart; v0 < end; v0 += chunk) yield { v0, C: Math.min(chunk, end - v0) };
  }
}

/** z[T,C] f32 = h[T,D] · W[v0:v0+C, D]ᵀ, with W's rows read in place from their chunk. */
function logits(p: Problem, h: Tensor, W: Tensor, v0: number, C: number, label: string): Tensor {
  const z = Tensor.empty(p.gpu, [p.T, C], "f32", { label });
  return matmul(h, W, { layout: "NT", bRows: { start: v0, count: C }, out: z });
}

/**
 * dz[T,C] f32 of one vocabulary chunk [v0, v0 + C), exactly as {@link crossEntropyBackward}
 * computes it before its dh product (the same `matmul` call and the same `cross_entropy_grad`
 * dispatch, so the same bits): z = h·W[v0:v0+C, D]ᵀ, then in place
 * dz[t,c] = scale·(e^(z[t,c] − lse[t]) − [v0 + c = y[t]]) on trained tokens (scale·w[t] with
 * `weights`), 0 on ignored ones. For ops built on the same pass, such as the lm_head's weight
 * gradient (`kernels/ops/lm_head_grad.ts`); they check the shapes and destroy dz.
 *
 * @param h hidden[T,D] (f32 or f16)
 * @param W lm_head W[V,D] (f32 or f16); rows [v0, v0 + C) must lie within one of its row chunks
 * @param targets y[T] i32, -100 for tokens that are not trained
 * @param lse lse[T] f32 from {@link crossEntropyForward}
 * @param scale dloss / N, as crossEntropyBackward computes it
 * @param weights w[T] f32 per-token weights, or undefined
 * @returns dz[T,C] f32 (T ≥ 1, C ≥ 1)
 * @example
 * ```ts
 * const dz = crossEntropyChunkGrad(h, W, targets, lse, v0, C, 1 / n);
 * matmul(dz, h, { layout: "TN", out: dWChunk }); // dW[v0:v0+C, D] = dzᵀ·h
 * dz.destroy();
 * ```
 */
export function crossEntropyChunkGrad(
  h: Tensor,
  W: Tensor,
  targets: Tensor,
  lse: Tensor,
  v0: number,
  C: number,
  scale: number,
  weights?: Tensor,
): Tensor {
  const gpu = h.gpu;
  const [T, D] = h.shape;
  const z = logits({ gpu, T, D, V: W.rows, chunk: C }, h, W, v0, C, "ce_dlogits");
  const grad = kernel(gpu, "cross_entropy_grad", ["write", "read", "read", "read"], 20);
  const u = new Uint32Array(5);
  u[4] = weights ? 1 : 0;
  u.set([T, C, v0]);
  new Float32Array(u.buffer)[3] = scale;
  // Unweighted, lse stands in for the weights binding (never read).
  const w = weights ?? lse;
  recorder(gpu).dispatch(
    grad,
    [z.buffer, targets.buffer, lse.buffer, w.buffer],
    u,
    grid(gpu, Math.ceil((T * C) / WG)),
  );
  return z;
}
