// The QLoRA recipes plan offline: with only each model's real config.json in a Hugging Face cache
// (HF_HUB_OFFLINE=1), `deno task recipe <name> --dry-run` lists every step (the keys of the steps
// that need the weights or the tokenizer are unknown until they are downloaded) and prints
// train-sft's memory plan for the recipe's settings.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { repoFolderName } from "../../hub/cache.ts";
import { loadRecipe } from "../../steps/recipe.ts";
import { recipeCommand } from "../../steps/pipeline.ts";
import { loadStep } from "../../steps/registry.ts";
import { resolveConfig } from "../../steps/runner.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const CONFIGS = new URL("../fixtures/hub_configs/", import.meta.url);
const SHA = "0123456789abcdef0123456789abcdef01234567";

/** A cache holding `repo`'s config.json alone, laid out as huggingface_hub does. */
async function cacheConfig(cache: string, repo: string): Promise<void> {
  const dir = join(cache, repoFolderName({ type: "model", name: repo }));
  await Deno.mkdir(join(dir, "refs"), { recursive: true });
  await Deno.mkdir(join(dir, "blobs"), { recursive: true });
  await Deno.mkdir(join(dir, "snapshots", SHA), { recursive: true });
  await Deno.writeTextFile(join(dir, "refs", "main"), SHA);
  await Deno.copyFile(new URL(`${repo.replace("/", "--")}.json`, CONFIGS), join(dir, "blobs", "config"));
  await Deno.symlink(join(dir, "blobs", "config"), join(dir, "snapshots", SHA, "config.json"));
}

async function dryRun(recipe: string, repo: string, extra: string[] = []): Promise<string[]> {
  const cache = await Deno.makeTempDir({ prefix: "lathe-hf-cache-" });
  const saved = ["HF_HUB_CACHE", "HF_HUB_OFFLINE", "LATHE_GPU_MEMORY"].map((k) =>
    [k, Deno.env.get(k)] as const
  );
  try {
    await cacheConfig(cache, repo);
    Deno.env.set("HF_HUB_CACHE", cache);
    Deno.env.set("HF_HUB_OFFLINE", "1");
    Deno.env.set("LATHE_GPU_MEMORY", "24GiB");
    const lines: string[] = [];
    await recipeCommand([recipe, "--dry-run", "--runs", join(cache, "runs"), ...extra], {
      projectRoot: ROOT,
      loadStep,
      print: (line: string) => lines.push(...line.split("\n")),
    });
    return lines;
  } finally {
    for (const [k, v] of saved) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    await Deno.remove(cache, { recursive: true });
  }
}

Deno.test("mistral-qlora is the guides' QLoRA configuration", async () => {
  const recipe = await loadRecipe("mistral-qlora", { projectRoot: ROOT, loadStep });
  assert.deepEqual(
    recipe.steps.map((s) => s.name),
    ["prepare", "tokenize", "quantize", "train-sft", "eval", "merge", "export"],
  );
  const exportCfg = recipe.steps.find((s) => s.name === "export")!.config as Record<string, unknown>;
  assert.deepEqual(exportCfg.targets, ["peft", "gguf", "ollama"]);
  assert.deepEqual((exportCfg.gguf as { types: string[] }).types, ["Q4_K_M"], "ends with GGUF Q4_K_M");
  const mergeCfg = recipe.steps.find((s) => s.name === "merge")!.config as Record<string, unknown>;
  assert.equal(mergeCfg.model, "mistralai/Mistral-7B-Instruct-v0.3", "merged into the original 16-bit base");
  assert.deepEqual(recipe.steps.find((s) => s.name === "eval")!.inputs, {
    data: "tokenize",
    base: "quantize",
    sft: "train-sft",
    preference: "tokenize",
  });
  const config = (name: string) => {
    const s = recipe.steps.find((s) => s.name === name)!;
    return resolveConfig(s.def, s.raw) as Record<string, unknown>;
  };
  const q = config("quantize"), t = config("train-sft"), tok = config("tokenize");
  assert.equal(q.model, "mistralai/Mistral-7B-Instruct-v0.3");
  assert.deepEqual([q.quant_type, q.double_quant, q.compute_dtype, q.blocksize], [
    "nf4",
    true,
    "float16",
    64,
  ]);
  assert.equal(t.model, q.model, "the adapter names the original model");
  assert.deepEqual(t.lora, {
    r: 16,
    alpha: 32,
    dropout: 0.05,
    bias: "none",
    target_modules: ["q_proj", "v_proj"],
    use_rslora: false,
    modules_to_save: null,
    trainable_token_indices: null,
  });
  assert.deepEqual(
    [t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate, t.num_train_epochs],
    [1, 16, 2e-4, 3],
  );
  assert.deepEqual(
    [t.lr_scheduler_type, t.warmup_ratio, t.gradient_checkpointing, t.offload_layer_inputs],
    ["cosine", 0.03, true, true],
  );
  assert.deepEqual([tok.max_seq_len, tok.packing], [2048, false]);
});

for (
  const [recipe, repo, arch] of [
    ["mistral-qlora", "mistralai/Mistral-7B-Instruct-v0.3", "MistralForCausalLM"],
    ["llama3-qlora", "meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM"],
  ] as const
) {
  Deno.test(`${recipe} --dry-run plans offline from config.json alone and prints the memory`, async () => {
    const out = await dryRun(recipe, repo);
    const text = out.join("\n");
    assert.match(text, new RegExp(`plan for recipe "${recipe}"`));
    const steps = [
      "prepare",
      "tokenize",
      "quantize",
      "train-sft",
      ...(recipe === "mistral-qlora" ? ["merge", "export"] : []),
    ];
    for (const step of steps) {
      assert.ok(out.some((l) => l.startsWith(step)), `a line for ${step}:\n${text}`);
    }
    // prepare reads the shipped sample: its key is known; the others wait for the downloads.
    assert.match(out.find((l) => l.startsWith("prepare"))!, /^prepare\s+[0-9a-f]{12}\s+would run/);
    assert.match(out.find((l) => l.startsWith("quantize"))!, /^quantize\s+\?\s+would run after downloading/);
    assert.match(text, /Peak GPU memory of one training step: \d+\.\d\d GiB/);
    assert.match(text, new RegExp(`${arch} D 4096, L 32, F 14336`));
    assert.match(
      text,
      /T = 1·2048, f16, checkpointing on, layer inputs in host memory, LoRA r 16 on q_proj, v_proj/,
    );
    assert.match(text, /NF4 double quant, blocksize 64/);
    assert.match(text, /fits the 24\.00 GiB of LATHE_GPU_MEMORY/);
    console.log(out.filter((l) => /Peak GPU memory|total|4-bit/.test(l)).join("\n"));
  });
}

Deno.test("a plan that does not fit says what would", async () => {
  const cache = "meta-llama/Llama-3.1-8B-Instruct";
  const saved = Deno.env.get("LATHE_GPU_MEMORY");
  try {
    const out = (await dryRun("llama3-qlora", cache, ["--set", "tokenize.max_seq_len=131072"])).join("\n");
    assert.match(out, /does not fit the 24\.00 GiB of LATHE_GPU_MEMORY/);
    assert.match(out, /seq_len: \d+ -> [\d.]+ GiB \(fits\)/, "a shorter sequence that fits is named");
  } finally {
    saved === undefined ? Deno.env.delete("LATHE_GPU_MEMORY") : Deno.env.set("LATHE_GPU_MEMORY", saved);
  }
});

Deno.test("mistral-dpo is SFT with the mistral-qlora settings, then DPO with the guides' settings", async () => {
  const recipe = await loadRecipe("mistral-dpo", { projectRoot: ROOT, loadStep });
  const qlora = await loadRecipe("mistral-qlora", { projectRoot: ROOT, loadStep });
  assert.deepEqual(recipe.steps.map((s) => s.name), [
    "prepare",
    "tokenize",
    "quantize",
    "train-sft",
    "prepare@preference",
    "tokenize@preference",
    "train-dpo",
    "eval",
  ]);
  assert.deepEqual(recipe.steps.find((s) => s.name === "eval")!.inputs, {
    data: "tokenize",
    preference: "tokenize@preference",
    base: "quantize",
    sft: "train-sft",
    dpo: "train-dpo",
  });
  const config = (r: typeof recipe, name: string) => {
    const s = r.steps.find((s) => s.name === name)!;
    return resolveConfig(s.def, s.raw) as Record<string, unknown>;
  };
  for (const name of ["tokenize", "quantize", "train-sft"]) {
    assert.deepEqual(config(recipe, name), config(qlora, name), `${name} as in mistral-qlora`);
  }
  const dpo = config(recipe, "train-dpo");
  assert.deepEqual(
    [
      dpo.beta,
      dpo.loss_type,
      dpo.learning_rate,
      dpo.per_device_train_batch_size,
      dpo.gradient_accumulation_steps,
    ],
    [0.1, "sigmoid", 5e-5, 1, 16],
  );
  assert.deepEqual([dpo.num_train_epochs, dpo.precompute_ref_log_probs], [1, true]);
  assert.equal(dpo.model, config(recipe, "train-sft").model);
  // train-dpo reads the preference instances, train-sft's adapter and the 4-bit base.
  assert.deepEqual(recipe.steps.find((s) => s.name === "train-dpo")!.inputs, {
    data: "tokenize@preference",
    base: "quantize",
    sft: "train-sft",
  });
  const out = (await dryRun("mistral-dpo", "mistralai/Mistral-7B-Instruct-v0.3")).join("\n");
  assert.match(out, /train-dpo +\? +would run \(upstream changes\)/);
  // Its memory plan: a pair is two rows of up to 2048 tokens.
  assert.match(
    out,
    /T = 2·2048, f16, checkpointing on, layer inputs in host memory, LoRA r 16 on q_proj, v_proj/,
  );
});
