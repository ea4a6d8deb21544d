// GPU dequantization of bitsandbytes 4-bit weights against formats/bnb4bit.ts `dequantize4bit`
// (the host reference, itself checked code for code against bitsandbytes' CUDA semantics) on
// random weights. W[out,in]; shapes whose `in` is not a multiple of the blocksize make blocks
// run across row ends. Tolerance: f32 outputs are the same f32 products, so they must be equal
// bit for bit; f16 outputs must be the reference rounded to f16 (round to nearest even).
import assert from "node:assert/strict";
import { dequantize4bit, quantize4bit, type QuantType } from "../../formats/bnb4bit.ts";
import { dequantize4bitGpu, uploadQuant4bit } from "../../kernels/ops/quant_4bit.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { gpuTest, nanTensor, randn } from "./_harness.ts";

const CASES: { shape: [number, number]; quantType: QuantType; doubleQuant: boolean; blocksize: number }[] = [
  { shape: [48, 64], quantType: "nf4", doubleQuant: true, blocksize: 64 },
  { shape: [37, 83], quantType: "nf4", doubleQuant: true, blocksize: 64 }, // ragged: blocks span rows, odd n
  { shape: [300, 130], quantType: "nf4", doubleQuant: true, blocksize: 64 }, // 610 blocks: 3 nested blocks
  { shape: [29, 70], quantType: "nf4", doubleQuant: false, blocksize: 64 },
  { shape: [33, 40], quantType: "fp4", doubleQuant: true, blocksize: 64 },
  { shape: [17, 96], quantType: "fp4", doubleQuant: false, blocksize: 128 },
  { shape: [64, 48], quantType: "nf4", doubleQuant: true, blocksize: 32 },
];

function weights(shape: [number, number], seed: number): Float32Array {
  const w = randn(shape[0] * shape[1], seed, 0.05);
  // A few outliers and an all-zero block, as real weights have.
  w[3] = 0.9;
  w[w.length - 2] = -1.3;
  for (let i = 64; i < 128 && i < w.length; i++) w[i] = 0;
  return w;
}

for (const [i, c] of CASES.entries()) {
  const name = `${c.quantType}${c.doubleQuant ? "+dq" : ""} B=${c.blocksize} [${c.shape}]`;
  gpuTest(`dequantize4bitGpu matches dequantize4bit bit for bit in f32: ${name}`, async (gpu) => {
    const q = quantize4bit(weights(c.shape, 10 + i), c.shape, c);
    const want = dequantize4bit(q);
    using w = uploadQuant4bit(gpu, q, q.codes, "w");
    using out = dequantize4bitGpu(w, "f32", { out: nanTensor(gpu, c.shape) });
    const got = await out.readF32();
    const bad = got.findIndex((v, k) => !Object.is(v, want[k]));
    assert.equal(bad, -1, `element ${bad}: got ${got[bad]}, want ${want[bad]}`);
  });
}

gpuTest("dequantize4bitGpu rounds to f16 once, when it stores", async (gpu) => {
  for (const [i, c] of CASES.entries()) {
    const q = quantize4bit(weights(c.shape, 40 + i), c.shape, c);
    const want = dequantize4bit(q).map((v) => Math.f16round(v));
    using w = uploadQuant4bit(gpu, q, q.codes, "w");
    using out = dequantize4bitGpu(w, "f16", { out: nanTensor(gpu, c.shape, "f16") });
    const got = await out.readF32();
    const bad = got.findIndex((v, k) => !Object.is(v, want[k]));
    assert.equal(bad, -1, `[${c.shape}] element ${bad}: got ${got[bad]}, want ${want[bad]}`);
  }
}, { needsF16: true });

gpuTest("dequantize4bitGpu writes an output split into row chunks", async (gpu) => {
  const shape: [number, number] = [45, 83]; // chunks of 7 rows: 581 elements, odd chunk starts
  const q = quantize4bit(weights(shape, 7), shape);
  const want = dequantize4bit(q);
  using w = uploadQuant4bit(gpu, q, null, "w");
  // Codes streamed in slices, as the loader writes them from a checkpoint.
  for (let at = 0; at < q.codes.length; at += 100) w.writeCodes(at, q.codes.subarray(at, at + 100));
  using out = Tensor.empty(gpu, shape, "f32", { maxChunkBytes: 7 * 83 * 4 });
  assert.ok(out.chunks.length === 7);
  dequantize4bitGpu(w, "f32", { out });
  assert.deepEqual(await out.readF32(), want);
});

gpuTest("uploadQuant4bit refuses codes of the wrong length and misaligned writes", (gpu) => {
  const q = quantize4bit(weights([8, 64], 3), [8, 64]);
  assert.throws(() => uploadQuant4bit(gpu, q, q.codes.subarray(1), "w"), /255 code bytes for 512 weights/);
  using w = uploadQuant4bit(gpu, q, null, "w");
  assert.throws(() => w.writeCodes(2, q.codes.subarray(0, 4)), /at byte 2/);
  assert.throws(() => w.writeCodes(252, q.codes.subarray(0, 8)), /8 code bytes at 252/);
});
