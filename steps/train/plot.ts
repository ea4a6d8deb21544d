/**
 * The loss curve of a run (`loss.svg`): training loss per logging step and eval loss per
 * evaluation (the baseline at step 0 included), drawn by tracker/plot.ts.
 * @module
 */
import { renderSvg } from "../../tracker/plot.ts";
import type { LogEntry } from "./trainer_state.ts";

/**
 * An SVG document with the train and eval loss of `history` over optimizer steps, and the
 * curves of `extra` metrics (e.g. DPO's "rewards/margins", "rewards/accuracies"), each with its
 * eval_ curve where the history has one.
 */
export function lossSvg(
  history: readonly LogEntry[],
  title = "train-sft",
  extra: readonly string[] = [],
): string {
  const curve = (key: string) =>
    history.filter((e) => e[key] !== undefined).map((e) => ({ x: e.step, y: e[key]! }));
  const series = [];
  for (const key of ["loss", ...extra]) {
    const label = key === "loss" ? "loss" : key;
    for (
      const [name, points] of [[`train ${label}`, curve(key)], [
        `eval ${label}`,
        curve(`eval_${key}`),
      ]] as const
    ) {
      if (points.length > 0) series.push({ label: name, points });
    }
  }
  return renderSvg(series, { title, xLabel: "optimizer step", yLabel: extra.length > 0 ? "value" : "loss" });
}
