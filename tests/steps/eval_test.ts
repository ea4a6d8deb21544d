// The eval step in a recipe after SFT and DPO on the demo data (a few steps each): the base, the
// SFT and the DPO adapters side by side; train-sft's adapter gets exactly train-sft's eval_loss;
// train-dpo's reward accuracy equals its own eval_rewards/accuracies; the reports and the
// generations hold every model; preference data given as `data` is refused.
import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { type PipelineResult, recipeCommand } from "../../steps/pipeline.ts";
import { loadStep } from "../../steps/registry.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { ROOT } from "./train/_fixtures.ts";

const DEMO = join(ROOT, "data", "demo");

function recipeText(dir: string, evalInputs = "{ data: tokenize, preference: tokenize@preference }"): string {
  return `name: eval-test
seed: 3
steps:
  prepare: { sources: [${join(dir, "sft.jsonl")}], eval_fraction: 0.2 }
  tokenize: { tokenizer: ${join(DEMO, "tokenizer")}, max_seq_len: 128, packing: true }
  train-sft:
    model: ${join(DEMO, "model")}
    lora: { r: 4, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj] }
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 1
    max_steps: 4
    learning_rate: 0.01
    save_steps: null
  prepare@preference: { sources: [${join(dir, "pref.jsonl")}], eval_fraction: 0.25 }
  tokenize@preference: { tokenizer: ${join(DEMO, "tokenizer")}, max_seq_len: 128 }
  train-dpo:
    model: ${join(DEMO, "model")}
    learning_rate: 0.003
    per_device_train_batch_size: 4
    gradient_accumulation_steps: 1
    max_steps: 4
    save_steps: null
  eval:
    inputs: ${evalInputs}
    model: ${join(DEMO, "model")}
    max_samples: 3
    max_new_tokens: 12
    batch_size: 2
`;
}

async function withProject(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-eval-" });
  try {
    const lines = async (file: string, n: number) =>
      (await Deno.readTextFile(join(DEMO, file))).split("\n").filter((l) => l !== "").slice(0, n);
    await Deno.writeTextFile(join(dir, "sft.jsonl"), (await lines("sft.jsonl", 20)).join("\n") + "\n");
    await Deno.writeTextFile(
      join(dir, "pref.jsonl"),
      (await lines("preference.jsonl", 16)).join("\n") + "\n",
    );
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function recipe(dir: string, text: string): Promise<PipelineResult> {
  const path = join(dir, "eval-test.yaml");
  await Deno.writeTextFile(path, text);
  return (await recipeCommand([path, "--runs", join(dir, "runs"), "--quiet"], {
    projectRoot: ROOT,
    loadStep,
    print: () => {},
    printError: () => {},
  }))!;
}

gpuTest(
  "eval compares base, SFT and DPO: train-sft's eval_loss to the bit, DPO's reward accuracy, reports",
  async () => {
    await withProject(async (dir) => {
      const result = await recipe(dir, recipeText(dir));
      const manifest = (step: string) => result.steps.find((s) => s.step === step)!.outcome.manifest;
      const ev = manifest("eval").metrics as Record<string, number>;
      const sft = manifest("train-sft").metrics as Record<string, number>;
      const dpo = manifest("train-dpo").metrics as Record<string, number>;
      assert.equal(ev["train-sft/eval_loss"], sft.eval_loss, "the same adapter, the same eval_loss");
      assert.equal(ev["base/eval_loss"], sft.eval_loss_before, "the base is train-sft's untrained start");
      assert.equal(ev["train-sft/perplexity"], Math.exp(sft.eval_loss));
      assert.ok(
        Math.abs(ev["train-dpo/reward_accuracy"] - dpo["eval_rewards/accuracies"]) <= 1 / ev.preference_pairs,
      );
      assert.equal(ev.samples, 3);
      for (const m of ["base", "train-sft", "train-dpo"]) {
        for (
          const k of [
            "rouge_l",
            "bleu",
            "exact_match",
            "json_valid",
            "json_field_accuracy",
            "preference_accuracy",
          ]
        ) {
          assert.equal(typeof ev[`${m}/${k}`], "number", `${m}/${k}`);
        }
      }
      const stepDir = join(result.runDir, "eval");
      const rows = (await Deno.readTextFile(join(stepDir, "generations.jsonl"))).trim().split("\n").map((l) =>
        JSON.parse(l)
      );
      assert.equal(rows.length, 3);
      for (const r of rows) {
        assert.deepEqual(Object.keys(r.outputs), ["base", "train-sft", "train-dpo"]);
        assert.ok(r.reference.startsWith("{"), "the demo's references are JSON");
        assert.equal(typeof r.outputs["train-dpo"].tokens, "number");
      }
      const md = await Deno.readTextFile(join(stepDir, "report.md"));
      assert.match(md, /\| metric \| base \| train-sft \| train-dpo \|/);
      assert.match(md, /\| eval loss \| [\d.]+ \| [\d.]+ \| [\d.]+ \|/);
      const html = await Deno.readTextFile(join(stepDir, "report.html"));
      assert.match(html, /^<!doctype html>/);
      assert.match(html, /<svg [^>]*>.*<rect /s, "a bar chart");
      assert.doesNotMatch(html, /<script|src="http|href="http/, "self-contained");
    });
  },
);

Deno.test("eval refuses preference pairs as its `data`", async () => {
  await withProject(async (dir) => {
    const text = recipeText(dir, "{ data: tokenize@preference }").replace(
      / {2}train-sft:[\s\S]*? {2}prepare@preference/,
      "  prepare@preference",
    )
      .replace(/ {2}train-dpo:[\s\S]*? {2}eval:/, "  eval:");
    await assert.rejects(() => recipe(dir, text), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /Cannot eval on step "tokenize@preference": its rows are preference pairs/);
      return true;
    });
  });
});
