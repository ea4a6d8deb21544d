/**
 * The `train-sft` step: LoRA supervised fine-tuning of a base model on the token shards of
 * `tokenize`, written as a PEFT adapter.
 *
 * QLoRA: with a `quantize` step in the run (its optional input `base`), train-sft trains on that
 * step's 4-bit model, which must be the quantized `model`; the adapter still names `model` as
 * its base, as peft does for a model loaded in 4 bits. A pre-quantized checkpoint (`*-bnb-4bit`)
 * named by `model` trains the same way. Either way the base stays 4-bit on the GPU
 * (docs/engine.md), norms and embeddings keep their precision, and gradient checkpointing is on
 * by default (prepare_model_for_kbit_training's settings).
 *
 * ```
 * deno task step train-sft --run <id> --set model=Qwen/Qwen2.5-0.5B --set max_steps=200
 * deno task step train-sft --run <id> --resume ...   # continue a killed run (LATHE_RESUME=1)
 * ```
 *
 * Full fine-tuning (`finetuning: full`): every weight trains (f32 masters and AdamW state on the
 * GPU), and `model/` replaces `adapter/`: a Hugging Face model directory in the base's dtype with
 * its config, tokenizer and generation config, which later steps take as a model.
 *
 * Outputs: `adapter/` (adapter_config.json, adapter_model.safetensors; PEFT format, loadable
 * by `PeftModel.from_pretrained`; with `load_best_model_at_end`, the adapter of the best
 * evaluation, else the last one), `trainer_state.json` (transformers' layout with the log
 * history), `loss.svg`, `metrics.jsonl` (loss, lr, grad_norm, tokens_per_s, mean_token_accuracy,
 * eval_loss, eval_mean_token_accuracy) and `checkpoints/step-N/`. While the step runs, checkpoints live in
 * `runs/<id>/.train-sft.checkpoints/<key>/` (outside the staging directory, so a killed run
 * keeps them) and move into the step directory when it succeeds. docs/training.md has the
 * config reference.
 * @module
 */
import { dirname, join } from "node:path";
import { type LoraConfig, resolveTargetModules } from "../formats/peft.ts";
import { loadModelConfig } from "../formats/model_config.ts";
import type { LoraSpec, TrainableModel } from "../kernels/models/trainable.ts";
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type Upstream } from "./define.ts";
import { LatheError } from "../foundation/errors.ts";

import { readAdapterWeights } from "./train/checkpoint.ts";
import { TrainSftConfig } from "./train/config.ts";
import { checkEvaluationNeeds, trainLoop } from "./train/loop.ts";
import { fullTrained } from "./train/trained.ts";
import {
  addedTokens,
  baseDir,
  checkFullFinetuning,
  checkMemory,
  createModel,
  describeTraining,
  measuredPeak,
  openSplits,
  resizedBase,
  resumeChoice,
  trainingSources,
  writeTrainingOutputs,
} from "./train/setup.ts";

export { TrainSftConfig };

/** Where a run keeps its checkpoints while the step runs: `<run dir>/.train-sft.checkpoints/<key>`. */
export const CHECKPOINTS_DIR = ".train-sft.checkpoints";

/**
 * Fault injection for tests: `wrapModel` replaces the backend's model by a wrapper (to make
 * a step fail at a chosen point, or return a non-finite loss). Empty in normal use.
 */
export const trainSftHooks: { wrapModel?: (model: TrainableModel) => TrainableModel } = {};

async function run(ctx: StepContext, stepConfig: TrainSftConfig, inputs: Record<string, Upstream>) {
  let config = stepConfig;
  const original = baseDir("train-sft", ctx, config, inputs);
  // New tokens (tokenize.add_special_tokens): train on the base grown to their vocabulary.
  const added = await addedTokens(inputs.data, await loadModelConfig(original));
  const dir = await resizedBase(ctx, original, added, "train-sft");
  const modelConfig = await loadModelConfig(dir);
  if (
    added !== null && config.finetuning !== "full" &&
    config.lora.modules_to_save?.includes("embed_tokens") !== true
  ) {
    // Their rows must train: as trainable tokens beside the adapters (peft's way), unless listed already.
    const rows = new Set([...(config.lora.trainable_token_indices ?? []), ...added.ids]);
    config = {
      ...config,
      lora: { ...config.lora, trainable_token_indices: [...rows].sort((a, b) => a - b) },
    };
  }
  const { train, eval: evalSplit } = await openSplits(inputs.data, modelConfig, (i) => {
    if (i.kind !== "preference") return;
    throw new LatheError(
      `Cannot train-sft on preference data (split "${i.split}" holds chosen/rejected pairs)`,
      {
        hint:
          "use the train-dpo step for preference data, or prepare SFT rows (messages, prompt/response, text)",
      },
    );
  });
  // Before the model loads: a config that needs evaluations fails fast without them.
  checkEvaluationNeeds(config, evalSplit !== null && evalSplit.rows.length > 0);
  const full = config.finetuning === "full";
  if (full) checkFullFinetuning("train-sft", config, modelConfig);
  const targets = full
    ? []
    : resolveTargetModules(config.lora.target_modules, "train-sft.lora.target_modules");
  const spec: LoraSpec = {
    r: config.lora.r,
    alpha: config.lora.alpha,
    dropout: config.lora.dropout,
    targets,
    useRslora: config.lora.use_rslora,
  };
  const peft: LoraConfig = {
    baseModelNameOrPath: config.model,
    r: spec.r,
    loraAlpha: spec.alpha,
    loraDropout: spec.dropout,
    targetModules: targets,
    useRslora: spec.useRslora,
    revision: config.revision === "main" ? null : config.revision,
    modulesToSave: config.lora.modules_to_save,
    trainableTokenIndices: config.lora.trainable_token_indices,
  };
  const checkpointDir = join(ctx.runDir, CHECKPOINTS_DIR, ctx.key);
  const resume = await resumeChoice("train-sft", checkpointDir);
  // Before any weight is loaded: a step that cannot fit stops here, with the settings that would.
  const plan = config.backend === "webgpu"
    ? await checkMemory("train-sft", config, modelConfig, targets, train.index.seq_len)
    : null;
  const base = await createModel(config, ctx, dir, modelConfig, spec);
  const model = trainSftHooks.wrapModel ? trainSftHooks.wrapModel(base) : base;
  try {
    if (config.init_adapter !== null) {
      const from = dirname(ctx.sources["init_adapter/config"]);
      const loaded = await readAdapterWeights(from, modelConfig);
      const same = loaded.config.r === spec.r &&
        resolveTargetModules(loaded.config.targetModules).join() === targets.join();
      if (!same) {
        throw new LatheError(
          `Cannot start from adapter "${from}" (train-sft.init_adapter): it has r=${loaded.config.r} and ` +
            `target_modules [${
              resolveTargetModules(loaded.config.targetModules).join(", ")
            }], the config asks ` +
            `for r=${spec.r} and [${targets.join(", ")}]`,
          { hint: "set train-sft.lora.r and lora.target_modules to the adapter's values" },
        );
      }
      await model.setLora(loaded.weights);
    }
    const result = await trainLoop({
      model,
      config,
      lora: peft,
      trained: full ? fullTrained() : undefined,
      train,
      eval: evalSplit,
      seed: ctx.seed,
      checkpointDir: config.save_steps === null ? null : checkpointDir,
      // Where the checkpoints are once the step succeeds, relative to the step directory.
      checkpointLabel: "checkpoints",
      resume,
      io: { log: ctx.log, progress: ctx.progress },
    });
    const outputs = await writeTrainingOutputs(
      ctx,
      model,
      peft,
      result,
      config,
      `train-sft ${config.model}`,
      checkpointDir,
      [],
      dir,
      added?.tokenizerDir ?? null,
    );
    return {
      outputs,
      metrics: {
        ...result.metrics,
        ...(plan === null ? {} : {
          memory_planned_bytes: plan.total,
          memory_peak_bytes: await measuredPeak(),
        }),
      },
    };
  } finally {
    model[Symbol.dispose]();
  }
}

/** The train-sft step. */
export const step = defineStep({
  name: "train-sft",
  version: "1",
  description:
    "Supervised fine-tuning on token shards: LoRA (writes a PEFT adapter) or every weight (writes a model)",
  config: TrainSftConfig,
  inputs: { data: "tokenize" },
  optionalInputs: { base: "quantize" },
  sources: trainingSources,
  run,
  describe: (config, ctx) => describeTraining("train-sft", config, ctx),
});

if (import.meta.main) await runFromCli(step);
