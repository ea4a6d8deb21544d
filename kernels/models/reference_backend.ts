/**
 * The CPU reference backend of {@link TrainableModel}: the frozen base model and its LoRA
 * adapters on the host, forward and backward by kernels/reference/decoder.ts (f64 arithmetic),
 * AdamW and clipping by kernels/reference/adamw.ts. Slow, exact and dependency-free: the loop's
 * semantics are tested with it, and the WebGPU graph is checked against it.
 *
 * B = rows, S = tokens per row, T = B·S, K = in features, N = out features, r = LoRA rank.
 *
 * State per adapted projection (PEFT layout, f32):
 *   A[r,K], B[N,r]             the adapter
 *   dA[r,K], dB[N,r]           gradients, f64, summed over the micro-batches of a step
 *   m, v (same shapes as A, B) AdamW moments, f32
 * Adapters start as PEFT's `init_lora_weights=True` (kernels/models/trainable.ts `initialAdapters`):
 * A ~ U(−1/√K, 1/√K) from PCG32 (seed, stream = layer·7 + projection index), B = 0.
 *
 * LoRA dropout: each adapter draws its own mask per micro-batch,
 *   keep[T,K] = dropout_mask(loraDropoutSeed(dropoutSeed, layer, module), T·K, p)
 * (kernels/reference/linear_lora.ts), so a backend that replays `loraDropoutSeed` and
 * `dropout_mask` in u32 arithmetic drops exactly the same inputs.
 *
 * Token accuracy: `correct` counts the trained tokens whose argmax logit (f64, lowest index on
 * ties) is the target, counted by the decoder's forward in the same pass over the logits as the loss.
 * @module
 */
import { loraKey } from "../../formats/peft.ts";
import { adamw_step, clip_grad_norm, grad_norm } from "../reference/adamw.ts";
import { count_trained, lm_head_argmax } from "../reference/cross_entropy.ts";
import { decoder_backward, decoder_forward, type DecoderForward } from "../reference/decoder.ts";
import { dropout_mask, type LoraAdapter } from "../reference/linear_lora.ts";
import {
  type ModelConfig,
  type Projection,
  projectionPath,
  PROJECTIONS,
  projectionShape,
} from "../../formats/model_config.ts";
import {
  type AdamWStep,
  type Batch,
  initialAdapters,
  type LoraSpec,
  type LoraWeights,
  type MicroBatchResult,
  type OptimizerState,
  type TokenScores,
  type TokenWeighting,
  type TrainableModel,
} from "./trainable.ts";

/**
 * The dropout seed of one adapter in one micro-batch:
 *   (dropoutSeed ⊕ ((layer·7 + projection index + 1) · 0x9E3779B9 mod 2³²)) mod 2³²
 * (projection index in {@link PROJECTIONS}: q, k, v, o, gate, up, down).
 */
export function loraDropoutSeed(dropoutSeed: number, layer: number, module: Projection): number {
  const slot = layer * PROJECTIONS.length + PROJECTIONS.indexOf(module) + 1;
  return ((dropoutSeed >>> 0) ^ Math.imul(slot, 0x9e3779b9)) >>> 0;
}

interface Slot {
  layer: number;
  module: Projection;
  /** HF module path, e.g. `model.layers.0.self_attn.q_proj`. */
  path: string;
  /** K, N of the projection. */
  inFeatures: number;
  outFeatures: number;
  A: Float32Array; // [r,K]
  B: Float32Array; // [N,r]
  dA: Float64Array; // [r,K]
  dB: Float64Array; // [N,r]
  mA: Float32Array;
  vA: Float32Array;
  mB: Float32Array;
  vB: Float32Array;
}

// Runs a synchronous body as a promise, so contract violations reject instead of throwing.
function settle<T>(body: () => T): Promise<T> {
  try {
    return Promise.resolve(body());
  } catch (error) {
    return Promise.reject(error);
  }
}

function contractError(what: string): never {
  throw new RangeError(`Cannot use the cpu-reference model: ${what}`);
}

/** The CPU reference model; see the module documentation. */
export class ReferenceModel implements TrainableModel {
  readonly config: ModelConfig;
  readonly lora: LoraSpec;
  readonly backend = "cpu-reference";
  readonly #weights: ReadonlyMap<string, Float32Array>;
  readonly #slots: Slot[];
  readonly #scaling: number;
  #step = 0;

  constructor(
    config: ModelConfig,
    weights: ReadonlyMap<string, Float32Array>,
    lora: LoraSpec,
    seed: number,
  ) {
    if (lora.targets.length === 0) contractError("LoRA targets are empty");
    this.config = config;
    this.lora = { ...lora, targets: [...lora.targets] };
    this.#weights = weights;
    this.#scaling = lora.useRslora ? lora.alpha / Math.sqrt(lora.r) : lora.alpha / lora.r;
    const pairs = initialAdapters(config, lora, seed);
    this.#slots = pairs.map((p) => {
      const [N, K] = projectionShape(config, p.module);
      return {
        layer: p.layer,
        module: p.module,
        path: projectionPath(p.layer, p.module),
        inFeatures: K,
        outFeatures: N,
        A: p.a,
        B: p.b,
        dA: new Float64Array(p.a.length),
        dB: new Float64Array(p.b.length),
        mA: new Float32Array(p.a.length),
        vA: new Float32Array(p.a.length),
        mB: new Float32Array(p.b.length),
        vB: new Float32Array(p.b.length),
      };
    });
  }

  #adapters(T: number, dropoutSeed: number | null): Map<string, LoraAdapter> {
    const p = this.lora.dropout;
    const out = new Map<string, LoraAdapter>();
    for (const s of this.#slots) {
      const dropout = dropoutSeed !== null && p > 0
        ? { p, keep: dropout_mask(loraDropoutSeed(dropoutSeed, s.layer, s.module), T * s.inFeatures, p) }
        : null;
      out.set(s.path, { A: s.A, B: s.B, r: this.lora.r, scaling: this.#scaling, dropout });
    }
    return out;
  }

  #input(batch: Batch, numItems: number) {
    const T = batch.rows * batch.seqLen;
    const arrays = {
      tokens: batch.tokens,
      targets: batch.targets,
      positions: batch.positions,
      docs: batch.docs,
    };
    for (const [name, a] of Object.entries(arrays)) {
      if (a.length !== T) {
        contractError(`batch.${name} holds ${a.length} values, expected rows·seqLen = ${T}`);
      }
    }
    return {
      B: batch.rows,
      S: batch.seqLen,
      ids: batch.tokens,
      targets: batch.targets,
      positions: batch.positions,
      docIds: batch.docs,
      numItems,
    };
  }

  /** argmax of every token's logits and its margin over the runner-up, from a forward. */
  #predictions(forward: DecoderForward): { argmax: Int32Array; margin: Float64Array } {
    const { xF, head, T } = forward.saved;
    return lm_head_argmax(xF, head, { T, V: this.config.vocabSize, D: this.config.hiddenSize });
  }

  #forwardBackward(
    batch: Batch,
    normaliser: number,
    dropoutSeed: number,
  ): { lossSum: number; tokens: number; correct: number } {
    if (!(normaliser > 0)) contractError(`normaliser ${normaliser} must be positive`);
    const tokens = count_trained(batch.targets);
    // No trained token: zero loss and zero gradient, nothing to run.
    if (tokens === 0) return { lossSum: 0, tokens: 0, correct: 0 };
    const T = batch.rows * batch.seqLen;
    const forward = decoder_forward(
      this.config,
      this.#weights,
      this.#adapters(T, dropoutSeed),
      this.#input(batch, normaliser),
    );
    this.#addGradients(decoder_backward(forward));
    return { lossSum: forward.loss * normaliser, tokens, correct: forward.correct };
  }

  /** The forward of `batch` with the dropout masks of `dropoutSeed` (none: null); N = 1. */
  #scored(batch: Batch, dropoutSeed: number | null): DecoderForward {
    const T = batch.rows * batch.seqLen;
    if (count_trained(batch.targets) === 0) contractError("the batch has no trained token to score");
    return decoder_forward(this.config, this.#weights, this.#adapters(T, dropoutSeed), this.#input(batch, 1));
  }

  #scoreTokens(batch: Batch): TokenScores {
    const forward = this.#scored(batch, null);
    return { logp: forward.logp, logitSum: forward.logitSum };
  }

  #forwardBackwardWeighted(batch: Batch, dropoutSeed: number, weigh: TokenWeighting): TokenScores {
    const forward = this.#scored(batch, dropoutSeed);
    const scores = { logp: forward.logp, logitSum: forward.logitSum };
    const weights = weigh(scores);
    if (weights.length !== forward.logp.length) {
      contractError(`the token weights hold ${weights.length} values, expected ${forward.logp.length}`);
    }
    this.#addGradients(decoder_backward(forward, 1, weights));
    return scores;
  }

  #addGradients(grads: ReturnType<typeof decoder_backward>): void {
    for (const s of this.#slots) {
      const g = grads.lora.get(s.path)!;
      for (let i = 0; i < s.dA.length; i++) s.dA[i] += g.dA[i];
      for (let i = 0; i < s.dB.length; i++) s.dB[i] += g.dB[i];
    }
  }

  #evaluate(batch: Batch): { lossSum: number; tokens: number; correct: number } {
    const tokens = count_trained(batch.targets);
    if (tokens === 0) return { lossSum: 0, tokens: 0, correct: 0 };
    const T = batch.rows * batch.seqLen;
    const forward = decoder_forward(
      this.config,
      this.#weights,
      this.#adapters(T, null),
      this.#input(batch, tokens),
    );
    return { lossSum: forward.loss * tokens, tokens, correct: forward.correct };
  }

  /**
   * The model's prediction for every token of `batch`: argmax[T] of the logits (lowest index on
   * ties) and margin[T], the maximum logit minus the largest other one (0 on a tie); with the
   * dropout masks of `dropoutSeed` as in {@link forwardBackward}, or none (null, as evaluate).
   * Beyond the contract: for tests and diagnostics.
   */
  predictions(batch: Batch, dropoutSeed: number | null = null): { argmax: Int32Array; margin: Float64Array } {
    const T = batch.rows * batch.seqLen;
    const adapters = this.#adapters(T, dropoutSeed);
    // numItems only scales the loss, which is not used here.
    const forward = decoder_forward(this.config, this.#weights, adapters, this.#input(batch, 1));
    return this.#predictions(forward);
  }

  /** The accumulated gradients (f64 copies) by PEFT tensor name; the reference exposes them for tests. */
  gradients(): Map<string, Float64Array> {
    const out = new Map<string, Float64Array>();
    for (const s of this.#slots) {
      out.set(loraKey(s.layer, s.module, "A"), s.dA.slice());
      out.set(loraKey(s.layer, s.module, "B"), s.dB.slice());
    }
    return out;
  }

  #optimizerStep(hp: AdamWStep): { gradNorm: number } {
    const grads = this.#slots.flatMap((s) => [s.dA, s.dB]);
    const gradNorm = hp.maxGradNorm > 0 ? clip_grad_norm(grads, hp.maxGradNorm).totalNorm : grad_norm(grads);
    this.#step++;
    const adam = {
      lr: hp.lr,
      beta1: hp.beta1,
      beta2: hp.beta2,
      eps: hp.eps,
      weightDecay: hp.weightDecay,
    };
    for (const s of this.#slots) {
      adamw_step(s.A, s.dA, s.mA, s.vA, this.#step, adam);
      adamw_step(s.B, s.dB, s.mB, s.vB, this.#step, adam);
      s.dA.fill(0);
      s.dB.fill(0);
    }
    return { gradNorm };
  }

  #zeroGrad(): void {
    for (const s of this.#slots) {
      s.dA.fill(0);
      s.dB.fill(0);
    }
  }

  #getLora(): LoraWeights[] {
    return this.#slots.map((s) => ({ layer: s.layer, module: s.module, A: s.A.slice(), B: s.B.slice() }));
  }

  #slot(layer: number, module: Projection): Slot {
    const s = this.#slots.find((x) => x.layer === layer && x.module === module);
    if (!s) {
      contractError(`layer ${layer} ${module} carries no adapter (targets: ${this.lora.targets.join(", ")})`);
    }
    return s;
  }

  #setLora(weights: LoraWeights[]): void {
    const seen = new Set<Slot>();
    for (const w of weights) {
      const s = this.#slot(w.layer, w.module);
      if (w.A.length !== s.A.length || w.B.length !== s.B.length) {
        contractError(
          `layer ${w.layer} ${w.module} got A of ${w.A.length} and B of ${w.B.length} values, ` +
            `expected ${s.A.length} and ${s.B.length}`,
        );
      }
      seen.add(s);
    }
    if (seen.size !== this.#slots.length) {
      contractError(`setLora got ${seen.size} distinct adapters, the model has ${this.#slots.length}`);
    }
    for (const w of weights) {
      const s = this.#slot(w.layer, w.module);
      s.A.set(w.A);
      s.B.set(w.B);
    }
  }

  #getOptimizerState(): OptimizerState {
    const m = new Map<string, Float32Array>();
    const v = new Map<string, Float32Array>();
    for (const s of this.#slots) {
      m.set(loraKey(s.layer, s.module, "A"), s.mA.slice());
      v.set(loraKey(s.layer, s.module, "A"), s.vA.slice());
      m.set(loraKey(s.layer, s.module, "B"), s.mB.slice());
      v.set(loraKey(s.layer, s.module, "B"), s.vB.slice());
    }
    return { step: this.#step, m, v };
  }

  #setOptimizerState(state: OptimizerState): void {
    if (!Number.isInteger(state.step) || state.step < 0) {
      contractError(`optimizer step ${state.step} is invalid`);
    }
    const take = (map: Map<string, Float32Array>, key: string, into: Float32Array, what: string): void => {
      const value = map.get(key);
      if (!value) contractError(`optimizer state has no ${what} for "${key}"`);
      if (value.length !== into.length) {
        contractError(`optimizer ${what} of "${key}" holds ${value.length} values, expected ${into.length}`);
      }
    };
    for (const s of this.#slots) {
      for (const [which, m, v] of [["A", s.mA, s.vA], ["B", s.mB, s.vB]] as const) {
        const key = loraKey(s.layer, s.module, which);
        take(state.m, key, m, "exp_avg");
        take(state.v, key, v, "exp_avg_sq");
      }
    }
    const expected = 2 * this.#slots.length;
    if (state.m.size !== expected || state.v.size !== expected) {
      contractError(`optimizer state holds ${state.m.size}/${state.v.size} moments, expected ${expected}`);
    }
    for (const s of this.#slots) {
      for (const [which, m, v] of [["A", s.mA, s.vA], ["B", s.mB, s.vB]] as const) {
        const key = loraKey(s.layer, s.module, which);
        m.set(state.m.get(key)!);
        v.set(state.v.get(key)!);
      }
    }
    this.#step = state.step;
  }

  forwardBackward(batch: Batch, normaliser: number, dropoutSeed: number): Promise<MicroBatchResult> {
    return settle(() => this.#forwardBackward(batch, normaliser, dropoutSeed));
  }

  evaluate(batch: Batch): Promise<MicroBatchResult> {
    return settle(() => this.#evaluate(batch));
  }

  scoreTokens(batch: Batch): Promise<TokenScores> {
    return settle(() => this.#scoreTokens(batch));
  }

  forwardBackwardWeighted(batch: Batch, dropoutSeed: number, weigh: TokenWeighting): Promise<TokenScores> {
    return settle(() => this.#forwardBackwardWeighted(batch, dropoutSeed, weigh));
  }

  optimizerStep(hp: AdamWStep): Promise<{ gradNorm: number }> {
    return settle(() => this.#optimizerStep(hp));
  }

  zeroGrad(): Promise<void> {
    return settle(() => this.#zeroGrad());
  }

  getLora(): Promise<LoraWeights[]> {
    return settle(() => this.#getLora());
  }

  setLora(weights: LoraWeights[]): Promise<void> {
    return settle(() => this.#setLora(weights));
  }

  getOptimizerState(): Promise<OptimizerState> {
    return settle(() => this.#getOptimizerState());
  }

  setOptimizerState(state: OptimizerState): Promise<void> {
    return settle(() => this.#setOptimizerState(state));
  }

  [Symbol.dispose](): void {
    for (const s of this.#slots) {
      s.dA = new Float64Array(0);
      s.dB = new Float64Array(0);
    }
  }
}

/**
 * A {@link TrainableModel} on the CPU with fresh PEFT-initialised adapters (seeded).
 *
 * @param weights every base tensor by HF name, f32 (kernels/models/load.ts `loadHostModel`)
 *
 * @example
 * ```ts
 * const { config, weights } = await loadHostModel(dir);
 * using model = createReferenceModel(config, weights, { r: 8, alpha: 16, dropout: 0, targets: ["q_proj", "v_proj"], useRslora: false }, 42);
 * ```
 */
export function createReferenceModel(
  config: ModelConfig,
  weights: ReadonlyMap<string, Float32Array>,
  lora: LoraSpec,
  seed: number,
): ReferenceModel {
  return new ReferenceModel(config, weights, lora, seed);
}
