import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { checkWeights, expectedTensors, loadModelConfig } from "../../formats/model_config.ts";
import {
  readTokenizerInfo,
  TINY_ARCHS,
  type TinyArch,
  type TinySize,
  writeTinyModel,
} from "../../kernels/models/tiny.ts";
import { fromFloat32, INDEX_FILE, ModelWeights, toFloat32 } from "../../formats/safetensors.ts";

const TOKENIZER = fileURLToPath(new URL("../../data/demo/tokenizer", import.meta.url));

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-tiny-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function filesOf(dir: string): Promise<Map<string, Uint8Array>> {
  const out = new Map<string, Uint8Array>();
  for (const e of [...Deno.readDirSync(dir)].sort((a, b) => a.name.localeCompare(b.name))) {
    out.set(e.name, await Deno.readFile(join(dir, e.name)));
  }
  return out;
}

Deno.test("readTokenizerInfo() takes the vocab size and special ids from the demo tokenizer", async () => {
  const info = await readTokenizerInfo(TOKENIZER);
  assert.deepEqual(info, { vocabSize: 512, bosTokenId: null, eosTokenId: 511, padTokenId: 509 });
});

Deno.test("writeTinyModel() writes HF directories that config.ts parses and whose weights match it", async () => {
  await withTempDir(async (root) => {
    for (const arch of TINY_ARCHS) {
      const dir = join(root, arch);
      const { config: written } = await writeTinyModel(dir, {
        arch,
        size: "nano",
        seed: 1,
        tokenizerDir: TOKENIZER,
      });
      const config = await loadModelConfig(dir);
      assert.deepEqual(config, written);
      assert.deepEqual(
        [config.vocabSize, config.hiddenSize, config.intermediateSize, config.numLayers, config.numHeads],
        [512, 64, 128, 2, 4],
      );
      assert.deepEqual([config.numKvHeads, config.headDim, config.eosTokenIds], [2, 16, [511]]);
      using weights = await ModelWeights.open(dir);
      checkWeights(config, weights.names().map((n) => weights.info(n)), dir);
      assert.deepEqual(weights.names().sort(), [...expectedTensors(config).keys()].sort());
      assert.ok(weights.names().every((n) => weights.info(n).dtype === "F32"));
      // Norms start at 1; weights are N(0, 0.02²).
      assert.ok((await weights.readFloat32("model.layers.1.input_layernorm.weight")).every((v) => v === 1));
      const w = await weights.readFloat32("model.layers.0.mlp.up_proj.weight");
      const mean = w.reduce((a, b) => a + b, 0) / w.length;
      const std = Math.sqrt(w.reduce((a, b) => a + (b - mean) ** 2, 0) / w.length);
      assert.ok(Math.abs(mean) < 0.001, `mean ${mean}`);
      assert.ok(Math.abs(std - 0.02) < 0.001, `std ${std}`);
      assert.deepEqual(
        await Deno.readFile(join(dir, "tokenizer.json")),
        await Deno.readFile(join(TOKENIZER, "tokenizer.json")),
      );
      const generation = JSON.parse(await Deno.readTextFile(join(dir, "generation_config.json")));
      assert.deepEqual(generation, { _from_model_config: true, eos_token_id: 511, pad_token_id: 509 });
      const raw = JSON.parse(await Deno.readTextFile(join(dir, "config.json")));
      assert.deepEqual(Object.keys(raw), Object.keys(raw).toSorted());
      if (arch === "llama") {
        assert.equal(raw.architectures[0], "LlamaForCausalLM");
        assert.equal(config.tieWordEmbeddings, true);
        assert.equal(weights.has("lm_head.weight"), false);
        assert.equal(config.ropeScaling?.type, "llama3");
      }
      if (arch === "mistral") {
        assert.equal(raw.architectures[0], "MistralForCausalLM");
        assert.deepEqual(config.layerWindows, [32, 32]);
        assert.deepEqual(weights.info("lm_head.weight").shape, [512, 64]);
      }
      if (arch === "qwen2") {
        assert.equal(raw.architectures[0], "Qwen2ForCausalLM");
        assert.equal(config.qkvBias, true);
        assert.deepEqual(weights.info("model.layers.1.self_attn.k_proj.bias").shape, [32]);
        const bias = await weights.readFloat32("model.layers.1.self_attn.q_proj.bias");
        assert.ok(bias.some((v) => v !== 0), "biases are drawn, not zero");
      }
    }
  });
});

Deno.test("writeTinyModel() gives the same bytes for the same seed and different weights for another", async () => {
  await withTempDir(async (root) => {
    const opts = {
      arch: "qwen2" as const,
      size: "nano" as const,
      tokenizerDir: TOKENIZER,
      dtype: "bf16" as const,
    };
    await writeTinyModel(join(root, "a"), { ...opts, seed: 7 });
    await writeTinyModel(join(root, "b"), { ...opts, seed: 7 });
    await writeTinyModel(join(root, "c"), { ...opts, seed: 8 });
    const a = await filesOf(join(root, "a"));
    assert.deepEqual(a, await filesOf(join(root, "b")));
    const c = await filesOf(join(root, "c"));
    assert.deepEqual(c.get("config.json"), a.get("config.json"));
    assert.notDeepEqual(c.get("model.safetensors"), a.get("model.safetensors"));
  });
});

Deno.test("writeTinyModel() bf16 weights are the f32 weights rounded, sharded or not", async () => {
  await withTempDir(async (root) => {
    const opts = { arch: "llama" as const, size: "nano" as const, seed: 3, tokenizerDir: TOKENIZER };
    await writeTinyModel(join(root, "f32"), opts);
    const { files } = await writeTinyModel(join(root, "bf16"), {
      ...opts,
      dtype: "bf16",
      maxShardBytes: 100_000,
    });
    const shards = files.filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f));
    assert.ok(shards.length >= 2, `shards: ${files.join(", ")}`);
    assert.ok(files.includes(INDEX_FILE));
    assert.equal(
      JSON.parse(await Deno.readTextFile(join(root, "bf16", "config.json"))).torch_dtype,
      "bfloat16",
    );
    using f32 = await ModelWeights.open(join(root, "f32"));
    using bf16 = await ModelWeights.open(join(root, "bf16"));
    assert.deepEqual(bf16.names(), f32.names());
    assert.ok(new Set(bf16.names().map((n) => bf16.info(n).file)).size >= 2);
    for (const name of ["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"]) {
      const full = await f32.readFloat32(name);
      const rounded = toFloat32("BF16", fromFloat32(full, "BF16"), name);
      assert.deepEqual(await bf16.readFloat32(name), rounded);
    }
    // Rewriting as a single file removes the stale shards and index.
    await writeTinyModel(join(root, "bf16"), { ...opts, dtype: "bf16" });
    const left = [...Deno.readDirSync(join(root, "bf16"))].map((e) => e.name).sort();
    assert.deepEqual(left, [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
  });
});

Deno.test("writeTinyModel() micro size has D=128 and 4 layers, and rejects unknown arch or size", async () => {
  await withTempDir(async (root) => {
    const { config } = await writeTinyModel(root, {
      arch: "mistral",
      size: "micro",
      tokenizerDir: TOKENIZER,
    });
    assert.deepEqual([config.hiddenSize, config.numLayers, config.intermediateSize, config.headDim], [
      128,
      4,
      256,
      32,
    ]);
    await assert.rejects(
      writeTinyModel(root, { arch: "gpt2" as TinyArch, size: "nano", tokenizerDir: TOKENIZER }),
      /arch "gpt2"/,
    );
    await assert.rejects(
      writeTinyModel(root, { arch: "llama", size: "huge" as TinySize, tokenizerDir: TOKENIZER }),
      /size "huge"/,
    );
    await assert.rejects(
      writeTinyModel(root, { arch: "llama", size: "nano", tokenizerDir: join(root, "none") }),
      /Cannot read tokenizer/,
    );
  });
});

Deno.test("scripts/make_tiny_models.ts writes the requested models and the sharded variant", async () => {
  const root = fileURLToPath(new URL("../../", import.meta.url));
  const run = (args: string[]) =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "scripts/make_tiny_models.ts", ...args],
      cwd: root,
      env: { LATHE_QUIET: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
  await withTempDir(async (out) => {
    const ok = await run([
      "--out",
      out,
      "--arch",
      "mistral,qwen2",
      "--size",
      "nano",
      "--sharded",
      "--dtype",
      "bf16",
    ]);
    assert.equal(ok.code, 0, new TextDecoder().decode(ok.stderr));
    assert.deepEqual([...Deno.readDirSync(out)].map((e) => e.name).sort(), [
      "llama-nano-sharded",
      "mistral-nano",
      "qwen2-nano",
    ]);
    using sharded = await ModelWeights.open(join(out, "llama-nano-sharded"));
    assert.ok(sharded.files.length >= 2);
    assert.equal(sharded.info("model.embed_tokens.weight").dtype, "BF16");
    const bad = await run(["--out", out, "--arch", "gpt2"]);
    assert.equal(bad.code, 1);
    assert.match(
      new TextDecoder().decode(bad.stderr),
      /error: Cannot make tiny models: --arch "gpt2" is not one of llama/,
    );
  });
});
