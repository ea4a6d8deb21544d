/**
 * Training checkpoints: everything a run needs to continue exactly where it stopped.
 *
 * ```
 * <root>/step-<N>/
 *   adapter_config.json, adapter_model.safetensors   the adapter after N steps (PEFT format), or with
 *   model.safetensors                                full fine-tuning every weight (f32 masters)
 *   optimizer.safetensors                            AdamW moments, F32: "<adapter key>.exp_avg",
 *                                                    "<adapter key>.exp_avg_sq"; metadata step = N
 *   training_state.json                              data cursor, seeds, running sums, early stopping,
 *                                                    best evaluation
 *   trainer_state.json                               transformers-style state with log_history
 *   best_adapter/                                    with load_best_model_at_end: the adapter (or the
 *                                                    weights) of the best evaluation so far
 * ```
 * A checkpoint is written into `.step-<N>.tmp-<id>/` and renamed into place, so a `step-<N>`
 * directory is always complete; a run killed while writing leaves only a temp directory,
 * which the next run removes.
 * @module
 */
import { join } from "node:path";
import { type AdapterExtras, type LoraConfig, readPeftAdapter } from "../../formats/peft.ts";
import { SafetensorsFile, type TensorSource, writeSafetensors } from "../../formats/safetensors.ts";
import type { ModelConfig } from "../../formats/model_config.ts";
import type { LoraWeights, OptimizerState, TrainableModel } from "../../kernels/models/trainable.ts";
import { exists, writeJsonAtomic } from "../../foundation/atomic.ts";
import { LatheError } from "../../foundation/errors.ts";
import type { BestModelRecord, TrainerState } from "./trainer_state.ts";
import { loraTrained, type Trained, type TrainedWeights } from "./trained.ts";

/** Format tag of training_state.json. */
export const TRAINING_STATE_FORMAT = "lathe.train-state/1";
/** File names inside a checkpoint. */
export const OPTIMIZER_FILE = "optimizer.safetensors";
export const TRAINING_STATE_FILE = "training_state.json";
export const TRAINER_STATE_FILE = "trainer_state.json";
export const BEST_ADAPTER_DIR = "best_adapter";

/** The loop's own state: the data cursor, the seeds and what the final metrics sum over. */
export interface TrainingState {
  format: typeof TRAINING_STATE_FORMAT;
  /** Optimizer steps taken. */
  step: number;
  /** Epoch of the next row to read. */
  epoch: number;
  /** Index of the next row in that epoch's shuffled order. */
  position: number;
  /** Seed of the shuffles (PCG32 stream SHUFFLE_STREAM + epoch) and of the dropout masks. */
  seed: number;
  shuffleStream: number;
  dropoutStream: number;
  /** Training rows the cursor indexes (checked on resume). */
  rows: number;
  totalSteps: number;
  /** Σ of the per-step losses so far (train_loss = lossSum / step). */
  lossSum: number;
  /** Token slots and trained tokens processed so far. */
  tokens: number;
  trainedTokens: number;
  /** Training seconds so far (summed over resumed runs). */
  seconds: number;
  /** Eval loss of the adapters before the first step, or null without an eval split. */
  evalLossBefore: number | null;
  /**
   * Early stopping: best value of metric_for_best_model so far (eval_loss unless configured
   * otherwise; the name is kept from checkpoints that only knew eval_loss) and evaluations since
   * it improved.
   */
  bestEvalLoss: number | null;
  badEvals: number;
  /** Σ of the step losses since the last log entry, and their count (logging_steps windows). */
  windowLoss: number;
  windowSteps: number;
  /**
   * The objective's further metrics since the last log entry, by name: [Σ of the step values,
   * steps that had one] (SFT's `mean_token_accuracy`, DPO's `rewards/…`).
   */
  windows?: Record<string, [number, number]>;
  /**
   * The token accuracy's window as checkpoints wrote it before `windows` (read on resume; absent
   * in checkpoints written since).
   */
  windowAccuracy?: number;
  windowAccuracySteps?: number;
  /**
   * With load_best_model_at_end only (absent otherwise): the best evaluation so far, null before
   * the first; its adapter is the checkpoint's `best_adapter/`.
   */
  bestModel?: BestModelRecord | null;
}

/** A checkpoint on disk. */
export interface CheckpointRef {
  dir: string;
  step: number;
}

/** What a checkpoint restores. */
export interface LoadedCheckpoint {
  /** The adapter (LoRA); empty with full fine-tuning, whose weights are `trained`. */
  lora: LoraWeights[];
  /** What trains: the adapter, or every weight. */
  trained: TrainedWeights;
  optimizer: OptimizerState;
  training: TrainingState;
  trainer: TrainerState;
  /** The adapter (or weights) of `training.bestModel` (`best_adapter/`), or null when the checkpoint has none. */
  best: TrainedWeights | null;
}

const STEP_DIR = /^step-(\d+)$/;

/** Reads adapter pairs from a PEFT directory as {@link LoraWeights}, and what trains beside them. */
export async function readAdapterWeights(dir: string, model: ModelConfig): Promise<{
  weights: LoraWeights[];
  config: LoraConfig;
  extras: AdapterExtras;
}> {
  const adapter = await readPeftAdapter(dir, model);
  const weights = [...adapter.pairs.values()].map((p) => ({
    layer: p.layer,
    module: p.module,
    A: p.a,
    B: p.b,
  }));
  return { weights, config: adapter.config, extras: adapter.extras };
}

/** Writes the model's adapters to `dir` in PEFT format. */
export async function writeAdapter(
  dir: string,
  model: TrainableModel,
  lora: LoraConfig,
): Promise<void> {
  await loraTrained(lora).save(dir, model);
}

function f32(values: Float32Array): Uint8Array {
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
}

/**
 * Writes checkpoint `step-<state.step>` under `root` (atomically, as a directory rename) and
 * returns its path. `best`: the adapter of the best evaluation, written to `best_adapter/`.
 */
export async function saveCheckpoint(
  root: string,
  model: TrainableModel,
  what: LoraConfig | Trained,
  training: TrainingState,
  trainer: TrainerState,
  best: TrainedWeights | null = null,
): Promise<string> {
  const trained = asTrained(what);
  const final = join(root, `step-${training.step}`);
  const tmp = join(root, `.step-${training.step}.tmp-${crypto.randomUUID().slice(0, 8)}`);
  await Deno.mkdir(tmp, { recursive: true });
  try {
    await trained.save(tmp, model);
    if (best) {
      const bestDir = join(tmp, BEST_ADAPTER_DIR);
      await Deno.mkdir(bestDir);
      await trained.save(bestDir, model, best);
    }
    const opt = await model.getOptimizerState();
    const tensors: TensorSource[] = [];
    for (const [name, m] of opt.m) {
      const v = opt.v.get(name);
      if (!v) throw new Error(`optimizer state has exp_avg but no exp_avg_sq for "${name}"`);
      tensors.push({ name: `${name}.exp_avg`, dtype: "F32", shape: [m.length], data: f32(m) });
      tensors.push({ name: `${name}.exp_avg_sq`, dtype: "F32", shape: [v.length], data: f32(v) });
    }
    await writeSafetensors(join(tmp, OPTIMIZER_FILE), tensors, {
      format: "lathe.optimizer/1",
      step: String(opt.step),
    });
    await writeJsonAtomic(join(tmp, TRAINER_STATE_FILE), trainer);
    await writeJsonAtomic(join(tmp, TRAINING_STATE_FILE), training);
    if (await exists(final)) await Deno.remove(final, { recursive: true });
    await Deno.rename(tmp, final);
  } catch (error) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw error;
  }
  return final;
}

/** Complete checkpoints under `root`, oldest first; temp directories of killed writes are removed. */
export async function listCheckpoints(root: string): Promise<CheckpointRef[]> {
  const found: CheckpointRef[] = [];
  if (!(await exists(root))) return found;
  for await (const entry of Deno.readDir(root)) {
    if (!entry.isDirectory) continue;
    if (entry.name.startsWith(".step-") && entry.name.includes(".tmp-")) {
      await Deno.remove(join(root, entry.name), { recursive: true }).catch(() => {});
      continue;
    }
    const m = STEP_DIR.exec(entry.name);
    if (m) found.push({ dir: join(root, entry.name), step: Number(m[1]) });
  }
  return found.sort((a, b) => a.step - b.step);
}

/**
 * Deletes the oldest checkpoints so that at most `limit` remain. `keepStep`: the checkpoint of
 * the best model, which is never deleted (transformers' rotation with load_best_model_at_end: it
 * ranks as the second newest, and with `limit` 1 the newest stays beside it).
 */
export async function pruneCheckpoints(
  root: string,
  limit: number,
  keepStep: number | null = null,
): Promise<void> {
  const all = await listCheckpoints(root);
  const best = all.findIndex((c) => c.step === keepStep);
  const moved = best !== -1 && best !== all.length - 1;
  const order = moved
    ? [...all.slice(0, best), ...all.slice(best + 1, -1), all[best], all[all.length - 1]]
    : all;
  const keep = moved ? Math.max(limit, 2) : limit;
  for (const c of order.slice(0, Math.max(0, order.length - keep))) {
    await Deno.remove(c.dir, { recursive: true });
  }
}

async function readJson(path: string): Promise<unknown> {
  try {
    return JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    throw new LatheError(`Cannot read checkpoint file "${path}": ${(error as Error).message}`, {
      hint: "the checkpoint is damaged; delete it to resume from the one before",
    });
  }
}

/** A LoRA config stands for {@link loraTrained} of it. */
function asTrained(what: LoraConfig | Trained): Trained {
  return "snapshot" in what ? what : loraTrained(what);
}

/** Reads a checkpoint written by {@link saveCheckpoint} (LoRA unless `what` says otherwise). */
export async function loadCheckpoint(
  dir: string,
  model: ModelConfig,
  what: Trained | null = null,
): Promise<LoadedCheckpoint> {
  const trained = what ?? loraTrained({
    baseModelNameOrPath: null,
    r: 1,
    loraAlpha: 1,
    loraDropout: 0,
    targetModules: [],
    useRslora: false,
  });
  const training = await readJson(join(dir, TRAINING_STATE_FILE)) as TrainingState;
  if (training?.format !== TRAINING_STATE_FORMAT) {
    throw new LatheError(
      `Cannot resume from "${dir}": ${TRAINING_STATE_FILE} has format ${
        JSON.stringify(training?.format)
      }, expected "${TRAINING_STATE_FORMAT}"`,
      { hint: "the checkpoint was written by another version of lathe; start over without resuming" },
    );
  }
  const trainer = await readJson(join(dir, TRAINER_STATE_FILE)) as TrainerState;
  const weights = await trained.load(dir, model);
  using st = await SafetensorsFile.open(join(dir, OPTIMIZER_FILE));
  const m = new Map<string, Float32Array>();
  const v = new Map<string, Float32Array>();
  for (const name of st.names()) {
    const values = await st.readFloat32(name);
    if (name.endsWith(".exp_avg")) m.set(name.slice(0, -".exp_avg".length), values);
    else if (name.endsWith(".exp_avg_sq")) v.set(name.slice(0, -".exp_avg_sq".length), values);
    else {
      throw new LatheError(`Cannot resume from "${dir}": ${OPTIMIZER_FILE} holds unknown tensor "${name}"`);
    }
  }
  const step = Number(st.metadata?.step);
  if (!Number.isInteger(step) || step !== training.step) {
    throw new LatheError(
      `Cannot resume from "${dir}": the optimizer state is at step ${st.metadata?.step}, ` +
        `${TRAINING_STATE_FILE} at step ${training.step}`,
      { hint: "the checkpoint is damaged; delete it to resume from the one before" },
    );
  }
  const bestDir = join(dir, BEST_ADAPTER_DIR);
  const best = (await exists(bestDir)) ? await trained.load(bestDir, model) : null;
  return {
    lora: Array.isArray(weights) ? weights : "pairs" in weights ? weights.pairs : [],
    trained: weights,
    optimizer: { step, m, v },
    training,
    trainer,
    best,
  };
}
