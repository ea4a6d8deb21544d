/**
 * Early stopping on the evaluation metric (`metric_for_best_model`, eval_loss by default), as
 * transformers' `EarlyStoppingCallback`: an evaluation improves when the metric is better than
 * the best (lower, or higher with `greater_is_better`) by more than `threshold` (the first one
 * always does); otherwise the count of evaluations without improvement grows, and training
 * stops when it reaches `patience`. The evaluation before the first step is a baseline and
 * does not count.
 * @module
 */

/** The early-stopping state (saved in checkpoints). */
export interface EarlyStoppingState {
  best: number | null;
  bad: number;
}

/** Whether `value` is strictly better than `best` in the metric's direction (any value beats null). */
export function isBetter(value: number, best: number | null, greaterIsBetter: boolean): boolean {
  return best === null || (greaterIsBetter ? value > best : value < best);
}

/**
 * Records evaluation `value` into `state` (in place); returns true when training should stop.
 * `patience` null never stops (the best value is still tracked).
 */
export function recordEval(
  state: EarlyStoppingState,
  value: number,
  patience: number | null,
  threshold: number,
  greaterIsBetter = false,
): boolean {
  if (
    state.best === null ||
    (isBetter(value, state.best, greaterIsBetter) && Math.abs(value - state.best) > threshold)
  ) {
    state.best = value;
    state.bad = 0;
  } else {
    state.bad++;
  }
  return patience !== null && state.bad >= patience;
}
