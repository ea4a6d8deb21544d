import assert from "node:assert/strict";
import {
  decoder_backward,
  decoder_forward,
  decoder_loss,
  type DecoderConfig,
  type DecoderInput,
  LAYER_PROJECTIONS,
  type Projection,
  projection_name,
  projection_shape,
} from "../../../kernels/reference/decoder.ts";
import { count_correct, IGNORE_INDEX, lm_head_argmax } from "../../../kernels/reference/cross_entropy.ts";
import { type ModelConfig, parseModelConfig } from "../../../formats/model_config.ts";
import { dropout_mask, lora_scaling, type LoraAdapter } from "../../../kernels/reference/linear_lora.ts";
import { assertClose, checkGradient, random, randomArray, someIndices } from "./_check.ts";

// V = 11, D = 8, F = 12, L = 2, H = 4, Hkv = 2, hd = 4 (H·hd = 16 != D on purpose)
const MISTRAL: DecoderConfig = {
  vocabSize: 11,
  hiddenSize: 8,
  intermediateSize: 12,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 4,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  ropeScaling: null,
  qkvBias: false,
  tieWordEmbeddings: false,
  layerWindows: [3, 2],
};

const QWEN2: DecoderConfig = {
  ...MISTRAL,
  numLayers: 1,
  layerWindows: [null],
  qkvBias: true,
  tieWordEmbeddings: true,
  ropeScaling: { type: "yarn", factor: 4, originalMaxPositionEmbeddings: 16 },
};

// Llama with attention_bias and mlp_bias: biases on all seven projections
const LLAMA3: DecoderConfig = {
  ...MISTRAL,
  layerWindows: [null, null],
  qkvBias: true,
  oBias: true,
  mlpBias: true,
  ropeScaling: {
    type: "llama3",
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 16,
  },
};

// Random base weights with Hugging Face names (norm weights near 1).
function tinyWeights(config: DecoderConfig, seed: number): Map<string, Float64Array> {
  const rand = random(seed);
  const { vocabSize: V, hiddenSize: D } = config;
  const w = new Map<string, Float64Array>();
  const norm = () => randomArray(rand, D, 0.2).map((x) => 1 + x);
  w.set("model.embed_tokens.weight", randomArray(rand, V * D));
  for (let l = 0; l < config.numLayers; l++) {
    w.set(`model.layers.${l}.input_layernorm.weight`, norm());
    w.set(`model.layers.${l}.post_attention_layernorm.weight`, norm());
    for (const p of LAYER_PROJECTIONS) {
      const { inFeatures: K, outFeatures: N } = projection_shape(config, p);
      w.set(`${projection_name(l, p)}.weight`, randomArray(rand, N * K, 1.5 / Math.sqrt(K)));
      const bias = p === "self_attn.o_proj"
        ? config.oBias
        : p.startsWith("self_attn.")
        ? config.qkvBias
        : config.mlpBias;
      if (bias) w.set(`${projection_name(l, p)}.bias`, randomArray(rand, N, 0.3));
    }
  }
  w.set("model.norm.weight", norm());
  if (!config.tieWordEmbeddings) w.set("lm_head.weight", randomArray(rand, V * D));
  return w;
}

// Adapters with random (non-zero) A and B on the given projections.
function tinyAdapters(
  config: DecoderConfig,
  targets: [number, Projection][],
  seed: number,
  r = 2,
): Map<string, LoraAdapter> {
  const rand = random(seed);
  const adapters = new Map<string, LoraAdapter>();
  for (const [l, p] of targets) {
    const { inFeatures: K, outFeatures: N } = projection_shape(config, p);
    adapters.set(projection_name(l, p), {
      A: randomArray(rand, r * K, 0.5),
      B: randomArray(rand, N * r, 0.5),
      r,
      scaling: lora_scaling(4, r),
    });
  }
  return adapters;
}

// FD-checks dA and dB of every adapter at a few entries, and optionally inputs_embeds.
function checkDecoderGradients(
  config: DecoderConfig,
  weights: Map<string, Float64Array>,
  adapters: Map<string, LoraAdapter>,
  input: DecoderInput,
  seed: number,
): void {
  const rand = random(seed);
  const grads = decoder_backward(decoder_forward(config, weights, adapters, input));
  assert.deepEqual([...grads.lora.keys()].sort(), [...adapters.keys()].sort());
  const loss = () => decoder_loss(config, weights, adapters, input);
  for (const [name, adapter] of adapters) {
    const g = grads.lora.get(name)!;
    const A = adapter.A as Float64Array;
    const B = adapter.B as Float64Array;
    checkGradient(`${name}.lora_A`, A, g.dA, loss, { indices: someIndices(rand, A.length, 3) });
    checkGradient(`${name}.lora_B`, B, g.dB, loss, { indices: someIndices(rand, B.length, 3) });
  }
  if (input.inputsEmbeds) {
    const x = input.inputsEmbeds as Float64Array;
    checkGradient("inputs_embeds", x, grads.dInputsEmbeds, loss, {
      indices: someIndices(rand, x.length, 12),
    });
  }
}

Deno.test("decoder_backward matches finite differences: Mistral-like, sliding windows, packed documents", () => {
  const config = MISTRAL;
  const rand = random(20);
  const B = 2, S = 6;
  // row 0 packs two documents of 3 tokens (positions restart); row 1 is one document
  const positions = Int32Array.of(0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5);
  const targets = Int32Array.from({ length: B * S }, () => Math.floor((rand() + 1) / 2 * config.vocabSize));
  targets[2] = IGNORE_INDEX; // last token of each document predicts nothing
  targets[5] = IGNORE_INDEX;
  targets[11] = IGNORE_INDEX;
  const input: DecoderInput = {
    B,
    S,
    inputsEmbeds: randomArray(rand, B * S * config.hiddenSize),
    targets,
    positions,
    vocabChunk: 4,
  };
  const adapters = tinyAdapters(config, [
    [0, "self_attn.q_proj"],
    [0, "self_attn.v_proj"],
    [0, "mlp.down_proj"],
    ...LAYER_PROJECTIONS.map((p) => [1, p] as [number, Projection]),
  ], 21);
  // dropout on one adapter: a fixed mask keeps the loss a smooth function of A, B and the inputs
  const v0 = adapters.get("model.layers.0.self_attn.v_proj")!;
  v0.dropout = { p: 0.2, keep: dropout_mask(9, B * S * config.hiddenSize, 0.2) };
  checkDecoderGradients(config, tinyWeights(config, 22), adapters, input, 23);
});

Deno.test("decoder_backward matches finite differences: Qwen2-like, qkv bias, tied, yarn, ids", () => {
  const config = QWEN2;
  const rand = random(24);
  const S = 7;
  const ids = Int32Array.from({ length: S }, () => Math.floor((rand() + 1) / 2 * config.vocabSize));
  const targets = Int32Array.of(...ids.subarray(1), IGNORE_INDEX);
  const adapters = tinyAdapters(config, LAYER_PROJECTIONS.map((p) => [0, p] as [number, Projection]), 25, 3);
  for (const a of adapters.values()) a.scaling = lora_scaling(6, 3, true);
  const input: DecoderInput = { B: 1, S, ids, targets, positions: Int32Array.of(0, 1, 2, 3, 0, 1, 2) };
  checkDecoderGradients(config, tinyWeights(config, 26), adapters, input, 27);
});

Deno.test("decoder_backward matches finite differences: Llama 3 rope, all biases, two rows", () => {
  const config = LLAMA3;
  const rand = random(28);
  const B = 2, S = 5;
  const input: DecoderInput = {
    B,
    S,
    inputsEmbeds: randomArray(rand, B * S * config.hiddenSize),
    targets: Int32Array.of(1, 2, 3, 4, IGNORE_INDEX, 5, 6, 7, 8, 9),
    numItems: 20, // as if the optimizer step accumulated 20 trained tokens
  };
  const adapters = tinyAdapters(config, [[0, "self_attn.k_proj"], [1, "self_attn.o_proj"], [
    1,
    "mlp.up_proj",
  ]], 29);
  checkDecoderGradients(config, tinyWeights(config, 30), adapters, input, 31);
});

Deno.test("decoder_forward on a packed row equals its documents run as separate rows", () => {
  // With per-document masks and restarted positions, packing changes nothing: the summed losses
  // (same N) and the adapter gradients of the packed row equal those of the documents alone.
  const config: DecoderConfig = { ...LLAMA3, layerWindows: [2, 2] };
  const rand = random(32);
  const weights = tinyWeights(config, 33);
  const adapters = tinyAdapters(config, [[0, "self_attn.q_proj"], [1, "mlp.gate_proj"]], 34);
  const ids = Int32Array.from({ length: 7 }, () => Math.floor((rand() + 1) / 2 * config.vocabSize));
  const targets = Int32Array.of(ids[1], ids[2], IGNORE_INDEX, ids[4], ids[5], ids[6], IGNORE_INDEX);
  const N = 5;
  const packed = decoder_forward(config, weights, adapters, {
    B: 1,
    S: 7,
    ids,
    targets,
    positions: Int32Array.of(0, 1, 2, 0, 1, 2, 3),
    numItems: N,
  });
  const first = decoder_forward(config, weights, adapters, {
    B: 1,
    S: 3,
    ids: ids.subarray(0, 3),
    targets: targets.subarray(0, 3),
    numItems: N,
  });
  const second = decoder_forward(config, weights, adapters, {
    B: 1,
    S: 4,
    ids: ids.subarray(3),
    targets: targets.subarray(3),
    numItems: N,
  });
  assertClose([packed.loss], [first.loss + second.loss], { atol: 0, rtol: 1e-12 });
  const gp = decoder_backward(packed).lora;
  const g1 = decoder_backward(first).lora;
  const g2 = decoder_backward(second).lora;
  for (const name of adapters.keys()) {
    const sum = g1.get(name)!.dA.map((x, i) => x + g2.get(name)!.dA[i]);
    assertClose(gp.get(name)!.dA, sum, { atol: 1e-14, rtol: 1e-10 }, `${name} dA`);
  }
  // without document masks the second document would see the first: the loss changes
  const leaky = decoder_loss(config, weights, adapters, {
    B: 1,
    S: 7,
    ids,
    targets,
    positions: Int32Array.of(0, 1, 2, 0, 1, 2, 3),
    docIds: new Int32Array(7),
    numItems: N,
  });
  assert.ok(Math.abs(leaky - packed.loss) > 1e-6);
});

Deno.test("decoder_forward with ids equals gathered inputs_embeds; zero lora_B keeps the base loss", () => {
  const config = MISTRAL;
  const weights = tinyWeights(config, 35);
  const ids = Int32Array.of(3, 1, 4, 1, 5);
  const targets = Int32Array.of(1, 4, 1, 5, 9);
  const E = weights.get("model.embed_tokens.weight")!;
  const embeds = new Float64Array(5 * config.hiddenSize);
  ids.forEach((id, t) =>
    embeds.set(E.subarray(id * config.hiddenSize, (id + 1) * config.hiddenSize), t * config.hiddenSize)
  );
  const base = decoder_loss(config, weights, new Map(), { B: 1, S: 5, ids, targets });
  assertClose([decoder_loss(config, weights, {}, { B: 1, S: 5, inputsEmbeds: embeds, targets })], [base], {
    atol: 0,
    rtol: 1e-14,
  });
  const adapters = tinyAdapters(config, [[0, "self_attn.q_proj"], [1, "mlp.down_proj"]], 36);
  for (const a of adapters.values()) (a.B as Float64Array).fill(0);
  assert.equal(decoder_loss(config, weights, adapters, { B: 1, S: 5, ids, targets }), base);
});

Deno.test("decoder_forward counts trained tokens whose argmax logit is the target, for every vocabulary chunk", () => {
  const config = MISTRAL;
  const V = config.vocabSize;
  const weights = tinyWeights(config, 37);
  const adapters = tinyAdapters(config, [[0, "self_attn.v_proj"], [1, "mlp.up_proj"]], 38);
  const rand = random(39);
  const ids = Int32Array.from({ length: 12 }, () => Math.floor((rand() + 1) / 2 * V));
  const input = { B: 2, S: 6, ids, targets: new Int32Array(12) };
  // The hidden states do not depend on the targets: the predictions of a first pass hold for the second.
  const { xF, head, T } = decoder_forward(config, weights, adapters, input).saved;
  const { argmax } = lm_head_argmax(xF, head, { T, V, D: config.hiddenSize });
  // Per token, by t mod 4: ignored (its target the argmax), the argmax, another token, the argmax.
  const targets = Int32Array.from(argmax, (a, t) => [IGNORE_INDEX, a, (a + 1) % V, a][t % 4]);
  for (const vocabChunk of [undefined, 1, 3, 4, V]) {
    const forward = decoder_forward(config, weights, adapters, { ...input, targets, vocabChunk });
    assert.equal(forward.correct, 6, `vocabulary chunk ${vocabChunk}`);
    assert.equal(forward.correct, count_correct(argmax, targets));
  }
  // An ignored token whose argmax is its target does not count.
  targets[0] = argmax[0];
  assert.equal(decoder_forward(config, weights, adapters, { ...input, targets }).correct, 7);
});

Deno.test("decoder_forward names a missing weight, a wrong-sized weight and an unknown adapter", () => {
  const config = MISTRAL;
  const weights = tinyWeights(config, 37);
  const input: DecoderInput = { B: 1, S: 2, ids: Int32Array.of(1, 2), targets: Int32Array.of(2, 3) };
  const missing = new Map(weights);
  missing.delete("model.layers.1.mlp.up_proj.weight");
  assert.throws(
    () => decoder_loss(config, missing, {}, input),
    /weight "model.layers.1.mlp.up_proj.weight" is missing/,
  );
  const wrong = new Map(weights);
  wrong.set("model.norm.weight", new Float64Array(3));
  assert.throws(
    () => decoder_loss(config, wrong, {}, input),
    /"model.norm.weight" holds 3 values, expected 8/,
  );
  const unknown = tinyAdapters(config, [[0, "self_attn.q_proj"]], 38);
  unknown.set("model.layers.2.self_attn.q_proj", unknown.get("model.layers.0.self_attn.q_proj")!);
  assert.throws(
    () => decoder_loss(config, weights, unknown, input),
    /adapter "model.layers.2.self_attn.q_proj"/,
  );
  assert.throws(
    () => decoder_loss(config, weights, {}, { ...input, targets: Int32Array.of(IGNORE_INDEX, IGNORE_INDEX) }),
    /no target is trained/,
  );
});

Deno.test("decoder_forward accepts a ModelConfig parsed from config.json (Mistral, Qwen2 yarn)", () => {
  const sizes = {
    vocab_size: 11,
    hidden_size: 8,
    intermediate_size: 12,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 4,
  };
  const mistral: ModelConfig = parseModelConfig({
    architectures: ["MistralForCausalLM"],
    ...sizes,
    sliding_window: 3,
  });
  const qwen2: ModelConfig = parseModelConfig({
    architectures: ["Qwen2ForCausalLM"],
    ...sizes,
    rope_scaling: { type: "yarn", factor: 4, original_max_position_embeddings: 16 },
    tie_word_embeddings: true,
  });
  const input: DecoderInput = {
    B: 1,
    S: 4,
    ids: Int32Array.of(1, 2, 3, 4),
    targets: Int32Array.of(2, 3, 4, 5),
  };
  const asMistral: DecoderConfig = { ...MISTRAL, layerWindows: [3, 3], rmsNormEps: 1e-6 };
  assertClose(
    [decoder_loss(mistral, tinyWeights(asMistral, 39), {}, input)],
    [decoder_loss(asMistral, tinyWeights(asMistral, 39), {}, input)],
    { atol: 0, rtol: 0 },
  );
  const asQwen2: DecoderConfig = {
    ...QWEN2,
    numLayers: 2,
    layerWindows: [null, null],
    rmsNormEps: 1e-6,
    maxPositionEmbeddings: 32768,
  };
  assertClose(
    [decoder_loss(qwen2, tinyWeights(asQwen2, 40), {}, input)],
    [decoder_loss(asQwen2, tinyWeights(asQwen2, 40), {}, input)],
    { atol: 0, rtol: 0 },
  );
});

Deno.test("decoder_forward adds the o_proj and MLP biases that oBias and mlpBias declare", () => {
  const input: DecoderInput = { B: 1, S: 3, ids: Int32Array.of(1, 2, 3), targets: Int32Array.of(2, 3, 4) };
  const weights = tinyWeights(LLAMA3, 41);
  const base = decoder_loss(LLAMA3, weights, {}, input);
  for (const name of ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.gate_proj.bias"]) {
    const bias = weights.get(name)!;
    bias[0] += 0.5;
    assert.notEqual(decoder_loss(LLAMA3, weights, {}, input), base, name);
    bias[0] -= 0.5;
  }
});

Deno.test("decoder_forward refuses positions past the original length under dynamic RoPE scaling", () => {
  const config: DecoderConfig = {
    ...MISTRAL,
    ropeScaling: { type: "dynamic", factor: 2, originalMaxPositionEmbeddings: 4 },
  };
  const weights = tinyWeights(config, 42);
  const ids = Int32Array.of(1, 2, 3, 4, 5);
  const targets = Int32Array.of(2, 3, 4, 5, 6);
  assert.throws(() => decoder_loss(config, weights, {}, { B: 1, S: 5, ids, targets }), /position 4 is past/);
  assert.ok(
    Number.isFinite(
      decoder_loss(config, weights, {}, { B: 1, S: 4, ids: ids.subarray(1), targets: targets.subarray(1) }),
    ),
  );
});

// Full fine-tuning: the gradient of every base weight (embeddings by scatter-add, norms, projections and
// their biases, lm_head, or the tied embedding's two paths summed) against central differences.
for (
  const [label, config, tied] of [
    ["Mistral-like, windows, untied head", MISTRAL, false],
    ["Qwen2-like, qkv bias, tied head", QWEN2, true],
    ["Llama 3 rope, every bias", LLAMA3, false],
  ] as const
) {
  Deno.test(`decoder_backward(full) gives every weight's gradient: ${label}`, () => {
    const rand = random(40);
    const B = 2, S = 5;
    const ids = Int32Array.from({ length: B * S }, () => Math.floor((rand() + 1) / 2 * config.vocabSize));
    const targets = Int32Array.from({ length: B * S }, () => Math.floor((rand() + 1) / 2 * config.vocabSize));
    targets[4] = IGNORE_INDEX;
    const input: DecoderInput = { B, S, ids, targets, vocabChunk: 4 };
    const weights = tinyWeights(config, 41);
    const adapters = tinyAdapters(config, [[0, "self_attn.q_proj"]], 42);
    const grads = decoder_backward(decoder_forward(config, weights, adapters, input), 1, null, true).weights!;
    assert.deepEqual([...grads.keys()].sort(), [...weights.keys()].sort(), "a gradient for every weight");
    assert.equal(grads.has("lm_head.weight"), !tied);
    const loss = () => decoder_loss(config, weights, adapters, input);
    for (const [name, w] of weights) {
      checkGradient(name, w, grads.get(name)!, loss, { indices: someIndices(rand, w.length, 3) });
    }
    // Rows of ids that no token uses get no gradient from the gather (tied: only the head's).
    const unused = [...Array(config.vocabSize).keys()].find((v) => !ids.includes(v));
    if (unused !== undefined && !tied) {
      const D = config.hiddenSize;
      assert.ok(
        grads.get("model.embed_tokens.weight")!.subarray(unused * D, unused * D + D).every((x) => x === 0),
      );
    }
  });
}
