/**
 * Direct preference optimisation as trl's `DPOTrainer` computes it (FORMATS.md "DPO as trl
 * computes it"), as an {@link Objective} of the training loop.
 *
 * A preference split holds pairs: rows 2i (chosen) and 2i+1 (rejected), each prompt + answer,
 * trained on the answer. A micro-batch of b pairs is one batch of 2b rows (chosen and rejected
 * run together). Per pair, with sequence log-probabilities summed over the answer's trained tokens
 * (averaged for `ipo`, as trl does):
 *   π_c, π_r  under the policy (the model being trained)
 *   ρ_c, ρ_r  under the reference (precomputed, or computed each step; 0 with reference_free)
 *   h = (π_c − π_r) − (ρ_c − ρ_r),  ε = label_smoothing
 *   sigmoid  ℓ = −(1−ε)·logσ(βh) − ε·logσ(−βh)              ∂ℓ/∂h = −(1−ε)·β·σ(−βh) + ε·β·σ(βh)
 *   robust   ℓ = (−(1−ε)·logσ(βh) + ε·logσ(−βh)) / (1−2ε)   ∂ℓ/∂h = −β·((1−ε)·σ(−βh) + ε·σ(βh)) / (1−2ε)
 *   hinge    ℓ = relu(1 − βh)                                ∂ℓ/∂h = −β where βh < 1, else 0
 *   ipo      ℓ = (h − 1/(2β))²                               ∂ℓ/∂h = 2·(h − 1/(2β))
 * The step's loss is the mean of ℓ over its P pairs, whatever their split into micro-batches
 * (bs 2 × GA 4 is bs 8), plus with rpo_alpha = a the chosen answers' mean token NLL over the
 * step's N_c chosen tokens:
 *   L = (1/P)·Σ ℓ_i + a·(Σ_{chosen t} −logp_t) / N_c
 * The backward gets per-token weights w[t] = ∂L/∂(−logp_t) (kernels/models/trainable.ts
 * `TokenWeighting`): on pair i's chosen tokens −(1/P)·∂ℓ_i/∂h·k_c + a/N_c, on its rejected
 * tokens (1/P)·∂ℓ_i/∂h·k_r, with k = 1 (sums) or 1/n_side (ipo's means).
 * Logged, detached, as trl names them (means over the step's pairs; logits over its answer
 * tokens and the vocabulary): rewards/chosen = β(π_c − ρ_c), rewards/rejected = β(π_r − ρ_r),
 * rewards/accuracies = share with chosen reward > rejected reward, rewards/margins, logps/chosen,
 * logps/rejected, logits/chosen, logits/rejected (and nll_loss with rpo_alpha); each with eval_
 * over the whole eval split, where eval_loss is the mean ℓ over its pairs (+ a·NLL).
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { Batch, TokenScores, TrainableModel } from "../../kernels/models/trainable.ts";
import { buildBatch, chunks, IGNORE, type Split } from "./batches.ts";
import type { EvalResult, Objective, ObjectiveStep } from "./loop.ts";

import { DPO_LOSS_TYPES, DPO_METRICS } from "./config.ts";

export { DPO_LOSS_TYPES, DPO_METRICS };
/** One of trl's `loss_type`s that lathe implements (config.ts `DPO_LOSS_TYPES`). */
export type LossType = typeof DPO_LOSS_TYPES[number];

/** The objective's settings (trl's DPOConfig names in the step config). */
export interface DpoSettings {
  lossType: LossType;
  beta: number;
  labelSmoothing: number;
  referenceFree: boolean;
  /** a of rpo_alpha; null: none. */
  rpoAlpha: number | null;
}

/** log σ(x), stable for any x: −softplus(−x). */
export function logSigmoid(x: number): number {
  return x >= 0 ? -Math.log1p(Math.exp(-x)) : x - Math.log1p(Math.exp(x));
}

/** σ(x), stable for any x. */
export function sigmoid(x: number): number {
  if (x >= 0) return 1 / (1 + Math.exp(-x));
  const e = Math.exp(x);
  return e / (1 + e);
}

/** ℓ(h) of one pair and ∂ℓ/∂h; see the module documentation. */
export function pairLoss(h: number, s: DpoSettings): { loss: number; dh: number } {
  const { beta: b, labelSmoothing: e } = s;
  const z = b * h;
  switch (s.lossType) {
    case "sigmoid":
      return {
        loss: -(1 - e) * logSigmoid(z) - e * logSigmoid(-z),
        dh: -(1 - e) * b * sigmoid(-z) + e * b * sigmoid(z),
      };
    case "robust":
      return {
        loss: (-(1 - e) * logSigmoid(z) + e * logSigmoid(-z)) / (1 - 2 * e),
        dh: (-(1 - e) * b * sigmoid(-z) - e * b * sigmoid(z)) / (1 - 2 * e),
      };
    case "hinge":
      return { loss: Math.max(0, 1 - z), dh: 1 - z > 0 ? -b : 0 };
    case "ipo": {
      const d = h - 1 / (2 * b);
      return { loss: d * d, dh: 2 * d };
    }
  }
}

/** Per row of a batch: Σ logp over its trained tokens, their count and Σ of their logit sums. */
export interface SequenceStats {
  logp: Float64Array;
  tokens: Float64Array;
  logitSum: Float64Array;
}

/** Sums a batch's token scores per row (trained tokens only). */
export function sequenceStats(batch: Batch, scores: TokenScores): SequenceStats {
  const { rows, seqLen } = batch;
  const out = {
    logp: new Float64Array(rows),
    tokens: new Float64Array(rows),
    logitSum: new Float64Array(rows),
  };
  for (let b = 0; b < rows; b++) {
    for (let t = b * seqLen; t < (b + 1) * seqLen; t++) {
      if (batch.targets[t] === IGNORE) continue;
      out.logp[b] += scores.logp[t];
      out.tokens[b]++;
      out.logitSum[b] += scores.logitSum[t];
    }
  }
  return out;
}

/** The batch of pairs `pairs` of `split`: rows chosen₀, rejected₀, chosen₁, ... */
export function pairBatch(split: Split, pairs: ArrayLike<number>): Batch {
  const rows = [];
  for (let i = 0; i < pairs.length; i++) rows.push(split.rows[2 * pairs[i]], split.rows[2 * pairs[i] + 1]);
  return buildBatch(rows, split.index.pad_id);
}

/** Pairs of a preference split. */
export function pairCount(split: Split): number {
  return split.rows.length / 2;
}

/**
 * Where the reference log-probabilities come from: ρ_c, ρ_r (sums over the answers' trained
 * tokens) of pairs of the train or eval split, as [2·pairs] (chosen, rejected, ...).
 */
export interface ReferenceSource {
  logps(split: "train" | "eval", pairs: ArrayLike<number>): Promise<Float64Array>;
}

/**
 * A reference read from precomputed log-probs: `tables.train` and `tables.eval` hold [2·pairs]
 * (chosen, rejected) of each split, as {@link scoreSplit} writes them.
 */
export function tableReference(tables: {
  train: ArrayLike<number>;
  eval?: ArrayLike<number>;
}): ReferenceSource {
  return {
    logps(split, pairs) {
      const table = tables[split];
      if (table === undefined) {
        throw new RangeError(`Cannot read the reference log-probs of the ${split} split: none were computed`);
      }
      return Promise.resolve(
        Float64Array.from({ length: 2 * pairs.length }, (_, k) => table[2 * pairs[k >> 1] + (k & 1)]),
      );
    },
  };
}

/** Sums of the metrics of some pairs (and their answer tokens), to be averaged. */
class Tally {
  pairs = 0;
  loss = 0;
  sums: Record<string, number> = {};
  logits = { chosen: 0, rejected: 0, chosenCount: 0, rejectedCount: 0 };
  nll = 0;
  chosenTokens = 0;

  add(name: string, value: number): void {
    this.sums[name] = (this.sums[name] ?? 0) + value;
  }

  /** The means by trl's names (prefixed). */
  means(V: number, prefix = ""): Record<string, number> {
    const out: Record<string, number> = {};
    for (const name of DPO_METRICS) {
      if (name === "logits/chosen") {
        out[prefix + name] = this.logits.chosen / (V * Math.max(1, this.logits.chosenCount));
      } else if (name === "logits/rejected") {
        out[prefix + name] = this.logits.rejected / (V * Math.max(1, this.logits.rejectedCount));
      } else out[prefix + name] = (this.sums[name] ?? 0) / Math.max(1, this.pairs);
    }
    return out;
  }
}

/**
 * Scores the pairs of one batch against their reference: adds every pair's metrics to `tally`
 * and returns the per-pair ∂ℓ/∂h (for the weights) and the sequence stats.
 */
function scorePairs(
  batch: Batch,
  scores: TokenScores,
  ref: Float64Array,
  s: DpoSettings,
  tally: Tally,
): { dh: Float64Array; stats: SequenceStats } {
  const stats = sequenceStats(batch, scores);
  const pairs = batch.rows / 2;
  const dh = new Float64Array(pairs);
  const mean = s.lossType === "ipo";
  for (let j = 0; j < pairs; j++) {
    const [c, r] = [2 * j, 2 * j + 1];
    const pc = mean ? stats.logp[c] / stats.tokens[c] : stats.logp[c];
    const pr = mean ? stats.logp[r] / stats.tokens[r] : stats.logp[r];
    const rc = s.referenceFree ? 0 : mean ? ref[2 * j] / stats.tokens[c] : ref[2 * j];
    const rr = s.referenceFree ? 0 : mean ? ref[2 * j + 1] / stats.tokens[r] : ref[2 * j + 1];
    const h = (pc - pr) - (rc - rr);
    const l = pairLoss(h, s);
    dh[j] = l.dh;
    const chosenReward = s.beta * (pc - rc);
    const rejectedReward = s.beta * (pr - rr);
    tally.pairs++;
    tally.loss += l.loss;
    tally.add("rewards/chosen", chosenReward);
    tally.add("rewards/rejected", rejectedReward);
    tally.add("rewards/accuracies", chosenReward > rejectedReward ? 1 : 0);
    tally.add("rewards/margins", chosenReward - rejectedReward);
    tally.add("logps/chosen", pc);
    tally.add("logps/rejected", pr);
    tally.logits.chosen += stats.logitSum[c];
    tally.logits.chosenCount += stats.tokens[c];
    tally.logits.rejected += stats.logitSum[r];
    tally.logits.rejectedCount += stats.tokens[r];
    tally.nll -= stats.logp[c];
    tally.chosenTokens += stats.tokens[c];
  }
  return { dh, stats };
}

/**
 * Per-token weights w[t] = ∂L/∂(−logp_t) of one micro-batch (see the module documentation):
 * `P` pairs and `chosenTokens` chosen tokens in the whole optimizer step.
 */
export function dpoTokenWeights(
  batch: Batch,
  dh: Float64Array,
  stats: SequenceStats,
  s: DpoSettings,
  P: number,
  chosenTokens: number,
): Float64Array {
  const w = new Float64Array(batch.targets.length);
  const mean = s.lossType === "ipo";
  const rpo = s.rpoAlpha === null ? 0 : s.rpoAlpha / chosenTokens;
  for (let row = 0; row < batch.rows; row++) {
    const j = row >> 1;
    const chosen = row % 2 === 0;
    const k = mean ? 1 / stats.tokens[row] : 1;
    // ∂L/∂π_side = (1/P)·∂ℓ/∂h·(±1), and −logp_t moves π by −k.
    const value = chosen ? -(dh[j] / P) * k + rpo : (dh[j] / P) * k;
    for (let t = row * batch.seqLen; t < (row + 1) * batch.seqLen; t++) {
      if (batch.targets[t] !== IGNORE) w[t] = value;
    }
  }
  return w;
}

/** Trained tokens of the chosen rows of pairs `pairs`. */
function chosenTokenCount(split: Split, pairs: ArrayLike<number>): number {
  let n = 0;
  for (let i = 0; i < pairs.length; i++) {
    const row = split.rows[2 * pairs[i]];
    for (let t = 1; t < row.tokens.length; t++) if (row.mask[t] === 1) n++;
  }
  return n;
}

/**
 * The DPO objective on preference splits (pairs in consecutive rows), its reference from
 * `reference`. `vocabSize` turns logit sums into trl's mean logits.
 */
export function dpoObjective(
  train: Split,
  evalSplit: Split | null,
  settings: DpoSettings,
  reference: ReferenceSource,
  vocabSize: number,
): Objective {
  return {
    size: pairCount(train),
    hasEval: evalSplit !== null && evalSplit.rows.length > 0,
    shown: { metric: "rewards/accuracies", label: "reward acc" },
    async step(model, take, batchSize, seeds): Promise<ObjectiveStep> {
      const P = take.length;
      const chosenTokens = chosenTokenCount(train, take);
      const tally = new Tally();
      let slots = 0;
      let trained = 0;
      const micro = chunks(Array.from(take), batchSize);
      for (let i = 0; i < micro.length; i++) {
        const batch = pairBatch(train, micro[i]);
        const ref = settings.referenceFree
          ? new Float64Array(2 * micro[i].length)
          : await reference.logps("train", micro[i]);
        await model.forwardBackwardWeighted(batch, seeds[i], (scores) => {
          const { dh, stats } = scorePairs(batch, scores, ref, settings, tally);
          return dpoTokenWeights(batch, dh, stats, settings, P, chosenTokens);
        });
        slots += batch.rows * batch.seqLen;
        for (const y of batch.targets) if (y !== IGNORE) trained++;
      }
      const nll = tally.nll / Math.max(1, tally.chosenTokens);
      const loss = tally.loss / P + (settings.rpoAlpha === null ? 0 : settings.rpoAlpha * nll);
      const metrics = tally.means(vocabSize);
      if (settings.rpoAlpha !== null) metrics.nll_loss = nll;
      return { loss, slots, trainedTokens: trained, metrics };
    },
    async evaluate(model, batchSize): Promise<EvalResult | null> {
      if (!evalSplit || evalSplit.rows.length === 0) return null;
      const tally = new Tally();
      const all = Array.from({ length: pairCount(evalSplit) }, (_, i) => i);
      for (const pairs of chunks(all, batchSize)) {
        const batch = pairBatch(evalSplit, pairs);
        const ref = settings.referenceFree
          ? new Float64Array(2 * pairs.length)
          : await reference.logps("eval", pairs);
        scorePairs(batch, await model.scoreTokens(batch), ref, settings, tally);
      }
      const nll = tally.nll / Math.max(1, tally.chosenTokens);
      const loss = tally.loss / tally.pairs + (settings.rpoAlpha === null ? 0 : settings.rpoAlpha * nll);
      if (!Number.isFinite(loss)) {
        throw new LatheError(`Cannot evaluate: the eval loss is ${loss}`, {
          hint: "the adapters or the base model hold non-finite values",
        });
      }
      return { eval_loss: loss, ...tally.means(vocabSize, "eval_") };
    },
  };
}

/**
 * ρ of every pair of `split` under `model` as it is now (no dropout): [2·pairs], chosen and
 * rejected sums, scored `batchSize` pairs at a time. `onBatch` reports progress in pairs.
 */
export async function scoreSplit(
  model: TrainableModel,
  split: Split,
  batchSize: number,
  onBatch?: (pairs: number) => void,
): Promise<Float64Array> {
  const out = new Float64Array(split.rows.length);
  const all = Array.from({ length: pairCount(split) }, (_, i) => i);
  for (const pairs of chunks(all, batchSize)) {
    const batch = pairBatch(split, pairs);
    const stats = sequenceStats(batch, await model.scoreTokens(batch));
    pairs.forEach((p, j) => {
      out[2 * p] = stats.logp[2 * j];
      out[2 * p + 1] = stats.logp[2 * j + 1];
    });
    onBatch?.(pairs.length);
  }
  return out;
}
