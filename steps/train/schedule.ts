/**
 * How many optimizer steps a run takes and the learning rate of each.
 *
 * With n rows, b = per_device_train_batch_size and g = gradient_accumulation_steps, one
 * optimizer step takes b·g rows; an epoch is ⌈n / (b·g)⌉ steps (its last step takes the
 * remaining rows, so every row is seen once per epoch). The run is `max_steps` steps, or
 * ⌈num_train_epochs · steps per epoch⌉. The learning rate of the update at step s (0-based)
 * is kernels/reference/schedules.ts `learning_rate(learning_rate, schedule, s)`, transformers'
 * LambdaLR.
 * @module
 */
import { learning_rate, type ScheduleConfig, warmup_steps_for } from "../../kernels/reference/schedules.ts";
import { LatheError } from "../errors.ts";
import type { TrainSftConfig } from "./config.ts";

/** The step plan of a run. */
export interface TrainPlan {
  /** b·g. */
  readonly rowsPerStep: number;
  readonly stepsPerEpoch: number;
  readonly totalSteps: number;
  readonly schedule: ScheduleConfig;
}

/** Plans a run over `numRows` training rows. */
export function planTraining(numRows: number, config: TrainSftConfig): TrainPlan {
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
export function lrAt(config: TrainSftConfig, plan: TrainPlan, step: number): number {
  return learning_rate(config.learning_rate, plan.schedule, step);
}
