// The FLOP model of the training benchmark (bench/train_flops.ts) against a brute-force count:
// attended query–key pairs counted pair by pair under the causal, document and window masks, and
// matmul sizes read off the checkpoint's tensor shapes.
import assert from "node:assert/strict";
import { syntheticBatch } from "../../bench/train.ts";
import { shapeConfigJson } from "../../bench/train_checkpoint.ts";
import { attentionPairs, documentPairs, knownPeakTflops, trainingFlops } from "../../bench/train_flops.ts";
import {
  expectedTensors,
  type ModelConfig,
  parseModelConfig,
  PROJECTIONS,
} from "../../formats/model_config.ts";

/** Mistral with D 64, F 96, L 3, H 4, Hkv 2, V 128 and sliding window `window`. */
function mistral(window: number | null): ModelConfig {
  return parseModelConfig(
    shapeConfigJson("mistral-7b", {
      hidden_size: 64,
      intermediate_size: 96,
      num_hidden_layers: 3,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      vocab_size: 128,
      sliding_window: window,
    }),
    "test",
  );
}

/** Pairs (i, j) of each row with j ≤ i, the same document, and i − j < w. */
function brutePairs(rows: number, S: number, docs: ArrayLike<number>, w: number | null): number {
  let n = 0;
  for (let b = 0; b < rows; b++) {
    for (let i = 0; i < S; i++) {
      for (let j = 0; j <= i; j++) {
        if (docs[b * S + i] === docs[b * S + j] && (w === null || i - j < w)) n++;
      }
    }
  }
  return n;
}

Deno.test("attentionPairs() counts the pairs the causal, document and window masks allow", () => {
  for (const [w, docsPerRow] of [[null, 1], [null, 4], [7, 1], [7, 3], [1, 2]] as const) {
    const batch = syntheticBatch(100, 3, 40, docsPerRow, 11);
    assert.equal(
      attentionPairs(batch, w),
      brutePairs(3, 40, batch.docs, w),
      `window ${w}, ${docsPerRow} docs`,
    );
  }
  assert.equal(documentPairs(2048, null), 2048 * 2049 / 2);
});

Deno.test("trainingFlops() is 2 FLOPs per multiply-add of every matmul a LoRA step runs, recompute included", () => {
  const config = mistral(5);
  const lora = { r: 4, targets: [...PROJECTIONS] };
  const batch = syntheticBatch(config.vocabSize, 2, 24, 2, 3);
  const T = 2 * 24;
  // Frozen matmuls of one layer and LoRA sizes, from the checkpoint's tensor shapes.
  const P = layerMatmulParams(config);
  let R = 0;
  for (const [name, shape] of expectedTensors(config)) {
    if (name.startsWith("model.layers.0.") && shape.length === 2) R += lora.r * (shape[0] + shape[1]);
  }
  const A = brutePairs(2, 24, batch.docs, 5);
  const attn = config.numHeads * config.headDim;
  const L = config.numLayers;
  const fwd = L * (2 * P * T + 2 * R * T + 4 * attn * A);
  const bwd = L * (2 * P * T + 4 * R * T + 8 * attn * A);
  const head = 2 * config.vocabSize * config.hiddenSize * T;
  const withCkpt = trainingFlops(config, lora, batch, true);
  assert.equal(withCkpt.total, 2 * fwd + bwd + 2 * head);
  assert.equal(withCkpt.model, fwd + bwd + 2 * head);
  assert.equal(withCkpt.recompute, fwd);
  const without = trainingFlops(config, lora, batch, false);
  assert.equal(without.total, withCkpt.model);
  assert.equal(without.recompute, 0);
});

Deno.test("trainingFlops() of one causal row: attention forward is 2·S(S+1)·H·hd per layer (4·S²·D halved)", () => {
  const config = mistral(null);
  const S = 64;
  const batch = syntheticBatch(config.vocabSize, 1, S, 1, 1);
  const lora = { r: 8, targets: [] };
  const base = trainingFlops(config, lora, batch, false);
  const attnOnly = base.layersForward - config.numLayers * 2 * layerMatmulParams(config) * S;
  assert.equal(attnOnly, config.numLayers * 2 * S * (S + 1) * config.hiddenSize);
});

/** Σ N·K over the seven projections of one layer, from the HF shapes. */
function layerMatmulParams(config: ModelConfig): number {
  let p = 0;
  for (const [name, shape] of expectedTensors(config)) {
    if (name.startsWith("model.layers.0.") && shape.length === 2) p += shape[0] * shape[1];
  }
  return p;
}

Deno.test("knownPeakTflops() gives the H100/H200 non-tensor-core peaks and null for other adapters", () => {
  assert.equal(knownPeakTflops("NVIDIA H100 80GB HBM3", "f16"), 133.8);
  assert.equal(knownPeakTflops("NVIDIA H100 80GB HBM3", "f32"), 66.9);
  assert.equal(knownPeakTflops("NVIDIA H200", "f16"), 133.8);
  assert.equal(knownPeakTflops("NVIDIA H100 PCIe", "f16"), 102.4);
  assert.equal(knownPeakTflops("llvmpipe (LLVM 15.0.6, 256 bits)", "f16"), null);
});
