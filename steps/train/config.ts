/**
 * The `train-sft` config: names and meanings as transformers' `TrainingArguments`, peft's
 * `LoraConfig` and trl's `SFTConfig` have them, so a recipe reads like the Python a user
 * already knows. Every default is written into the manifest (and so into the step's key), and
 * the best-model keys are resolved as transformers resolves them (`metric_for_best_model` gets
 * its "eval_" prefix, `greater_is_better` its derived value), so a config that spells a default
 * out has the key of one that leaves it out.
 * @module
 */
import * as z from "zod";
import { PROJECTIONS } from "../../formats/model_config.ts";
import { LatheError } from "../../foundation/errors.ts";

const positive = z.number().positive();
const count = z.number().int().positive();
const unit = (what: string) => z.number().min(0).lt(1, `${what} must be below 1`);

/** LoRA hyper-parameters (peft `LoraConfig`: `r`, `lora_alpha`, `lora_dropout`, `target_modules`, `use_rslora`). */
export const LoraSection = z.strictObject({
  /** Rank r (peft `r`, default 8). */
  r: count.default(8),
  /** Scale numerator (peft `lora_alpha`, default 16): s = alpha / r, or alpha / √r with use_rslora. */
  alpha: positive.default(16),
  /** Dropout on the adapter input (peft `lora_dropout`, default 0.05). */
  dropout: unit("lora.dropout").default(0.05),
  /** "all-linear" (the seven projections, default) or a list of projection names. */
  target_modules: z.union([z.literal("all-linear"), z.array(z.enum(PROJECTIONS)).min(1)]).default(
    "all-linear",
  ),
  /** Rank-stabilised scaling alpha / √r (peft `use_rslora`, default false). */
  use_rslora: z.boolean().default(false),
  /** Which biases train (peft `bias`): "none", the only one lathe trains (peft's default, the guides' setting). */
  bias: z.literal("none", { error: 'lora.bias must be "none": lathe trains LoRA adapters without biases' })
    .default("none"),
  /**
   * Whole modules trained beside the adapters and saved in the adapter (peft `modules_to_save`):
   * "embed_tokens", "lm_head" (default null: none).
   */
  modules_to_save: z.array(z.enum(["embed_tokens", "lm_head"])).min(1).nullable().default(null),
  /**
   * Rows of embed_tokens trained beside the adapters, the rest unchanged (peft
   * `trainable_token_indices`; e.g. the ids of added special tokens; default null).
   */
  trainable_token_indices: z.array(z.number().int().min(0)).min(1).nullable().default(null),
});

/**
 * The metrics an SFT evaluation computes, by their transformers / trl names: the token-weighted
 * cross-entropy and the share of trained tokens whose argmax logit is the target.
 */
export const EVAL_METRICS = ["eval_loss", "eval_mean_token_accuracy"] as const;
/** An evaluation metric's name ("eval_loss", "eval_rewards/accuracies", ...). */
export type EvalMetric = string;
const DEFAULT_METRIC: EvalMetric = "eval_loss";

/** transformers' reading of metric_for_best_model: a name without the "eval_" prefix gets it. */
export function evalMetricName(name: string): string {
  return name.startsWith("eval_") ? name : `eval_${name}`;
}

/** transformers' default of greater_is_better: false for a metric whose name ends in "loss". */
export function defaultGreaterIsBetter(metric: string): boolean {
  return !metric.endsWith("loss");
}

/** Schedules of transformers' `lr_scheduler_type` that lathe implements. */
export const SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine"] as const;

/**
 * The training arguments every training step shares (transformers' `TrainingArguments` and
 * peft's `LoraConfig`); each step adds its own keys and checks (see {@link TrainSftConfig}).
 */
export const TrainingArgs = z.strictObject({
  /**
   * The base model: a directory (relative to the project root or absolute), a Hugging Face
   * cache snapshot or a Hub repo id ("Qwen/Qwen2.5-0.5B"). Its config and weight files are
   * sources of the step, so they are part of its key.
   */
  model: z.string().min(1),
  /** Hub revision (branch, tag or commit) when `model` is a repo id (default "main"). */
  revision: z.string().min(1).default("main"),
  /** "webgpu" (default): the WGSL engine; "cpu-reference": the f64 CPU reference (tiny models, tests). */
  backend: z.enum(["webgpu", "cpu-reference"]).default("webgpu"),
  /**
   * "lora" (default): train LoRA adapters on the frozen base; "full": train every weight (trl
   * without a peft_config, LLaMA-Factory's `finetuning_type: full`), with f32 master weights and
   * AdamW state, writing a Hugging Face model directory instead of an adapter (`lora` is unused).
   */
  finetuning: z.enum(["lora", "full"]).default("lora"),
  lora: LoraSection.prefault({}),
  /**
   * A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start from
   * instead of fresh adapters; its r and target_modules must equal `lora`'s (default null).
   */
  init_adapter: z.string().min(1).nullable().default(null),
  /** Rows (token-shard rows of seq_len tokens) per micro-batch (default 1). */
  per_device_train_batch_size: count.default(1),
  /** Rows per evaluation batch; null: per_device_train_batch_size (default null). */
  per_device_eval_batch_size: count.nullable().default(null),
  /** Micro-batches per optimizer step (default 8). The loss is normalised over all of them. */
  gradient_accumulation_steps: count.default(8),
  /** Optimizer steps to run; −1 (default): num_train_epochs decides. */
  max_steps: z.number().int().refine((v) => v === -1 || v > 0, "max_steps must be -1 or a positive integer")
    .default(-1),
  /** Passes over the training rows when max_steps is −1 (default 3; fractions allowed). */
  num_train_epochs: positive.default(3),
  /** Peak learning rate (default 2e-4). */
  learning_rate: positive.default(2e-4),
  /** Learning-rate schedule (default "linear", as transformers). */
  lr_scheduler_type: z.enum(SCHEDULES).default("linear"),
  /** Warmup as a fraction of the total steps, used when warmup_steps is 0 (default 0). */
  warmup_ratio: unit("warmup_ratio").default(0),
  /** Warmup steps; overrides warmup_ratio when > 0 (default 0). */
  warmup_steps: z.number().int().min(0).default(0),
  /** Decoupled AdamW weight decay λ (default 0). */
  weight_decay: z.number().min(0).default(0),
  /** AdamW β1 (default 0.9). */
  adam_beta1: unit("adam_beta1").default(0.9),
  /** AdamW β2 (default 0.999). */
  adam_beta2: unit("adam_beta2").default(0.999),
  /** AdamW ε (default 1e-8). */
  adam_epsilon: positive.default(1e-8),
  /** Clip the global gradient norm to this; 0 disables clipping (default 1.0). */
  max_grad_norm: z.number().min(0).default(1),
  /** Recompute each layer's activations in the backward instead of keeping them (default true; webgpu). */
  gradient_checkpointing: z.boolean().default(true),
  /**
   * With gradient checkpointing: keep the layer inputs in host memory between the forward and the
   * backward instead of on the GPU, as Unsloth's offloaded checkpointing does (default false; webgpu).
   * Same gradients, (L − 1)·4·T·D bytes less GPU memory.
   */
  offload_layer_inputs: z.boolean().default(false),
  /** Evaluate on the eval split every N optimizer steps; null: only before and after training (default null). */
  eval_steps: count.nullable().default(null),
  /**
   * Keep the adapter of the best evaluation (by metric_for_best_model) and export it instead of
   * the last one (transformers `load_best_model_at_end`; default false). Needs eval_steps and an
   * eval split.
   */
  load_best_model_at_end: z.boolean().default(false),
  /**
   * The evaluation metric that ranks adapters and that early stopping watches: one of
   * {@link EVAL_METRICS}; a name without the "eval_" prefix gets it, as in transformers ("loss" is
   * "eval_loss", "mean_token_accuracy" is "eval_mean_token_accuracy"). Null: "eval_loss" (default).
   */
  metric_for_best_model: z.string().min(1).nullable().default(DEFAULT_METRIC),
  /**
   * Whether a larger metric is better; null (default): false when metric_for_best_model ends in
   * "loss", else true (transformers' rule), written into the manifest resolved.
   */
  greater_is_better: z.boolean().nullable().default(null),
  /** Stop after this many evaluations without improvement of metric_for_best_model; null: never (default null). */
  early_stopping_patience: count.nullable().default(null),
  /** An evaluation improves when the metric gets better by more than this (default 0). */
  early_stopping_threshold: z.number().min(0).default(0),
  /** Write a checkpoint every N optimizer steps; null: none (default 500). */
  save_steps: count.nullable().default(500),
  /** Keep at most this many checkpoints, deleting the oldest; null: keep all (default null). */
  save_total_limit: count.nullable().default(null),
  /** Log loss, lr, grad_norm and tokens/s every N optimizer steps (default 1). */
  logging_steps: count.default(1),
});
/** The shared training arguments, parsed: what the training loop reads. */
export type TrainingArgs = z.output<typeof TrainingArgs>;

/**
 * A check of the best-model keys against the evaluation metrics a step computes (`metrics`):
 * metric_for_best_model must name one, and load_best_model_at_end needs eval_steps.
 */
export function checkBestModelKeys(metrics: readonly string[]) {
  return (
    config: {
      metric_for_best_model: string | null;
      load_best_model_at_end: boolean;
      eval_steps: number | null;
    },
    ctx: z.RefinementCtx,
  ): void => {
    const metric = config.metric_for_best_model;
    if (metric !== undefined && metric !== null && !metrics.includes(evalMetricName(metric))) {
      const read = evalMetricName(metric) === metric ? "" : ` (read as "${evalMetricName(metric)}")`;
      ctx.addIssue({
        code: "custom",
        path: ["metric_for_best_model"],
        message: `unknown metric "${metric}"${read}; the evaluation computes ${
          metrics.map((m) => `"${m}"`).join(", ")
        } (the "eval_" prefix may be left out, as in "loss")`,
      });
    }
    if (config.load_best_model_at_end === true && config.eval_steps === null) {
      ctx.addIssue({
        code: "custom",
        path: ["load_best_model_at_end"],
        message: "needs evaluations during training, but eval_steps is null (the adapter is then only " +
          "evaluated before and after training); set eval_steps, e.g. to save_steps",
      });
    }
  };
}

/** The train-sft config; see docs/training.md for the reference with the transformers names. */
export const TrainSftConfig = TrainingArgs.superRefine(checkBestModelKeys(EVAL_METRICS)).overwrite(
  canonicalBestModelKeys,
);
/** The parsed config. */
export type TrainSftConfig = z.output<typeof TrainSftConfig>;

/** What load_best_model_at_end, metric_for_best_model and greater_is_better resolve to. */
export interface BestModelSettings {
  /** Export the adapter of the best evaluation (load_best_model_at_end). */
  loadBest: boolean;
  /** The metric, with its "eval_" prefix. */
  metric: EvalMetric;
  /** A larger metric is better. */
  greaterIsBetter: boolean;
}

/**
 * The settings of a parsed config, with transformers' defaults for the keys it leaves out;
 * `metrics` are the evaluation metrics of the step (`step` names it in errors).
 */
export function bestModelSettings(
  config: TrainingArgs,
  metrics: readonly string[] = EVAL_METRICS,
  step = "train-sft",
): BestModelSettings {
  const given = config.metric_for_best_model ?? DEFAULT_METRIC;
  const metric = evalMetricName(given);
  if (!metrics.includes(metric)) {
    throw new LatheError(
      `Cannot use ${step}.metric_for_best_model "${given}": it is not an evaluation metric`,
      {
        hint: `use one of ${metrics.map((m) => `"${m}"`).join(", ")}`,
      },
    );
  }
  return {
    loadBest: config.load_best_model_at_end ?? false,
    metric,
    greaterIsBetter: config.greater_is_better ?? defaultGreaterIsBetter(given),
  };
}

/** Resolves the metric's name and greater_is_better as transformers does, so equal meanings give equal keys. */
export function canonicalBestModelKeys<
  T extends { metric_for_best_model: string | null; greater_is_better: boolean | null },
>(config: T): T {
  const given = config.metric_for_best_model ?? DEFAULT_METRIC;
  config.metric_for_best_model = evalMetricName(given);
  config.greater_is_better ??= defaultGreaterIsBetter(given);
  return config;
}

/** trl's DPO `loss_type`s lathe implements (steps/train/dpo.ts). */
export const DPO_LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"] as const;

/** The metrics a DPO step logs, by trl's names (each also with eval_; steps/train/dpo.ts). */
export const DPO_METRICS = [
  "rewards/chosen",
  "rewards/rejected",
  "rewards/accuracies",
  "rewards/margins",
  "logps/chosen",
  "logps/rejected",
  "logits/chosen",
  "logits/rejected",
] as const;

/** The evaluation metrics of train-dpo: eval_loss and trl's eval_rewards/…, eval_logps/…, eval_logits/…. */
export const DPO_EVAL_METRICS = ["eval_loss", ...DPO_METRICS.map((m) => `eval_${m}`)];

/**
 * The train-dpo config: the training arguments, with trl's `DPOConfig` keys (docs/training.md).
 * `per_device_train_batch_size` counts pairs (each two rows), as trl's does.
 */
export const TrainDpoConfig = TrainingArgs.extend({
  /** Peak learning rate (trl's DPOConfig default 1e-6). */
  learning_rate: positive.default(1e-6),
  /** β, the strength of the pull towards the reference (default 0.1). */
  beta: z.number().positive("beta must be above 0 (β scales the implicit reward; trl's default is 0.1)")
    .default(0.1),
  /** trl's loss_type: "sigmoid" (default, DPO), "ipo", "hinge" or "robust". */
  loss_type: z.enum(DPO_LOSS_TYPES).default("sigmoid"),
  /** ε, the assumed share of flipped labels (cDPO, robust DPO; default 0). */
  label_smoothing: z.number().min(0).lt(0.5, "label_smoothing must be below 0.5").default(0),
  /** No reference model: ρ = 0 (default false). */
  reference_free: z.boolean().default(false),
  /** a: add a·(the chosen answers' mean token NLL) to the loss (RPO); null: none (default). */
  rpo_alpha: z.number().positive().nullable().default(null),
  /**
   * Compute the reference log-probs once before training and keep them as an output
   * (`reference_logps.json`), reused on resume and by reruns with the same reference (default true).
   */
  precompute_ref_log_probs: z.boolean().default(true),
}).superRefine(checkBestModelKeys(DPO_EVAL_METRICS)).overwrite(canonicalBestModelKeys);
/** The parsed train-dpo config. */
export type TrainDpoConfig = z.output<typeof TrainDpoConfig>;
