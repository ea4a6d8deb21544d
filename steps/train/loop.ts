/**
 * The supervised fine-tuning loop over a {@link TrainableModel}: seeded row order per epoch,
 * gradient accumulation, the learning-rate schedule, clipping, evaluation, early stopping,
 * checkpoints, resume, and the logs. It knows nothing of the backend.
 *
 * Loss normalisation (transformers ≥ 4.46, `num_items_in_batch`): the g micro-batches of one
 * optimizer step are built first and their trained tokens counted, N = Σ_micro tokens; every
 * micro-batch then adds ∇(Σ_its tokens CE / N), so the step's gradient is that of the mean CE
 * over all N tokens, whatever the split into micro-batches (b = 2, g = 4 equals b = 8, even
 * when the micro-batches hold different numbers of trained tokens). The step's loss is
 * Σ lossSum / N.
 *
 * Token accuracy (trl's `mean_token_accuracy`): the trained tokens whose argmax logit is the
 * target, counted by the backend in the loss's forward and readback, over the same N tokens:
 * Σ correct / N for a step (a step without trained tokens has none), the mean of the step
 * accuracies over a logging window (as the loss), and Σ correct / Σ tokens over the whole eval
 * split for `eval_mean_token_accuracy` (token-weighted, as `eval_loss`). It only reads the
 * forward: the loss, the gradients and so the adapters are the same bits with or without it.
 *
 * Randomness is counter-based, so a resumed run replays exactly: the row order of epoch e
 * comes from PCG32(seed, SHUFFLE_STREAM + e), the dropout seeds of step s from
 * PCG32(seed, DROPOUT_STREAM + s) (one u32 per micro-batch, in order).
 *
 * With load_best_model_at_end, every evaluation after a step (those of eval_steps and the one
 * after the last step) whose metric is strictly better than the best so far (transformers'
 * `_determine_best_metric`) copies the adapter to the host; checkpoints carry that copy, and at
 * the end the model is set back to it. The evaluation before the first step is a baseline and
 * is never kept.
 * @module
 */
import { join } from "node:path";
import type { LoraConfig } from "../../formats/peft.ts";
import { Pcg32 } from "../../foundation/random.ts";
import type { TrainableModel } from "../../kernels/models/trainable.ts";
import { loraTrained, type Trained, type TrainedWeights } from "./trained.ts";
import { LatheError } from "../../foundation/errors.ts";
import { humanCount, type Progress } from "../../foundation/progress.ts";
import { buildBatch, chunks, epochOrder, SHUFFLE_STREAM, type Split, trainedTokens } from "./batches.ts";
import {
  type CheckpointRef,
  listCheckpoints,
  loadCheckpoint,
  pruneCheckpoints,
  saveCheckpoint,
  TRAINING_STATE_FORMAT,
  type TrainingState,
} from "./checkpoint.ts";
import { bestModelSettings, EVAL_METRICS, type EvalMetric, type TrainingArgs } from "./config.ts";
import { isBetter, recordEval } from "./early_stopping.ts";
import { lrAt, planTraining, type TrainPlan } from "./schedule.ts";
import type { BestModelRecord } from "./trainer_state.ts";
import { type LogEntry, trainerState } from "./trainer_state.ts";

/** PCG32 stream of step s's dropout seeds is DROPOUT_STREAM + s. */
export const DROPOUT_STREAM = 2 ** 41;

/** Where the loop reports: the step context's metric log and progress. */
export interface LoopIo {
  /** Appends one metric point (metrics.jsonl). */
  log(name: string, index: number, value: number): void;
  /** A progress reporter over `total` units. */
  progress(total: number, unit?: string): Progress;
}

/** Inputs of {@link trainLoop}. */
export interface TrainLoopOptions {
  model: TrainableModel;
  config: TrainingArgs;
  /**
   * What is trained (default: SFT on `train`, evaluated on `eval`). The `train` and `eval` splits
   * are then only read for the evaluation metrics' names.
   */
  objective?: Objective;
  /** The evaluation metrics the objective computes (best model, early stopping; default SFT's). */
  evalMetrics?: readonly string[];
  /** The step's name in errors (default "train-sft"). */
  stepName?: string;
  /** The adapter's PEFT config (written with every checkpoint). */
  lora: LoraConfig;
  /** What trains (default: the LoRA adapters of `lora`; `fullTrained()` for full fine-tuning). */
  trained?: Trained;
  train: Split;
  eval: Split | null;
  seed: number;
  /** Directory of checkpoints (`step-N/`); null: none are written. */
  checkpointDir: string | null;
  /**
   * How trainer_state.json names the checkpoint directory in `best_model_checkpoint` (where the
   * checkpoints will be read, e.g. "checkpoints" inside the step directory); default: checkpointDir.
   */
  checkpointLabel?: string;
  /** Continue from the latest checkpoint in `checkpointDir` when there is one. */
  resume: boolean;
  io: LoopIo;
}

/** Final scalars of a run (the step manifest's metrics). */
export interface TrainMetrics {
  /** Mean of the per-step losses over all steps. */
  train_loss: number;
  /** Eval loss after training; null without an eval split. */
  eval_loss: number | null;
  /** Eval loss of the adapters before the first step. */
  eval_loss_before: number | null;
  /** Eval token accuracy after training (trl's `eval_mean_token_accuracy`); null without an eval split. */
  eval_mean_token_accuracy: number | null;
  /** Token slots (padding included) per second of training. */
  tokens_per_s: number;
  steps: number;
  epochs: number;
  trained_tokens: number;
  seconds: number;
  stopped_early: boolean;
  resumed_from_step: number | null;
  backend: string;
  /** With load_best_model_at_end only: the exported adapter's metric, step and checkpoint (trainer_state.json names). */
  best_metric?: number | null;
  best_global_step?: number | null;
  best_model_checkpoint?: string | null;
}

/** What {@link trainLoop} returns. */
export interface TrainLoopResult {
  metrics: TrainMetrics;
  history: LogEntry[];
  plan: TrainPlan;
  state: TrainingState;
}

/** The u32 dropout seeds of the micro-batches of step `step`. */
export function dropoutSeeds(seed: number, step: number, count: number): number[] {
  const rng = new Pcg32(seed, DROPOUT_STREAM + step);
  return Array.from({ length: count }, () => rng.nextU32());
}

/** The metrics of one evaluation, by their transformers / trl names ("eval_loss" first). */
export type EvalResult = Record<EvalMetric, number>;

/** What one optimizer step of an {@link Objective} did. */
export interface ObjectiveStep {
  /** The step's loss (the mean the gradient is of). */
  loss: number;
  /** Token slots (padding included) run forward. */
  slots: number;
  /** Trained tokens of the step. */
  trainedTokens: number;
  /** Further metrics of the step, logged as means over the logging window (trl's names). */
  metrics: Record<string, number>;
}

/**
 * What a training loop trains: its examples, one optimizer step's forward and backward over
 * some of them, and the evaluation. SFT (rows, token-mean cross-entropy) and DPO (pairs,
 * steps/train/dpo.ts) are the two; the loop around them is the same.
 */
export interface Objective {
  /** Training examples (SFT: token-shard rows; DPO: preference pairs). */
  readonly size: number;
  /**
   * Adds the gradients of one optimizer step over the examples `take` (in order), run as
   * micro-batches of `batchSize` examples with one dropout seed each (`seeds[i]` for micro-batch
   * i; as many as `microBatches(take.length, batchSize)`), normalised so that the step's
   * gradient does not depend on the split into micro-batches.
   */
  step(model: TrainableModel, take: Uint32Array, batchSize: number, seeds: number[]): Promise<ObjectiveStep>;
  /** Evaluates the whole eval split (no dropout); null when there is none or it trains nothing. */
  evaluate(model: TrainableModel, batchSize: number): Promise<EvalResult | null>;
  /** Whether there is an eval split with examples. */
  readonly hasEval: boolean;
  /** The step metric the progress line shows as a percentage, and its label there (SFT: token accuracy). */
  readonly shown?: { metric: string; label: string };
}

/** Micro-batches of `examples` in chunks of `batchSize`. */
export function microBatches(examples: number, batchSize: number): number {
  return Math.ceil(examples / batchSize);
}

/**
 * Supervised fine-tuning (see the module documentation): rows, the cross-entropy's token mean
 * over the step, and trl's `mean_token_accuracy`.
 */
export function sftObjective(train: Split, evalSplit: Split | null): Objective {
  const padId = train.index.pad_id;
  return {
    size: train.rows.length,
    hasEval: evalSplit !== null && evalSplit.rows.length > 0,
    shown: { metric: "mean_token_accuracy", label: "acc" },
    async step(model, take, batchSize, seeds) {
      const micro = chunks(Array.from(take, (i) => train.rows[i]), batchSize).map((rows) =>
        buildBatch(rows, padId)
      );
      const stepTokens = micro.reduce((s, b) => s + trainedTokens(b), 0);
      const normaliser = Math.max(1, stepTokens);
      let lossSum = 0;
      let correct = 0;
      let slots = 0;
      for (let i = 0; i < micro.length; i++) {
        const r = await model.forwardBackward(micro[i], normaliser, seeds[i]);
        lossSum += r.lossSum;
        correct += r.correct;
        slots += micro[i].rows * micro[i].seqLen;
        // A non-finite loss stops the step here; the loop reports it.
        if (!Number.isFinite(r.lossSum)) break;
      }
      return {
        loss: lossSum / normaliser,
        slots,
        trainedTokens: stepTokens,
        metrics: stepTokens > 0
          ? { mean_token_accuracy: correct / stepTokens }
          : {} as Record<string, number>,
      };
    },
    async evaluate(model, batchSize) {
      return evalSplit && evalSplit.rows.length > 0 ? await evaluateSplit(model, evalSplit, batchSize) : null;
    },
  };
}

/**
 * Token-weighted mean loss and token accuracy of `model` over every row of `split` (no
 * dropout); null when nothing is trained.
 */
export async function evaluateSplit(
  model: TrainableModel,
  split: Split,
  batchSize: number,
): Promise<EvalResult | null> {
  let lossSum = 0;
  let tokens = 0;
  let correct = 0;
  for (const rows of chunks(split.rows, batchSize)) {
    const r = await model.evaluate(buildBatch(rows, split.index.pad_id));
    lossSum += r.lossSum;
    tokens += r.tokens;
    correct += r.correct;
  }
  if (tokens === 0) return null;
  const loss = lossSum / tokens;
  if (!Number.isFinite(loss)) {
    throw new LatheError(`Cannot evaluate: the eval loss is ${loss}`, {
      hint: "the adapters or the base model hold non-finite values",
    });
  }
  return { eval_loss: loss, eval_mean_token_accuracy: correct / tokens };
}

/** The log_history entry of an evaluation. */
function evalEntry(step: number, epoch: number, result: EvalResult): LogEntry {
  return { step, epoch, ...result };
}

/** The evaluation a log_history entry records: its eval_ metrics. */
function evalOf(e: LogEntry): EvalResult {
  return Object.fromEntries(
    Object.entries(e).filter(([k, v]) => k.startsWith("eval_") && typeof v === "number"),
  ) as EvalResult;
}

/**
 * Checks that the evaluations `config` relies on take place: early_stopping_patience and
 * load_best_model_at_end need an eval split with rows and eval_steps. Throws a LatheError
 * naming the key.
 */
export function checkEvaluationNeeds(config: TrainingArgs, hasEvalSplit: boolean, step = "train-sft"): void {
  const needs: [string, boolean][] = [
    ["early_stopping_patience", config.early_stopping_patience !== null],
    ["load_best_model_at_end", config.load_best_model_at_end],
  ];
  for (const [key, used] of needs) {
    if (!used || (hasEvalSplit && config.eval_steps !== null)) continue;
    throw new LatheError(
      `Cannot use ${step}.${key}: ` +
        (hasEvalSplit
          ? "eval_steps is null, so there are no evaluations to watch"
          : "there is no eval split"),
      {
        hint: hasEvalSplit
          ? "set eval_steps"
          : `give prepare an eval split (its eval_fraction / eval file), or drop ${key}`,
      },
    );
  }
}

function nonFinite(what: string, value: number, step: number, last: CheckpointRef | null): LatheError {
  const kept = last
    ? `the last good checkpoint is step ${last.step} at "${last.dir}"`
    : "no checkpoint was written yet";
  return new LatheError(`Cannot continue training: the ${what} of step ${step} is ${value}; ${kept}`, {
    hint: "Lower learning_rate, add warmup or gradient clipping (max_grad_norm), or check the data for " +
      "extreme rows." +
      (last ? " To keep the progress, start a run from the checkpoint's adapter with init_adapter." : ""),
  });
}

function freshState(seed: number, rows: number, plan: TrainPlan): TrainingState {
  return {
    format: TRAINING_STATE_FORMAT,
    step: 0,
    epoch: 0,
    position: 0,
    seed,
    shuffleStream: SHUFFLE_STREAM,
    dropoutStream: DROPOUT_STREAM,
    rows,
    totalSteps: plan.totalSteps,
    lossSum: 0,
    tokens: 0,
    trainedTokens: 0,
    seconds: 0,
    evalLossBefore: null,
    bestEvalLoss: null,
    badEvals: 0,
    windowLoss: 0,
    windowSteps: 0,
    windows: {},
  };
}

/** metrics.jsonl's name of a log_history key. */
function metricName(key: string): string {
  return key === "learning_rate" ? "lr" : key === "tokens_per_second" ? "tokens_per_s" : key;
}

/** Logs the numbers of one log_history entry (its step and epoch aside; the final summary is not logged). */
function logEntry(io: LoopIo, e: LogEntry): void {
  if (e.train_loss !== undefined) return;
  for (const [key, value] of Object.entries(e)) {
    if (key === "step" || key === "epoch" || typeof value !== "number") continue;
    io.log(metricName(key), e.step, value);
  }
}

/**
 * Trains `model` under `config`: the SFT objective on `train` or `options.objective`; see the
 * module documentation. Throws a LatheError (leaving every checkpoint written so far) when a loss
 * or gradient norm is not finite.
 */
export async function trainLoop(options: TrainLoopOptions): Promise<TrainLoopResult> {
  const { model, config, io, seed } = options;
  const stepName = options.stepName ?? "train-sft";
  const objective = options.objective ?? sftObjective(options.train, options.eval);
  checkEvaluationNeeds(config, objective.hasEval, stepName);
  const settings = bestModelSettings(config, options.evalMetrics ?? EVAL_METRICS, stepName);
  const n = objective.size;
  const plan = planTraining(n, config);
  const bs = config.per_device_train_batch_size;
  const evalBs = config.per_device_eval_batch_size ?? bs;

  const trained = options.trained ?? loraTrained(options.lora);
  let state = freshState(seed, n, plan);
  if (settings.loadBest) state.bestModel = null;
  // The adapter (or weights) of state.bestModel, on the host.
  let bestWeights: TrainedWeights | null = null;
  let history: LogEntry[] = [];
  let resumedFrom: number | null = null;
  let lastCheckpoint: CheckpointRef | null = null;
  const checkpoints = options.checkpointDir ? await listCheckpoints(options.checkpointDir) : [];
  if (options.resume && checkpoints.length > 0) {
    lastCheckpoint = checkpoints[checkpoints.length - 1];
    const loaded = await loadCheckpoint(lastCheckpoint.dir, model.config, trained);
    const t = loaded.training;
    if (t.rows !== n || t.seed !== seed || t.totalSteps !== plan.totalSteps) {
      throw new LatheError(
        `Cannot resume from "${lastCheckpoint.dir}": it was written for ${t.rows} rows, seed ${t.seed}, ` +
          `${t.totalSteps} steps; this run has ${n} rows, seed ${seed}, ${plan.totalSteps} steps`,
        { hint: "the checkpoint belongs to another run; start over without resuming" },
      );
    }
    if (
      settings.loadBest && (t.bestModel === undefined || (t.bestModel === null) !== (loaded.best === null))
    ) {
      throw new LatheError(
        `Cannot resume from "${lastCheckpoint.dir}": it does not hold the best adapter that ` +
          "load_best_model_at_end keeps",
        { hint: "the checkpoint is damaged or belongs to another run; start over without resuming" },
      );
    }
    await trained.restore(model, loaded.trained);
    await model.setOptimizerState(loaded.optimizer);
    state = t;
    bestWeights = loaded.best;
    history = loaded.trainer.log_history;
    resumedFrom = t.step;
    for (const e of history) logEntry(io, e);
  } else if (objective.hasEval) {
    const before = await objective.evaluate(model, evalBs);
    state.evalLossBefore = before?.eval_loss ?? null;
    if (before !== null) {
      const entry = evalEntry(0, 0, before);
      history.push(entry);
      logEntry(io, entry);
    }
  }
  // Checkpoints written before the metric windows were kept by name hold the accuracy's alone.
  state.windows ??= {};
  if (state.windowAccuracySteps) {
    state.windows.mean_token_accuracy = [state.windowAccuracy ?? 0, state.windowAccuracySteps];
  }
  delete state.windowAccuracy;
  delete state.windowAccuracySteps;
  const windows = state.windows;

  const epochAt = () => state.epoch + state.position / n;
  const checkpointName = (step: number) =>
    join(options.checkpointLabel ?? options.checkpointDir ?? "", `step-${step}`);
  // transformers' _determine_best_metric: a strictly better metric makes this step's adapter the best.
  const keepIfBest = async (step: number, value: number) => {
    if (!settings.loadBest || !isBetter(value, state.bestModel?.metric ?? null, settings.greaterIsBetter)) {
      return;
    }
    bestWeights = await trained.snapshot(model);
    state.bestModel = {
      step,
      metric: value,
      checkpoint: lastCheckpoint?.step === step ? checkpointName(step) : null,
    };
  };
  const snapshot = () =>
    trainerState({
      step: state.step,
      epoch: epochAt(),
      history,
      bestEvalLoss: state.bestEvalLoss,
      best: settings.loadBest ? state.bestModel ?? null : undefined,
      evalSteps: config.eval_steps,
      loggingSteps: config.logging_steps,
      maxSteps: plan.totalSteps,
      epochs: plan.totalSteps / plan.stepsPerEpoch,
      saveSteps: config.save_steps,
      tokens: state.tokens,
      batchSize: bs,
    });

  const progress = io.progress(plan.totalSteps - state.step, "steps");
  let order = epochOrder(n, seed, state.epoch);
  const evals = history.filter((e) => e.eval_loss !== undefined);
  let lastEvalStep = evals.length > 0 ? evals[evals.length - 1].step : -1;
  let lastEval: EvalResult | null = evals.length > 0 ? evalOf(evals[evals.length - 1]) : null;
  // A run killed right after early stopping triggered does not train on when resumed.
  let stoppedEarly = config.early_stopping_patience !== null &&
    state.badEvals >= config.early_stopping_patience;
  const span = { tokens: 0, seconds: 0 };
  const evaluate = async (step: number) => {
    lastEval = await objective.evaluate(model, evalBs);
    lastEvalStep = step;
    if (lastEval === null) return null;
    const entry = evalEntry(step, epochAt(), lastEval);
    history.push(entry);
    logEntry(io, entry);
    return lastEval;
  };

  while (state.step < plan.totalSteps && !stoppedEarly) {
    const started = performance.now();
    if (state.position >= n) {
      state.epoch++;
      state.position = 0;
      order = epochOrder(n, seed, state.epoch);
    }
    const take = order.subarray(state.position, Math.min(n, state.position + plan.rowsPerStep));
    const seeds = dropoutSeeds(seed, state.step, microBatches(take.length, bs));
    const r = await objective.step(model, take, bs, seeds);
    if (!Number.isFinite(r.loss)) throw nonFinite("loss", r.loss, state.step + 1, lastCheckpoint);
    const lr = lrAt(config, plan, state.step);
    const { gradNorm } = await model.optimizerStep({
      lr,
      beta1: config.adam_beta1,
      beta2: config.adam_beta2,
      eps: config.adam_epsilon,
      weightDecay: config.weight_decay,
      maxGradNorm: config.max_grad_norm,
    });
    if (!Number.isFinite(gradNorm)) {
      throw nonFinite("gradient norm", gradNorm, state.step + 1, lastCheckpoint);
    }
    const loss = r.loss;
    state.step++;
    state.position += take.length;
    state.lossSum += loss;
    state.tokens += r.slots;
    state.trainedTokens += r.trainedTokens;
    state.windowLoss += loss;
    state.windowSteps++;
    for (const [name, value] of Object.entries(r.metrics)) {
      const w = windows[name] ??= [0, 0];
      w[0] += value;
      w[1]++;
    }
    span.tokens += r.slots;
    const step = state.step;

    // Throughput counts forward, backward and update; evaluation and checkpoints stay out.
    span.seconds += (performance.now() - started) / 1000;
    if (step % config.logging_steps === 0 || step === plan.totalSteps) {
      const entry: LogEntry = {
        step,
        epoch: epochAt(),
        loss: state.windowLoss / state.windowSteps,
        learning_rate: lr,
        grad_norm: gradNorm,
        tokens_per_second: span.tokens / Math.max(1e-9, span.seconds),
      };
      for (const [name, [sum, steps]] of Object.entries(windows)) if (steps > 0) entry[name] = sum / steps;
      history.push(entry);
      logEntry(io, entry);
      state.windowLoss = state.windowSteps = 0;
      for (const name of Object.keys(windows)) delete windows[name];
      span.tokens = span.seconds = 0;
    }
    if (objective.hasEval && config.eval_steps !== null && step % config.eval_steps === 0) {
      const result = await evaluate(step);
      if (result !== null) {
        const value = result[settings.metric];
        const early = { best: state.bestEvalLoss, bad: state.badEvals };
        stoppedEarly = recordEval(
          early,
          value,
          config.early_stopping_patience,
          config.early_stopping_threshold,
          settings.greaterIsBetter,
        );
        state.bestEvalLoss = early.best;
        state.badEvals = early.bad;
        await keepIfBest(step, value);
      }
    }
    state.seconds += (performance.now() - started) / 1000;
    if (options.checkpointDir && config.save_steps !== null && step % config.save_steps === 0) {
      if (state.bestModel?.step === step) state.bestModel.checkpoint = checkpointName(step);
      const dir = await saveCheckpoint(
        options.checkpointDir,
        model,
        trained,
        structuredClone(state),
        snapshot(),
        bestWeights,
      );
      lastCheckpoint = { dir, step };
      if (config.save_total_limit !== null) {
        const best = state.bestModel?.checkpoint ? state.bestModel.step : null;
        await pruneCheckpoints(options.checkpointDir, config.save_total_limit, best);
      }
    }
    const rate = r.slots / Math.max(1e-9, (performance.now() - started) / 1000);
    const value = objective.shown ? r.metrics[objective.shown.metric] : undefined;
    const shown = value === undefined ? "" : ` · ${objective.shown!.label} ${(100 * value).toFixed(1)}%`;
    progress.tick(
      1,
      `loss ${loss.toFixed(4)}${shown} · lr ${lr.toExponential(2)} · ${humanCount(rate)} tok/s`,
    );
  }

  if (objective.hasEval && lastEvalStep !== state.step) {
    const result = await evaluate(state.step);
    if (result !== null) await keepIfBest(state.step, result[settings.metric]);
  }
  const best: BestModelRecord | null = state.bestModel ?? null;
  if (best && bestWeights && best.step !== state.step) await trained.restore(model, bestWeights);
  const tokensPerS = state.tokens / Math.max(1e-9, state.seconds);
  history.push({
    step: state.step,
    epoch: epochAt(),
    train_loss: state.step > 0 ? state.lossSum / state.step : 0,
    train_runtime: state.seconds,
    train_tokens_per_second: tokensPerS,
  });
  const kept = !settings.loadBest
    ? ""
    : best
    ? ` · kept the adapter of step ${best.step} (best ${settings.metric} ${best.metric.toFixed(4)})`
    : " · no evaluation after a step: kept the last adapter";
  progress.done(`loss ${(state.lossSum / Math.max(1, state.step)).toFixed(4)}${kept}`);
  // The evaluation before the first step (a baseline), when there was one.
  const first = history.find((e) => e.eval_loss !== undefined);
  const baseline = first && first.step === 0 ? evalOf(first) : null;
  const finalEval: EvalResult | null = lastEval;
  const evalMetrics: Record<string, number | null> = {};
  for (const name of options.evalMetrics ?? EVAL_METRICS) {
    evalMetrics[name] = objective.hasEval ? nullIfNaN(finalEval?.[name]) : null;
    if (name !== "eval_loss" && options.evalMetrics) {
      evalMetrics[`${name}_before`] = objective.hasEval ? nullIfNaN(baseline?.[name]) : null;
    }
  }
  return {
    metrics: {
      train_loss: state.step > 0 ? state.lossSum / state.step : 0,
      eval_loss: objective.hasEval ? finalEval?.eval_loss ?? null : null,
      eval_loss_before: state.evalLossBefore,
      eval_mean_token_accuracy: evalMetrics.eval_mean_token_accuracy ?? null,
      ...evalMetrics,
      tokens_per_s: tokensPerS,
      steps: state.step,
      epochs: epochAt(),
      trained_tokens: state.trainedTokens,
      seconds: state.seconds,
      stopped_early: stoppedEarly,
      resumed_from_step: resumedFrom,
      backend: model.backend,
      ...(settings.loadBest
        ? {
          best_metric: best?.metric ?? null,
          best_global_step: best?.step ?? null,
          best_model_checkpoint: best?.checkpoint ?? null,
        }
        : {}),
    },
    history,
    plan,
    state,
  };
}

function nullIfNaN(value: number | undefined): number | null {
  return value === undefined || Number.isNaN(value) ? null : value;
}

/** The trainer_state.json object of a finished loop. */
export function finalTrainerState(result: TrainLoopResult, config: TrainingArgs) {
  return trainerState({
    step: result.state.step,
    epoch: result.metrics.epochs,
    history: result.history,
    bestEvalLoss: result.state.bestEvalLoss,
    best: config.load_best_model_at_end ? result.state.bestModel ?? null : undefined,
    evalSteps: config.eval_steps,
    loggingSteps: config.logging_steps,
    maxSteps: result.plan.totalSteps,
    epochs: result.plan.totalSteps / result.plan.stepsPerEpoch,
    saveSteps: config.save_steps,
    tokens: result.state.tokens,
    batchSize: config.per_device_train_batch_size,
  });
}
