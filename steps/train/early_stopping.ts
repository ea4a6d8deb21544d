/**
 * Early stopping on eval_loss, as transformers' `EarlyStoppingCallback`: an evaluation
 * improves when `eval_loss < best` and `|eval_loss − best| > threshold` (the first one always
 * does); otherwise the count of evaluations without improvement grows, and training stops
 * when it reaches `patience`. The evaluation before the first step is a baseline and does
 * not count.
 * @module
 */

/** The early-stopping state (saved in checkpoints). */
export interface EarlyStoppingState {
  best: number | null;
  bad: number;
}

/**
 * Records evaluation `loss` into `state` (in place); returns true when training should stop.
 * `patience` null never stops (the best loss is still tracked).
 */
export function recordEval(
  state: EarlyStoppingState,
  loss: number,
  patience: number | null,
  threshold: number,
): boolean {
  if (state.best === null || (loss < state.best && Math.abs(loss - state.best) > threshold)) {
    state.best = loss;
    state.bad = 0;
  } else {
    state.bad++;
  }
  return patience !== null && state.bad >= patience;
}
