// GPU embedding gather and scatter-add against kernels/reference/embedding.ts on seeded data.
// T = tokens, V = vocab, D = hidden. The gather copies values, so it must match exactly (f16
// tables widen exactly). dE sums f32 rows: |gpu − ref| ≤ atol + rtol·|ref| with scale = max|ref|,
// atol 1e-5·scale, rtol 1e-4 (f32 and f16 dout alike: the reference sees the same f16 values).
import assert from "node:assert/strict";
import { embedding_backward, embedding_forward } from "../../kernels/reference/embedding.ts";
import { embeddingBackward, embeddingForward } from "../../kernels/ops/embedding.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, rng, roundF16, type Tolerance } from "./_harness.ts";

function tol(ref: ArrayLike<number>, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
  return { atol: 1e-5 * scale, rtol: 1e-4, name };
}

/** T ids in [0, V) with repeats, seeded. */
function randomIds(T: number, V: number, seed: number): Uint32Array {
  const next = rng(seed);
  return Uint32Array.from({ length: T }, () => Math.floor(next() * V));
}

gpuTest("embeddingForward gathers table rows for GPU and host ids", async (gpu) => {
  const V = 29, D = 37, T = 13;
  const E = randn(V * D, 1);
  const ids = randomIds(T, V, 2);
  ids[3] = ids[7] = V - 1;
  const want = embedding_forward(E, ids, { V, D });
  const table = Tensor.from(gpu, E, [V, D]);
  const fromTensor = embeddingForward(table, Tensor.from(gpu, ids, [T], "u32"), {
    out: nanTensor(gpu, [T, D]),
  });
  const fromHost = embeddingForward(table, [...ids]);
  assert.deepEqual(await fromTensor.readF32(), want);
  assert.deepEqual(await fromHost.readF32(), want);
});

gpuTest("embeddingForward reads a table split into row chunks into a split output", async (gpu) => {
  const V = 50, D = 12, T = 21;
  const E = randn(V * D, 3);
  const ids = randomIds(T, V, 4);
  ids[0] = 0;
  ids[1] = V - 1;
  const want = embedding_forward(E, ids, { V, D });
  const table = Tensor.from(gpu, E, [V, D], "f32", { maxChunkBytes: 7 * D * 4 });
  const out = Tensor.empty(gpu, [T, D], "f32", { maxChunkBytes: 5 * D * 4 });
  const idt = Tensor.from(gpu, ids, [T], "u32", { maxChunkBytes: 16 });
  assert.ok(table.chunks.length > 5 && out.chunked && idt.chunked);
  embeddingForward(table, idt, { out });
  assert.deepEqual(await out.readF32(), want);
});

gpuTest("embeddingForward writes NaN rows for GPU ids outside the vocabulary", async (gpu) => {
  const V = 10, D = 6;
  const E = randn(V * D, 5);
  const table = Tensor.from(gpu, E, [V, D], "f32", { maxChunkBytes: 4 * D * 4 });
  const out = embeddingForward(table, Tensor.from(gpu, [2, 10, 9, 4000000000], [4], "u32"));
  const got = await out.readF32();
  assert.deepEqual(got.subarray(0, D), E.subarray(2 * D, 3 * D));
  assert.ok(got.subarray(D, 2 * D).every(Number.isNaN), "id 10 = V gives a NaN row");
  assert.deepEqual(got.subarray(2 * D, 3 * D), E.subarray(9 * D, 10 * D));
  assert.ok(got.subarray(3 * D).every(Number.isNaN), "a huge id gives a NaN row");
});

gpuTest("embeddingForward refuses host ids outside the vocabulary, naming the token", (gpu) => {
  const table = Tensor.zeros(gpu, [8, 4], "f32", { label: "embed_tokens" });
  assert.throws(
    () => embeddingForward(table, [1, 2, 8]),
    /token 2 has id "8", outside the vocabulary \[0, 8\)/,
  );
  assert.throws(() => embeddingForward(table, [-1]), /token 0 has id "-1"/);
  assert.throws(
    () => embeddingForward(table, Tensor.zeros(gpu, [3], "i32", { label: "ids" })),
    /"ids" has dtype i32/,
  );
  assert.throws(() => embeddingBackward(Tensor.zeros(gpu, [2, 4]), [0, 9], 8), /token 1 has id "9"/);
});

gpuTest("embeddingForward widens an f16 table exactly into f32 or f16 outputs", async (gpu) => {
  const V = 17, D = 33, T = 9;
  const E = roundF16(randn(V * D, 6, 4));
  const ids = randomIds(T, V, 7);
  const want = embedding_forward(E, ids, { V, D });
  const table = Tensor.from(gpu, E, [V, D], "f16");
  const f32 = embeddingForward(table, ids);
  const f16 = embeddingForward(table, ids, { dtype: "f16" });
  assert.equal(f32.dtype, "f32");
  assert.equal(f16.dtype, "f16");
  assert.deepEqual(await f32.readF32(), want);
  assert.deepEqual(await f16.readF32(), want);
  // A NaN row survives the f16 store.
  const bad = embeddingForward(table, Tensor.from(gpu, [V], [1], "u32"), { dtype: "f16" });
  assert.ok((await bad.readF32()).every(Number.isNaN));
}, { needsF16: true });

gpuTest("embeddingBackward sums the rows of repeated ids and zeroes the others", async (gpu) => {
  const V = 23, D = 19, T = 40;
  const dout = randn(T * D, 8);
  const ids = randomIds(T, V, 9);
  ids[0] = ids[5] = ids[39] = 4;
  const want = embedding_backward(dout, ids, { V, D });
  const dE = embeddingBackward(Tensor.from(gpu, dout, [T, D]), ids, V, { dE: nanTensor(gpu, [V, D]) });
  assertClose(await dE.readF32(), want, tol(want, "dE"));
  assert.ok(want.some((v) => v === 0), "some vocabulary rows are not in the batch");
});

gpuTest("embeddingBackward accumulates across split dout and dE row chunks", async (gpu) => {
  const V = 31, D = 8, T = 25;
  const dout = randn(T * D, 10);
  const ids = randomIds(T, V, 11);
  const dE0 = randn(V * D, 12);
  const want = embedding_backward(dout, ids, { V, D }).map((v, i) => v + dE0[i]);
  const dE = Tensor.from(gpu, dE0, [V, D], "f32", { maxChunkBytes: 6 * D * 4 });
  const dt = Tensor.from(gpu, dout, [T, D], "f32", { maxChunkBytes: 4 * D * 4 });
  assert.ok(dE.chunked && dt.chunked);
  embeddingBackward(dt, ids, V, { dE, accumulate: true });
  assertClose(await dE.readF32(), want, tol(want, "dE"));
});

gpuTest("embeddingBackward takes f16 upstream gradients", async (gpu) => {
  const V = 12, D = 10, T = 30;
  const dout = roundF16(randn(T * D, 13));
  const ids = randomIds(T, V, 14);
  const want = embedding_backward(dout, ids, { V, D });
  const dE = embeddingBackward(Tensor.from(gpu, dout, [T, D], "f16"), ids, V);
  assert.equal(dE.dtype, "f32");
  assertClose(await dE.readF32(), want, tol(want, "dE"));
}, { needsF16: true });
