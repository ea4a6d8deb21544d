// The eval step in a recipe after SFT and DPO on the demo data (a few steps each): the base, the
// SFT and the DPO adapters side by side; train-sft's adapter gets exactly train-sft's eval_loss;
// train-dpo's reward accuracy equals its own eval_rewards/accuracies; the reports and the
// generations hold every model; preference data given as `data` is refused.
import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { ROOT } from "./train/_fixtures.ts";
import { runRecipe } from "./_recipes.ts";

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

const recipe = (dir: string, text: string) => runRecipe(dir, "eval-test", text);

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

Deno.test("eval refuses preference pairs as its `data`, and data without an eval split", async () => {
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
    const noEval = text.replace("{ data: tokenize@preference }", "{ data: tokenize, preference: tokenize }")
      .replace(
        "eval_fraction: 0.2",
        "eval_fraction: 0",
      );
    await assert.rejects(() => recipe(dir, noEval), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /Cannot eval: step "tokenize" has no eval split/);
      assert.match(e.hint ?? "", /prepare\.eval_fraction/);
      return true;
    });
  });
});

/** A chat-completions mock: scores 7 unless the answer is empty (then "no idea"); records what it got. */
function mockJudge(key: string) {
  const seen: { auth: string | null; model: string; content: string }[] = [];
  const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen: () => {} }, async (req) => {
    const body = await req.json();
    seen.push({
      auth: req.headers.get("authorization"),
      model: body.model,
      content: body.messages[0].content,
    });
    if (req.headers.get("authorization") !== `Bearer ${key}`) return new Response("no", { status: 401 });
    const reply = /Assistant's answer:\n\n/.test(body.messages[0].content) ? "no idea" : "Score: 7/10";
    return Response.json({ choices: [{ message: { role: "assistant", content: reply } }] });
  });
  return { server, seen, url: `http://127.0.0.1:${server.addr.port}/v1` };
}

gpuTest("eval with a multiple-choice benchmark and an LLM judge; the judge's key lands nowhere", async () => {
  await withProject(async (dir) => {
    const key = "sk-test-7f3a9c";
    const judgeServer = mockJudge(key);
    const saved = Deno.env.get("LATHE_TEST_JUDGE_KEY");
    Deno.env.set("LATHE_TEST_JUDGE_KEY", key);
    try {
      await Deno.writeTextFile(
        join(dir, "mc.jsonl"),
        [
          JSON.stringify({
            question: "Which city is in Portugal?",
            choices: ["Lisbon", "Zurich"],
            answer: 0,
          }),
          JSON.stringify({ question: "How many mugs is 'six mugs'?", choices: ["2", "6", "9"], answer: 1 }),
        ].join("\n") + "\n",
      );
      const text = recipeText(dir, "{ data: tokenize }")
        .replace(/ {2}prepare@preference:[\s\S]*? {2}eval:/, "  eval:") +
        `    benchmarks: [{ name: shop-mc, source: ${join(dir, "mc.jsonl")} }]\n` +
        `    judge: { url: "${judgeServer.url}", model: judge-1, key_env: LATHE_TEST_JUDGE_KEY }\n`;
      const result = await recipe(dir, text);
      const ev = result.steps.find((s) => s.step === "eval")!.outcome.manifest;
      const m = ev.metrics as Record<string, number>;
      for (const label of ["base", "train-sft"]) {
        assert.ok([0, 0.5, 1].includes(m[`${label}/shop-mc/acc`]), `${label} acc`);
        assert.ok([0, 0.5, 1].includes(m[`${label}/shop-mc/acc_norm`]));
        assert.equal(m[`${label}/judge_score`] ?? null, m[`${label}/judge_unscored`] === 3 ? null : 7);
      }
      assert.equal(judgeServer.seen.length, 6, "3 answers × 2 models");
      assert.ok(judgeServer.seen.every((s) => s.model === "judge-1" && s.auth === `Bearer ${key}`));
      assert.match(judgeServer.seen[0].content, /Reference answer:\n\{/);
      // The key is in no file of the run (manifests, reports, generations, logs) nor the index.
      for await (const f of walkFiles(join(dir, "runs"))) {
        const bytes = await Deno.readFile(f);
        assert.ok(!new TextDecoder().decode(bytes).includes(key), `the key is in ${f}`);
      }
      // An unreachable judge fails the step: no manifest claims success.
      await judgeServer.server.shutdown();
      await assert.rejects(
        () => recipe(dir, text.replace("judge-1", "judge-2")),
        (e: Error) => {
          assert.ok(e instanceof LatheError);
          assert.match(
            e.message,
            /Cannot reach the judge at http:\/\/127\.0\.0\.1:\d+\/v1\/chat\/completions/,
          );
          assert.ok(!e.message.includes(key) && !(e.hint ?? "").includes(key));
          return true;
        },
      );
    } finally {
      if (saved === undefined) Deno.env.delete("LATHE_TEST_JUDGE_KEY");
      else Deno.env.set("LATHE_TEST_JUDGE_KEY", saved);
      await judgeServer.server.shutdown().catch(() => {});
    }
  });
});

async function* walkFiles(dir: string): AsyncGenerator<string> {
  for await (const e of Deno.readDir(dir)) {
    const p = join(dir, e.name);
    if (e.isDirectory) yield* walkFiles(p);
    else if (e.isFile) yield p;
  }
}
