/**
 * `deno task demo`: the embedded default — the tiny-demo recipe end to end (prepare, tokenize,
 * quantize to NF4, QLoRA train-sft, train-dpo on preference pairs, eval, merge, export to GGUF
 * for llama.cpp and Ollama), offline, on the shipped
 * demo data and tokenizer — followed by where its manifests are and how to query it.
 * Extra arguments go to the recipe command (`deno task demo --set tokenize.max_seq_len=128`).
 * @module
 */
import { printOutcome } from "../steps/cli.ts";
import { runMain } from "../foundation/errors.ts";
import { displayPath, projectRoot } from "../foundation/paths.ts";
import { recipeCommand } from "../steps/pipeline.ts";
import { loadStep } from "../steps/registry.ts";
import { trackerHook } from "../tracker/hook.ts";
import { type GenerationRow, sampleRow, samplesText } from "../steps/eval/report.ts";

/** The first `n` eval prompts of generations.jsonl, each model's answer beside the reference. */
async function sideBySide(path: string, labels: string[], n: number): Promise<string[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  const rows = text.split("\n").filter((l) => l.trim() !== "").slice(0, n)
    .map((l) => sampleRow(JSON.parse(l) as GenerationRow));
  return rows.length === 0
    ? []
    : ["", `first ${rows.length} eval prompts, answered greedily:`, ...samplesText(rows, labels)];
}

if (import.meta.main) {
  const root = projectRoot();
  await runMain(async () => {
    console.log("lathe demo: the tiny-demo recipe (recipes/tiny-demo.yaml), offline\n");
    const result = await recipeCommand(["tiny-demo", ...Deno.args], {
      projectRoot: root,
      onFinish: trackerHook,
      onStep: (outcome) => printOutcome(outcome, root),
      loadStep,
    });
    if (!result) return;
    const runDir = displayPath(result.runDir, root);
    const train = result.steps.find((s) => s.step === "train-sft")?.outcome.manifest;
    const quantize = result.steps.find((s) => s.step === "quantize")?.outcome.manifest;
    const f = (v: unknown) => typeof v === "number" ? v.toFixed(4) : "?";
    if (quantize) {
      const q = quantize.metrics;
      console.log(`
quantize:    ${q.tensors_quantized} projections to ${q.quant_type}, relative RMS error ${
        f(q.rel_rms_error)
      } · base in 4 bits: ${runDir}/quantize/model/ (bitsandbytes layout)`);
    }
    if (train) {
      const m = train.metrics;
      console.log(
        `train-sft:   train loss ${f(m.train_loss)} · eval loss ${f(m.eval_loss_before)} untrained -> ${
          f(m.eval_loss)
        } trained
loss curve:  ${runDir}/train-sft/loss.svg   (or: deno task runs plot ${result.runId})
adapter:     ${runDir}/train-sft/adapter/   (PEFT format: PeftModel.from_pretrained(base, path))`,
      );
    }
    const dpo = result.steps.find((s) => s.step === "train-dpo")?.outcome.manifest;
    if (dpo) {
      const m = dpo.metrics;
      const pct = (v: unknown) => typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "?";
      console.log(
        `train-dpo:   reward accuracy on the eval pairs ${
          pct(m["eval_rewards/accuracies_before"])
        } at the reference -> ${
          pct(m["eval_rewards/accuracies"])
        } trained (share of pairs whose chosen answer gained more than the rejected one) · margin ${
          f(m["eval_rewards/margins"])
        } · DPO loss ${f(m.eval_loss_before)} -> ${f(m.eval_loss)}
dpo curves:  ${runDir}/train-dpo/loss.svg   (loss, reward margins and accuracies)
adapter:     ${runDir}/train-dpo/adapter/   (the SFT adapter, preference-tuned)`,
      );
    }
    const evalStep = result.steps.find((s) => s.step === "eval")?.outcome.manifest;
    if (evalStep) {
      const m = evalStep.metrics as Record<string, number | null>;
      const models = ["base", "train-sft", "train-dpo"].filter((k) => `${k}/eval_loss` in m);
      const pct = (v: number | null | undefined) => typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "–";
      const num = (v: number | null | undefined) => typeof v === "number" ? v.toFixed(3) : "–";
      const rows = [
        ["model", "eval loss", "valid JSON", "fields right", "ROUGE-L", "chosen likelier"],
        ...models.map((k) => [
          k,
          num(m[`${k}/eval_loss`]),
          pct(m[`${k}/json_valid`]),
          pct(m[`${k}/json_field_accuracy`]),
          pct(m[`${k}/rouge_l`]),
          pct(m[`${k}/preference_accuracy`]),
        ]),
      ];
      const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
      console.log(
        `\neval (${m.samples} eval prompts answered greedily, ${m.preference_pairs} preference pairs):`,
      );
      for (const r of rows) {
        console.log(
          "  " + r.map((cell, c) => c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c])).join("  "),
        );
      }
      for (const line of await sideBySide(`${result.runDir}/eval/generations.jsonl`, models, 3)) {
        console.log(line);
      }
      console.log(`report:      ${runDir}/eval/report.html   (and report.md, generations.jsonl)`);
    }
    const merge = result.steps.find((s) => s.step === "merge")?.outcome.manifest;
    if (merge) {
      const m = merge.metrics;
      console.log(
        `merge:       ${runDir}/merge/model/ (transformers layout, ${m.dtype}) · loss on ${m.check_rows} eval rows ${
          f(m.check_loss_unmerged)
        } as trained (NF4 base + adapter) -> ${f(m.check_loss_merged)} merged into the original base`,
      );
    }
    const exported = result.steps.find((s) => s.step === "export")?.outcome;
    if (exported) {
      const dir = `${runDir}/export`;
      const gguf = Object.keys(exported.manifest.outputs).filter((o) => o.endsWith(".gguf"));
      console.log(
        `export:      ${gguf.map((g) => `${dir}/${g}`).join(", ")} · adapter with model card: ${dir}/peft/`,
      );
      try {
        const commands = await Deno.readTextFile(`${result.runDir}/export/commands.txt`);
        console.log(`run it:\n${commands.trimEnd().split("\n").map((c) => `  ${c}`).join("\n")}`);
      } catch { /* no commands */ }
    }
    console.log(`
manifests:   ${runDir}/<step>/manifest.json
rerun one:   deno task step tokenize --manifest ${runDir}/tokenize/manifest.json
query:       deno task runs sql "select step, status, seconds, key from steps where run_id = '${result.runId}'"`);
  });
}
