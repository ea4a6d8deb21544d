// The random-weight checkpoints of the training benchmark (bench/train_checkpoint.ts), on shapes
// shrunk by config overrides so nothing large is written: the files are exactly what
// formats/safetensors.ts `writeModelWeights` writes for the same tensors (shards, headers,
// index), the config loads and matches the weights, and the values are bf16 N(0, 0.02²) with
// norms at 1. The full shapes are checked against the sizes their published checkpoints have.
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  DEFAULT_SHARD_BYTES,
  shapeConfigJson,
  SHAPES,
  writeRandomCheckpoint,
} from "../../bench/train_checkpoint.ts";
import { INDEX_FILE, ModelWeights, writeModelWeights } from "../../formats/safetensors.ts";
import {
  checkWeights,
  expectedTensors,
  loadModelConfig,
  parseModelConfig,
} from "../../formats/model_config.ts";
import { LatheError } from "../../foundation/errors.ts";

/** Qwen2 (biases, untied head) at D 64, F 128, L 2, H 4, Hkv 2, V 256. */
const SMALL = {
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 256,
  max_window_layers: 2,
};

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-bench-ckpt-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("shapeConfigJson() applies overrides to the published config and refuses unknown shapes", () => {
  const json = shapeConfigJson("mistral-7b", { num_hidden_layers: 3 });
  assert.equal(json.num_hidden_layers, 3);
  assert.equal(json.hidden_size, 4096);
  assert.equal(json.sliding_window, null);
  assert.deepEqual(Object.keys(json), Object.keys(json).toSorted());
  assert.throws(() => shapeConfigJson("gpt-5"), (e) => e instanceof LatheError && /"gpt-5"/.test(e.message));
});

Deno.test("the shapes have the parameter counts of their published bf16 checkpoints (index total_size)", () => {
  // total_size of model.safetensors.index.json in mistralai/Mistral-7B-v0.3,
  // meta-llama/Meta-Llama-3-8B and Qwen/Qwen2-7B.
  const published: Record<string, number> = {
    "mistral-7b": 14_496_047_104,
    "llama3-8b": 16_060_522_496,
    "qwen2-7b": 15_231_233_024,
  };
  assert.deepEqual(Object.keys(SHAPES).sort(), Object.keys(published).sort());
  for (const name of Object.keys(SHAPES)) {
    const config = parseModelConfig(shapeConfigJson(name), name);
    let bytes = 0;
    for (const shape of expectedTensors(config).values()) bytes += 2 * shape.reduce((a, b) => a * b, 1);
    assert.equal(bytes, published[name], name);
  }
  const mistral = parseModelConfig(shapeConfigJson("mistral-7b"), "mistral-7b");
  assert.equal(mistral.ropeTheta, 1e6);
  assert.equal(mistral.rmsNormEps, 1e-5);
  assert.deepEqual(new Set(mistral.layerWindows), new Set([null]));
  assert.equal(mistral.numKvHeads, 8);
});

Deno.test("writeRandomCheckpoint() writes what writeModelWeights writes for the same tensors, sharded", async () => {
  await withTempDir(async (dir) => {
    const ours = join(dir, "ours");
    const theirs = join(dir, "theirs");
    await Deno.mkdir(ours);
    const json = shapeConfigJson("qwen2-7b", SMALL);
    // Three shards or more: the data is ~110 kB.
    const maxShardBytes = 40_000;
    const ckpt = await writeRandomCheckpoint(ours, json, { seed: 5, maxShardBytes, blockElements: 1000 });
    assert.ok(ckpt.files.includes(INDEX_FILE));
    assert.ok(ckpt.files.filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f)).length >= 3);

    using weights = await ModelWeights.open(ours);
    const sources = [...expectedTensors(ckpt.config)].map(([name, shape]) => ({
      name,
      dtype: "BF16" as const,
      shape,
      data: () => weights.readBytes(name),
    }));
    const written = await writeModelWeights(theirs, sources, { maxShardBytes });
    assert.deepEqual(ckpt.files.filter((f) => f !== "config.json").sort(), written.sort());
    for (const file of written) {
      assert.deepEqual(await Deno.readFile(join(ours, file)), await Deno.readFile(join(theirs, file)), file);
    }
    const index = JSON.parse(await Deno.readTextFile(join(ours, INDEX_FILE)));
    assert.equal(index.metadata.total_size, ckpt.weightBytes);
    assert.deepEqual(JSON.parse(await Deno.readTextFile(join(ours, "config.json"))), json);
  });
});

Deno.test("writeRandomCheckpoint() makes a checkpoint that loads: bf16 N(0, 0.02²) matrices, biases, norms at 1", async () => {
  await withTempDir(async (dir) => {
    const blockElements = 1000;
    const ckpt = await writeRandomCheckpoint(dir, shapeConfigJson("qwen2-7b", SMALL), {
      blockElements,
      maxShardBytes: DEFAULT_SHARD_BYTES,
    });
    assert.deepEqual(ckpt.files, ["model.safetensors", "config.json"]);
    const config = await loadModelConfig(dir);
    assert.equal(config.architecture, "Qwen2ForCausalLM");
    assert.equal(config.qkvBias, true);
    using weights = await ModelWeights.open(dir);
    checkWeights(config, weights.names().map((name) => weights.info(name)), dir);
    assert.ok(weights.names().every((n) => weights.info(n).dtype === "BF16"));

    const norm = await weights.readFloat32("model.layers.1.post_attention_layernorm.weight");
    assert.ok(norm.every((x) => x === 1));
    const embed = await weights.readFloat32("model.embed_tokens.weight");
    let sum = 0, sq = 0;
    for (const x of embed) {
      sum += x;
      sq += x * x;
    }
    const mean = sum / embed.length;
    const std = Math.sqrt(sq / embed.length - mean * mean);
    assert.ok(Math.abs(mean) < 0.003, `mean ${mean}`);
    assert.ok(Math.abs(std - 0.02) < 0.002, `std ${std}`);
    // The block repeats with its period; tensors start at different phases.
    for (let i = 0; i < 50; i++) assert.equal(embed[i], embed[i + blockElements]);
    const q = await weights.readFloat32("model.layers.0.self_attn.q_proj.weight");
    const o = await weights.readFloat32("model.layers.0.self_attn.o_proj.weight");
    assert.notDeepEqual(q.slice(0, 16), o.slice(0, 16));
    const bias = await weights.readFloat32("model.layers.0.self_attn.k_proj.bias");
    assert.ok(bias.some((x) => x !== 0) && bias.every((x) => Math.abs(x) < 0.2));
  });
});
