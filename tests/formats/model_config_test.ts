import assert from "node:assert/strict";
import { join } from "node:path";
import {
  checkSequenceLength,
  checkWeights,
  expectedTensors,
  loadModelConfig,
  parseModelConfig,
  projectionShape,
} from "../../formats/model_config.ts";
import { LatheError } from "../../foundation/errors.ts";

// Published configs (trimmed of fields lathe ignores).
const LLAMA_32_1B = {
  architectures: ["LlamaForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: 128001,
  head_dim: 64,
  hidden_act: "silu",
  hidden_size: 2048,
  initializer_range: 0.02,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: "llama",
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  pretraining_tp: 1,
  rms_norm_eps: 1e-05,
  rope_scaling: {
    factor: 32.0,
    high_freq_factor: 4.0,
    low_freq_factor: 1.0,
    original_max_position_embeddings: 8192,
    rope_type: "llama3",
  },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  transformers_version: "4.45.0.dev0",
  use_cache: true,
  vocab_size: 128256,
};

const LLAMA_2_7B = {
  architectures: ["LlamaForCausalLM"],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: "silu",
  hidden_size: 4096,
  intermediate_size: 11008,
  max_position_embeddings: 4096,
  model_type: "llama",
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 32,
  rms_norm_eps: 1e-05,
  rope_scaling: null,
  tie_word_embeddings: false,
  torch_dtype: "float16",
  vocab_size: 32000,
};

const MISTRAL_7B_V01 = {
  architectures: ["MistralForCausalLM"],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: "silu",
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 14336,
  max_position_embeddings: 32768,
  model_type: "mistral",
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-05,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
  torch_dtype: "bfloat16",
  vocab_size: 32000,
};

const QWEN25_05B = {
  architectures: ["Qwen2ForCausalLM"],
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151645,
  hidden_act: "silu",
  hidden_size: 896,
  initializer_range: 0.02,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 21,
  model_type: "qwen2",
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-06,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

function rejects(raw: unknown, pattern: RegExp, hint?: RegExp): void {
  assert.throws(() => parseModelConfig(raw, "m/config.json"), (e: unknown) => {
    assert.ok(e instanceof LatheError, `expected LatheError, got ${e}`);
    assert.match(e.message, /^Cannot load model config "m\/config.json": /);
    assert.match(e.message, pattern);
    if (hint) assert.match(e.hint ?? "", hint);
    return true;
  });
}

Deno.test("parseModelConfig() reads Llama 3.2 with llama3 RoPE scaling, head_dim and tied embeddings", () => {
  const c = parseModelConfig(LLAMA_32_1B);
  assert.equal(c.architecture, "LlamaForCausalLM");
  assert.equal(c.modelType, "llama");
  assert.deepEqual(
    [c.vocabSize, c.hiddenSize, c.intermediateSize, c.numLayers, c.numHeads, c.numKvHeads, c.headDim],
    [128256, 2048, 8192, 16, 32, 8, 64],
  );
  assert.equal(c.rmsNormEps, 1e-5);
  assert.equal(c.ropeTheta, 500000);
  assert.deepEqual(c.ropeScaling, {
    type: "llama3",
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  assert.equal(c.tieWordEmbeddings, true);
  assert.deepEqual([c.qkvBias, c.oBias, c.mlpBias], [false, false, false]);
  assert.deepEqual(c.layerWindows, Array(16).fill(null));
  assert.deepEqual([c.bosTokenId, c.eosTokenIds, c.torchDtype], [128000, [128001], "bfloat16"]);
  const t = expectedTensors(c);
  assert.equal(t.size, 1 + 16 * 9 + 1);
  assert.equal(t.has("lm_head.weight"), false);
  assert.deepEqual(t.get("model.embed_tokens.weight"), [128256, 2048]);
  assert.deepEqual(t.get("model.layers.15.self_attn.k_proj.weight"), [512, 2048]);
  assert.deepEqual(t.get("model.layers.0.self_attn.o_proj.weight"), [2048, 2048]);
  assert.deepEqual(t.get("model.layers.3.mlp.down_proj.weight"), [2048, 8192]);
  assert.deepEqual(t.get("model.layers.3.post_attention_layernorm.weight"), [2048]);
  // transformers' state_dict order: embeddings, layer 0 projections then norms, ...
  assert.deepEqual([...t.keys()].slice(0, 10), [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
  ]);
  assert.equal([...t.keys()].at(-1), "model.norm.weight");
});

Deno.test("parseModelConfig() fills Llama 2 defaults: kv heads, head_dim = D/H, untied lm_head", () => {
  const { num_key_value_heads: _, ...raw } = LLAMA_2_7B;
  const c = parseModelConfig(raw);
  assert.equal(c.numKvHeads, 32);
  assert.equal(c.headDim, 128);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.ropeScaling, null);
  assert.deepEqual(expectedTensors(c).get("lm_head.weight"), [32000, 4096]);
  assert.deepEqual(projectionShape(c, "q_proj"), [4096, 4096]);
});

Deno.test("parseModelConfig() applies Mistral's sliding window to every layer; null disables it", () => {
  const v01 = parseModelConfig(MISTRAL_7B_V01);
  assert.deepEqual(v01.layerWindows, Array(32).fill(4096));
  assert.deepEqual(projectionShape(v01, "v_proj"), [1024, 4096]);
  const v03 = parseModelConfig({
    ...MISTRAL_7B_V01,
    sliding_window: null,
    rope_theta: 1e6,
    vocab_size: 32768,
  });
  assert.deepEqual(v03.layerWindows, Array(32).fill(null));
  // An absent key takes transformers' MistralConfig default of 4096.
  const { sliding_window: _, ...absent } = MISTRAL_7B_V01;
  assert.equal(parseModelConfig(absent).layerWindows[0], 4096);
  // Mistral NeMo-style explicit head_dim that differs from D/H.
  const nemo = parseModelConfig({ ...MISTRAL_7B_V01, hidden_size: 5120, head_dim: 128 });
  assert.deepEqual(projectionShape(nemo, "q_proj"), [4096, 5120]);
  assert.deepEqual(projectionShape(nemo, "o_proj"), [5120, 4096]);
});

Deno.test("parseModelConfig() gives Qwen2 q/k/v biases and windows only with use_sliding_window", () => {
  const c = parseModelConfig(QWEN25_05B);
  assert.deepEqual([c.qkvBias, c.oBias, c.mlpBias, c.tieWordEmbeddings], [true, false, false, true]);
  assert.deepEqual(c.layerWindows, Array(24).fill(null));
  const t = expectedTensors(c);
  assert.deepEqual(t.get("model.layers.0.self_attn.q_proj.bias"), [896]);
  assert.deepEqual(t.get("model.layers.0.self_attn.k_proj.bias"), [128]);
  assert.deepEqual(t.get("model.layers.0.self_attn.v_proj.bias"), [128]);
  assert.equal(t.has("model.layers.0.self_attn.o_proj.bias"), false);
  assert.equal(t.size, 1 + 24 * 12 + 1);
  const sliding = parseModelConfig({ ...QWEN25_05B, use_sliding_window: true });
  assert.deepEqual(sliding.layerWindows, [...Array(21).fill(null), 32768, 32768, 32768]);
  const typed = parseModelConfig({
    ...QWEN25_05B,
    num_hidden_layers: 3,
    use_sliding_window: true,
    layer_types: ["sliding_attention", "full_attention", "sliding_attention"],
  });
  assert.deepEqual(typed.layerWindows, [32768, null, 32768]);
  rejects(
    { ...QWEN25_05B, use_sliding_window: true, layer_types: ["full_attention"] },
    /layer_types has 1 entries for 24 layers/,
  );
});

Deno.test("parseModelConfig() gives Llama attention_bias and mlp_bias their biases", () => {
  const c = parseModelConfig({ ...LLAMA_2_7B, attention_bias: true, mlp_bias: true, num_hidden_layers: 1 });
  const t = expectedTensors(c);
  for (const p of ["q", "k", "v", "o"]) assert.ok(t.has(`model.layers.0.self_attn.${p}_proj.bias`), p);
  for (const p of ["gate", "up", "down"]) assert.ok(t.has(`model.layers.0.mlp.${p}_proj.bias`), p);
  assert.deepEqual(t.get("model.layers.0.mlp.down_proj.bias"), [4096]);
});

Deno.test("parseModelConfig() reads linear, dynamic, yarn and rope_parameters RoPE settings", () => {
  const linear = parseModelConfig({ ...LLAMA_2_7B, rope_scaling: { type: "linear", factor: 2.0 } });
  assert.deepEqual(linear.ropeScaling, { type: "linear", factor: 2 });
  const dynamic = parseModelConfig({ ...LLAMA_2_7B, rope_scaling: { rope_type: "dynamic", factor: 2.0 } });
  assert.deepEqual(dynamic.ropeScaling, { type: "dynamic", factor: 2, originalMaxPositionEmbeddings: 4096 });
  checkSequenceLength(dynamic, 4096);
  assert.throws(
    () => checkSequenceLength(dynamic, 4097),
    /dynamic NTK RoPE scaling changes θ beyond 4096 positions/,
  );
  const yarn = parseModelConfig({
    ...QWEN25_05B,
    rope_scaling: { type: "yarn", factor: 4.0, original_max_position_embeddings: 32768 },
  });
  assert.deepEqual(yarn.ropeScaling, {
    type: "yarn",
    factor: 4,
    originalMaxPositionEmbeddings: 32768,
    betaFast: 32,
    betaSlow: 1,
    mscale: null,
    mscaleAllDim: null,
    attentionFactor: null,
  });
  const { rope_theta: _, rope_scaling: __, ...v5 } = LLAMA_32_1B;
  const c = parseModelConfig({
    ...v5,
    rope_parameters: { ...LLAMA_32_1B.rope_scaling, rope_theta: 500000.0 },
  });
  assert.equal(c.ropeTheta, 500000);
  assert.equal(c.ropeScaling?.type, "llama3");
  const plain = parseModelConfig({ ...v5, rope_parameters: { rope_type: "default", rope_theta: 1e6 } });
  assert.deepEqual([plain.ropeTheta, plain.ropeScaling], [1e6, null]);
  assert.throws(() => checkSequenceLength(c, 131073), /max_position_embeddings is 131072/);
});

Deno.test("parseModelConfig() rejects unsupported RoPE scalings and malformed factors", () => {
  rejects(
    { ...LLAMA_2_7B, rope_scaling: { rope_type: "longrope", factor: 2 } },
    /rope_scaling type "longrope" is not supported/,
    /linear, dynamic, llama3, yarn/,
  );
  rejects(
    { ...LLAMA_2_7B, rope_scaling: { type: "linear" } },
    /rope_scaling.factor is undefined; expected a positive number/,
  );
  rejects(
    { ...LLAMA_32_1B, rope_scaling: { ...LLAMA_32_1B.rope_scaling, low_freq_factor: 4 } },
    /low_freq_factor 4 must be below high_freq_factor 4/,
  );
});

Deno.test("parseModelConfig() names unsupported architectures and lists the supported ones", () => {
  rejects(
    { ...LLAMA_2_7B, architectures: ["GPT2LMHeadModel"] },
    /architecture "GPT2LMHeadModel" is not supported/,
    /LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM/,
  );
  rejects({ ...LLAMA_2_7B, hidden_act: "gelu" }, /hidden_act is "gelu"; only "silu"/);
  rejects(
    { ...LLAMA_2_7B, model_type: "mistral" },
    /model_type "mistral" does not match architecture "LlamaForCausalLM"/,
  );
});

Deno.test("parseModelConfig() reports missing and malformed fields by key", () => {
  const { hidden_size: _, ...noHidden } = LLAMA_2_7B;
  rejects(noHidden, /hidden_size: /);
  rejects({ ...LLAMA_2_7B, num_hidden_layers: 0 }, /num_hidden_layers: /);
  rejects({ ...LLAMA_2_7B, vocab_size: "32000" }, /vocab_size: /);
  rejects({ ...LLAMA_2_7B, architectures: [] }, /architectures: /);
  rejects(
    { ...LLAMA_2_7B, num_key_value_heads: 5 },
    /num_attention_heads 32 is not a multiple of num_key_value_heads 5/,
  );
  rejects(
    { ...LLAMA_2_7B, hidden_size: 4100 },
    /hidden_size 4100 is not divisible by num_attention_heads 32/,
  );
  rejects("not an object", /\(root\)/);
});

Deno.test("loadModelConfig() names a missing or unparsable config.json", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-cfg-" });
  try {
    await assert.rejects(loadModelConfig(dir), /config.json": the file does not exist/);
    await Deno.writeTextFile(join(dir, "config.json"), "{");
    await assert.rejects(loadModelConfig(dir), /config.json": it is not valid JSON/);
    await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(QWEN25_05B));
    assert.equal((await loadModelConfig(dir)).hiddenSize, 896);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("checkWeights() accepts a complete set and lists missing, mis-shaped and unexpected tensors", () => {
  const c = parseModelConfig({ ...QWEN25_05B, num_hidden_layers: 2, tie_word_embeddings: false });
  const all = [...expectedTensors(c)].map(([name, shape]) => ({ name, shape }));
  checkWeights(c, all, "w");
  // Old checkpoints carry rotary inv_freq buffers; they are not weights.
  checkWeights(c, [...all, { name: "model.layers.0.self_attn.rotary_emb.inv_freq", shape: [32] }], "w");
  const broken = all
    .filter((t) => t.name !== "model.layers.1.self_attn.q_proj.bias" && t.name !== "lm_head.weight")
    .map((t) => (t.name === "model.norm.weight" ? { ...t, shape: [895] } : t));
  broken.push({ name: "model.layers.2.mlp.up_proj.weight", shape: [4864, 896] });
  assert.throws(() => checkWeights(c, broken, "models/x"), (e: unknown) => {
    assert.ok(e instanceof LatheError);
    assert.match(
      e.message,
      /^Cannot load weights "models\/x": they do not match config.json \(Qwen2ForCausalLM/,
    );
    assert.match(e.message, /missing \(2\): "model.layers.1.self_attn.q_proj.bias"; "lm_head.weight"/);
    assert.match(e.message, /wrong shape \(1\): "model.norm.weight" is \[895\], expected \[896\]/);
    assert.match(e.message, /unexpected \(1\): "model.layers.2.mlp.up_proj.weight"/);
    return true;
  });
  // A tied model may still store lm_head.weight, with the embedding's shape.
  const tied = parseModelConfig({ ...QWEN25_05B, num_hidden_layers: 2 });
  checkWeights(tied, all, "w");
  assert.throws(
    () =>
      checkWeights(tied, all.map((t) => (t.name === "lm_head.weight" ? { ...t, shape: [1, 896] } : t)), "w"),
    /"lm_head.weight" is \[1, 896\], expected \[151936, 896\]/,
  );
  checkWeights(c, [...all, { name: "x.absmax", shape: [1] }], "w", { ignore: (n) => n.endsWith(".absmax") });
  // A caller's own problems join the same error, with its hint when they are the only ones.
  const problems = [{ label: "4-bit layout", items: ['"a.absmax" is missing'] }, {
    label: "other",
    items: [],
  }];
  assert.throws(() => checkWeights(c, all, "w", { problems, hint: "Download it again." }), (e: unknown) => {
    assert.ok(e instanceof LatheError);
    assert.match(e.message, /\n {2}4-bit layout \(1\): "a.absmax" is missing$/);
    assert.equal(e.hint, "Download it again.");
    return true;
  });
  checkWeights(c, all, "w", { problems: [{ label: "none", items: [] }] });
});
