// Elementwise ops against plain loops. f32 results must match exactly (one f32 operation per
// element); f16 results must be the f32 result rounded to f16, within one f16 ulp (WGSL lets
// the conversion round either way), i.e. |gpu − ref| <= 2⁻¹⁰·|ref| + 2⁻²⁴.
import assert from "node:assert/strict";
import { f32ToF16 } from "../../kernels/half.ts";
import { add, axpy, cast, copy, fill, mul, scale } from "../../kernels/ops/elementwise.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, roundF16 } from "./_harness.ts";

const F16_TOL = { atol: 2 ** -24, rtol: 2 ** -10 };
const SIZES = [1, 7, 1001];

function ref(n: number, f: (i: number) => number): Float32Array {
  return Float32Array.from({ length: n }, (_, i) => f(i));
}

gpuTest("add, mul and scale of f32 tensors match f32 arithmetic exactly", async (gpu) => {
  for (const n of SIZES) {
    const x = randn(n, n), y = randn(n, n + 1);
    using a = Tensor.from(gpu, x, [n]);
    using b = Tensor.from(gpu, y, [n]);
    using sum = add(a, b, { out: nanTensor(gpu, [n]) });
    using prod = mul(a, b);
    using scaled = scale(a, -0.75);
    assertClose(await sum.read(), ref(n, (i) => Math.fround(x[i] + y[i])), {
      atol: 0,
      rtol: 0,
      name: `add ${n}`,
    });
    assertClose(await prod.read(), ref(n, (i) => Math.fround(x[i] * y[i])), {
      atol: 0,
      rtol: 0,
      name: `mul ${n}`,
    });
    assertClose(await scaled.read(), ref(n, (i) => Math.fround(x[i] * -0.75)), {
      atol: 0,
      rtol: 0,
      name: `scale ${n}`,
    });
  }
});

gpuTest("f16 elementwise results are the f32 result rounded to f16", async (gpu) => {
  for (const n of SIZES) {
    const x = roundF16(randn(n, 10 + n)), y = roundF16(randn(n, 20 + n));
    using a = Tensor.from(gpu, x, [n], "f16");
    using b = Tensor.from(gpu, y, [n], "f16");
    using sum = add(a, b, { out: nanTensor(gpu, [n], "f16") });
    using prod = mul(a, b);
    assert.equal(sum.dtype, "f16");
    assertClose(await sum.readF32(), roundF16(ref(n, (i) => x[i] + y[i])), {
      ...F16_TOL,
      name: `add f16 ${n}`,
    });
    assertClose(await prod.readF32(), roundF16(ref(n, (i) => x[i] * y[i])), {
      ...F16_TOL,
      name: `mul f16 ${n}`,
    });
  }
});

gpuTest("mixed f16 and f32 inputs give an f32 result", async (gpu) => {
  const n = 9;
  const x = roundF16(randn(n, 1)), y = randn(n, 2);
  using a = Tensor.from(gpu, x, [n], "f16");
  using b = Tensor.from(gpu, y, [n], "f32");
  using sum = add(a, b);
  assert.equal(sum.dtype, "f32");
  assertClose(await sum.read(), ref(n, (i) => Math.fround(x[i] + y[i])), { atol: 0, rtol: 0 });
});

gpuTest("in-place ops read and write the output binding: add, scale, axpy", async (gpu) => {
  for (const dtype of ["f32", "f16"] as const) {
    const n = 1001;
    const round = dtype === "f16" ? roundF16 : (v: Float32Array) => v;
    const tol = dtype === "f16" ? F16_TOL : { atol: 0, rtol: 0 };
    const x = round(randn(n, 3)), y = round(randn(n, 4));
    using a = Tensor.from(gpu, x, [n], dtype);
    using b = Tensor.from(gpu, y, [n], dtype);
    add(a, b, { out: a }); // a = x + y
    const afterAdd = round(ref(n, (i) => x[i] + y[i]));
    assertClose(await a.readF32(), afterAdd, { ...tol, name: `add in place ${dtype}` });
    axpy(a, 0.5, b); // a += 0.5·y
    const afterAxpy = round(ref(n, (i) => afterAdd[i] + 0.5 * y[i]));
    assertClose(await a.readF32(), afterAxpy, { ...tol, name: `axpy ${dtype}` });
    scale(a, 2, { out: a });
    assertClose(await a.readF32(), round(ref(n, (i) => 2 * afterAxpy[i])), {
      ...tol,
      name: `scale ${dtype}`,
    });
    add(b, b, { out: b }); // both inputs are the output
    assertClose(await b.readF32(), round(ref(n, (i) => 2 * y[i])), {
      ...tol,
      name: `x + x in place ${dtype}`,
    });
  }
});

gpuTest("fill sets every element for f32, f16, u32 and i32", async (gpu) => {
  for (const n of SIZES) {
    using a = fill(nanTensor(gpu, [n]), 2.5);
    using h = fill(nanTensor(gpu, [n], "f16"), -1.5);
    using u = fill(Tensor.from(gpu, new Uint32Array(n).fill(9), [n], "u32"), 0xdeadbeef);
    using s = fill(Tensor.empty(gpu, [n], "i32"), -3);
    assert.deepEqual([...await a.read()], new Array(n).fill(2.5));
    assert.deepEqual([...await h.readF32()], new Array(n).fill(-1.5));
    assert.deepEqual([...await u.read()], new Array(n).fill(0xdeadbeef));
    assert.deepEqual([...await s.read()], new Array(n).fill(-3));
  }
});

gpuTest("copy duplicates a tensor and refuses a different shape", async (gpu) => {
  const x = randn(15, 5);
  using a = Tensor.from(gpu, x, [3, 5]);
  using b = copy(a, nanTensor(gpu, [3, 5]));
  assert.deepEqual(await b.read(), x);
  using c = Tensor.empty(gpu, [5, 3]);
  assert.throws(() => copy(a, c), /Cannot copy "tensor" f32\[3,5\] to "tensor" f32\[5,3\]/);
});

gpuTest("cast converts f32 to f16 with round-to-nearest and f16 to f32 exactly", async (gpu) => {
  for (const n of SIZES) {
    const x = randn(n, 30 + n, 100);
    using a = Tensor.from(gpu, x, [n]);
    using h = cast(a, "f16", { out: nanTensor(gpu, [n], "f16") });
    const bits = await h.read() as Uint16Array;
    for (let i = 0; i < n; i++) {
      const want = f32ToF16(x[i]);
      assert.ok(Math.abs(bits[i] - want) <= 1, `cast of ${x[i]}: bits ${bits[i]} vs ${want}`);
    }
    using back = cast(h, "f32");
    assertClose(await back.read(), await h.readF32(), { atol: 0, rtol: 0, name: "f16 -> f32" });
  }
});

gpuTest("elementwise ops run per chunk on tensors split into row chunks", async (gpu) => {
  const x = randn(40 * 3, 8), y = randn(40 * 3, 9);
  using a = Tensor.from(gpu, x, [40, 3], "f32", { maxChunkBytes: 200 });
  using b = Tensor.from(gpu, y, [40, 3], "f32", { maxChunkBytes: 200 });
  assert.ok(a.chunks.length > 2);
  using out = add(a, b, { out: Tensor.empty(gpu, [40, 3], "f32", { maxChunkBytes: 200 }) });
  assertClose(await out.read(), ref(120, (i) => Math.fround(x[i] + y[i])), { atol: 0, rtol: 0 });
  using plain = Tensor.from(gpu, y, [40, 3]);
  assert.throws(() => add(a, plain), /split into different row chunks/);
});

gpuTest("elementwise ops refuse mismatched sizes and integer tensors", (gpu) => {
  using a = Tensor.empty(gpu, [4]);
  using b = Tensor.empty(gpu, [5]);
  using i = Tensor.empty(gpu, [4], "i32");
  assert.throws(() => add(a, b), /Cannot run add: "tensor" \[5\] and "tensor" \[4\] differ/);
  assert.throws(() => scale(i, 2), /dtype i32/);
});

gpuTest("fill covers tensors that need more workgroups than one dimension allows", async (gpu) => {
  // ceil(n/2) pairs over 256-wide workgroups exceed 65535 groups: the dispatch spreads over y.
  const n = 2 * 256 * 65535 + 2 * 256 * 3 + 6;
  using h = fill(Tensor.empty(gpu, [n], "f16"), 1);
  const bits = await h.read() as Uint16Array;
  let wrong = -1;
  for (let i = 0; i < n && wrong < 0; i++) if (bits[i] !== 0x3c00) wrong = i;
  assert.equal(wrong, -1, `element ${wrong} not written`);
});
