// GPU SwiGLU against kernels/reference/swiglu.ts on seeded random data.
// T = tokens, F = ffn size. Tolerance |gpu − ref| ≤ atol + rtol·|ref| with scale = max|ref|:
// f32: atol 1e-5·scale, rtol 1e-4; f16 storage (f32 math, one rounding on store): atol 1e-3·scale,
// rtol 1e-2.
import assert from "node:assert/strict";
import { swiglu_backward, swiglu_forward } from "../../kernels/reference/swiglu.ts";
import {
  swigluBackward,
  swigluBackwardFused,
  swigluForward,
  swigluForwardFused,
} from "../../kernels/ops/swiglu.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, roundF16, type Tolerance } from "./_harness.ts";

function tol(dtype: "f32" | "f16", ref: ArrayLike<number>, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
  return dtype === "f32"
    ? { atol: 1e-5 * scale, rtol: 1e-4, name }
    : { atol: 1e-3 * scale, rtol: 1e-2, name };
}

/** [T,2F] rows of g then u. */
function fuse(g: Float32Array, u: Float32Array, T: number, F: number): Float32Array {
  const out = new Float32Array(2 * T * F);
  for (let t = 0; t < T; t++) {
    out.set(g.subarray(t * F, t * F + F), 2 * t * F);
    out.set(u.subarray(t * F, t * F + F), 2 * t * F + F);
  }
  return out;
}

gpuTest("swigluForward and swigluBackward match the reference in f32", async (gpu) => {
  const T = 9, F = 37;
  // Gate values out to ±30 check that σ saturates without NaN.
  const g = randn(T * F, 1, 3);
  g[0] = 30;
  g[1] = -30;
  const u = randn(T * F, 2);
  const dh = randn(T * F, 3);
  const wantH = swiglu_forward(g, u);
  const want = swiglu_backward(dh, g, u);
  const gt = Tensor.from(gpu, g, [T, F]);
  const ut = Tensor.from(gpu, u, [T, F]);
  const h = swigluForward(gt, ut, { out: nanTensor(gpu, [T, F]) });
  const { dg, du } = swigluBackward(Tensor.from(gpu, dh, [T, F]), gt, ut, {
    dg: nanTensor(gpu, [T, F]),
    du: nanTensor(gpu, [T, F]),
  });
  assertClose(await h.readF32(), wantH, tol("f32", wantH, "h"));
  assertClose(await dg.readF32(), want.dg, tol("f32", want.dg, "dg"));
  assertClose(await du.readF32(), want.du, tol("f32", want.du, "du"));
});

gpuTest("swiglu on a fused gate_up tensor reads and writes its two halves", async (gpu) => {
  const T = 5, F = 23;
  const g = randn(T * F, 11, 2);
  const u = randn(T * F, 12);
  const dh = randn(T * F, 13);
  const wantH = swiglu_forward(g, u);
  const want = swiglu_backward(dh, g, u);
  const gateUp = Tensor.from(gpu, fuse(g, u, T, F), [T, 2 * F]);
  const h = swigluForwardFused(gateUp);
  assert.deepEqual(h.shape, [T, F]);
  const dgu = swigluBackwardFused(Tensor.from(gpu, dh, [T, F]), gateUp, { out: nanTensor(gpu, [T, 2 * F]) });
  const wantDgu = fuse(want.dg, want.du, T, F);
  assertClose(await h.readF32(), wantH, tol("f32", wantH, "h"));
  assertClose(await dgu.readF32(), wantDgu, tol("f32", wantDgu, "dgate_up"));
});

gpuTest("swiglu handles operands split into differently placed row chunks", async (gpu) => {
  const T = 11, F = 16;
  const g = randn(T * F, 21);
  const u = randn(T * F, 22);
  const dh = randn(T * F, 23);
  const wantH = swiglu_forward(g, u);
  const want = swiglu_backward(dh, g, u);
  const rowBytes = F * 4;
  const gt = Tensor.from(gpu, g, [T, F], "f32", { maxChunkBytes: 3 * rowBytes });
  const ut = Tensor.from(gpu, u, [T, F], "f32", { maxChunkBytes: 4 * rowBytes });
  const h = Tensor.empty(gpu, [T, F], "f32", { maxChunkBytes: 5 * rowBytes });
  swigluForward(gt, ut, { out: h });
  const gateUp = Tensor.from(gpu, fuse(g, u, T, F), [T, 2 * F], "f32", { maxChunkBytes: 2 * 2 * rowBytes });
  const dgu = Tensor.empty(gpu, [T, 2 * F], "f32", { maxChunkBytes: 3 * 2 * rowBytes });
  swigluBackwardFused(Tensor.from(gpu, dh, [T, F], "f32", { maxChunkBytes: 6 * rowBytes }), gateUp, {
    out: dgu,
  });
  assert.ok(gt.chunked && ut.chunked && h.chunked && gateUp.chunked && dgu.chunked);
  const wantDgu = fuse(want.dg, want.du, T, F);
  assertClose(await h.readF32(), wantH, tol("f32", wantH, "h"));
  assertClose(await dgu.readF32(), wantDgu, tol("f32", wantDgu, "dgate_up"));
});

gpuTest("swiglu with f16 tensors computes in f32 and rounds once", async (gpu) => {
  const T = 7, F = 41;
  const g = roundF16(randn(T * F, 31, 2));
  const u = roundF16(randn(T * F, 32));
  const dh = roundF16(randn(T * F, 33));
  const wantH = swiglu_forward(g, u);
  const want = swiglu_backward(dh, g, u);
  const gt = Tensor.from(gpu, g, [T, F], "f16");
  const ut = Tensor.from(gpu, u, [T, F], "f16");
  const h = swigluForward(gt, ut);
  assert.equal(h.dtype, "f16");
  const { dg, du } = swigluBackward(Tensor.from(gpu, dh, [T, F], "f16"), gt, ut);
  assertClose(await h.readF32(), wantH, tol("f16", wantH, "h"));
  assertClose(await dg.readF32(), want.dg, tol("f16", want.dg, "dg"));
  assertClose(await du.readF32(), want.du, tol("f16", want.du, "du"));
}, { needsF16: true });

gpuTest("swiglu refuses mismatched shapes, mixed dtypes and aliased outputs", (gpu) => {
  const g = Tensor.zeros(gpu, [4, 6], "f32", { label: "gate" });
  const u = Tensor.zeros(gpu, [4, 5], "f32", { label: "up" });
  assert.throws(() => swigluForward(g, u), /u "up" has shape \[4,5\], expected \[4,6\]/);
  assert.throws(
    () => swigluForwardFused(Tensor.zeros(gpu, [4, 7], "f32", { label: "gu" })),
    /expected \[T, 2F\]/,
  );
  const u6 = Tensor.zeros(gpu, [4, 6], "f32");
  assert.throws(() => swigluForward(g, u6, { out: g }), /must not be an input/);
  const dh = Tensor.zeros(gpu, [4, 6], "f32");
  assert.throws(() => swigluBackward(dh, g, u6, { du: dh }), /must not be an input/);
  assert.throws(() => swigluBackward(dh, g, u6, { dg: dh, du: g }), /must not be an input/);
  const ids = Tensor.zeros(gpu, [4, 6], "u32", { label: "ids" });
  assert.throws(() => swigluForward(g, ids), /"ids" has dtype u32/);
});

gpuTest(
  "swigluBackward writes dg over dh with the bits of a separate output, chunks included",
  async (gpu) => {
    const T = 23, F = 19;
    const [g, u, dh] = [randn(T * F, 31), randn(T * F, 32), randn(T * F, 33)];
    const chunk = { maxChunkBytes: 5 * F * 4 };
    const gt = Tensor.from(gpu, g, [T, F], "f32", chunk);
    const ut = Tensor.from(gpu, u, [T, F]);
    const want = swigluBackward(Tensor.from(gpu, dh, [T, F]), gt, ut);
    const dhg = Tensor.from(gpu, dh, [T, F], "f32", { maxChunkBytes: 7 * F * 4 });
    const got = swigluBackward(dhg, gt, ut, { dg: dhg, du: nanTensor(gpu, [T, F]) });
    assert.equal(got.dg, dhg);
    assert.deepEqual(await got.dg.readF32(), await want.dg.readF32());
    assert.deepEqual(await got.du.readF32(), await want.du.readF32());
  },
);

gpuTest("swigluBackward reads f16 activations with f32 gradients as their exact f32 values", async (gpu) => {
  const T = 17, F = 24;
  const [g, u, dh] = [roundF16(randn(T * F, 41)), roundF16(randn(T * F, 42)), randn(T * F, 43)];
  // The same values in f32: what a cast of the f16 activations would give.
  const want = swigluBackward(
    Tensor.from(gpu, dh, [T, F]),
    Tensor.from(gpu, g, [T, F]),
    Tensor.from(gpu, u, [T, F]),
  );
  const g16 = Tensor.from(gpu, g, [T, F], "f16"), u16 = Tensor.from(gpu, u, [T, F], "f16");
  const dhg = Tensor.from(gpu, dh, [T, F]);
  const got = swigluBackward(dhg, g16, u16, { dg: dhg });
  assert.equal(got.du.dtype, "f32");
  assert.deepEqual(await got.dg.readF32(), await want.dg.readF32());
  assert.deepEqual(await got.du.readF32(), await want.du.readF32());
  const separate = swigluBackward(Tensor.from(gpu, dh, [T, F]), g16, u16);
  assert.deepEqual(await separate.dg.readF32(), await want.dg.readF32());
}, { needsF16: true });
