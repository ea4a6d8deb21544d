/**
 * How many optimizer steps a run takes and the learning rate of each.
 *
 * With n rows, b = per_device_train_batch_size and g = gradient_accumulation_steps, one
 * optimizer step takes b·g rows; an epoch is ⌈n / (b·g)⌉ steps (its last step takes the
 * remaining rows, so every row is seen once per epoch). The run is `max_steps` steps, or
 * ⌈num_train_epochs · steps per epoch⌉. The learning rate of the update at step s (0-based)
 * is `learning_rate(learning_rate, schedule, s)`: transformers' `get_scheduler(name, optimizer,
 * num_warmup_steps, num_training_steps)`, a LambdaLR whose multiplier at step s (the number of optimizer steps already
 * taken, so the first update uses s = 0) is, with w = warmup steps and n = total steps:
 *   constant:              1                       (warmup ignored, as get_constant_schedule)
 *   constant_with_warmup:  s < w ? s / max(1, w) : 1
 *   linear:                s < w ? s / max(1, w) : max(0, (n − s) / max(1, n − w))
 *   cosine:                s < w ? s / max(1, w)
 *                          : max(0, ½ · (1 + cos(π · 2·cycles · (s − w) / max(1, n − w))))  (cycles ½)
 * Warmup from a ratio: TrainingArguments.get_warmup_steps gives warmup_steps when > 0, else
 * ceil(n · warmup_ratio) in f64 (so 100 · 0.07 = 7.000000000000001 gives 8, as in Python).
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { TrainingArgs } from "./config.ts";

/** The step plan of a run. */
export interface TrainPlan {
  /** b·g. */
  readonly rowsPerStep: number;
  readonly stepsPerEpoch: number;
  readonly totalSteps: number;
  readonly schedule: ScheduleConfig;
}

/** Plans a run over `numRows` training rows. */
export function planTraining(numRows: number, config: TrainingArgs): TrainPlan {
  if (numRows === 0) {
    throw new LatheError("Cannot train: the training split has no rows", {
      hint: "check the prepare and tokenize steps' metrics (rows, empty_rows, overlong_rows)",
    });
  }
  const rowsPerStep = config.per_device_train_batch_size * config.gradient_accumulation_steps;
  const stepsPerEpoch = Math.ceil(numRows / rowsPerStep);
  const totalSteps = config.max_steps > 0
    ? config.max_steps
    : Math.max(1, Math.ceil(config.num_train_epochs * stepsPerEpoch));
  const warmupSteps = warmup_steps_for(
    { steps: config.warmup_steps, ratio: config.warmup_ratio },
    totalSteps,
  );
  return {
    rowsPerStep,
    stepsPerEpoch,
    totalSteps,
    schedule: { name: config.lr_scheduler_type, warmupSteps, totalSteps },
  };
}

/** The learning rate of the update at 0-based step `step`. */
export function lrAt(config: TrainingArgs, plan: TrainPlan, step: number): number {
  return learning_rate(config.learning_rate, plan.schedule, step);
}

/** Schedule names accepted by {@link lr_lambda} (transformers' SchedulerType values). */
export type ScheduleName = "constant" | "constant_with_warmup" | "linear" | "cosine";

/** What a schedule depends on. */
export interface ScheduleConfig {
  name: ScheduleName;
  /** w. */
  warmupSteps: number;
  /** n: total optimizer steps of the run. */
  totalSteps: number;
  /** Cosine cycles (default 0.5: one half-period from 1 to 0). */
  numCycles?: number;
}

/** The LambdaLR multiplier at step s (0 for the first optimizer step). */
export function lr_lambda(config: ScheduleConfig, step: number): number {
  const { name, warmupSteps: w, totalSteps: n } = config;
  if (name === "constant") return 1;
  if (step < w) return step / Math.max(1, w);
  switch (name) {
    case "constant_with_warmup":
      return 1;
    case "linear":
      return Math.max(0, (n - step) / Math.max(1, n - w));
    case "cosine": {
      const cycles = config.numCycles ?? 0.5;
      const progress = (step - w) / Math.max(1, n - w);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * cycles * 2 * progress)));
    }
    default:
      throw new RangeError(
        `Cannot build a learning-rate schedule: "${name as string}" is not one of ` +
          `"constant", "constant_with_warmup", "linear", "cosine"`,
      );
  }
}

/** The learning rate of the update at step s: base_lr · lr_lambda(s). */
export function learning_rate(baseLr: number, config: ScheduleConfig, step: number): number {
  return baseLr * lr_lambda(config, step);
}

/** Warmup steps as TrainingArguments.get_warmup_steps: steps when > 0, else ceil(ratio · total). */
export function warmup_steps_for(warmup: { steps?: number; ratio?: number }, totalSteps: number): number {
  const steps = warmup.steps ?? 0;
  if (steps > 0) return steps;
  return Math.ceil(totalSteps * (warmup.ratio ?? 0)); // n · ratio, in transformers' order
}
