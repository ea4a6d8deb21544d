import assert from "node:assert/strict";
import { scale } from "../../kernels/ops/elementwise.ts";
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
  using h = Tensor.from(gpu, half, [9, 3], "f16", { maxChunkBytes: 16 });
  assert.equal(h.chunks.length, 5);
  assert.deepEqual(await h.readF32(), roundF16(half));
});

gpuTest("a row larger than the chunk limit is refused", (gpu) => {
  assert.throws(
    () => Tensor.empty(gpu, [4, 100], "f32", { label: "wide", maxChunkBytes: 256 }),
    /Cannot allocate "wide": one row of 400 bytes exceeds the binding limit of 256 bytes/,
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
