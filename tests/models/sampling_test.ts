// transformers' logits processors and warpers (kernels/models/sampling.ts) on hand-computed cases.
import assert from "node:assert/strict";
import {
  argmax,
  checkSampling,
  DEFAULT_SAMPLING,
  nextToken,
  processLogits,
  samplingRng,
} from "../../kernels/models/sampling.ts";

const sample = { ...DEFAULT_SAMPLING, doSample: true, topK: 0 };
const kept = (z: Float64Array) => Array.from(z.keys()).filter((i) => z[i] !== -Infinity);

Deno.test("repetition_penalty divides positive and multiplies negative logits of seen ids, once each", () => {
  const z = processLogits([2, -1, 0.5], [0, 1, 1, 0], { ...DEFAULT_SAMPLING, repetitionPenalty: 2 });
  assert.deepEqual(Array.from(z), [1, -2, 0.5]);
});

Deno.test("greedy is the argmax, the lowest id on ties, after the repetition penalty", () => {
  assert.equal(argmax([1, 3, 3, 2]), 1);
  const rng = samplingRng(1, 0);
  assert.equal(nextToken([1, 3, 3, 2], [], DEFAULT_SAMPLING, rng), 1);
  // Temperature 0 is greedy too, whatever do_sample says.
  assert.equal(nextToken([1, 3, 3, 2], [], { ...sample, temperature: 0 }, rng), 1);
  assert.equal(nextToken([1, 3, 2.5, 2], [1], { ...DEFAULT_SAMPLING, repetitionPenalty: 2 }, rng), 2);
});

Deno.test("temperature, top_k (ties at the k-th kept), top_p and min_p keep what transformers keeps", () => {
  assert.deepEqual(Array.from(processLogits([1, 2], [], { ...sample, temperature: 0.5 })), [2, 4]);
  assert.deepEqual(kept(processLogits([1, 3, 2, 3], [], { ...sample, topK: 2 })), [1, 3]);
  const z = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  // Ascending cumulative 0.05, 0.2, 0.5, 1: removed while ≤ 1 − 0.75.
  assert.deepEqual(kept(processLogits(z, [], { ...sample, topP: 0.75 })), [0, 1]);
  assert.deepEqual(
    kept(processLogits(z, [], { ...sample, topP: 0.01 })),
    [0],
    "the most likely always stays",
  );
  // min_p 0.4: below 0.4 · 0.5 = 0.2 removed.
  assert.deepEqual(kept(processLogits(z, [], { ...sample, minP: 0.4 })), [0, 1]);
  // Greedy ignores the warpers.
  assert.deepEqual(Array.from(processLogits([1, 2], [], { ...DEFAULT_SAMPLING, temperature: 0.5 })), [1, 2]);
});

Deno.test("sampling draws from the processed distribution, and a seed repeats it", () => {
  const z = [0.5, 0.3, 0.2, 0].map((p) => (p === 0 ? -Infinity : Math.log(p)));
  const counts = [0, 0, 0, 0];
  const rng = samplingRng(7, 0);
  const n = 20000;
  const draws = Array.from({ length: n }, () => nextToken(z, [], sample, rng));
  for (const t of draws) counts[t]++;
  [0.5, 0.3, 0.2, 0].forEach((p, i) =>
    assert.ok(Math.abs(counts[i] / n - p) < 0.015, `id ${i}: ${counts[i] / n} vs ${p}`)
  );
  const again = samplingRng(7, 0);
  assert.deepEqual(Array.from({ length: 50 }, () => nextToken(z, [], sample, again)), draws.slice(0, 50));
  const other = samplingRng(7, 1);
  assert.notDeepEqual(Array.from({ length: 50 }, () => nextToken(z, [], sample, other)), draws.slice(0, 50));
});

Deno.test("out-of-range options name transformers' option", () => {
  for (
    const [o, pattern] of [
      [{ temperature: -1 }, /temperature -1/],
      [{ topK: 1.5 }, /top_k 1\.5/],
      [{ topP: 0 }, /top_p 0/],
      [{ minP: 1 }, /min_p 1/],
      [{ repetitionPenalty: 0 }, /repetition_penalty 0/],
    ] as const
  ) {
    assert.throws(() => checkSampling({ ...DEFAULT_SAMPLING, ...o }), pattern);
  }
});

Deno.test("top_k keeps exactly what sorting would, on random logits with ties", () => {
  let x = 12345;
  const next = () => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let round = 0; round < 200; round++) {
    const n = 1 + Math.floor(next() * 300);
    const z = Array.from({ length: n }, () => Math.round(next() * 40) / 4); // many ties
    const k = 1 + Math.floor(next() * n);
    const kth = [...z].sort((a, b) => b - a)[k - 1];
    const want = Array.from(z.keys()).filter((i) => z[i] >= kth);
    assert.deepEqual(kept(processLogits(z, [], { ...sample, topK: k })), k < n ? want : Array.from(z.keys()));
  }
});
