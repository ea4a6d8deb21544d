/**
 * Cross-entropy fused with the lm_head, chunked over the vocabulary: logits[T,V] are never held
 * at once, only a [T,Vc] f32 scratch for one chunk of Vc vocabulary rows.
 *
 * T = tokens, D = hidden, V = vocab, Vc = vocabulary rows per chunk, N = normaliser.
 *
 * Forward, per chunk [v0, v0 + Vc):   z[T,Vc] = h[T,D] · W[v0:v0+Vc, D]ᵀ   (matmul NT)
 *   then `cross_entropy_stats` merges the chunk into each token's running (max, Σ e^(z − max))
 *   and picks the target's logit; `cross_entropy_finish` writes lse[T] and
 *   loss = Σ_{t trained} (lse[t] − z[t, y[t]]) / N.
 * Backward, per chunk (logits recomputed):   dz = dloss/N · (softmax − onehot(y)) on trained tokens,
 *   0 on ignored ones (`cross_entropy_grad`, in place), then dh[T,D] += dz[T,Vc] · W[v0:v0+Vc, D]
 *   (matmul NN).
 * Targets are already shifted (y[t] is the token after t); -100 marks a token that is not trained.
 * N is the number of trained tokens of the whole optimizer step, so the losses of its
 * micro-batches add up to the step's mean loss (`accumulateLoss`), as transformers'
 * `num_items_in_batch`.
 *
 * W (f32 or f16) may be split into row chunks. When a vocabulary chunk is not all of W, its rows
 * are copied into a [Vc,D] scratch in W's dtype before the products (the matmul takes whole
 * tensors); that copy is Vc·D elements against the T·Vc·D multiply-adds of the product.
 * This file is the only place these kernels' workgroup sizes are written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel, type Kernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { DTYPE_BYTES, Tensor } from "../tensor.ts";
import { grid } from "./_grid.ts";
import { matmul } from "./matmul.ts";

/** Targets equal to this are not trained (PyTorch's ignore_index). */
export const IGNORE_INDEX = -100;

/** Invocations per workgroup of the three kernels (a power of two). */
const WG = 256;
/** Bytes of the chunk scratch (logits, and copied W rows) unless the caller sets `scratchBytes`. */
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
  /** Bytes the chunk scratch may take when `chunk` is not given (default 64 MiB). */
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
}

/** What {@link crossEntropyForward} returns. */
export interface CrossEntropyForwardResult {
  /** loss[1] f32: Σ over trained tokens of −log softmax(h·Wᵀ)[y] / N. */
  loss: Tensor;
  /** lse[T] f32: log Σ_v e^(h_t·W_v), kept for the backward. */
  lse: Tensor;
}

/** Options of {@link crossEntropyBackward}. */
export interface CrossEntropyBackwardOptions extends CrossEntropyOptions {
  /** dh[T,D] to write (created as f32 when absent). */
  dh?: Tensor;
  /** Add into `dh` instead of overwriting it. */
  accumulate?: boolean;
  /** Upstream gradient of the loss (default 1). */
  dloss?: number;
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
 * const { loss, lse } = crossEntropyForward(h, lmHead, targets, { n: trainedTokens });
 * const dh = crossEntropyBackward(h, lmHead, targets, lse, { n: trainedTokens });
 * const [value] = await loss.readF32();
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
  if (T === 0) {
    if (!options.accumulateLoss) recorder(gpu).clearBuffer(loss.buffer, 0, 4);
    return { loss, lse };
  }
  const rec = recorder(gpu);
  const stats = kernel(gpu, "cross_entropy_stats", ["read", "read", "write"]);
  const state = Tensor.empty(gpu, [T, 4], "f32", { label: "ce_state" });
  for (let v0 = 0; v0 < V; v0 += p.chunk) {
    const C = Math.min(p.chunk, V - v0);
    const rows = weightRows(W, v0, C);
    const z = matmul(h, rows, { layout: "NT", outDtype: "f32", label: "ce_logits" });
    rec.dispatch(
      stats,
      [z.buffer, targets.buffer, state.buffer],
      new Uint32Array([T, C, v0, v0 === 0 ? 1 : 0]),
      grid(gpu, T),
    );
    z.destroy();
    if (rows !== W) rows.destroy();
  }
  const finish = kernel(gpu, "cross_entropy_finish", ["read", "read", "write", "write"]);
  const u = new Uint32Array(4);
  u[0] = T;
  u[1] = V;
  new Float32Array(u.buffer)[2] = options.n;
  u[3] = options.accumulateLoss ? 1 : 0;
  rec.dispatch(finish, [state.buffer, targets.buffer, lse.buffer, loss.buffer], u, [1]);
  state.destroy();
  return { loss, lse };
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
  const { gpu, T, D, V } = p;
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
  if (T === 0) return dh;
  const rec = recorder(gpu);
  const grad = kernel(gpu, "cross_entropy_grad", ["write", "read", "read"]);
  const u = new Uint32Array(4);
  const scale = (options.dloss ?? 1) / options.n;
  for (let v0 = 0; v0 < V; v0 += p.chunk) {
    const C = Math.min(p.chunk, V - v0);
    const rows = weightRows(W, v0, C);
    const z = matmul(h, rows, { layout: "NT", outDtype: "f32", label: "ce_dlogits" });
    u.set([T, C, v0]);
    new Float32Array(u.buffer)[3] = scale;
    rec.dispatch(grad, [z.buffer, targets.buffer, lse.buffer], u, grid(gpu, Math.ceil((T * C) / WG)));
    matmul(z, rows, { layout: "NN", out: dh, accumulate: (options.accumulate ?? false) || v0 > 0 });
    z.destroy();
    if (rows !== W) rows.destroy();
  }
  return dh;
}

/**
 * Vc for the product h[T,D]·W[V,D]ᵀ: `chunk` when given; else all of V when the [T,V] f32
 * logits fit `scratchBytes`, or the largest multiple of 256 (at most 32768) whose logits and
 * copied W rows fit it. Never more rows than one storage binding holds for T tokens.
 *
 * @example
 * ```ts
 * crossEntropyChunk(h, W, { scratchBytes: 2 ** 26 }); // 2560 for T = 4096, D = 4096 and an f16 W
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
      // Per vocabulary row: 4·T bytes of logits and one copied W row.
      const perRow = 4 * T + W.rowSize * DTYPE_BYTES[W.dtype];
      chunk = Math.min(Math.floor(budget / perRow), MAX_CHUNK);
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

function kernel(gpu: Gpu, name: string, bindings: ("read" | "write")[]): Kernel {
  return getKernel(gpu, {
    name,
    code: () => Deno.readTextFileSync(new URL(`../wgsl/${name}.wgsl`, import.meta.url)),
    bindings,
    uniformBytes: 16,
    constants: { WG },
  });
}

/**
 * W[v0:v0+C, D] as a tensor: W itself when the range is all of it, else a copy of those rows
 * (one buffer copy per W row chunk the range overlaps).
 */
function weightRows(W: Tensor, v0: number, C: number): Tensor {
  if (v0 === 0 && C === W.rows) return W;
  const rowBytes = W.rowSize * DTYPE_BYTES[W.dtype];
  const rows = Tensor.empty(W.gpu, [C, W.rowSize], W.dtype, { label: `${W.label}[rows ${v0}..${v0 + C})` });
  if (rows.chunked) {
    throw new RangeError(
      `Cannot copy ${C} rows of "${W.label}": they exceed one storage binding; use a smaller chunk`,
    );
  }
  const rec = recorder(W.gpu);
  for (const c of W.chunks) {
    const start = Math.max(v0, c.rowStart);
    const end = Math.min(v0 + C, c.rowStart + c.rows);
    if (end <= start) continue;
    const src = (start - c.rowStart) * rowBytes;
    const dst = (start - v0) * rowBytes;
    const size = (end - start) * rowBytes;
    if (src % 4 !== 0 || dst % 4 !== 0 || size % 4 !== 0) {
      throw new RangeError(
        `Cannot copy rows ${start}..${end} of "${W.label}" (${W.dtype}, ${W.rowSize} per row): the byte range ` +
          `is not 4-byte aligned; use an even vocabulary chunk`,
      );
    }
    rec.copyBuffer(c.buffer, src, rows.buffer, dst, size);
  }
  return rows;
}
