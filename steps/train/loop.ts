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
import type { Batch, LoraWeights, TrainableModel } from "../../kernels/models/trainable.ts";
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
import { bestModelSettings, type EvalMetric, type TrainSftConfig } from "./config.ts";
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
  config: TrainSftConfig;
  /** The adapter's PEFT config (written with every checkpoint). */
  lora: LoraConfig;
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

/** The metrics of one evaluation, by their transformers names (the {@link EvalMetric}s). */
export type EvalResult = Record<EvalMetric, number>;

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

/** The evaluation a log_history entry records (accuracy NaN in entries written before it was measured). */
function evalOf(e: LogEntry): EvalResult {
  return { eval_loss: e.eval_loss!, eval_mean_token_accuracy: e.eval_mean_token_accuracy ?? NaN };
}

/**
 * Checks that the evaluations `config` relies on take place: early_stopping_patience and
 * load_best_model_at_end need an eval split with rows and eval_steps. Throws a LatheError
 * naming the key.
 */
export function checkEvaluationNeeds(config: TrainSftConfig, hasEvalSplit: boolean): void {
  const needs: [string, boolean][] = [
    ["early_stopping_patience", config.early_stopping_patience !== null],
    ["load_best_model_at_end", bestModelSettings(config).loadBest],
  ];
  for (const [key, used] of needs) {
    if (!used || (hasEvalSplit && config.eval_steps !== null)) continue;
    throw new LatheError(
      `Cannot use train-sft.${key}: ` +
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
    windowAccuracy: 0,
    windowAccuracySteps: 0,
  };
}

function replay(io: LoopIo, history: readonly LogEntry[]): void {
  for (const e of history) {
    if (e.loss !== undefined) io.log("loss", e.step, e.loss);
    if (e.learning_rate !== undefined) io.log("lr", e.step, e.learning_rate);
    if (e.grad_norm !== undefined) io.log("grad_norm", e.step, e.grad_norm);
    if (e.tokens_per_second !== undefined) io.log("tokens_per_s", e.step, e.tokens_per_second);
    if (e.mean_token_accuracy !== undefined) io.log("mean_token_accuracy", e.step, e.mean_token_accuracy);
    if (e.eval_loss !== undefined) io.log("eval_loss", e.step, e.eval_loss);
    if (e.eval_mean_token_accuracy !== undefined) {
      io.log("eval_mean_token_accuracy", e.step, e.eval_mean_token_accuracy);
    }
  }
}

function logEval(io: LoopIo, step: number, result: EvalResult): void {
  io.log("eval_loss", step, result.eval_loss);
  io.log("eval_mean_token_accuracy", step, result.eval_mean_token_accuracy);
}

/**
 * Trains `model` on `train` under `config`; see the module documentation. Throws a LatheError
 * (leaving every checkpoint written so far) when a loss or gradient norm is not finite.
 */
export async function trainLoop(options: TrainLoopOptions): Promise<TrainLoopResult> {
  const { model, config, train, io, seed } = options;
  const evalSplit = options.eval && options.eval.rows.length > 0 ? options.eval : null;
  checkEvaluationNeeds(config, evalSplit !== null);
  const settings = bestModelSettings(config);
  const n = train.rows.length;
  const plan = planTraining(n, config);
  const bs = config.per_device_train_batch_size;
  const evalBs = config.per_device_eval_batch_size ?? bs;
  const padId = train.index.pad_id;

  let state = freshState(seed, n, plan);
  if (settings.loadBest) state.bestModel = null;
  // The adapter of state.bestModel, on the host.
  let bestWeights: LoraWeights[] | null = null;
  let history: LogEntry[] = [];
  let resumedFrom: number | null = null;
  let lastCheckpoint: CheckpointRef | null = null;
  const checkpoints = options.checkpointDir ? await listCheckpoints(options.checkpointDir) : [];
  if (options.resume && checkpoints.length > 0) {
    lastCheckpoint = checkpoints[checkpoints.length - 1];
    const loaded = await loadCheckpoint(lastCheckpoint.dir, model.config);
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
    await model.setLora(loaded.lora);
    await model.setOptimizerState(loaded.optimizer);
    state = t;
    bestWeights = loaded.best;
    history = loaded.trainer.log_history;
    resumedFrom = t.step;
    replay(io, history);
  } else if (evalSplit) {
    const before = await evaluateSplit(model, evalSplit, evalBs);
    state.evalLossBefore = before?.eval_loss ?? null;
    if (before !== null) {
      history.push(evalEntry(0, 0, before));
      logEval(io, 0, before);
    }
  }
  // Checkpoints written before token accuracy was measured lack its window.
  state.windowAccuracy ??= 0;
  state.windowAccuracySteps ??= 0;

  const epochAt = () => state.epoch + state.position / n;
  const checkpointName = (step: number) =>
    join(options.checkpointLabel ?? options.checkpointDir ?? "", `step-${step}`);
  // transformers' _determine_best_metric: a strictly better metric makes this step's adapter the best.
  const keepIfBest = async (step: number, value: number) => {
    if (!settings.loadBest || !isBetter(value, state.bestModel?.metric ?? null, settings.greaterIsBetter)) {
      return;
    }
    bestWeights = await model.getLora();
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

  while (state.step < plan.totalSteps && !stoppedEarly) {
    const started = performance.now();
    if (state.position >= n) {
      state.epoch++;
      state.position = 0;
      order = epochOrder(n, seed, state.epoch);
    }
    const take = order.subarray(state.position, Math.min(n, state.position + plan.rowsPerStep));
    const micro: Batch[] = chunks(Array.from(take, (i) => train.rows[i]), bs).map((rows) =>
      buildBatch(rows, padId)
    );
    const stepTokens = micro.reduce((s, b) => s + trainedTokens(b), 0);
    const normaliser = Math.max(1, stepTokens);
    const seeds = dropoutSeeds(seed, state.step, micro.length);
    let lossSum = 0;
    let correct = 0;
    let slots = 0;
    for (let i = 0; i < micro.length; i++) {
      const r = await model.forwardBackward(micro[i], normaliser, seeds[i]);
      if (!Number.isFinite(r.lossSum)) throw nonFinite("loss", r.lossSum, state.step + 1, lastCheckpoint);
      lossSum += r.lossSum;
      correct += r.correct;
      slots += micro[i].rows * micro[i].seqLen;
    }
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
    const loss = lossSum / normaliser;
    state.step++;
    state.position += take.length;
    state.lossSum += loss;
    state.tokens += slots;
    state.trainedTokens += stepTokens;
    state.windowLoss += loss;
    state.windowSteps++;
    const accuracy = stepTokens > 0 ? correct / stepTokens : null;
    if (accuracy !== null) {
      state.windowAccuracy += accuracy;
      state.windowAccuracySteps++;
    }
    span.tokens += slots;
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
      if (state.windowAccuracySteps > 0) {
        entry.mean_token_accuracy = state.windowAccuracy / state.windowAccuracySteps;
      }
      history.push(entry);
      io.log("loss", step, entry.loss!);
      io.log("lr", step, lr);
      io.log("grad_norm", step, gradNorm);
      io.log("tokens_per_s", step, entry.tokens_per_second!);
      if (entry.mean_token_accuracy !== undefined) {
        io.log("mean_token_accuracy", step, entry.mean_token_accuracy);
      }
      state.windowLoss = state.windowSteps = 0;
      state.windowAccuracy = state.windowAccuracySteps = 0;
      span.tokens = span.seconds = 0;
    }
    if (evalSplit && config.eval_steps !== null && step % config.eval_steps === 0) {
      lastEval = await evaluateSplit(model, evalSplit, evalBs);
      lastEvalStep = step;
      if (lastEval !== null) {
        history.push(evalEntry(step, epochAt(), lastEval));
        logEval(io, step, lastEval);
        const value = lastEval[settings.metric];
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
        options.lora,
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
    const rate = slots / Math.max(1e-9, (performance.now() - started) / 1000);
    const acc = accuracy === null ? "" : ` · acc ${(100 * accuracy).toFixed(1)}%`;
    progress.tick(1, `loss ${loss.toFixed(4)}${acc} · lr ${lr.toExponential(2)} · ${humanCount(rate)} tok/s`);
  }

  if (evalSplit && lastEvalStep !== state.step) {
    lastEval = await evaluateSplit(model, evalSplit, evalBs);
    if (lastEval !== null) {
      history.push(evalEntry(state.step, epochAt(), lastEval));
      logEval(io, state.step, lastEval);
      await keepIfBest(state.step, lastEval[settings.metric]);
    }
  }
  const best: BestModelRecord | null = state.bestModel ?? null;
  if (best && bestWeights && best.step !== state.step) await model.setLora(bestWeights);
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
  return {
    metrics: {
      train_loss: state.step > 0 ? state.lossSum / state.step : 0,
      eval_loss: evalSplit ? lastEval?.eval_loss ?? null : null,
      eval_loss_before: state.evalLossBefore,
      eval_mean_token_accuracy: evalSplit ? nullIfNaN(lastEval?.eval_mean_token_accuracy) : null,
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
export function finalTrainerState(result: TrainLoopResult, config: TrainSftConfig) {
  return trainerState({
    step: result.state.step,
    epoch: result.metrics.epochs,
    history: result.history,
    bestEvalLoss: result.state.bestEvalLoss,
    best: bestModelSettings(config).loadBest ? result.state.bestModel ?? null : undefined,
    evalSteps: config.eval_steps,
    loggingSteps: config.logging_steps,
    maxSteps: result.plan.totalSteps,
    epochs: result.plan.totalSteps / result.plan.stepsPerEpoch,
    saveSteps: config.save_steps,
    tokens: result.state.tokens,
    batchSize: config.per_device_train_batch_size,
  });
}
