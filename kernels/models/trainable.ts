/**
 * The contract between training loops and model backends. A backend holds a frozen base model
 * and its LoRA adapters (with gradients and AdamW state) and runs micro-batches; the loop
 * (steps/train_sft.ts) owns the schedule, accumulation, clipping policy, checkpoints and
 * logging. Two backends implement it: the WebGPU graph (kernels/models/graph.ts) and the CPU
 * reference (kernels/models/reference_backend.ts, built on kernels/reference/decoder.ts),
 * which the GPU graph is tested against and which makes loop semantics testable anywhere.
 *
 * B = rows per micro-batch, S = sequence length (tokens per row), r = LoRA rank.
 * @module
 */
import { initLoraAdapters, type LoraPair } from "../../formats/peft.ts";
import type { ModelConfig, Projection } from "../../formats/model_config.ts";

/** One micro-batch of packed rows, row-major [B, S]. */
export interface Batch {
  rows: number;
  seqLen: number;
  /** Input token ids [B,S]. */
  tokens: Uint32Array;
  /** Next-token targets [B,S]; −100 where no loss is taken (prompt, padding, document ends). */
  targets: Int32Array;
  /** Position ids [B,S], restarting at 0 at each packed document. */
  positions: Uint32Array;
  /** Document index within its row [B,S]; attention never crosses documents. Padding has its own id. */
  docs: Uint32Array;
}

/** LoRA hyperparameters as PEFT names them. */
export interface LoraSpec {
  r: number;
  alpha: number;
  dropout: number;
  /** Projections that carry adapters (PEFT `target_modules`, expanded). */
  targets: Projection[];
  useRslora: boolean;
}

/** One adapter pair: A[r,in], B[out,r] (PEFT layout), f32. */
export interface LoraWeights {
  layer: number;
  module: Projection;
  A: Float32Array;
  B: Float32Array;
}

/** AdamW hyperparameters for one optimizer step (PyTorch semantics). */
export interface AdamWStep {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Clip the global gradient norm to this (0 = no clipping). */
  maxGradNorm: number;
}

/** Optimizer state for checkpoints: step count and first/second moments, by adapter tensor name. */
export interface OptimizerState {
  step: number;
  m: Map<string, Float32Array>;
  v: Map<string, Float32Array>;
}

/** What a backend returns for one micro-batch (forward, or forward and backward). */
export interface MicroBatchResult {
  /** Σ over the trained tokens of the cross-entropy, not normalised. */
  lossSum: number;
  /** Trained tokens (targets other than −100). */
  tokens: number;
  /**
   * Trained tokens whose argmax logit (the lowest index among equal maxima, as torch.argmax)
   * is the target: trl's `mean_token_accuracy` is Σ correct / Σ tokens. It comes from the
   * same forward and readback as the loss.
   */
  correct: number;
}

/**
 * Per-token scores of one forward, from the loss's own pass over the logits (never a [T,V]
 * buffer): what sequence-level objectives (DPO) are built from.
 */
export interface TokenScores {
  /** logp[T]: log softmax(logits[t])[target[t]] of each trained token, 0 where the target is −100. */
  logp: Float64Array;
  /** logitSum[T]: Σ_v logits[t,v] of every token (trl's `logits/*` metrics are its mean over v). */
  logitSum: Float64Array;
}

/**
 * A sequence objective's per-token weights from the forward's scores: w[T] = ∂loss/∂(−logp[t])
 * (0 where the target is −100). The backward then adds the gradient of Σ_t w[t]·(−logp[t]); an
 * SFT micro-batch is w[t] = 1/N.
 */
export type TokenWeighting = (scores: TokenScores) => Float64Array;

/** A model that trains LoRA adapters. */
export interface TrainableModel extends Disposable {
  readonly config: ModelConfig;
  readonly lora: LoraSpec;
  /** Backend description for manifests and logs ("webgpu: <adapter>", "cpu-reference"). */
  readonly backend: string;
  /**
   * Forward and backward of one micro-batch; adds the LoRA gradients of
   * Σ_tokens CE / `normaliser` into the gradient buffers (so micro-batches of one optimizer step,
   * each called with the step's total trained-token count, sum to the mean over the whole batch).
   * `dropoutSeed` seeds LoRA dropout for this micro-batch. Returns the summed (unnormalised) loss,
   * the trained-token count and the correctly predicted tokens of this micro-batch (with
   * dropout, as the loss).
   */
  forwardBackward(batch: Batch, normaliser: number, dropoutSeed: number): Promise<MicroBatchResult>;
  /** Forward only, no dropout: summed loss, trained-token count and correctly predicted tokens. */
  evaluate(batch: Batch): Promise<MicroBatchResult>;
  /** Forward only, no dropout: the per-token scores. */
  scoreTokens(batch: Batch): Promise<TokenScores>;
  /**
   * Forward of one micro-batch (dropout from `dropoutSeed`), then `weigh` turns its scores into
   * per-token weights and the backward adds the LoRA gradients of Σ_t w[t]·(−logp[t]) into the
   * gradient buffers. Returns the forward's scores.
   */
  forwardBackwardWeighted(batch: Batch, dropoutSeed: number, weigh: TokenWeighting): Promise<TokenScores>;
  /** Clips (if asked) and applies one AdamW step to every adapter, then zeroes the gradients. Returns the pre-clip global gradient norm. */
  optimizerStep(hp: AdamWStep): Promise<{ gradNorm: number }>;
  /** Zeroes the gradients without stepping (e.g. after a skipped non-finite step). */
  zeroGrad(): Promise<void>;
  /** Current adapter weights. */
  getLora(): Promise<LoraWeights[]>;
  /** Replaces adapter weights (resume, continue training from a PEFT adapter). */
  setLora(weights: LoraWeights[]): Promise<void>;
  getOptimizerState(): Promise<OptimizerState>;
  setOptimizerState(state: OptimizerState): Promise<void>;
}

/**
 * The initial adapters of every backend, PEFT's `init_lora_weights=True` (formats/peft.ts): A
 * Kaiming-uniform with bound 1/√in from a seeded PCG32 stream per (layer, module), B = 0. Backends must
 * start from these so that a seed means the same adapters everywhere.
 */
export function initialAdapters(config: ModelConfig, lora: LoraSpec, seed: number): LoraPair[] {
  return initLoraAdapters(config, {
    baseModelNameOrPath: null,
    r: lora.r,
    loraAlpha: lora.alpha,
    loraDropout: lora.dropout,
    targetModules: lora.targets,
    useRslora: lora.useRslora,
  }, seed);
}
