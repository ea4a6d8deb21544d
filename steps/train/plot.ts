/**
 * The loss curve of a run (`loss.svg`): training loss per logging step and eval loss per
 * evaluation (the baseline at step 0 included), drawn by tracker/plot.ts.
 * @module
 */
import { renderSvg } from "../../tracker/plot.ts";
import type { LogEntry } from "./trainer_state.ts";

/** An SVG document with the train and eval loss of `history` over optimizer steps. */
export function lossSvg(history: readonly LogEntry[], title = "train-sft"): string {
  const train = history.filter((e) => e.loss !== undefined).map((e) => ({ x: e.step, y: e.loss! }));
  const evals = history.filter((e) => e.eval_loss !== undefined).map((e) => ({ x: e.step, y: e.eval_loss! }));
  const series = [{ label: "train loss", points: train }];
  if (evals.length > 0) series.push({ label: "eval loss", points: evals });
  return renderSvg(series, { title, xLabel: "optimizer step", yLabel: "loss" });
}
