import assert from "node:assert/strict";
import {
  dropout_mask,
  linear_lora_backward,
  linear_lora_forward,
  lora_scaling,
  type LoraAdapter,
} from "../../../kernels/reference/linear_lora.ts";
import { assertClose, checkGradient, dot, random, randomArray } from "./_check.ts";

Deno.test("linear_lora_forward adds s·(x·Aᵀ)·Bᵀ to x·Wᵀ + b", () => {
  // x = [1, 2]; W = [[1, 0], [0, 1], [1, 1]]; b = [0, 0, 1] -> x·Wᵀ + b = [1, 2, 4]
  // A = [[1, 1]] (r = 1): x·Aᵀ = 3; B = [[1], [0], [2]]; s = 2 -> + [6, 0, 12]
  const x = Float64Array.of(1, 2);
  const W = Float64Array.of(1, 0, 0, 1, 1, 1);
  const b = Float64Array.of(0, 0, 1);
  const lora: LoraAdapter = { A: Float64Array.of(1, 1), B: Float64Array.of(1, 0, 2), r: 1, scaling: 2 };
  const dims = { T: 1, inFeatures: 2, outFeatures: 3 };
  const { y, xa } = linear_lora_forward(x, W, b, lora, dims);
  assert.deepEqual([...y], [7, 2, 16]);
  assert.deepEqual([...xa!], [3]);
  assert.deepEqual([...linear_lora_forward(x, W, b, null, dims).y], [1, 2, 4]);
});

Deno.test("lora_scaling is alpha / r, or alpha / sqrt(r) with rslora", () => {
  assert.equal(lora_scaling(16, 8), 2);
  assert.equal(lora_scaling(16, 16, true), 4);
});

Deno.test("linear_lora_backward matches central finite differences for dx, dA, dB (bias, dropout)", () => {
  const rand = random(16);
  const T = 4, K = 5, N = 3, r = 2, p = 0.25;
  const x = randomArray(rand, T * K);
  const W = randomArray(rand, N * K);
  const bias = randomArray(rand, N);
  const lora: LoraAdapter = {
    A: randomArray(rand, r * K),
    B: randomArray(rand, N * r),
    r,
    scaling: lora_scaling(8, r),
    dropout: { p, keep: dropout_mask(3, T * K, p) },
  };
  const dims = { T, inFeatures: K, outFeatures: N };
  const dy = randomArray(rand, T * N);
  const { xa } = linear_lora_forward(x, W, bias, lora, dims);
  const { dx, dA, dB } = linear_lora_backward(dy, x, W, lora, xa, dims);
  const loss = () => dot(linear_lora_forward(x, W, bias, lora, dims).y, dy);
  checkGradient("dx", x, dx, loss);
  checkGradient("dA", lora.A as Float64Array, dA!, loss);
  checkGradient("dB", lora.B as Float64Array, dB!, loss);
});

Deno.test("linear_lora_backward with lora_B = 0 (PEFT init) gives dA = 0 and a non-zero dB", () => {
  const rand = random(17);
  const T = 3, K = 4, N = 2, r = 2;
  const x = randomArray(rand, T * K);
  const W = randomArray(rand, N * K);
  const lora: LoraAdapter = { A: randomArray(rand, r * K), B: new Float64Array(N * r), r, scaling: 1 };
  const dims = { T, inFeatures: K, outFeatures: N };
  const { y, xa } = linear_lora_forward(x, W, null, lora, dims);
  assertClose(y, linear_lora_forward(x, W, null, null, dims).y, { atol: 0, rtol: 0 });
  const { dA, dB } = linear_lora_backward(randomArray(rand, T * N), x, W, lora, xa, dims);
  assert.ok(dA!.every((g) => g === 0));
  assert.ok(dB!.some((g) => g !== 0));
});

Deno.test("dropout_mask is a seeded PCG hash mask with drop rate p", () => {
  // expected bits from a Python transcription of the formula in dropout_mask's documentation
  assert.deepEqual([...dropout_mask(42, 16, 0.5)], [1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1]);
  assert.deepEqual([...dropout_mask(7, 16, 0.25)], [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1]);
  const m = dropout_mask(123, 20000, 0.1);
  assertClose([1 - m.reduce((s, k) => s + k, 0) / m.length], [0.1003], { atol: 1e-12, rtol: 0 });
  assert.ok(dropout_mask(5, 64, 0).every((k) => k === 1));
  assert.throws(() => dropout_mask(5, 4, 1), /p "1" is not in \[0, 1\)/);
});
