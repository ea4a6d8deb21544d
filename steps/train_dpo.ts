/**
 * The `train-dpo` step: preference tuning (DPO and trl's variants, steps/train/dpo.ts) on the
 * paired shards of `tokenize`, of LoRA adapters written as a PEFT adapter, or with
 * `finetuning: full` of every weight, written as a model directory (as train-sft's full fine-tune).
 *
 * The policy and its reference:
 * - no train-sft upstream (and no init_adapter): the policy is a fresh adapter and the reference
 *   is the base alone (trl's `ref_model=None` with peft: the adapter disabled);
 * - train-sft upstream (or init_adapter): the policy continues from that adapter (its r, alpha,
 *   dropout and target modules) and the reference is the base with that adapter, frozen. (trl
 *   with a loaded trainable adapter and `ref_model=None` takes the bare base as reference;
 *   lathe takes the model the preference tuning starts from, which is what DPO's KL term means.)
 * Either way the reference is the policy before its first step, so with
 * `precompute_ref_log_probs` (default) the reference log-probs are the policy's scores before
 * training, computed once (no dropout), kept in `reference_logps.json` with the identity of the
 * reference (base, adapter, data, backend) and reused on resume and by any later train-dpo whose
 * reference is the same (a rerun with another beta or loss_type). Without it each step scores its
 * pairs under the reference adapter (B = 0 for the bare base) before the policy's forward.
 *
 * With `finetuning: full` the policy is every weight of the base (or of a full train-sft's model),
 * and the reference is those weights before the first step: precomputed as above, or scored each
 * step from a host copy of them. After a LoRA train-sft it is refused (merge the adapter first).
 *
 * Works on 16/32-bit and 4-bit bases (a quantize step upstream, or a pre-quantized checkpoint),
 * as train-sft does; everything around the objective is train-sft's loop (accumulation,
 * schedules, clipping, evaluation, early stopping, best model, checkpoints and resume).
 *
 * Outputs: `adapter/` (or `model/`), `trainer_state.json`, `loss.svg` (loss, reward margins and accuracies),
 * `metrics.jsonl` (trl's names), `reference_logps.json` (with precomputing) and `checkpoints/`.
 * docs/training.md has the config reference.
 * @module
 */
import { dirname, join } from "node:path";
import { type LoraConfig, resolveTargetModules } from "../formats/peft.ts";
import { loadModelConfig, type ModelConfig } from "../formats/model_config.ts";
import type { LoraSpec, LoraWeights, TrainableModel } from "../kernels/models/trainable.ts";
import { exists, writeJsonAtomic } from "../foundation/atomic.ts";
import { canonicalJson, sha256Hex } from "../foundation/hash.ts";
import { LatheError } from "../foundation/errors.ts";
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type Upstream } from "./define.ts";
import type { Split } from "./train/batches.ts";
import { readAdapterWeights } from "./train/checkpoint.ts";
import { DPO_EVAL_METRICS, TrainDpoConfig } from "./train/config.ts";
import {
  DPO_METRICS,
  dpoObjective,
  pairBatch,
  type ReferenceSource,
  scoreSplit,
  sequenceStats,
  tableReference,
} from "./train/dpo.ts";
import { checkEvaluationNeeds, trainLoop } from "./train/loop.ts";
import { type FullModel, fullTrained } from "./train/trained.ts";
import {
  baseDir,
  checkFullFinetuning,
  checkMemory,
  createModel,
  describeTraining,
  measuredPeak,
  openSplits,
  resumeChoice,
  trainingSources,
  writeTrainingOutputs,
} from "./train/setup.ts";

export { TrainDpoConfig };

/** Where a run keeps train-dpo's checkpoints (and its reference log-probs) while the step runs. */
export const CHECKPOINTS_DIR = ".train-dpo.checkpoints";
/** The reference log-probs file, in the checkpoint directory and among the outputs. */
export const REFERENCE_FILE = "reference_logps.json";

/** Fault injection for tests, as train-sft's. */
export const trainDpoHooks: { wrapModel?: (model: TrainableModel) => TrainableModel } = {};

/** The adapter the policy starts from (and the reference keeps): train-sft's, init_adapter's, or none. */
interface StartAdapter {
  /** Where it was read, for messages. */
  from: string;
  weights: LoraWeights[];
  config: LoraConfig;
}

async function startAdapter(
  ctx: StepContext,
  config: TrainDpoConfig,
  inputs: Record<string, Upstream>,
  model: ModelConfig,
): Promise<StartAdapter | null> {
  const sft = inputs.sft;
  let dir: string;
  let what: string;
  if (sft !== undefined) {
    const sftConfig = sft.manifest.config as { model?: unknown; revision?: unknown };
    if (sftConfig.model !== config.model || (sftConfig.revision ?? "main") !== config.revision) {
      throw new LatheError(
        `Cannot use the adapter of step "${sft.manifest.step}" as train-dpo's reference: it was trained on ` +
          `"${String(sftConfig.model)}", train-dpo.model is "${config.model}"`,
        {
          hint: "set train-dpo.model to train-sft.model: the reference adapter must fit the base it runs on",
        },
      );
    }
    if (config.init_adapter !== null) {
      throw new LatheError(
        "Cannot use train-dpo.init_adapter with a train-sft step in the recipe: the policy starts from " +
          "train-sft's adapter",
        { hint: "drop train-dpo.init_adapter, or run train-dpo without the train-sft step" },
      );
    }
    dir = dirname(sft.path("adapter"));
    what = `step "${sft.manifest.step}"`;
  } else if (config.init_adapter !== null) {
    dir = dirname(ctx.sources["init_adapter/config"]);
    what = `train-dpo.init_adapter "${config.init_adapter}"`;
  } else return null;
  let loaded;
  try {
    loaded = await readAdapterWeights(dir, model);
  } catch (error) {
    if (!(error instanceof LatheError)) throw error;
    throw new LatheError(
      `Cannot use the adapter of ${what} as train-dpo's reference: it does not fit the base "${config.model}": ` +
        error.message,
      { hint: "train the adapter on the same base model (train-dpo.model = train-sft.model)" },
    );
  }
  if (loaded.config.modulesToSave?.length || loaded.config.trainableTokenIndices?.length) {
    throw new LatheError(
      `Cannot continue the adapter of ${what} in train-dpo: it trains modules_to_save or trainable tokens, ` +
        "which train-dpo does not carry yet",
      { hint: "merge that adapter into the base (the merge step) and run train-dpo on the merged model" },
    );
  }
  return { from: what, weights: loaded.weights, config: loaded.config };
}

/** The identity of the reference: what its log-probs depend on (base, adapter, data, backend, dtype). */
function referenceKey(
  ctx: StepContext,
  config: TrainDpoConfig,
  inputs: Record<string, Upstream>,
  model: TrainableModel,
): string {
  return sha256Hex(canonicalJson({
    data: inputs.data.manifest.key,
    base: inputs.base?.manifest.key ?? null,
    sft: inputs.sft?.manifest.key ?? null,
    model: config.model,
    revision: config.revision,
    sources: ctx.sourceHashes,
    backend: model.backend,
    dtype: "dtype" in model ? String((model as { dtype: unknown }).dtype) : null,
    eval_batch: config.per_device_eval_batch_size ?? config.per_device_train_batch_size,
    // A full fine-tune scores with its own weights, not the base under a zero adapter.
    ...(config.finetuning === "full" ? { finetuning: "full" } : {}),
  }));
}

interface StoredReference {
  key: string;
  train: number[];
  eval: number[];
}

async function readReference(path: string, key: string): Promise<StoredReference | null> {
  try {
    const stored = JSON.parse(await Deno.readTextFile(path)) as StoredReference;
    return stored.key === key && Array.isArray(stored.train) && Array.isArray(stored.eval) ? stored : null;
  } catch {
    return null;
  }
}

/** A finished train-dpo's reference log-probs with this key, in any run under the runs root. */
async function findReference(runsRoot: string, key: string): Promise<StoredReference | null> {
  const dirs = async (path: string) => {
    try {
      return (await Array.fromAsync(Deno.readDir(path))).filter((e) => e.isDirectory).map((e) => e.name);
    } catch {
      return [];
    }
  };
  for (const run of await dirs(runsRoot)) {
    for (const step of await dirs(join(runsRoot, run))) {
      if (step !== "train-dpo" && !step.startsWith("train-dpo@")) continue;
      const found = await readReference(join(runsRoot, run, step, REFERENCE_FILE), key);
      if (found) return found;
    }
  }
  return null;
}

/**
 * The precomputed reference: from this step's checkpoint directory (a resume), from an earlier
 * train-dpo with the same reference, or scored now; kept in the checkpoint directory.
 */
async function precomputedReference(
  ctx: StepContext,
  key: string,
  model: TrainableModel,
  train: Split,
  evalSplit: Split | null,
  batchSize: number,
  checkpointDir: string,
): Promise<{ source: ReferenceSource; reused: boolean }> {
  const path = join(checkpointDir, REFERENCE_FILE);
  let stored = await readReference(path, key) ?? await findReference(dirname(ctx.runDir), key);
  const reused = stored !== null;
  if (stored === null) {
    const pairs = (train.rows.length + (evalSplit?.rows.length ?? 0)) / 2;
    const progress = ctx.progress(pairs, "pairs");
    const tick = (n: number) => progress.tick(n, "reference log-probs");
    const trainLogps = await scoreSplit(model, train, batchSize, tick);
    const evalLogps = evalSplit ? await scoreSplit(model, evalSplit, batchSize, tick) : new Float64Array(0);
    progress.done("reference log-probs computed");
    stored = { key, train: Array.from(trainLogps), eval: Array.from(evalLogps) };
  }
  await Deno.mkdir(checkpointDir, { recursive: true });
  await writeJsonAtomic(path, stored);
  return { reused, source: tableReference(stored) };
}

/**
 * The reference scored each time: the policy's adapter is set aside, the reference adapter (the
 * start adapter, or B = 0 for the bare base) scores the pairs, and the policy comes back.
 */
export function liveReference(
  model: TrainableModel,
  reference: LoraWeights[],
  train: Split,
  evalSplit: Split | null,
): ReferenceSource {
  return swappedReference(model, () => model.getLora(), (w) => model.setLora(w), reference, train, evalSplit);
}

/**
 * The reference of a full fine-tune scored each time: the policy's weights go to the host, the
 * initial weights (a host copy taken before the first step) score the pairs, and the policy's come
 * back, bit for bit (the f32 masters). Twice the weights on the host and two uploads per scoring:
 * precomputing (the default) costs one pass.
 */
export function liveFullReference(
  model: FullModel,
  initial: ReadonlyMap<string, Float32Array>,
  train: Split,
  evalSplit: Split | null,
): ReferenceSource {
  return swappedReference(
    model,
    () => model.getWeights(),
    (w) => model.setWeights(w),
    initial,
    train,
    evalSplit,
  );
}

function swappedReference<W>(
  model: TrainableModel,
  get: () => Promise<W>,
  set: (weights: W) => Promise<void>,
  reference: W,
  train: Split,
  evalSplit: Split | null,
): ReferenceSource {
  return {
    async logps(split, pairs) {
      const policy = await get();
      await set(reference);
      try {
        const batch = pairBatch(split === "train" ? train : evalSplit!, pairs);
        const stats = sequenceStats(batch, await model.scoreTokens(batch));
        return stats.logp;
      } finally {
        await set(policy);
      }
    },
  };
}

async function run(ctx: StepContext, config: TrainDpoConfig, inputs: Record<string, Upstream>) {
  // After a full fine-tune the SFT model is the base: a fresh policy adapter on it, the model itself
  // the reference.
  const sftModel = inputs.sft && "model" in inputs.sft.manifest.outputs
    ? dirname(inputs.sft.path("model"))
    : null;
  const dir = sftModel ?? baseDir("train-dpo", ctx, config, inputs);
  const modelConfig = await loadModelConfig(dir);
  const { train, eval: evalSplit } = await openSplits(inputs.data, modelConfig, (i) => {
    if (i.kind === "preference" && i.paired) return;
    throw new LatheError(
      `Cannot train-dpo on split "${i.split}" of step "${inputs.data.manifest.step}": it holds ${i.kind} rows, ` +
        "not chosen/rejected pairs",
      {
        hint: "give train-dpo a tokenize step of preference data (prompt, chosen, rejected), e.g. " +
          "prepare@preference and tokenize@preference before it in the recipe",
      },
    );
  });
  checkEvaluationNeeds(config, evalSplit !== null && evalSplit.rows.length > 0, "train-dpo");
  if (config.lora.modules_to_save !== null || config.lora.trainable_token_indices !== null) {
    throw new LatheError("Cannot train modules_to_save or trainable_token_indices in train-dpo yet", {
      hint: "train them in train-sft; merge, then run train-dpo on the merged model",
    });
  }
  // finetuning: full trains every weight of the policy; the reference is the same weights before the
  // first step (the base, or a full train-sft's model).
  const full = config.finetuning === "full";
  if (full) {
    checkFullFinetuning("train-dpo", config, modelConfig);
    if (inputs.sft && !sftModel) {
      throw new LatheError(
        `Cannot fine-tune every weight in train-dpo after the LoRA adapter of step "${inputs.sft.manifest.step}" ` +
          "(train-dpo.finetuning: full): the policy would be a base plus an adapter, not one model",
        {
          hint: "set train-dpo.finetuning: lora to continue the SFT adapter, or merge it into its base " +
            "(a merge step) and give train-dpo.model the merged model",
        },
      );
    }
  }
  const start = sftModel || full ? null : await startAdapter(ctx, config, inputs, modelConfig);
  const spec: LoraSpec = start
    ? {
      r: start.config.r,
      alpha: start.config.loraAlpha,
      dropout: start.config.loraDropout,
      targets: resolveTargetModules(start.config.targetModules),
      useRslora: start.config.useRslora,
    }
    : {
      r: config.lora.r,
      alpha: config.lora.alpha,
      dropout: config.lora.dropout,
      targets: full ? [] : resolveTargetModules(config.lora.target_modules, "train-dpo.lora.target_modules"),
      useRslora: config.lora.use_rslora,
    };
  const peft: LoraConfig = {
    baseModelNameOrPath: sftModel ?? config.model,
    r: spec.r,
    loraAlpha: spec.alpha,
    loraDropout: spec.dropout,
    targetModules: spec.targets,
    useRslora: spec.useRslora,
    revision: config.revision === "main" ? null : config.revision,
  };
  const checkpointDir = join(ctx.runDir, CHECKPOINTS_DIR, ctx.key);
  const resume = await resumeChoice("train-dpo", checkpointDir);
  // A micro-batch of b pairs runs 2b rows.
  const rows = { ...config, per_device_train_batch_size: 2 * config.per_device_train_batch_size };
  const plan = config.backend === "webgpu"
    ? await checkMemory("train-dpo", rows, modelConfig, spec.targets, train.index.seq_len)
    : null;
  const base = await createModel(config, ctx, dir, modelConfig, spec);
  const model = trainDpoHooks.wrapModel ? trainDpoHooks.wrapModel(base) : base;
  try {
    if (start) await model.setLora(start.weights);
    const evalBs = config.per_device_eval_batch_size ?? config.per_device_train_batch_size;
    const refKey = referenceKey(ctx, config, inputs, model);
    let reference: ReferenceSource;
    let reused = false;
    if (config.reference_free) {
      reference = { logps: (_, pairs) => Promise.resolve(new Float64Array(2 * pairs.length)) };
    } else if (config.precompute_ref_log_probs) {
      // The reference is the policy before its first step: score now, before any update.
      ({ source: reference, reused } = await precomputedReference(
        ctx,
        refKey,
        model,
        train,
        evalSplit,
        evalBs,
        checkpointDir,
      ));
    } else if (full) {
      // A host copy of the initial weights scores each step.
      const policy = model as FullModel;
      reference = liveFullReference(policy, await policy.getWeights(), train, evalSplit);
    } else {
      const weights = start?.weights ??
        (await model.getLora()).map((w) => ({ ...w, B: new Float32Array(w.B.length) }));
      reference = liveReference(model, weights, train, evalSplit);
    }
    const objective = dpoObjective(
      train,
      evalSplit,
      {
        lossType: config.loss_type,
        beta: config.beta,
        labelSmoothing: config.label_smoothing,
        referenceFree: config.reference_free,
        rpoAlpha: config.rpo_alpha,
      },
      reference,
      modelConfig.vocabSize,
    );
    const result = await trainLoop({
      model,
      config,
      lora: peft,
      trained: full ? fullTrained() : undefined,
      train,
      eval: evalSplit,
      objective,
      evalMetrics: DPO_EVAL_METRICS,
      stepName: "train-dpo",
      seed: ctx.seed,
      checkpointDir: config.save_steps === null ? null : checkpointDir,
      checkpointLabel: "checkpoints",
      resume,
      io: { log: ctx.log, progress: ctx.progress },
    });
    // The reference log-probs become an output; the checkpoints move in after them.
    const refPath = join(checkpointDir, REFERENCE_FILE);
    const hasReference = await exists(refPath);
    if (hasReference) await Deno.rename(refPath, await ctx.out(REFERENCE_FILE));
    const outputs = await writeTrainingOutputs(
      ctx,
      model,
      peft,
      result,
      config,
      `train-dpo ${config.model}`,
      checkpointDir,
      ["rewards/margins", "rewards/accuracies"],
      dir,
    );
    if (hasReference) outputs.reference_logps = REFERENCE_FILE;
    const { eval_mean_token_accuracy: _, ...metrics } = result.metrics;
    return {
      outputs,
      metrics: {
        ...metrics,
        pairs: train.rows.length / 2,
        reference: config.reference_free
          ? "none"
          : full
          ? (sftModel
            ? `the model of step "${inputs.sft!.manifest.step}" before training`
            : "base before training")
          : start
          ? `base + adapter of ${start.from}`
          : "base (adapter disabled)",
        reference_key: config.reference_free ? null : refKey,
        reference_reused: reused,
        ...(plan === null
          ? {}
          : { memory_planned_bytes: plan.total, memory_peak_bytes: await measuredPeak() }),
      },
    };
  } finally {
    model[Symbol.dispose]();
  }
}

/** Metric names train-dpo logs per step (for docs and tests). */
export const TRAIN_DPO_METRICS = ["loss", ...DPO_METRICS];

/** The train-dpo step. */
export const step = defineStep({
  name: "train-dpo",
  version: "1",
  description:
    "Preference tuning (DPO, IPO, hinge, robust) on paired shards: LoRA (writes a PEFT adapter) or every weight (writes a model)",
  config: TrainDpoConfig,
  inputs: { data: "tokenize" },
  optionalInputs: { base: "quantize", sft: "train-sft" },
  sources: trainingSources,
  run,
  // A micro-batch of b pairs is 2b rows; after train-sft, the adapter is train-sft's.
  describe: (config, ctx) =>
    describeTraining(
      "train-dpo",
      ctx.inputs.sft ? { ...config, lora: ctx.inputs.sft.lora as TrainDpoConfig["lora"] } : config,
      ctx,
      2,
    ),
});

if (import.meta.main) await runFromCli(step);
