/**
 * Choosing the next token from a model's logits, as transformers' `generate` does with its
 * logits processors and warpers, in its order:
 *   1. repetition_penalty p (RepetitionPenaltyLogitsProcessor): every token id already in the
 *      sequence (prompt and generated) gets z/p where z > 0, z·p where z ≤ 0;
 *   greedy (do_sample false, or temperature 0): the argmax (lowest id on ties, as torch.argmax);
 *   sampling:
 *   2. temperature T: z/T;
 *   3. top_k k (> 0): ids whose z is below the k-th largest z are removed (ties at it kept);
 *   4. top_p P (< 1): sorted by z ascending, ids whose cumulative probability is ≤ 1 − P are
 *      removed, the most likely always kept;
 *   5. min_p m (> 0): ids whose probability is below m · the largest probability are removed;
 *   6. a draw from softmax of what remains, u ~ U[0,1) from PCG32(seed, stream of the sequence),
 *      the first id (by id order) whose cumulative probability exceeds u.
 * All in f64 on the host; logits are f32 from the GPU.
 * @module
 */
import { Pcg32 } from "../../foundation/random.ts";

/** The sampling options, by transformers' `GenerationConfig` names (camelCased). */
export interface SamplingOptions {
  /** false: greedy (transformers' `do_sample`). */
  doSample: boolean;
  /** T > 0 (1: unchanged); 0 means greedy. */
  temperature: number;
  /** k ≥ 0 (0: off; transformers' default 50). */
  topK: number;
  /** P in (0, 1] (1: off). */
  topP: number;
  /** m in [0, 1) (0: off). */
  minP: number;
  /** p > 0 (1: off). */
  repetitionPenalty: number;
}

/** transformers' defaults (its GenerationConfig without a model's generation_config.json). */
export const DEFAULT_SAMPLING: SamplingOptions = {
  doSample: false,
  temperature: 1,
  topK: 50,
  topP: 1,
  minP: 0,
  repetitionPenalty: 1,
};

/** Checks the options; throws a RangeError naming the option (transformers' name) that is out of range. */
export function checkSampling(o: SamplingOptions): void {
  const bad = (name: string, value: number, want: string): never => {
    throw new RangeError(`Cannot sample with ${name} ${value}: it must be ${want}`);
  };
  if (!(o.temperature >= 0) || !Number.isFinite(o.temperature)) bad("temperature", o.temperature, "≥ 0");
  if (!Number.isInteger(o.topK) || o.topK < 0) bad("top_k", o.topK, "an integer ≥ 0");
  if (!(o.topP > 0 && o.topP <= 1)) bad("top_p", o.topP, "in (0, 1]");
  if (!(o.minP >= 0 && o.minP < 1)) bad("min_p", o.minP, "in [0, 1)");
  if (!(o.repetitionPenalty > 0) || !Number.isFinite(o.repetitionPenalty)) {
    bad("repetition_penalty", o.repetitionPenalty, "> 0");
  }
}

/** The processed scores (steps 1–5 of the module documentation); removed ids are −∞. */
export function processLogits(
  logits: ArrayLike<number>,
  history: ArrayLike<number>,
  o: SamplingOptions,
): Float64Array {
  const z = Float64Array.from(logits);
  if (o.repetitionPenalty !== 1) {
    const seen = new Set<number>();
    for (let i = 0; i < history.length; i++) seen.add(history[i]);
    for (const id of seen) {
      if (id < 0 || id >= z.length) continue;
      z[id] = z[id] > 0 ? z[id] / o.repetitionPenalty : z[id] * o.repetitionPenalty;
    }
  }
  if (!o.doSample || o.temperature === 0) return z;
  if (o.temperature !== 1) { for (let i = 0; i < z.length; i++) z[i] /= o.temperature; }
  if (o.topK > 0 && o.topK < z.length) {
    const kth = kthLargest(Float64Array.from(z), o.topK);
    for (let i = 0; i < z.length; i++) if (z[i] < kth) z[i] = -Infinity;
  }
  if (o.topP < 1) {
    // Only the ids still in play are sorted (after top_k, a few dozen, not the vocabulary).
    const order = Array.from(z.keys()).filter((i) => z[i] !== -Infinity).sort((a, b) => z[a] - z[b] || a - b);
    const p = softmax(z);
    let cum = 0;
    // Ascending: remove while the cumulative probability stays ≤ 1 − P; the last (largest) stays.
    for (let r = 0; r < order.length - 1; r++) {
      cum += p[order[r]];
      if (cum <= 1 - o.topP) z[order[r]] = -Infinity;
    }
  }
  if (o.minP > 0) {
    const p = softmax(z);
    const top = Math.max(...p);
    for (let i = 0; i < z.length; i++) if (p[i] < o.minP * top) z[i] = -Infinity;
  }
  return z;
}

/** The k-th largest value of `a` (1-based; `a` is reordered): quickselect, O(V) on average. */
function kthLargest(a: Float64Array, k: number): number {
  let lo = 0;
  let hi = a.length - 1;
  const target = k - 1;
  while (lo < hi) {
    const pivot = a[(lo + hi) >> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else return a[target];
  }
  return a[target];
}

function softmax(z: Float64Array): Float64Array {
  let m = -Infinity;
  for (const x of z) m = Math.max(m, x);
  const e = z.map((x) => Math.exp(x - m));
  const s = e.reduce((a, x) => a + x, 0);
  return e.map((x) => x / s);
}

/** argmax with the lowest index on ties. */
export function argmax(z: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < z.length; i++) if (z[i] > z[best]) best = i;
  return best;
}

/** The next token of one sequence: greedy or a draw from `rng` (see the module documentation). */
export function nextToken(
  logits: ArrayLike<number>,
  history: ArrayLike<number>,
  o: SamplingOptions,
  rng: Pcg32,
): number {
  const z = processLogits(logits, history, o);
  if (!o.doSample || o.temperature === 0) return argmax(z);
  const p = softmax(z);
  const u = rng.uniform();
  let cum = 0;
  let last = 0;
  for (let i = 0; i < p.length; i++) {
    if (p[i] === 0) continue;
    cum += p[i];
    last = i;
    if (u < cum) return i;
  }
  return last;
}

/** The sampling stream of sequence `index` of a request with `seed`. */
export function samplingRng(seed: number, index: number): Pcg32 {
  return new Pcg32(seed, SAMPLING_STREAM + index);
}

/** PCG32 streams of sampling, apart from training's (kernels/models/trainable.ts, steps/train). */
export const SAMPLING_STREAM = 2 ** 42;
