import assert from "node:assert/strict";
import { cast, fill, scale } from "../../kernels/ops/elementwise.ts";
import { recorder } from "../../kernels/recorder.ts";
import {
  bucketSize,
  memoryStats,
  readTensors,
  resetPeakMemory,
  Tensor,
  trimPool,
} from "../../kernels/tensor.ts";
import { gpuTest, randn, roundF16 } from "./_harness.ts";

gpuTest("Tensor.from() round-trips f32 data", async (gpu) => {
  const data = randn(1001, 1);
  using t = Tensor.from(gpu, data, [7, 11, 13], "f32", { label: "x" });
  assert.equal(t.size, 1001);
  assert.equal(t.rows, 7);
  assert.equal(t.rowSize, 143);
  assert.deepEqual(await t.read(), data);
});

gpuTest("f16 tensors store values rounded to nearest even and read back exactly", async (gpu) => {
  const data = new Float32Array([1 / 3, 65504, 65520, 1e-8, -2.5, 0.1, 2049, 2051]);
  using t = Tensor.from(gpu, data, [8], "f16");
  assert.equal(t.byteLength, 16);
  assert.deepEqual(await t.readF32(), roundF16(data));
  const bits = await t.read();
  assert.ok(bits instanceof Uint16Array);
  assert.equal(bits[1], 0x7bff);
  assert.equal(bits[2], 0x7c00);
});

gpuTest("u8, u32 and i32 tensors of odd byte lengths round-trip", async (gpu) => {
  using a = Tensor.from(gpu, new Uint8Array([1, 2, 3, 254, 255]), [5], "u8");
  using b = Tensor.from(gpu, new Uint32Array([0, 1, 0xffffffff]), [3], "u32");
  using c = Tensor.from(gpu, [-5, 7, -2147483648], [3], "i32");
  using h = Tensor.from(gpu, new Float32Array([1, 2, 3]), [3], "f16");
  const [ra, rb, rc, rh] = await readTensors([a, b, c, h]);
  assert.deepEqual([...ra], [1, 2, 3, 254, 255]);
  assert.deepEqual([...rb], [0, 1, 0xffffffff]);
  assert.deepEqual([...rc], [-5, 7, -2147483648]);
  assert.deepEqual([...rh], [0x3c00, 0x4000, 0x4200]);
});

gpuTest("readTensors() reads several tensors with one submit", async (gpu) => {
  const tensors = [1, 2, 3].map((i) => Tensor.from(gpu, new Float32Array(10).fill(i), [10]));
  const rec = recorder(gpu);
  await rec.sync();
  const before = rec.submitCount;
  const hosts = await readTensors(tensors);
  assert.equal(rec.submitCount - before, 1);
  hosts.forEach((h, i) => assert.deepEqual([...h], new Array(10).fill(i + 1)));
  tensors.forEach((t) => t.destroy());
});

gpuTest("Tensor.from() rejects data that does not fill the shape", (gpu) => {
  assert.throws(
    () => Tensor.from(gpu, new Float32Array(5), [2, 3], "f32", { label: "w" }),
    /Cannot create tensor "w": shape \[2,3\] holds 6 elements, data has 5/,
  );
  assert.throws(
    () => Tensor.from(gpu, new Int32Array(6), [2, 3], "f32"),
    /Cannot create a f32 tensor from a Int32Array/,
  );
});

gpuTest("tensors over the chunk limit are split into row chunks and read back whole", async (gpu) => {
  const data = randn(37 * 10, 2);
  using t = Tensor.from(gpu, data, [37, 10], "f32", { label: "big", maxChunkBytes: 1000 });
  assert.equal(t.chunked, true);
  assert.deepEqual(t.chunks.map((c) => [c.rowStart, c.rows, c.byteLength]), [[0, 25, 1000], [25, 12, 480]]);
  assert.throws(() => t.buffer, /Cannot bind tensor "big" as one buffer: it is split into 2 row chunks/);
  assert.deepEqual(await t.read(), data);

  // f16 rows of odd length: chunk buffers are padded to whole words.
  const half = randn(9 * 3, 3);
  using h = Tensor.from(gpu, half, [9, 3], "f16", { maxChunkBytes: 24 });
  assert.deepEqual(h.chunks.map((c) => [c.rowStart, c.rows, c.byteLength]), [
    [0, 2, 12],
    [2, 2, 12],
    [
      4,
      2,
      12,
    ],
    [6, 2, 12],
    [8, 1, 6],
  ]);
  assert.deepEqual(await h.readF32(), roundF16(half));
});

gpuTest(
  "tensors of one shape split at the same rows whatever their dtype, so a cast pairs them chunk by chunk",
  async (gpu) => {
    const data = randn(37 * 10, 11);
    using a = Tensor.from(gpu, data, [37, 10], "f32", { label: "a", maxChunkBytes: 1000 });
    using h = Tensor.empty(gpu, [37, 10], "f16", { label: "h", maxChunkBytes: 1000 });
    using i = Tensor.empty(gpu, [37, 10], "i32", { label: "i", maxChunkBytes: 1000 });
    const rows = (t: Tensor) => t.chunks.map((c) => [c.rowStart, c.rows]);
    assert.deepEqual(rows(a), [[0, 25], [25, 12]]);
    assert.deepEqual(rows(h), rows(a));
    assert.deepEqual(rows(i), rows(a));
    using back = Tensor.empty(gpu, [37, 10], "f32", { label: "back", maxChunkBytes: 1000 });
    cast(a, "f16", { out: h });
    cast(h, "f32", { out: back });
    assert.deepEqual(await back.readF32(), roundF16(data));
  },
);

gpuTest("a row larger than the chunk limit is refused", (gpu) => {
  assert.throws(
    () => Tensor.empty(gpu, [4, 100], "f32", { label: "wide", maxChunkBytes: 256 }),
    /Cannot allocate "wide": one row of 400 bytes \(counted at 4 per element\) exceeds the binding limit of 256 bytes/,
  );
});

gpuTest("destroyed tensors return their buffers to the pool for reuse", async (gpu) => {
  const stats0 = memoryStats(gpu);
  const a = Tensor.empty(gpu, [1000], "f32");
  const stats1 = memoryStats(gpu);
  assert.equal(stats1.liveBytes - stats0.liveBytes, bucketSize(4000));
  a.destroy();
  a.destroy(); // twice is harmless
  assert.equal(a.destroyed, true);
  assert.throws(() => a.chunks, /was destroyed/);
  assert.equal(memoryStats(gpu).liveBytes, stats0.liveBytes);
  const b = Tensor.empty(gpu, [990], "f32"); // same bucket: reused, nothing created
  assert.equal(memoryStats(gpu).created, stats1.created);
  b.destroy();
  await recorder(gpu).sync();
});

gpuTest("peak memory tracks the highest live bytes since the last reset", (gpu) => {
  resetPeakMemory(gpu);
  const base = memoryStats(gpu).liveBytes;
  const a = Tensor.empty(gpu, [4096], "f32");
  const b = Tensor.empty(gpu, [4096], "f32");
  a.destroy();
  b.destroy();
  const stats = memoryStats(gpu);
  assert.equal(stats.peakBytes - base, 2 * bucketSize(4096 * 4));
  assert.equal(stats.liveBytes, base);
  trimPool(gpu);
  assert.equal(memoryStats(gpu).pooledBytes, 0);
});

gpuTest("`using` returns a tensor's buffers at the end of its scope", (gpu) => {
  const before = memoryStats(gpu).liveBuffers;
  let escaped: Tensor;
  {
    using t = Tensor.empty(gpu, [16]);
    escaped = t;
    assert.equal(memoryStats(gpu).liveBuffers, before + 1);
  }
  assert.equal(escaped.destroyed, true);
  assert.equal(memoryStats(gpu).liveBuffers, before);
});

gpuTest("Tensor.zeros() clears a reused buffer", async (gpu) => {
  const dirty = Tensor.from(gpu, new Float32Array(300).fill(7), [300]);
  dirty.destroy();
  using z = Tensor.zeros(gpu, [300]);
  assert.deepEqual(await z.read(), new Float32Array(300));
});

gpuTest("an upload into a pooled buffer waits for recorded work that still reads it", async (gpu) => {
  const x = Tensor.from(gpu, new Float32Array(64).fill(3), [64]);
  const y = scale(x, 2); // recorded, not yet submitted
  x.destroy();
  const reuse = Tensor.from(gpu, new Float32Array(64).fill(100), [64]); // may get x's buffer
  assert.deepEqual(await y.read(), new Float32Array(64).fill(6));
  reuse.destroy();
  y.destroy();
});

gpuTest("reshape() views the same buffer: writes through either are read through the other", async (gpu) => {
  const data = Float32Array.from({ length: 24 }, (_, i) => i);
  using x = Tensor.from(gpu, data, [4, 6], "f32", { label: "x" });
  using v = x.reshape([2, 3, 4], "v");
  assert.deepEqual(v.shape, [2, 3, 4]);
  assert.equal(v.label, "v");
  assert.equal(v.size, 24);
  assert.equal(v.rows, 2);
  assert.equal(v.rowSize, 12);
  assert.equal(v.buffer, x.buffer);
  assert.deepEqual(await v.read(), data);
  scale(v, 2, { out: v }); // written through the view
  assert.deepEqual(await x.read(), data.map((d) => 2 * d));
  fill(x, -1); // written through the tensor
  assert.deepEqual(await v.read(), new Float32Array(24).fill(-1));
  // A view of a view, -1 inferred, and a scalar view of a one-element tensor.
  using flat = v.reshape([-1]);
  assert.deepEqual(flat.shape, [24]);
  using inferred = x.reshape([3, -1, 2]);
  assert.deepEqual(inferred.shape, [3, 4, 2]);
  using one = Tensor.from(gpu, [7], [1, 1], "f32");
  using scalar = one.reshape([]);
  assert.deepEqual(scalar.shape, []);
  assert.deepEqual([...(await scalar.read())], [7]);
});

gpuTest(
  "a tensor and its views return their buffer to the pool once, when the last is destroyed",
  async (gpu) => {
    await recorder(gpu).sync();
    const before = memoryStats(gpu);
    const x = Tensor.from(gpu, randn(1000, 4), [10, 100], "f32", { label: "x" });
    const bytes = bucketSize(4000);
    const v = x.reshape([1000]);
    const w = v.reshape([100, 10]);
    const after = memoryStats(gpu);
    assert.equal(after.liveBytes - before.liveBytes, bytes, "views add no live bytes");
    assert.equal(after.liveBuffers - before.liveBuffers, 1, "views add no buffers");
    x.destroy(); // the original first: its views keep the buffer
    x.destroy();
    assert.equal(x.destroyed, true);
    assert.equal(v.destroyed, false);
    assert.throws(() => x.reshape([1000]), /Cannot use tensor "x": it was destroyed/);
    assert.equal(memoryStats(gpu).liveBytes - before.liveBytes, bytes);
    assert.equal((await v.read()).length, 1000);
    w.destroy();
    w.destroy(); // a second destroy of a view does not release the buffer for the others
    assert.equal(memoryStats(gpu).liveBuffers - before.liveBuffers, 1);
    v.destroy();
    const end = memoryStats(gpu);
    assert.equal(end.liveBytes, before.liveBytes);
    assert.equal(end.liveBuffers, before.liveBuffers);
    assert.equal(end.pooledBytes - before.pooledBytes, bytes, "the buffer is pooled once");
    // Released once, the buffer is handed out once: two new tensors of its bucket get two buffers.
    using a = Tensor.empty(gpu, [1000], "f32");
    using b = Tensor.empty(gpu, [1000], "f32");
    assert.notEqual(a.buffer, b.buffer);
  },
);

gpuTest("peak memory counts a viewed buffer once", (gpu) => {
  resetPeakMemory(gpu);
  const base = memoryStats(gpu).liveBytes;
  {
    using x = Tensor.empty(gpu, [64, 64], "f32");
    using _a = x.reshape([4096]);
    using _b = x.reshape([64, 8, 8]);
  }
  const stats = memoryStats(gpu);
  assert.equal(stats.peakBytes - base, bucketSize(64 * 64 * 4));
  assert.equal(stats.liveBytes, base);
});

gpuTest("views of a tensor split into row chunks keep its chunks and first dimension", async (gpu) => {
  const data = randn(37 * 10, 5);
  using t = Tensor.from(gpu, data, [37, 10], "f32", { label: "big", maxChunkBytes: 1000 });
  using v = t.reshape([37, 2, 5], "big3");
  assert.equal(v.chunked, true);
  assert.deepEqual(v.chunks.map((c) => [c.rowStart, c.rows, c.byteLength]), [[0, 25, 1000], [25, 12, 480]]);
  assert.deepEqual(v.chunks.map((c) => c.buffer), t.chunks.map((c) => c.buffer));
  assert.deepEqual(await v.read(), data);
  fill(v, 3);
  assert.deepEqual(await t.read(), new Float32Array(370).fill(3));
  assert.throws(
    () => t.reshape([74, 5]),
    (e: Error) =>
      e instanceof RangeError &&
      e.message === 'Cannot reshape tensor "big" [37,10] to [74,5] without a copy: it is split into 2 row ' +
          "chunks of whole rows, so a view must keep the first dimension 37",
  );
  assert.throws(() => t.reshape([370]), /without a copy/);
  assert.throws(() => t.reshape([-1]), /Cannot reshape tensor "big" \[37,10\] to \[-1\] without a copy/);
});

gpuTest("reshape() refuses another element count and shapes that are not sizes", (gpu) => {
  using x = Tensor.empty(gpu, [2, 3], "f32", { label: "x" });
  assert.throws(
    () => x.reshape([4, 2]),
    (e: Error) =>
      e instanceof RangeError &&
      e.message === 'Cannot reshape tensor "x" [2,3] to [4,2]: it holds 6 elements, the shape 8',
  );
  assert.throws(() => x.reshape([-1, -1]), /only one dimension may be -1/);
  assert.throws(() => x.reshape([4, -1]), /its 6 elements are not a multiple of 4/);
  assert.throws(() => x.reshape([1.5, 4]), /dimension "1.5" is not a size/);
  assert.throws(() => x.reshape([-2, -3]), /dimension "-2" is not a size/);
  using empty = Tensor.empty(gpu, [0, 3], "f32");
  using flipped = empty.reshape([3, 0]);
  assert.deepEqual(flipped.shape, [3, 0]);
  assert.throws(() => empty.reshape([0, -1]), /cannot be inferred next to a dimension of 0/);
});

Deno.test("bucketSize() rounds up to four sizes per power of two", () => {
  assert.equal(bucketSize(1), 256);
  assert.equal(bucketSize(256), 256);
  assert.equal(bucketSize(257), 320);
  assert.equal(bucketSize(512), 512);
  assert.equal(bucketSize(513), 640);
  assert.equal(bucketSize(4000), 4096);
  assert.equal(bucketSize(5000), 5120);
  for (let n = 1; n < 100_000; n += 997) {
    const b = bucketSize(n);
    assert.ok(b >= n && (n <= 256 || b <= n * 1.25 + 4), `bucket of ${n} is ${b}`);
  }
});
