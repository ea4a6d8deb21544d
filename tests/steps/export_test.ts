// The merge and export steps in a recipe after a short QLoRA SFT on the demo data, on a random nano Llama
// (D 64, 2 layers: the demo's own model is larger than these checks need):
// - merge into the original 16-bit base and into the dequantized NF4 weights, each recording the
//   loss of merged against unmerged on the first eval rows (original: the NF4 rounding shows; the
//   dequantized merge equals the model as trained within f32 rounding);
// - export writes the PEFT adapter with its card, the merged model (hard links) with its card,
//   GGUF files whose metadata and tensor infos @huggingface/gguf reads back as written, a LoRA
//   GGUF, and a Modelfile; it prints the commands;
// - bad input: gguf with an adapter and no merge; an unknown GGUF type (the list of supported ones).
import assert from "node:assert/strict";
import { join } from "node:path";
import { gguf as parseGguf } from "@huggingface/gguf";
import { LatheError } from "../../foundation/errors.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { ROOT } from "./train/_fixtures.ts";
import { runRecipe } from "./_recipes.ts";
import { startFakeHub } from "../hub/_fake_hub.ts";
import { llamaCpp, llamaCppAvailable } from "../interop/_llama_cpp.ts";
import { ModelWeights } from "../../formats/safetensors.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";

const DEMO = join(ROOT, "data", "demo");

function recipeText(dir: string, mergeBase = "original", exportCfg?: string): string {
  return `name: export-test
seed: 3
steps:
  prepare: { sources: [${join(dir, "sft.jsonl")}], eval_fraction: 0.2 }
  tokenize: { tokenizer: ${join(DEMO, "tokenizer")}, max_seq_len: 128, packing: true }
  quantize: { model: ${join(dir, "model")}, quant_type: nf4, double_quant: true, compute_dtype: float16 }
  train-sft:
    model: ${join(dir, "model")}
    lora: { r: 4, alpha: 16, dropout: 0.0, target_modules: all-linear }
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 1
    max_steps: 3
    learning_rate: 0.02
    save_steps: null
  merge: { model: ${join(dir, "model")}, dtype: float32, merge_base: ${mergeBase}, check_rows: 4 }
  export:
${exportCfg ?? "    targets: [peft, merged, gguf, gguf-lora, ollama]\n    gguf: { types: [F16, Q8_0] }"}
`;
}

async function withProject(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-export-" });
  try {
    const lines = (await Deno.readTextFile(join(DEMO, "sft.jsonl"))).split("\n").filter((l) => l !== "");
    await Deno.writeTextFile(join(dir, "sft.jsonl"), lines.slice(0, 20).join("\n") + "\n");
    await writeTinyModel(join(dir, "model"), {
      arch: "llama",
      size: "nano",
      seed: 0,
      tokenizerDir: join(DEMO, "tokenizer"),
    });
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const recipe = (dir: string, text: string) => runRecipe(dir, "export-test", text);

gpuTest(
  "merge records merged vs unmerged loss; export writes peft, merged, GGUF, LoRA GGUF, Modelfile",
  async () => {
    await withProject(async (dir) => {
      const result = await recipe(dir, recipeText(dir));
      const manifest = (step: string) => result.steps.find((s) => s.step === step)!.outcome.manifest;
      const m = manifest("merge").metrics as Record<string, number>;
      assert.equal(m.check_rows, 4);
      assert.ok(Number.isFinite(m.check_loss_merged) && Number.isFinite(m.check_loss_unmerged));
      // Merged into the original f32 weights, not the NF4 ones the adapter was trained on: a small cost.
      assert.ok(Math.abs(m.check_loss_delta) < 0.05, `delta ${m.check_loss_delta}`);
      const ex = join(result.runDir, "export");
      const outputs = manifest("export").outputs;
      for (const f of ["peft/adapter_config.json", "peft/adapter_model.safetensors", "peft/README.md"]) {
        assert.ok(f in outputs, f);
      }
      const card = await Deno.readTextFile(join(ex, "peft", "README.md"));
      assert.match(card, /^---\nbase_model: .*lathe-export-\w+\/model\nlibrary_name: peft\n/);
      assert.match(card, /tags:\n {2}- lathe\n {2}- sft\n {2}- lora\n/);
      assert.match(card, /datasets:\n {2}- sft\.jsonl\n/);
      assert.match(card, /\| learning_rate \| 0\.02000 \|/);
      assert.match(card, /AutoPeftModelForCausalLM/);
      assert.ok("merged/model.safetensors" in outputs && "merged/config.json" in outputs);
      const mergedStat = await Deno.stat(join(ex, "merged", "model.safetensors"));
      assert.ok(mergedStat.nlink === null || mergedStat.nlink >= 2, "hard-linked, not copied");
      assert.match(await Deno.readTextFile(join(ex, "merged", "README.md")), /library_name: transformers/);

      for (const type of ["F16", "Q8_0"]) {
        const path = join(ex, "gguf", `model-lathe-${type}.gguf`);
        const parsed = await parseGguf(path, { allowLocalFile: true });
        const meta = parsed.metadata as Record<string, unknown>;
        assert.equal(meta["general.architecture"], "llama");
        assert.equal(meta["general.file_type"], type === "F16" ? 1 : 7);
        assert.equal(meta["llama.block_count"], 2);
        assert.equal(meta["llama.embedding_length"], 64);
        assert.equal(meta["tokenizer.ggml.model"], "gpt2");
        assert.equal(meta["tokenizer.ggml.pre"], "gpt-2");
        assert.equal((meta["tokenizer.ggml.tokens"] as string[]).length, 512);
        assert.equal(meta["tokenizer.ggml.eos_token_id"], 511);
        assert.match(String(meta["tokenizer.chat_template"]), /<\|im_start\|>/);
        const infos = parsed.tensorInfos;
        // token_embd, 2 × 9 layer tensors, output_norm, rope_freqs (tied: no output).
        assert.equal(infos.length, 1 + 18 + 1 + 1);
        const q = infos.find((t) => t.name === "blk.0.attn_q.weight")!;
        assert.deepEqual(q.shape.map(Number), [64, 64]);
        const k = infos.find((t) => t.name === "blk.1.attn_k.weight")!;
        assert.deepEqual(k.shape.map(Number), [64, 32]);
        assert.equal(
          Number(infos.find((t) => t.name === "blk.0.attn_norm.weight")!.dtype),
          0,
          "norms stay F32",
        );
        assert.equal(Number(q.dtype), type === "F16" ? 1 : 8);
        assert.deepEqual(infos.find((t) => t.name === "rope_freqs.weight")!.shape.map(Number), [8]);
      }
      const lora = await parseGguf(join(ex, "gguf", "model-lathe-lora-F32.gguf"), { allowLocalFile: true });
      const lm = lora.metadata as Record<string, unknown>;
      assert.equal(lm["general.type"], "adapter");
      assert.equal(lm["adapter.type"], "lora");
      assert.equal(lm["adapter.lora.alpha"], 16);
      assert.equal(lora.tensorInfos.length, 2 * 7 * 2);
      const a = lora.tensorInfos.find((t) => t.name === "blk.0.ffn_down.weight.lora_a")!;
      assert.deepEqual(a.shape.map(Number), [128, 4], "A[r, in] → ne [in, r]");
      const b = lora.tensorInfos.find((t) => t.name === "blk.0.ffn_down.weight.lora_b")!;
      assert.deepEqual(b.shape.map(Number), [4, 64], "B[out, r] → ne [r, out]");

      const modelfile = await Deno.readTextFile(join(ex, "gguf", "Modelfile"));
      assert.match(modelfile, /^FROM \.\/model-lathe-F16\.gguf\n/);
      assert.match(modelfile, /<\|im_start\|>\{\{ \.Role \}\}/);
      assert.match(modelfile, /PARAMETER stop "<\|im_end\|>"/);
      const commands = await Deno.readTextFile(join(ex, "commands.txt"));
      assert.match(commands, /llama-cli -m .*model-lathe-F16\.gguf/);
      assert.match(commands, /ollama create model-lathe -f .*Modelfile/);
    });
  },
);

gpuTest("merge_base dequantized equals the model as trained (NF4 base + adapter)", async () => {
  await withProject(async (dir) => {
    const result = await recipe(dir, recipeText(dir, "dequantized", "    targets: [peft]"));
    const m = result.steps.find((s) => s.step === "merge")!.outcome.manifest.metrics as Record<
      string,
      number
    >;
    assert.equal(m.merge_base, "dequantized" as unknown as number);
    assert.ok(Math.abs(m.check_loss_delta) < 1e-4, `delta ${m.check_loss_delta}`);
  });
});

Deno.test("export refuses gguf of an adapter without merge, and names the supported GGUF types", async () => {
  await withProject(async (dir) => {
    const noMerge = recipeText(dir, "original", "    targets: [peft, gguf]").replace(/ {2}merge: .*\n/, "");
    await assert.rejects(() => recipe(dir, noMerge), (e: Error) => {
      assert.ok(e instanceof LatheError, String(e));
      assert.match(e.message, /Cannot export gguf: the model has an adapter but there is no merge step/);
      return true;
    });
    const badType = recipeText(dir, "original", "    targets: [gguf]\n    gguf: { types: [Q3_K_S] }");
    await assert.rejects(() => recipe(dir, badType), (e: Error) => {
      assert.ok(e instanceof LatheError, String(e));
      assert.match(e.message, /export\.gguf\.types/);
      assert.match(e.message, /Q4_K_M/);
      return true;
    });
  });
});

gpuTest(
  "export uploads to the Hub (fake): repo created private, files arrive, token in no file of the run",
  async () => {
    const token = "hf_SECRETexportToken123";
    const hub = startFakeHub({ token, namespaces: ["me"], lfsThreshold: 64 * 1024 });
    const saved = {
      t: Deno.env.get("HF_TOKEN"),
      e: Deno.env.get("HF_ENDPOINT"),
      o: Deno.env.get("HF_HUB_OFFLINE"),
    };
    Deno.env.set("HF_TOKEN", token);
    Deno.env.set("HF_ENDPOINT", hub.url);
    Deno.env.delete("HF_HUB_OFFLINE");
    try {
      await withProject(async (dir) => {
        const cfg =
          "    targets: [peft, gguf, hub]\n    gguf: { types: [Q8_0] }\n    hub: { repo: me/demo-tuned }";
        const result = await recipe(dir, recipeText(dir, "original", cfg));
        const repo = hub.repos.get("me/demo-tuned")!;
        assert.ok(repo, "created");
        assert.equal(repo.private, true);
        const files = repo.branches.get("main")!;
        const ex = join(result.runDir, "export");
        for (const f of ["peft/adapter_model.safetensors", "peft/README.md", "gguf/model-lathe-Q8_0.gguf"]) {
          assert.ok(files.has(f), f);
          const local = await Deno.readFile(join(ex, f));
          assert.deepEqual(new Uint8Array(files.get(f)!.bytes), local, `${f} arrives byte for byte`);
        }
        assert.match(repo.commits.at(-1)!.title, new RegExp(`^lathe run ${result.runId}`));
        const m = result.steps.find((s) => s.step === "export")!.outcome.manifest.metrics;
        assert.equal(m.hub_repo, "me/demo-tuned");
        // The token is nowhere in the run: manifests, logs, metrics, cards, hub.json.
        for await (const e of walk(result.runDir)) {
          const text = new TextDecoder().decode(await Deno.readFile(e));
          assert.ok(!text.includes(token), `token found in ${e}`);
        }
      });
    } finally {
      await hub.close();
      for (
        const [k, v] of [["HF_TOKEN", saved.t], ["HF_ENDPOINT", saved.e], [
          "HF_HUB_OFFLINE",
          saved.o,
        ]] as const
      ) {
        if (v === undefined) Deno.env.delete(k);
        else Deno.env.set(k, v);
      }
    }
  },
);

Deno.test("export to the Hub with a bad token fails clearly, without the token, and claims nothing", async () => {
  const token = "hf_SECRETwrongToken999";
  const hub = startFakeHub({ token: "hf_theRealOne", namespaces: ["me"] });
  const saved = { t: Deno.env.get("HF_TOKEN"), e: Deno.env.get("HF_ENDPOINT") };
  Deno.env.set("HF_TOKEN", token);
  Deno.env.set("HF_ENDPOINT", hub.url);
  try {
    await withProject(async (dir) => {
      const cfg = "    targets: [peft, hub]\n    hub: { repo: me/demo-tuned }";
      await assert.rejects(() => recipe(dir, recipeText(dir, "original", cfg)), (e: Error) => {
        assert.ok(e instanceof LatheError, String(e));
        assert.match(e.message, /token/);
        assert.ok(!String(e).includes(token) && !(e.hint ?? "").includes(token));
        return true;
      });
      for await (const e of walk(join(dir, "runs"))) {
        const text = new TextDecoder().decode(await Deno.readFile(e));
        assert.ok(!text.includes(token), `token found in ${e}`);
        assert.ok(!e.endsWith("export/manifest.json"), "no manifest claims the export");
      }
    });
  } finally {
    await hub.close();
    for (const [k, v] of [["HF_TOKEN", saved.t], ["HF_ENDPOINT", saved.e]] as const) {
      if (v === undefined) Deno.env.delete(k);
      else Deno.env.set(k, v);
    }
  }
});

/** Every file under `dir`. */
async function* walk(dir: string): AsyncGenerator<string> {
  for await (const e of Deno.readDir(dir)) {
    const p = join(dir, e.name);
    if (e.isDirectory) yield* walk(p);
    else if (e.isFile) yield p;
  }
}

gpuTest(
  "a fully fine-tuned model is a model downstream: train-dpo tunes an adapter on it, eval compares, export writes its GGUF",
  async () => {
    await withProject(async (dir) => {
      const prefs = (await Deno.readTextFile(join(DEMO, "preference.jsonl"))).split("\n").filter((l) => l)
        .slice(0, 12);
      await Deno.writeTextFile(join(dir, "pref.jsonl"), prefs.join("\n") + "\n");
      const text = `name: full-test
seed: 3
steps:
  prepare: { sources: [${join(dir, "sft.jsonl")}], eval_fraction: 0.2 }
  tokenize: { tokenizer: ${join(DEMO, "tokenizer")}, max_seq_len: 128, packing: true }
  train-sft:
    model: ${join(dir, "model")}
    finetuning: full
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 1
    max_steps: 3
    learning_rate: 0.002
    save_steps: null
  prepare@preference: { sources: [${join(dir, "pref.jsonl")}], eval_fraction: 0.25 }
  tokenize@preference: { tokenizer: ${join(DEMO, "tokenizer")}, max_seq_len: 128 }
  train-dpo:
    model: ${join(dir, "model")}
    lora: { r: 4, alpha: 8, target_modules: [q_proj, v_proj] }
    per_device_train_batch_size: 4
    gradient_accumulation_steps: 1
    max_steps: 2
    save_steps: null
  eval:
    inputs: { data: tokenize, preference: tokenize@preference }
    model: ${join(dir, "model")}
    max_samples: 2
    max_new_tokens: 8
    batch_size: 2
  merge: { model: ${join(dir, "model")}, dtype: float32, check_rows: 0 }
  export:
    targets: [merged, gguf]
    gguf: { types: [F16] }
`;
      const result = await recipe(dir, text);
      const manifest = (step: string) => result.steps.find((s) => s.step === step)!.outcome.manifest;
      const ev = manifest("eval").metrics as Record<string, number>;
      const sft = manifest("train-sft").metrics as Record<string, number>;
      assert.equal(manifest("merge").metrics.projections_merged, 2 * 2, "DPO's adapter into the tuned model");
      const dpo = manifest("train-dpo").metrics as Record<string, number>;
      assert.equal(ev["train-sft/eval_loss"], sft.eval_loss, "the tuned model's own eval_loss");
      assert.equal(ev["base/eval_loss"], sft.eval_loss_before);
      // train-dpo's adapter runs on the tuned model, its reference: the first DPO loss is ln 2.
      assert.ok(Math.abs(dpo.eval_loss_before - Math.LN2) < 1e-6, `${dpo.eval_loss_before}`);
      assert.ok(
        Math.abs(ev["train-dpo/reward_accuracy"] - dpo["eval_rewards/accuracies"]) <= 1 / ev.preference_pairs,
      );
      const cfg = JSON.parse(
        await Deno.readTextFile(join(result.runDir, "train-dpo", "adapter", "adapter_config.json")),
      );
      assert.match(cfg.base_model_name_or_path, /train-sft\/model$/);
      const outputs = manifest("export").outputs;
      assert.ok("merged/model.safetensors" in outputs, "the tuned model, linked");
      const parsed = await parseGguf(join(result.runDir, "export", "gguf", "model-lathe-F16.gguf"), {
        allowLocalFile: true,
      });
      assert.equal(parsed.tensorInfos.length, 21);
    });
  },
);

const llama = await llamaCppAvailable();

gpuTest(
  `a special token added in tokenize trains its row, merges and reaches the GGUF as one token${
    llama.ok ? "" : ` (llama.cpp part skipped: ${llama.reason})`
  }`,
  async () => {
    await withProject(async (dir) => {
      // An answer that uses the new token, so its row has gradient.
      const rows = (await Deno.readTextFile(join(dir, "sft.jsonl"))).trim().split("\n").map((l) => {
        const r = JSON.parse(l);
        r.messages[r.messages.length - 1].content = "<tool_call>" + r.messages[r.messages.length - 1].content;
        return JSON.stringify(r);
      });
      await Deno.writeTextFile(join(dir, "sft.jsonl"), rows.join("\n") + "\n");
      const text = recipeText(dir, "original", "    targets: [peft, gguf]\n    gguf: { types: [F16] }")
        .replace(
          "max_seq_len: 128, packing: true }",
          "max_seq_len: 128, packing: true, add_special_tokens: [<tool_call>] }",
        )
        .replace(/ {2}quantize: .*\n/, "");
      const result = await recipe(dir, text);
      const manifest = (step: string) => result.steps.find((s) => s.step === step)!.outcome.manifest;
      const adapter = join(result.runDir, "train-sft", "adapter");
      const config = JSON.parse(await Deno.readTextFile(join(adapter, "adapter_config.json")));
      assert.deepEqual(config.trainable_token_indices, { embed_tokens: [512] }, "the new row trains");
      assert.ok(
        "adapter/tokenizer.json" in manifest("train-sft").outputs,
        "the tokenizer goes with the adapter",
      );
      const merged = join(result.runDir, "merge", "model");
      const mc = JSON.parse(await Deno.readTextFile(join(merged, "config.json")));
      assert.equal(mc.vocab_size, 513);
      using w = await ModelWeights.open(merged);
      assert.deepEqual(w.info("model.embed_tokens.weight").shape, [513, 64]);
      // Row 512 started at the mean of the 512 base rows and moved in training.
      const E = await w.readFloat32("model.embed_tokens.weight");
      using base = await ModelWeights.open(join(dir, "model"));
      const E0 = await base.readFloat32("model.embed_tokens.weight");
      const mean = Array.from({ length: 64 }, (_, d) => {
        let s = 0;
        for (let v = 0; v < 512; v++) s += E0[v * 64 + d];
        return Math.fround(s / 512);
      });
      assert.ok(E.subarray(512 * 64).some((x, d) => x !== mean[d]), "the new row trained");
      assert.deepEqual(E.subarray(0, 512 * 64), E0, "the other rows are the base's");
      const gguf = join(result.runDir, "export", "gguf", "model-lathe-F16.gguf");
      const parsed = await parseGguf(gguf, { allowLocalFile: true });
      const tokens = (parsed.metadata as Record<string, unknown>)["tokenizer.ggml.tokens"] as string[];
      assert.equal(tokens.length, 513);
      assert.equal(tokens[512], "<tool_call>");
      if (!llama.ok) return;
      const answer = await llamaCpp({
        model: gguf,
        lora: null,
        contextSize: 256,
        threads: 1,
        tasks: [{ kind: "tokenize", text: "<tool_call>Ship 2 mugs", special: true }],
      });
      assert.equal(
        (answer.results[0] as { tokens: number[] }).tokens[0],
        512,
        "llama.cpp reads it as one token",
      );
    });
  },
);
