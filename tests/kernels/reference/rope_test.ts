import assert from "node:assert/strict";
import {
  rope_backward,
  rope_check_positions,
  rope_forward,
  rope_inv_freq,
  rope_tables,
  type RopeConfig,
} from "../../../kernels/reference/rope.ts";
import { assertClose, checkGradient, dot, random, randomArray } from "./_check.ts";

// Expected frequencies below were computed with a float64 NumPy transcription of transformers'
// `_compute_llama3_parameters` / `_compute_yarn_parameters`.
const LLAMA31: RopeConfig = {
  headDim: 128,
  theta: 500000,
  scaling: {
    type: "llama3",
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  },
};
// Qwen2.5 long-context recipe:
// rope_scaling {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}
const QWEN25_YARN: RopeConfig = {
  headDim: 128,
  theta: 1e6,
  scaling: { type: "yarn", factor: 4, originalMaxPositionEmbeddings: 32768 },
};

Deno.test("rope_inv_freq default is 1 / theta^(2i/hd)", () => {
  const { invFreq, attentionFactor } = rope_inv_freq({ headDim: 8, theta: 10000, scaling: null });
  assertClose(invFreq, [1, 0.1, 0.01, 0.001], { atol: 0, rtol: 1e-14 });
  assert.equal(attentionFactor, 1);
});

Deno.test("rope_inv_freq linear divides every frequency by the factor", () => {
  const base = rope_inv_freq({ headDim: 16, theta: 10000, scaling: null }).invFreq;
  const linear = rope_inv_freq({ headDim: 16, theta: 10000, scaling: { type: "linear", factor: 4 } }).invFreq;
  assertClose(linear, base.map((f) => f / 4), { atol: 0, rtol: 1e-15 });
});

Deno.test("rope_inv_freq llama3 keeps high, divides low, smooths middle frequencies (Llama 3.1)", () => {
  const { invFreq, attentionFactor } = rope_inv_freq(LLAMA31);
  assert.equal(invFreq.length, 64);
  assert.equal(attentionFactor, 1);
  // i = 0, 20, 28: wavelength < 8192/4, unchanged; i = 29..34: smoothed; i >= 35: divided by 8
  const expected: Record<number, number> = {
    0: 1,
    20: 0.016560440080994446,
    28: 0.0032114459947525913,
    30: 0.0013718935677611381,
    35: 9.556212353964683e-05,
    40: 3.428102195952591e-05,
    63: 3.068925988914511e-07,
  };
  for (const [i, value] of Object.entries(expected)) {
    assertClose([invFreq[Number(i)]], [value], { atol: 0, rtol: 1e-12 }, `inv_freq[${i}]`);
  }
});

Deno.test("rope_inv_freq yarn ramps over the correction range and sets the mscale factor (Qwen2.5)", () => {
  // correction range: hd·ln(32768 / (2π·32)) / (2 ln 1e6) = 23.60 -> floor 23;
  //                   hd·ln(32768 / (2π·1)) / (2 ln 1e6) = 39.65 -> ceil 40
  const { invFreq, attentionFactor } = rope_inv_freq(QWEN25_YARN);
  const expected: Record<number, number> = {
    0: 1,
    22: 0.008659643233600653,
    23: 0.006978305848598663,
    24: 0.005375321490790102,
    30: 0.0010643609812470017,
    39: 6.490394320837028e-05,
    40: 4.445698525097307e-05,
    63: 3.102344401879299e-07,
  };
  for (const [i, value] of Object.entries(expected)) {
    assertClose([invFreq[Number(i)]], [value], { atol: 0, rtol: 1e-12 }, `inv_freq[${i}]`);
  }
  // 0.1·ln(4) + 1
  assertClose([attentionFactor], [1.138629436111989], { atol: 0, rtol: 1e-14 });
});

Deno.test("rope_inv_freq yarn takes mscale / mscale_all_dim, attention_factor, the config length", () => {
  const deepseek = rope_inv_freq({
    headDim: 64,
    theta: 10000,
    scaling: {
      type: "yarn",
      factor: 40,
      originalMaxPositionEmbeddings: 4096,
      mscale: 0.707,
      mscaleAllDim: 1,
    },
  });
  // (0.1·0.707·ln 40 + 1) / (0.1·1·ln 40 + 1)
  assertClose([deepseek.attentionFactor], [0.9210423553163399], { atol: 0, rtol: 1e-14 });
  const given = rope_inv_freq({
    headDim: 64,
    theta: 10000,
    scaling: { type: "yarn", factor: 40, originalMaxPositionEmbeddings: 4096, attentionFactor: 0.5 },
  });
  assert.equal(given.attentionFactor, 0.5);
  const fromConfig = rope_inv_freq({
    ...QWEN25_YARN,
    scaling: { type: "yarn", factor: 4 },
    maxPositionEmbeddings: 32768,
  });
  assertClose(fromConfig.invFreq, rope_inv_freq(QWEN25_YARN).invFreq, { atol: 0, rtol: 0 });
  assert.throws(
    () => rope_inv_freq({ ...QWEN25_YARN, scaling: { type: "yarn", factor: 4 } }),
    /max_position_embeddings/,
  );
});

Deno.test("rope_forward at position 0 is the identity", () => {
  const rand = random(3);
  const x = randomArray(rand, 2 * 3 * 8);
  for (const config of [{ headDim: 8, theta: 10000, scaling: null }, { ...LLAMA31, headDim: 8 }]) {
    const { cos, sin } = rope_tables(rope_inv_freq(config), [0, 0]);
    assertClose(rope_forward(x, cos, sin, { T: 2, heads: 3, headDim: 8 }), x, { atol: 0, rtol: 0 });
  }
});

Deno.test("rope_forward rotates the pair (i, i + hd/2), not (2i, 2i + 1)", () => {
  // x = e_1 in a head of hd = 6 (pairs (0,3), (1,4), (2,5)); inv_freq[1] = 1/100^(2/6)
  const x = Float64Array.of(0, 1, 0, 0, 0, 0);
  const p = 7;
  const { cos, sin } = rope_tables(rope_inv_freq({ headDim: 6, theta: 100, scaling: null }), [p]);
  const angle = p / Math.pow(100, 2 / 6);
  const y = rope_forward(x, cos, sin, { T: 1, heads: 1, headDim: 6 });
  assertClose(y, [0, Math.cos(angle), 0, 0, Math.sin(angle), 0], { atol: 1e-15, rtol: 1e-14 });
});

Deno.test("rope makes q·k depend only on the position difference", () => {
  const rand = random(4);
  const q = randomArray(rand, 16);
  const k = randomArray(rand, 16);
  const freqs = rope_inv_freq({ headDim: 16, theta: 10000, scaling: null });
  const score = (m: number, n: number) => {
    const t = rope_tables(freqs, [m]);
    const u = rope_tables(freqs, [n]);
    const dims = { T: 1, heads: 1, headDim: 16 };
    return dot(rope_forward(q, t.cos, t.sin, dims), rope_forward(k, u.cos, u.sin, dims));
  };
  assertClose([score(5, 2), score(13, 10)], [score(103, 100), score(103, 100)], { atol: 1e-12, rtol: 1e-12 });
});

Deno.test("rope_tables multiply cos and sin by the yarn attention factor", () => {
  const freqs = rope_inv_freq(QWEN25_YARN);
  const { cos, sin } = rope_tables(freqs, [0]);
  assertClose(cos, new Float64Array(64).fill(freqs.attentionFactor), { atol: 0, rtol: 0 });
  assertClose(sin, new Float64Array(64), { atol: 0, rtol: 0 });
});

Deno.test("rope_backward matches central finite differences (default and yarn, per-token positions)", () => {
  const rand = random(5);
  const T = 4, heads = 2, hd = 8;
  const positions = [0, 1, 2, 0]; // a packed row: the second document restarts at 0
  for (const scaling of [null, { type: "yarn" as const, factor: 4, originalMaxPositionEmbeddings: 64 }]) {
    const { cos, sin } = rope_tables(rope_inv_freq({ headDim: hd, theta: 10000, scaling }), positions);
    const x = randomArray(rand, T * heads * hd);
    const dy = randomArray(rand, T * heads * hd);
    const dims = { T, heads, headDim: hd };
    const dx = rope_backward(dy, cos, sin, dims);
    checkGradient("dx", x, dx, () => dot(rope_forward(x, cos, sin, dims), dy));
  }
});

Deno.test("rope_inv_freq rejects an odd head dim and an unknown scaling type", () => {
  assert.throws(() => rope_inv_freq({ headDim: 7, theta: 10000, scaling: null }), /odd/);
  assert.throws(
    () => rope_inv_freq({ headDim: 8, theta: 10000, scaling: { type: "longrope" } as never }),
    /"longrope" is not one of/,
  );
});

Deno.test("rope dynamic scaling is plain RoPE within the original length and refused past it", () => {
  const config: RopeConfig = {
    headDim: 8,
    theta: 10000,
    scaling: { type: "dynamic", factor: 2 },
    maxPositionEmbeddings: 4,
  };
  assertClose(rope_inv_freq(config).invFreq, [1, 0.1, 0.01, 0.001], { atol: 0, rtol: 1e-14 });
  rope_check_positions(config, [0, 1, 2, 3]);
  assert.throws(() => rope_check_positions(config, [0, 4]), /position 4 is past the original length 4/);
  rope_check_positions({ ...config, scaling: null }, [0, 4000]);
});
