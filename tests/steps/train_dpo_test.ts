// The train-dpo step in recipes: after train-sft on a 4-bit base (the reference is base + the SFT
// adapter), on preference data of its own prepare@preference and tokenize@preference instances.
// The first evaluation is at the reference (loss ln 2, rewards 0); training on the pairs raises
// their reward accuracy; same seed, same bytes; a killed run resumes to the same bytes; the
// precomputed reference log-probs are reused by a rerun with another beta and equal the ones
// scored each step; bad input stops with the key or file:line.
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadModelConfig } from "../../formats/model_config.ts";
import { readPeftAdapter } from "../../formats/peft.ts";
import { LatheError } from "../../foundation/errors.ts";
import { FAILURE_FILE, type Manifest, readManifest } from "../../foundation/manifest.ts";
import type { PipelineResult } from "../../steps/pipeline.ts";
import { trainDpoHooks } from "../../steps/train_dpo.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { FaultyModel, ROOT } from "./train/_fixtures.ts";
import { runRecipe } from "./_recipes.ts";

const DEMO = join(ROOT, "data", "demo");

/** A temp project dir with 12 SFT chats and 16 preference pairs of the demo data. */
async function withProject(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-train-dpo-" });
  try {
    const lines = async (file: string, n: number) =>
      (await Deno.readTextFile(join(DEMO, file))).split("\n").filter((l) => l !== "").slice(0, n);
    await Deno.writeTextFile(join(dir, "sft.jsonl"), (await lines("sft.jsonl", 12)).join("\n") + "\n");
    await Deno.writeTextFile(
      join(dir, "pref.jsonl"),
      (await lines("preference.jsonl", 16)).join("\n") + "\n",
    );
    await fn(dir);
  } finally {
    delete trainDpoHooks.wrapModel;
    Deno.env.delete("LATHE_RESUME");
    await Deno.remove(dir, { recursive: true });
  }
}

/** The recipe: SFT on a 4-bit demo model, then DPO trained and evaluated on the same 16 pairs. */
function recipeText(dir: string, dpo: Record<string, unknown> = {}): string {
  const config = {
    model: join(DEMO, "model"),
    beta: 0.1,
    learning_rate: 0.003,
    per_device_train_batch_size: 4,
    gradient_accumulation_steps: 1,
    max_steps: 12,
    eval_steps: 6,
    save_steps: 4,
    ...dpo,
  };
  return `name: dpo-test
seed: 5
steps:
  prepare:
    sources: [${join(dir, "sft.jsonl")}]
    eval_fraction: 0
  tokenize:
    tokenizer: ${join(DEMO, "tokenizer")}
    max_seq_len: 128
    packing: true
  quantize:
    model: ${join(DEMO, "model")}
  train-sft:
    model: ${join(DEMO, "model")}
    lora: { r: 4, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj] }
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 1
    max_steps: 3
    learning_rate: 0.01
    save_steps: null
  prepare@preference:
    sources: [${join(dir, "pref.jsonl")}]
    eval_fraction: 0.25
  tokenize@preference:
    tokenizer: ${join(DEMO, "tokenizer")}
    max_seq_len: 128
  train-dpo: ${JSON.stringify(config)}
`;
}

/** Runs the recipe in `dir` (extra argv: --only, --run, --set ...); returns the result. */
const recipe = (dir: string, text: string, ...argv: string[]) => runRecipe(dir, "dpo-test", text, ...argv);

const dpoOf = (r: PipelineResult): Manifest => r.steps.find((s) => s.step === "train-dpo")!.outcome.manifest;

gpuTest(
  "train-dpo after train-sft on an NF4 base: reference = base + SFT adapter, ln 2 at the start, reward accuracy rises",
  async () => {
    await withProject(async (dir) => {
      const result = await recipe(dir, recipeText(dir, { max_steps: 16, eval_steps: 8 }));
      const m = dpoOf(result);
      const runDir = result.runDir;
      assert.equal(m.inputs.data.step, "tokenize@preference");
      assert.equal(m.inputs.sft.step, "train-sft");
      assert.equal(m.inputs.base.step, "quantize");
      assert.equal(m.metrics.reference, 'base + adapter of step "train-sft"');
      assert.ok(Object.hasOwn(m.outputs, "reference_logps"));
      const met = m.metrics as Record<string, number>;
      // The first evaluation is at the reference: h = 0 for every pair.
      assert.equal(met.eval_loss_before, Math.LN2);
      for (const k of ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]) {
        assert.equal(met[`eval_${k}_before`], 0, k);
      }
      assert.ok(met.pairs >= 10, `${met.pairs} training pairs`);
      // The adapter continues train-sft's (its r and targets) and names the original model.
      const adapter = await readPeftAdapter(
        join(runDir, "train-dpo", "adapter"),
        await loadModelConfig(join(DEMO, "model")),
      );
      assert.equal(adapter.config.baseModelNameOrPath, join(DEMO, "model"));
      assert.equal(adapter.config.r, 4);
      assert.deepEqual([...adapter.config.targetModules].sort(), ["q_proj", "v_proj"]);
      // trl's names in the log history and metrics.jsonl.
      const state = JSON.parse(await Deno.readTextFile(join(runDir, "train-dpo", "trainer_state.json")));
      const logged = state.log_history.find((e: Record<string, number>) => e.loss !== undefined);
      for (
        const k of [
          "rewards/chosen",
          "rewards/rejected",
          "rewards/accuracies",
          "rewards/margins",
          "logps/chosen",
          "logps/rejected",
          "logits/chosen",
          "logits/rejected",
        ]
      ) {
        assert.equal(typeof logged[k], "number", k);
      }
      // Trained on its pairs, the policy prefers their chosen answers: the loss falls below ln 2
      // and the reward accuracy of the last steps is high.
      const steps = state.log_history.filter((e: Record<string, number>) => e.loss !== undefined);
      const last = steps.slice(-4);
      const mean = (k: string) =>
        last.reduce((a: number, e: Record<string, number>) => a + e[k], 0) / last.length;
      assert.ok(mean("loss") < Math.LN2, `loss ${mean("loss")}`);
      assert.ok(mean("rewards/accuracies") >= 0.75, `reward accuracy ${mean("rewards/accuracies")}`);
      assert.ok(mean("rewards/margins") > 0, `margins ${mean("rewards/margins")}`);
      const svg = await Deno.readTextFile(join(runDir, "train-dpo", "loss.svg"));
      assert.match(svg, /rewards\/margins/);
      assert.match(svg, /rewards\/accuracies/);
    });
  },
);

gpuTest(
  "train-dpo: same seed, same bytes; a killed run resumes to the same bytes, reusing its reference log-probs",
  async () => {
    await withProject(async (dir) => {
      const text = recipeText(dir);
      const whole = dpoOf(await recipe(dir, text, "--run", "w"));
      const again = dpoOf(await recipe(dir, text, "--run", "w", "--only", "train-dpo", "--force"));
      const sha = (m: Manifest) => m.outputs.adapter_weights.sha256;
      assert.equal(sha(again), sha(whole), "same seed, same adapter bytes");

      trainDpoHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 7 });
      const forced = ["--run", "k", "--only", "train-dpo", "--force"];
      await assert.rejects(() => recipe(dir, text, ...forced), /injected kill at step 7/);
      delete trainDpoHooks.wrapModel;
      const failure = await readManifest(join(dir, "runs", "k", "train-dpo", FAILURE_FILE));
      assert.equal(failure.status, "failed");
      Deno.env.set("LATHE_RESUME", "1");
      const resumed = dpoOf(await recipe(dir, text, ...forced));
      Deno.env.delete("LATHE_RESUME");
      assert.equal(resumed.metrics.resumed_from_step, 4);
      assert.equal(
        resumed.metrics.reference_reused,
        true,
        "the resumed run reads its reference log-probs back",
      );
      assert.equal(sha(resumed), sha(whole), "resumed = uninterrupted");
      assert.equal(resumed.outputs.reference_logps.sha256, whole.outputs.reference_logps.sha256);
    });
  },
);

gpuTest(
  "train-dpo: a rerun with another beta reuses the reference; scored each step it gives the same numbers",
  async () => {
    await withProject(async (dir) => {
      const first = dpoOf(await recipe(dir, recipeText(dir, { max_steps: 4, save_steps: null })));
      assert.equal(first.metrics.reference_reused, false);
      const other = dpoOf(await recipe(dir, recipeText(dir, { max_steps: 4, save_steps: null, beta: 0.3 })));
      assert.equal(other.metrics.reference_reused, true, "another beta, the same reference");
      assert.equal(other.metrics.reference_key, first.metrics.reference_key);
      assert.equal(other.metrics.eval_loss_before, Math.LN2);
      // Without precomputing, the reference (the SFT adapter) is scored each step: same results.
      const live = dpoOf(
        await recipe(
          dir,
          recipeText(dir, { max_steps: 4, save_steps: null, precompute_ref_log_probs: false }),
        ),
      );
      assert.ok(!Object.hasOwn(live.outputs, "reference_logps"));
      for (
        const k of [
          "eval_loss_before",
          "train_loss",
          "eval_loss",
          "eval_rewards/margins",
          "eval_logps/chosen",
        ]
      ) {
        const [a, b] = [first.metrics[k] as number, live.metrics[k] as number];
        assert.ok(Math.abs(a - b) <= 1e-4 * (1 + Math.abs(a)), `${k}: precomputed ${a} vs live ${b}`);
      }
    });
  },
);

gpuTest(
  "train-dpo without train-sft: the reference is the bare base (the fresh adapter is zero), ln 2 at the start",
  async () => {
    await withProject(async (dir) => {
      const text = recipeText(dir, {
        max_steps: 2,
        save_steps: null,
        lora: { r: 4, alpha: 8, target_modules: ["q_proj", "v_proj"] },
      })
        .replace(/ {2}quantize:[\s\S]*? {2}prepare@preference:/, "  prepare@preference:");
      const m = dpoOf(await recipe(dir, text));
      assert.equal(m.metrics.reference, "base (adapter disabled)");
      assert.equal(m.inputs.sft, undefined);
      assert.equal(m.metrics.eval_loss_before, Math.LN2);
    });
  },
);

Deno.test("train-dpo refuses beta <= 0, SFT data, and an SFT adapter of another base, each by its key", async () => {
  await withProject(async (dir) => {
    const bad = (over: Record<string, unknown>) =>
      recipe(dir, recipeText(dir, { backend: "cpu-reference", ...over }), "--dry-run");
    await assert.rejects(() => bad({ beta: 0 }), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /steps\.train-dpo\.beta: beta must be above 0/);
      return true;
    });
    await assert.rejects(() => bad({ loss_type: "kto" }), /steps\.train-dpo\.loss_type/);
    // SFT data: train-dpo placed right after the SFT tokenize reads that.
    const onSft = recipeText(dir, { backend: "cpu-reference", max_steps: 1 })
      .replace(/ {2}prepare@preference:[\s\S]*? {2}train-dpo:/, "  train-dpo:");
    await assert.rejects(() => recipe(dir, onSft), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /Cannot train-dpo on split "train" of step "tokenize": it holds sft rows/);
      assert.match(e.hint ?? "", /prepare@preference and tokenize@preference/);
      return true;
    });
    const other = join(dir, "other");
    const { writeTinyModel } = await import("../../kernels/models/tiny.ts");
    await writeTinyModel(other, {
      arch: "llama",
      size: "nano",
      seed: 9,
      tokenizerDir: join(DEMO, "tokenizer"),
    });
    const mismatch = recipeText(dir, { backend: "cpu-reference", max_steps: 1, model: other })
      .replace(/ {2}quantize:\n.*\n/, "");
    await assert.rejects(() => recipe(dir, mismatch), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(
        e.message,
        /Cannot use the adapter of step "train-sft" as train-dpo's reference: it was trained on/,
      );
      return true;
    });
  });
});

Deno.test("prepare and tokenize refuse preference rows that prefer nothing, with file:line", async () => {
  await withProject(async (dir) => {
    const rows = (await Deno.readTextFile(join(dir, "pref.jsonl"))).split("\n").filter((l) => l);
    const cases: [string, (r: Record<string, unknown>) => void, RegExp][] = [
      ["identical", (r) => (r.rejected = r.chosen), /identical/],
      ["empty", (r) => (r.chosen = " "), /empty/],
      [
        "prompts",
        (r) => {
          // Multi-turn answers whose user turns differ: the two sides answer different conversations.
          r.chosen = [{ role: "assistant", content: "a" }, { role: "user", content: "one" }, {
            role: "assistant",
            content: "b",
          }];
          r.rejected = [{ role: "assistant", content: "a" }, { role: "user", content: "two" }, {
            role: "assistant",
            content: "c",
          }];
        },
        /prompt/,
      ],
    ];
    for (const [name, edit, pattern] of cases) {
      const row = JSON.parse(rows[2]);
      edit(row);
      const lines = [...rows];
      lines[2] = JSON.stringify(row);
      await Deno.writeTextFile(join(dir, "pref.jsonl"), lines.join("\n") + "\n");
      await assert.rejects(
        () => recipe(dir, recipeText(dir, { backend: "cpu-reference" }), "--only", "tokenize@preference"),
        (e: Error) => {
          assert.ok(e instanceof LatheError, name);
          assert.match(e.message, pattern, `${name}: ${e.message}`);
          assert.match(e.message, /pref\.jsonl:3/, `${name}: names the source line`);
          return true;
        },
      );
    }
  });
});

gpuTest(
  "train-dpo keeps the adapter of the best eval_rewards/accuracies, and stops on a NaN loss naming the step",
  async () => {
    await withProject(async (dir) => {
      const best = dpoOf(
        await recipe(
          dir,
          recipeText(dir, {
            max_steps: 12,
            eval_steps: 4,
            save_steps: 4,
            load_best_model_at_end: true,
            metric_for_best_model: "rewards/accuracies",
          }),
        ),
      );
      assert.equal((best.config as Record<string, unknown>).metric_for_best_model, "eval_rewards/accuracies");
      assert.equal((best.config as Record<string, unknown>).greater_is_better, true);
      const state = JSON.parse(
        await Deno.readTextFile(join(dir, "runs", best.runId, "train-dpo", "trainer_state.json")),
      );
      const evals = state.log_history.filter((e: Record<string, number>) =>
        e.step > 0 && e.eval_loss !== undefined
      );
      const top = Math.max(...evals.map((e: Record<string, number>) => e["eval_rewards/accuracies"]));
      assert.equal(best.metrics.best_metric, top);
      assert.equal(state.best_metric, top);
      const first = evals.find((e: Record<string, number>) => e["eval_rewards/accuracies"] === top);
      assert.equal(best.metrics.best_global_step, first.step, "the first evaluation reaching the best");

      trainDpoHooks.wrapModel = (model) => new FaultyModel(model, { nanAtStep: 3 });
      await assert.rejects(
        () => recipe(dir, recipeText(dir, { max_steps: 6, save_steps: 2 }), "--run", "nan"),
        (e: Error) => {
          assert.ok(e instanceof LatheError);
          assert.match(e.message, /the loss of step 3 is NaN; the last good checkpoint is step 2/);
          return true;
        },
      );
      delete trainDpoHooks.wrapModel;
      const files = [...Deno.readDirSync(join(dir, "runs", "nan", "train-dpo"))].map((e) => e.name);
      assert.deepEqual(files, [FAILURE_FILE], "no manifest claims success");
    });
  },
);

/** The recipe without quantize and train-sft: train-dpo starts from the bare 32-bit base. */
const bareBase = (text: string) =>
  text.replace(/ {2}quantize:[\s\S]*? {2}prepare@preference:/, "  prepare@preference:");

/** finetuning: full at a learning rate fit for every weight of the micro base. */
const FULL_DPO = { finetuning: "full", learning_rate: 5e-4, max_steps: 6, eval_steps: 3, save_steps: 3 };

gpuTest(
  "train-dpo finetuning: full trains every weight from ln 2, writes a model that eval and export take, " +
    "resumes to the same bytes, and scores a live reference as the precomputed one",
  async () => {
    await withProject(async (dir) => {
      // The SFT rows get an eval split: eval answers its prompts with the tuned model.
      const text =
        bareBase(recipeText(dir, FULL_DPO)).replace("    eval_fraction: 0\n", "    eval_fraction: 0.2\n") +
        `  eval:
    inputs: { data: tokenize, preference: tokenize@preference }
    model: ${join(DEMO, "model")}
    max_samples: 2
    max_new_tokens: 8
  export:
    targets: [gguf]
    gguf: { types: [Q8_0] }
`;
      const result = await recipe(dir, text);
      const manifest = (step: string) => result.steps.find((s) => s.step === step)!.outcome.manifest;
      const m = manifest("train-dpo");
      const met = m.metrics as Record<string, number>;
      assert.equal(m.metrics.reference, "base before training");
      assert.equal(met.eval_loss_before, Math.LN2, "the reference is the policy before its first step");
      assert.ok(
        met.eval_loss < met.eval_loss_before,
        `eval loss ${met.eval_loss_before} -> ${met.eval_loss}`,
      );
      assert.ok(!Object.hasOwn(m.outputs, "adapter"), "no adapter");
      assert.ok(
        Object.hasOwn(m.outputs, "model/model.safetensors") && Object.hasOwn(m.outputs, "reference_logps"),
      );
      // Every weight moved; the model keeps the base's names and dtype.
      const { ModelWeights } = await import("../../formats/safetensors.ts");
      const modelDir = join(result.runDir, "train-dpo", "model");
      assert.equal((await loadModelConfig(modelDir)).torchDtype, "float32");
      using trained = await ModelWeights.open(modelDir);
      using base = await ModelWeights.open(join(DEMO, "model"));
      assert.deepEqual(trained.names().sort(), base.names().sort());
      for (const name of base.names()) {
        const a = await trained.readFloat32(name), b = await base.readFloat32(name);
        assert.ok(a.some((x, i) => x !== b[i]), `${name} trained`);
      }
      // eval scores it as a model of its own, against the base it started from.
      const ev = manifest("eval").metrics as Record<string, number>;
      assert.ok(
        Math.abs(ev["train-dpo/reward_accuracy"] - met["eval_rewards/accuracies"]) <= 1 / ev.preference_pairs,
        `eval's reward accuracy ${ev["train-dpo/reward_accuracy"]} vs train-dpo's ${
          met["eval_rewards/accuracies"]
        }`,
      );
      assert.equal(typeof ev["train-dpo/eval_loss"], "number");
      assert.equal(ev.samples, 2, "and it answered the prompts");
      // export writes the model itself as GGUF.
      const exported = Object.keys(manifest("export").outputs);
      assert.ok(exported.some((k) => k.endsWith("Q8_0.gguf")), exported.join(", "));
      // merge has no adapter to fold in, and says so.
      await assert.rejects(
        () =>
          recipe(dir, text.replace("  export:", `  merge:\n    model: ${join(DEMO, "model")}\n  export:`)),
        (e: Error) => {
          assert.ok(e instanceof LatheError);
          assert.match(e.message, /Cannot merge after step "train-dpo": it fine-tuned every weight/);
          assert.match(e.hint ?? "", /drop the merge step/);
          return true;
        },
      );
      const whole = m;
      const sha = (x: Manifest) => x.outputs["model/model.safetensors"].sha256;
      // Killed after its step-3 checkpoint, then resumed: the bytes of the uninterrupted run, which is
      // also a second run with the same seed.
      trainDpoHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 5 });
      const forced = ["--run", "k", "--only", "train-dpo", "--force"];
      await assert.rejects(() => recipe(dir, text, ...forced), /injected kill at step 5/);
      delete trainDpoHooks.wrapModel;
      Deno.env.set("LATHE_RESUME", "1");
      const resumed = dpoOf(await recipe(dir, text, ...forced));
      Deno.env.delete("LATHE_RESUME");
      assert.equal(resumed.metrics.resumed_from_step, 3);
      assert.equal(sha(resumed), sha(whole), "resumed = uninterrupted");

      // Scored each step from a host copy of the initial weights: the precomputed run's numbers.
      const live = dpoOf(
        await recipe(
          dir,
          bareBase(recipeText(dir, { ...FULL_DPO, precompute_ref_log_probs: false })),
          "--run",
          "l",
        ),
      );
      assert.ok(!Object.hasOwn(live.outputs, "reference_logps"));
      for (const k of ["eval_loss_before", "train_loss", "eval_loss", "eval_rewards/margins"]) {
        const [a, b] = [whole.metrics[k] as number, live.metrics[k] as number];
        assert.ok(Math.abs(a - b) <= 1e-4 * (1 + Math.abs(a)), `${k}: precomputed ${a} vs live ${b}`);
      }

      // Refused after a LoRA train-sft (the policy would be base + adapter); a 4-bit base is refused by
      // the check train-sft shares (tests/steps/train/full_test.ts).
      const afterLora = recipeText(dir, FULL_DPO).replace(/ {2}quantize:\n.*\n/, "");
      await assert.rejects(() => recipe(dir, afterLora, "--run", "s"), (e: Error) => {
        assert.ok(e instanceof LatheError);
        assert.match(e.message, /after the LoRA adapter of step "train-sft"/);
        assert.match(e.hint ?? "", /merge/);
        return true;
      });
    });
  },
);
