// GPU RMSNorm against kernels/reference/rmsnorm.ts on seeded random data.
// T = tokens, D = hidden. Tolerance |gpu − ref| ≤ atol + rtol·|ref| with scale = max|ref|:
// f32: atol 1e-5·scale, rtol 1e-4; f16 storage (f32 math, one rounding on store): atol 1e-3·scale,
// rtol 1e-2.
import assert from "node:assert/strict";
import { rmsnorm_backward, rmsnorm_forward } from "../../kernels/reference/rmsnorm.ts";
import { rmsnormBackward, rmsnormForward } from "../../kernels/ops/rmsnorm.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, randu, roundF16, type Tolerance } from "./_harness.ts";

function tol(dtype: "f32" | "f16", ref: ArrayLike<number>, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
  return dtype === "f32"
    ? { atol: 1e-5 * scale, rtol: 1e-4, name }
    : { atol: 1e-3 * scale, rtol: 1e-2, name };
}

for (const [T, D] of [[7, 37], [5, 300], [3, 1030]]) {
  gpuTest(`rmsnormForward matches the reference in f32 (T=${T}, D=${D})`, async (gpu) => {
    const eps = 1e-5;
    const x = randn(T * D, 11 + D, 2);
    const w = randu(D, 12 + D, 0.5, 1.5);
    const ref = rmsnorm_forward(x, w, { T, D, eps });
    const out = nanTensor(gpu, [T, D]);
    const rstdOut = nanTensor(gpu, [T], "f32", "rstd");
    const { y, rstd } = rmsnormForward(Tensor.from(gpu, x, [T, D]), Tensor.from(gpu, w, [D]), {
      eps,
      out,
      rstd: rstdOut,
    });
    assert.equal(y, out);
    assertClose(await y.readF32(), ref.y, tol("f32", ref.y, "y"));
    assertClose(await rstd.readF32(), ref.rstd, tol("f32", ref.rstd, "rstd"));
  });
}

gpuTest("rmsnormForward with a residual adds it into x in place and normalises the sum", async (gpu) => {
  const T = 10, D = 75, eps = 1e-6;
  const x = randn(T * D, 61);
  const res = randn(T * D, 62, 0.5);
  const w = randu(D, 63, 0.5, 1.5);
  const sum = x.map((v, i) => v + res[i]);
  const ref = rmsnorm_forward(sum, w, { T, D, eps });
  const xt = Tensor.from(gpu, x, [T, D], "f32", { maxChunkBytes: 4 * D * 4 });
  const { y, rstd } = rmsnormForward(xt, Tensor.from(gpu, w, [D]), {
    eps,
    residual: Tensor.from(gpu, res, [T, D]),
    out: nanTensor(gpu, [T, D]),
  });
  assertClose(await xt.readF32(), sum, tol("f32", sum, "x + res"));
  assertClose(await y.readF32(), ref.y, tol("f32", ref.y, "y"));
  assertClose(await rstd.readF32(), ref.rstd, tol("f32", ref.rstd, "rstd"));
});

gpuTest("rmsnormBackward matches the reference for dx and dw over several row blocks", async (gpu) => {
  // T = 100 rows make 4 blocks of 32 in the dw partial pass, so the second pass runs.
  const T = 100, D = 45, eps = 1e-6;
  const x = randn(T * D, 21);
  const w = randu(D, 22, -1.5, 1.5);
  const dy = randn(T * D, 23);
  const { rstd } = rmsnorm_forward(x, w, { T, D, eps });
  const ref = rmsnorm_backward(dy, x, w, rstd, { T, D, eps });
  const xt = Tensor.from(gpu, x, [T, D]);
  const wt = Tensor.from(gpu, w, [D]);
  const fwd = rmsnormForward(xt, wt, { eps });
  const { dx, dw } = rmsnormBackward(Tensor.from(gpu, dy, [T, D]), xt, wt, fwd.rstd, {
    dx: nanTensor(gpu, [T, D]),
    dw: nanTensor(gpu, [D]),
  });
  assertClose(await dx.readF32(), ref.dx, tol("f32", ref.dx, "dx"));
  assert.ok(dw !== null);
  assertClose(await dw.readF32(), ref.dw, tol("f32", ref.dw, "dw"));
});

gpuTest("rmsnormBackward accumulates into dx and dw when asked (one dw block)", async (gpu) => {
  const T = 9, D = 70, eps = 1e-5;
  const x = randn(T * D, 31);
  const w = randu(D, 32, 0.5, 1.5);
  const dy = randn(T * D, 33);
  const dx0 = randn(T * D, 34);
  const dw0 = randn(D, 35);
  const { rstd } = rmsnorm_forward(x, w, { T, D, eps });
  const ref = rmsnorm_backward(dy, x, w, rstd, { T, D, eps });
  const xt = Tensor.from(gpu, x, [T, D]);
  const wt = Tensor.from(gpu, w, [D]);
  const dx = Tensor.from(gpu, dx0, [T, D]);
  const dw = Tensor.from(gpu, dw0, [D]);
  const fwd = rmsnormForward(xt, wt, { eps });
  rmsnormBackward(Tensor.from(gpu, dy, [T, D]), xt, wt, fwd.rstd, {
    dx,
    accumulate: true,
    dw,
    accumulateDw: true,
  });
  const wantDx = ref.dx.map((v, i) => v + dx0[i]);
  const wantDw = ref.dw.map((v, i) => v + dw0[i]);
  assertClose(await dx.readF32(), wantDx, tol("f32", wantDx, "dx"));
  assertClose(await dw.readF32(), wantDw, tol("f32", wantDw, "dw"));
});

gpuTest("rmsnorm handles tensors split into differently placed row chunks", async (gpu) => {
  // x in chunks of 3 rows, y in chunks of 4 rows, dy in chunks of 5: every range boundary differs.
  const T = 13, D = 24, eps = 1e-5;
  const rowBytes = D * 4;
  const x = randn(T * D, 41);
  const w = randu(D, 42, 0.5, 1.5);
  const dy = randn(T * D, 43);
  const fwdRef = rmsnorm_forward(x, w, { T, D, eps });
  const bwdRef = rmsnorm_backward(dy, x, w, fwdRef.rstd, { T, D, eps });
  const xt = Tensor.from(gpu, x, [T, D], "f32", { maxChunkBytes: 3 * rowBytes });
  const y = Tensor.empty(gpu, [T, D], "f32", { maxChunkBytes: 4 * rowBytes });
  assert.ok(xt.chunked && y.chunked);
  const wt = Tensor.from(gpu, w, [D]);
  const { rstd } = rmsnormForward(xt, wt, { eps, out: y });
  const dyt = Tensor.from(gpu, dy, [T, D], "f32", { maxChunkBytes: 5 * rowBytes });
  const { dx, dw } = rmsnormBackward(dyt, xt, wt, rstd, { weightGrad: true });
  assertClose(await y.readF32(), fwdRef.y, tol("f32", fwdRef.y, "y"));
  assertClose(await dx.readF32(), bwdRef.dx, tol("f32", bwdRef.dx, "dx"));
  assertClose(await dw!.readF32(), bwdRef.dw, tol("f32", bwdRef.dw, "dw"));
});

gpuTest("rmsnorm with f16 activations and weight computes in f32 and rounds once", async (gpu) => {
  const T = 6, D = 130, eps = 1e-5;
  const x = roundF16(randn(T * D, 51, 3));
  const w = roundF16(randu(D, 52, 0.5, 1.5));
  const dy = roundF16(randn(T * D, 53));
  const fwdRef = rmsnorm_forward(x, w, { T, D, eps });
  const bwdRef = rmsnorm_backward(dy, x, w, fwdRef.rstd, { T, D, eps });
  const xt = Tensor.from(gpu, x, [T, D], "f16");
  const wt = Tensor.from(gpu, w, [D], "f16");
  const { y, rstd } = rmsnormForward(xt, wt, { eps });
  assert.equal(y.dtype, "f16");
  const { dx, dw } = rmsnormBackward(Tensor.from(gpu, dy, [T, D], "f16"), xt, wt, rstd, { weightGrad: true });
  assert.equal(dx.dtype, "f16");
  assertClose(await y.readF32(), fwdRef.y, tol("f16", fwdRef.y, "y"));
  assertClose(await rstd.readF32(), fwdRef.rstd, tol("f32", fwdRef.rstd, "rstd"));
  assertClose(await dx.readF32(), bwdRef.dx, tol("f16", bwdRef.dx, "dx"));
  // dw is f32: only its f16 inputs were rounded, and the reference sees the same values.
  assertClose(await dw!.readF32(), bwdRef.dw, tol("f32", bwdRef.dw, "dw"));
}, { needsF16: true });

gpuTest("rmsnorm refuses mismatched shapes and dtypes with the tensor named", (gpu) => {
  const x = Tensor.zeros(gpu, [4, 8], "f32", { label: "h" });
  const w = Tensor.zeros(gpu, [9], "f32", { label: "norm.weight" });
  assert.throws(
    () => rmsnormForward(x, w, { eps: 1e-5 }),
    /weight "norm\.weight" has shape \[9\], expected \[8\]/,
  );
  const w8 = Tensor.zeros(gpu, [8], "f32");
  const ids = Tensor.zeros(gpu, [4, 8], "u32", { label: "ids" });
  assert.throws(() => rmsnormForward(ids, w8, { eps: 1e-5 }), /"ids" has dtype u32/);
  const { rstd } = rmsnormForward(x, w8, { eps: 1e-5 });
  assert.throws(
    () => rmsnormBackward(x, x, w8, rstd, { accumulate: true }),
    /accumulate needs the dx tensor/,
  );
});
