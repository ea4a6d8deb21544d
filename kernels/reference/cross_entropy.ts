/**
 * Cross-entropy reference for causal LM training, with ignore index and an explicit normaliser,
 * plus the lm_head-fused variant that never holds logits[T,V] at once (chunks over V with an
 * online log-sum-exp).
 *
 * T = tokens, V = vocab, D = hidden, C = vocabulary chunk size, N = normaliser.
 *
 * Targets are already shifted (target[t] is the token after t). Token t is trained iff
 * target[t] != -100 (IGNORE_INDEX) and, when a mask is given, mask[t] != 0.
 *   lse[t]   = log Σ_v exp(logits[t,v])
 *   loss     = Σ_{t trained} (lse[t] − logits[t, target[t]]) / N
 *   dlogits  = dloss / N · (softmax(logits[t]) − onehot(target[t])) for trained t, 0 otherwise
 * N is passed in rather than counted, so gradient accumulation can divide every micro-batch by the
 * number of trained tokens in the whole optimizer step (transformers' `num_items_in_batch`); with
 * N = the count of trained tokens this is PyTorch's mean reduction.
 *
 * Fused with lm_head (W[V,D] = lm_head.weight, or embed_tokens.weight when tied):
 *   logits = hidden · Wᵀ;  dhidden = dlogits · W;  dW = dlogitsᵀ · hidden
 * Online log-sum-exp over chunks: m' = max(m, max_c z), s' = s · e^(m − m') + Σ_c e^(z − m'),
 * lse = m + log s.
 *
 * Token accuracy (trl's `mean_token_accuracy` = correct / trained tokens):
 *   correct = Σ_{t trained} [argmax_v logits[t,v] = target[t]]
 * with ties resolved to the lowest index, as torch.argmax; over chunks the running argmax moves
 * only to a strictly larger chunk maximum, so the first maximum wins wherever the chunks are cut.
 * A NaN logit is never the argmax (torch would return its index; the loss is NaN then anyway).
 *
 * Per-token scores (what preference objectives are built from), from the same pass:
 *   logp[t]     = logits[t, target[t]] − lse[t]  for trained t, 0 otherwise (log-softmax of the target)
 *   logitSum[t] = Σ_v logits[t,v]                 (trl's `logits/chosen` is its mean over v and tokens)
 * and a backward with a weight per token in place of dloss / N (a sequence-level loss built on
 * logp: w[t] = ∂loss/∂(−logp[t])):
 *   dlogits[t] = w[t] · (softmax(logits[t]) − onehot(target[t]))   for trained t
 * @module
 */
import { alloc, expectLength, expectPositiveInt, type Floats } from "./_dense.ts";

/** Targets equal to this are not trained (PyTorch's default ignore_index). */
export const IGNORE_INDEX = -100;

/** Sizes and normalisation of a cross-entropy call. */
export interface CrossEntropyDims {
  /** Tokens. */
  T: number;
  /** Vocab. */
  V: number;
  /** N: the loss is the sum over trained tokens divided by N (> 0). */
  n: number;
  /** mask[T]: 0 leaves token t out as if its target were -100. */
  mask?: ArrayLike<number> | null;
}

/** Whether token t is trained (target not ignored, mask not 0). */
export function is_trained(
  targets: ArrayLike<number>,
  mask: ArrayLike<number> | null | undefined,
  t: number,
): boolean {
  return targets[t] !== IGNORE_INDEX && (!mask || mask[t] !== 0);
}

/** Number of trained tokens: the usual N for one micro-batch. */
export function count_trained(targets: ArrayLike<number>, mask?: ArrayLike<number> | null): number {
  let n = 0;
  for (let t = 0; t < targets.length; t++) if (is_trained(targets, mask, t)) n++;
  return n;
}

function checkTargets(targets: ArrayLike<number>, dims: CrossEntropyDims): void {
  const { T, V, n } = dims;
  expectPositiveInt("V", V);
  expectLength("targets[T]", targets, T);
  if (dims.mask) expectLength("mask[T]", dims.mask, T);
  if (!(n > 0)) throw new RangeError(`Cannot normalise the loss: N "${n}" must be positive`);
  for (let t = 0; t < T; t++) {
    const y = targets[t];
    if (y !== IGNORE_INDEX && !(Number.isInteger(y) && y >= 0 && y < V)) {
      throw new RangeError(
        `Cannot compute the loss of token ${t}: target "${y}" is neither ${IGNORE_INDEX} nor in [0, ${V})`,
      );
    }
  }
}

/** Sentinel of {@link token_argmax} for a row without a non-NaN logit above −∞. */
export const NO_ARGMAX = -1;

/**
 * argmax[T] of logits[T,V], the lowest index among equal maxima (torch.argmax). NaN and −∞
 * logits never win; a row with nothing else gets {@link NO_ARGMAX}.
 */
export function token_argmax(logits: Floats, T: number, V: number): Int32Array {
  expectLength("logits[T,V]", logits, T * V);
  const argmax = new Int32Array(T).fill(NO_ARGMAX);
  for (let t = 0; t < T; t++) {
    let best = -Infinity;
    for (let v = 0; v < V; v++) {
      const z = logits[t * V + v];
      if (z > best) {
        best = z;
        argmax[t] = v;
      }
    }
  }
  return argmax;
}

/** Σ over trained tokens of [argmax[t] = target[t]]: the numerator of the token accuracy. */
export function count_correct(
  argmax: ArrayLike<number>,
  targets: ArrayLike<number>,
  mask?: ArrayLike<number> | null,
): number {
  expectLength("argmax[T]", argmax, targets.length);
  let correct = 0;
  for (let t = 0; t < targets.length; t++) {
    if (is_trained(targets, mask, t) && argmax[t] === targets[t]) correct++;
  }
  return correct;
}

/**
 * Loss from full logits.
 *
 * @param logits logits[T,V]
 * @param targets target[T] (shifted; -100 ignored)
 * @returns loss, lse[T], and the trained tokens whose argmax is their target
 */
export function cross_entropy_forward<A extends Floats>(
  logits: A,
  targets: ArrayLike<number>,
  dims: CrossEntropyDims,
): { loss: number; lse: A; correct: number } {
  const { T, V, n, mask } = dims;
  checkTargets(targets, dims);
  expectLength("logits[T,V]", logits, T * V);
  const lse = alloc(logits, T);
  let sum = 0;
  for (let t = 0; t < T; t++) {
    let max = -Infinity;
    for (let v = 0; v < V; v++) max = Math.max(max, logits[t * V + v]);
    let s = 0;
    for (let v = 0; v < V; v++) s += Math.exp(logits[t * V + v] - max);
    const l = max + Math.log(s);
    lse[t] = l;
    if (is_trained(targets, mask, t)) sum += l - logits[t * V + targets[t]];
  }
  const correct = count_correct(token_argmax(logits, T, V), targets, mask);
  return { loss: sum / n, lse, correct };
}

/**
 * dlogits[T,V] of {@link cross_entropy_forward}.
 *
 * @param logits logits[T,V]
 * @param lse lse[T] from the forward
 * @param dloss upstream gradient of the loss (1 for the loss itself)
 */
export function cross_entropy_backward<A extends Floats>(
  logits: A,
  targets: ArrayLike<number>,
  lse: Floats,
  dims: CrossEntropyDims,
  dloss = 1,
): A {
  const { T, V, n, mask } = dims;
  checkTargets(targets, dims);
  expectLength("logits[T,V]", logits, T * V);
  expectLength("lse[T]", lse, T);
  const dlogits = alloc(logits, T * V);
  for (let t = 0; t < T; t++) {
    if (!is_trained(targets, mask, t)) continue;
    for (let v = 0; v < V; v++) {
      const p = Math.exp(logits[t * V + v] - lse[t]);
      dlogits[t * V + v] = (dloss / n) * (p - (v === targets[t] ? 1 : 0));
    }
  }
  return dlogits;
}

/** Sizes of the lm_head-fused cross-entropy. */
export interface LmHeadCrossEntropyDims extends CrossEntropyDims {
  /** Hidden size. */
  D: number;
  /** C: vocabulary rows per chunk (default 1024). */
  chunk?: number;
}

// z[T,C] = hidden[T,D] · W[v0:v0+C, D]ᵀ
function chunkLogits(hidden: Floats, W: Floats, T: number, D: number, v0: number, C: number): Float64Array {
  const z = new Float64Array(T * C);
  for (let t = 0; t < T; t++) {
    for (let c = 0; c < C; c++) {
      let acc = 0;
      for (let d = 0; d < D; d++) acc += hidden[t * D + d] * W[(v0 + c) * D + d];
      z[t * C + c] = acc;
    }
  }
  return z;
}

function checkHead(hidden: Floats, W: Floats, dims: LmHeadCrossEntropyDims): number {
  const { T, V, D } = dims;
  expectPositiveInt("D", D);
  expectLength("hidden[T,D]", hidden, T * D);
  expectLength("W[V,D]", W, V * D);
  const chunk = dims.chunk ?? 1024;
  expectPositiveInt("chunk", chunk);
  return chunk;
}

/**
 * Loss of logits = hidden · Wᵀ, computed C vocabulary rows at a time.
 *
 * @param hidden hidden[T,D] (after the final norm)
 * @param W W[V,D]
 * @returns loss, lse[T], argmax[T] of the logits (ties: lowest index) and the trained tokens
 *   whose argmax is their target
 */
export function lm_head_cross_entropy_forward<A extends Floats>(
  hidden: A,
  W: Floats,
  targets: ArrayLike<number>,
  dims: LmHeadCrossEntropyDims,
): {
  loss: number;
  lse: A;
  argmax: Int32Array;
  correct: number;
  logp: Float64Array;
  logitSum: Float64Array;
} {
  const { T, V, D, n, mask } = dims;
  checkTargets(targets, dims);
  const chunk = checkHead(hidden, W, dims);
  const m = new Float64Array(T).fill(-Infinity);
  const s = new Float64Array(T);
  const targetLogit = new Float64Array(T);
  const logitSum = new Float64Array(T);
  // Running argmax: the first maximum of the chunks seen so far (a later chunk must beat it).
  const best = new Float64Array(T).fill(-Infinity);
  const argmax = new Int32Array(T).fill(NO_ARGMAX);
  for (let v0 = 0; v0 < V; v0 += chunk) {
    const C = Math.min(chunk, V - v0);
    const z = chunkLogits(hidden, W, T, D, v0, C);
    const chunkArgmax = token_argmax(z, T, C);
    for (let t = 0; t < T; t++) {
      let mc = -Infinity;
      for (let c = 0; c < C; c++) mc = Math.max(mc, z[t * C + c]);
      const mNew = Math.max(m[t], mc);
      let sNew = s[t] * Math.exp(m[t] - mNew);
      for (let c = 0; c < C; c++) {
        sNew += Math.exp(z[t * C + c] - mNew);
        logitSum[t] += z[t * C + c];
      }
      m[t] = mNew;
      s[t] = sNew;
      const y = targets[t];
      if (y >= v0 && y < v0 + C) targetLogit[t] = z[t * C + (y - v0)];
      const a = chunkArgmax[t];
      if (a !== NO_ARGMAX && z[t * C + a] > best[t]) {
        best[t] = z[t * C + a];
        argmax[t] = v0 + a;
      }
    }
  }
  const lse = alloc(hidden, T);
  const logp = new Float64Array(T);
  let sum = 0;
  for (let t = 0; t < T; t++) {
    lse[t] = m[t] + Math.log(s[t]);
    if (!is_trained(targets, mask, t)) continue;
    logp[t] = targetLogit[t] - (m[t] + Math.log(s[t]));
    sum -= logp[t];
  }
  return { loss: sum / n, lse, argmax, correct: count_correct(argmax, targets, mask), logp, logitSum };
}

/**
 * argmax[T] of logits = hidden · Wᵀ (ties: lowest index) and the margin of each token's maximum
 * over the largest other logit (0 for a tie), without the loss: predictions of a model and how
 * far they are from flipping.
 *
 * @param hidden hidden[T,D]
 * @param W W[V,D]
 */
export function lm_head_argmax(
  hidden: Floats,
  W: Floats,
  dims: { T: number; V: number; D: number },
): { argmax: Int32Array; margin: Float64Array } {
  const { T, V, D } = dims;
  expectPositiveInt("V", V);
  expectPositiveInt("D", D);
  expectLength("hidden[T,D]", hidden, T * D);
  expectLength("W[V,D]", W, V * D);
  const z = chunkLogits(hidden, W, T, D, 0, V);
  const argmax = token_argmax(z, T, V);
  const margin = new Float64Array(T);
  for (let t = 0; t < T; t++) {
    const a = argmax[t];
    if (a === NO_ARGMAX) continue;
    let second = -Infinity;
    for (let v = 0; v < V; v++) if (v !== a) second = Math.max(second, z[t * V + v]);
    margin[t] = z[t * V + a] - second;
  }
  return { argmax, margin };
}

/**
 * Gradients of {@link lm_head_cross_entropy_forward}, recomputing each logits chunk.
 *
 * @param hidden hidden[T,D]
 * @param W W[V,D]
 * @param lse lse[T] from the forward
 * @param dloss upstream gradient of the loss (1 for the loss itself)
 * @param wantDW also return dW[V,D] (for a trained lm_head; LoRA does not need it)
 * @param weights w[T]: per-token weights used in place of dloss / N (see the module doc)
 * @returns dhidden[T,D] and dW[V,D] or null
 */
export function lm_head_cross_entropy_backward<A extends Floats>(
  hidden: A,
  W: Floats,
  targets: ArrayLike<number>,
  lse: Floats,
  dims: LmHeadCrossEntropyDims,
  dloss = 1,
  wantDW = false,
  weights: ArrayLike<number> | null = null,
): { dhidden: A; dW: A | null } {
  const { T, V, D, n, mask } = dims;
  checkTargets(targets, dims);
  const chunk = checkHead(hidden, W, dims);
  expectLength("lse[T]", lse, T);
  if (weights) expectLength("weights[T]", weights, T);
  const dhidden = new Float64Array(T * D);
  const dW = wantDW ? new Float64Array(V * D) : null;
  for (let v0 = 0; v0 < V; v0 += chunk) {
    const C = Math.min(chunk, V - v0);
    const z = chunkLogits(hidden, W, T, D, v0, C);
    for (let t = 0; t < T; t++) {
      if (!is_trained(targets, mask, t)) continue;
      for (let c = 0; c < C; c++) {
        const p = Math.exp(z[t * C + c] - lse[t]);
        const dz = (weights ? weights[t] : dloss / n) * (p - (v0 + c === targets[t] ? 1 : 0));
        for (let d = 0; d < D; d++) {
          dhidden[t * D + d] += dz * W[(v0 + c) * D + d];
          if (dW) dW[(v0 + c) * D + d] += dz * hidden[t * D + d];
        }
      }
    }
  }
  const dh = alloc(hidden, T * D);
  dh.set(dhidden);
  let dWOut: A | null = null;
  if (dW) {
    dWOut = alloc(hidden, V * D);
    dWOut.set(dW);
  }
  return { dhidden: dh, dW: dWOut };
}
