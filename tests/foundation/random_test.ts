import assert from "node:assert/strict";
import { Pcg32 } from "../../foundation/random.ts";

/** pcg32_random_r in BigInt arithmetic: the textbook definition, slow but obviously right. */
function referencePcg32(seed: bigint, stream: bigint): () => number {
  const mask = (1n << 64n) - 1n;
  const mul = 6364136223846793005n;
  const inc = ((stream << 1n) | 1n) & mask;
  let state = 0n;
  const step = () => (state = (state * mul + inc) & mask);
  step();
  state = (state + seed) & mask;
  step();
  return () => {
    const old = state;
    step();
    const xs = Number((((old >> 18n) ^ old) >> 27n) & 0xffffffffn);
    const rot = Number(old >> 59n);
    return ((xs >>> rot) | (xs << ((-rot) & 31))) >>> 0;
  };
}

Deno.test("Pcg32 reproduces pcg32-demo's first outputs for seed 42, stream 54", () => {
  const rng = new Pcg32(42, 54);
  const got = Array.from({ length: 6 }, () => rng.nextU32());
  assert.deepEqual(got, [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]);
});

Deno.test("Pcg32 agrees with a BigInt PCG32 for large seeds and streams", () => {
  for (
    const [seed, stream] of [[0, 0], [2 ** 52 + 12345, 2 ** 40 + 7], [0xffffffff, 1], [
      123456789,
      2 ** 53 - 1,
    ]]
  ) {
    const ours = new Pcg32(seed, stream);
    const ref = referencePcg32(BigInt(seed), BigInt(stream));
    for (let i = 0; i < 2000; i++) {
      assert.equal(ours.nextU32(), ref(), `seed ${seed} stream ${stream} draw ${i}`);
    }
  }
});

Deno.test("Pcg32 uniform and normal draws have the stated range, mean and variance", () => {
  const rng = new Pcg32(1);
  const n = 100_000;
  const u = rng.fillUniform(new Float32Array(n), -2, 2);
  assert.ok(u.every((v) => v >= -2 && v <= 2));
  const z = rng.fillNormal(new Float32Array(n), 1, 3);
  const mean = z.reduce((a, b) => a + b, 0) / n;
  const variance = z.reduce((a, b) => a + (b - mean) ** 2, 0) / n;
  // Standard errors: mean 3/√n ≈ 0.0095, variance ≈ 9·√(2/n) ≈ 0.04.
  assert.ok(Math.abs(mean - 1) < 0.05, `mean ${mean}`);
  assert.ok(Math.abs(variance - 9) < 0.2, `variance ${variance}`);
  const umean = u.reduce((a, b) => a + b, 0) / n;
  assert.ok(Math.abs(umean) < 0.03, `uniform mean ${umean}`);
  assert.throws(() => new Pcg32(-1), /seed -1 is not a non-negative safe integer/);
  assert.throws(() => new Pcg32(1, 0.5), /stream 0.5/);
});
