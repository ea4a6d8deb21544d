/**
 * GPU global gradient norm and clip scale against the CPU reference (clip_grad_norm_).
 *
 * Tolerance, |gpu − ref| ≤ atol + rtol·|ref|: f32 atol 1e-5·scale, rtol 1e-4 with scale the
 * reference norm (the GPU sums squares in f32 in a different order from the f64 reference).
 */
import assert from "node:assert/strict";
import { CLIP_SCALE_INDEX, GRAD_NORM_INDEX, gradNorm } from "../../kernels/ops/grad_norm.ts";
import { clip_grad_norm, grad_norm } from "../../kernels/reference/adamw.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, randn } from "./_harness.ts";

/** Odd sizes: below one block, a block and one element, several blocks, and a 2-D tensor. */
const SHAPES = [[7], [33, 5], [4097], [3, 1000], [1], [40961]];

function makeGrads(seed: number): Float32Array[] {
  return SHAPES.map((shape, i) => randn(shape.reduce((a, b) => a * b, 1), seed + i, 0.1 * (i + 1)));
}

function tol(norm: number, name: string) {
  return { atol: 1e-5 * norm, rtol: 1e-4, name };
}

gpuTest("gradNorm matches the reference norm over several tensors of odd sizes", async (gpu) => {
  const host = makeGrads(1);
  const grads = host.map((g, i) => Tensor.from(gpu, g, SHAPES[i], "f32", { label: `g${i}` }));
  const out = gradNorm(grads);
  const got = await out.readF32();
  const ref = grad_norm(host);
  assertClose([got[GRAD_NORM_INDEX]], [ref], tol(ref, "norm"));
  assert.equal(got[CLIP_SCALE_INDEX], 1, "no max_norm: scale 1");
  // The gradients themselves are left as they were.
  assert.deepEqual(await grads[2].readF32(), host[2]);
  for (const t of [...grads, out]) t.destroy();
});

gpuTest("gradNorm computes the clip scale of clip_grad_norm_ on the GPU", async (gpu) => {
  const host = makeGrads(2);
  const norm = grad_norm(host);
  const grads = host.map((g, i) => Tensor.from(gpu, g, SHAPES[i], "f32"));
  for (const maxNorm of [norm / 3, norm * 2]) {
    using out = gradNorm(grads, { maxNorm });
    const got = await out.readF32();
    const ref = clip_grad_norm(host.map((g) => g.slice()), maxNorm);
    assertClose([got[GRAD_NORM_INDEX]], [ref.totalNorm], tol(ref.totalNorm, "norm"));
    assertClose([got[CLIP_SCALE_INDEX]], [ref.scale], {
      atol: 1e-6,
      rtol: 1e-4,
      name: `scale for ${maxNorm}`,
    });
  }
  for (const t of grads) t.destroy();
});

gpuTest("gradNorm reads tensors split into row chunks", async (gpu) => {
  const host = randn(37 * 130, 5);
  using g = Tensor.from(gpu, host, [37, 130], "f32", { label: "g", maxChunkBytes: 5 * 130 * 4 });
  assert.ok(g.chunked);
  using small = Tensor.from(gpu, [3, 4], [2], "f32");
  using out = gradNorm([g, small], { maxNorm: 1 });
  const got = await out.readF32();
  const ref = clip_grad_norm([host.slice(), new Float32Array([3, 4])], 1);
  assertClose([got[GRAD_NORM_INDEX]], [ref.totalNorm], tol(ref.totalNorm, "norm"));
  assertClose([got[CLIP_SCALE_INDEX]], [ref.scale], { atol: 1e-7, rtol: 1e-4, name: "scale" });
});

gpuTest("gradNorm writes into a given tensor and is zero for zero gradients", async (gpu) => {
  using g = Tensor.zeros(gpu, [100], "f32");
  using out = Tensor.from(gpu, [NaN, NaN], [2], "f32");
  gradNorm([g], { maxNorm: 1, out });
  assert.deepEqual([...await out.readF32()], [0, 1]);
});

gpuTest("gradNorm refuses f16 gradients, no gradients and a non-positive max_norm", (gpu) => {
  assert.throws(() => gradNorm([]), /no gradients/);
  using g = Tensor.zeros(gpu, [4], "f32");
  assert.throws(() => gradNorm([g], { maxNorm: 0 }), /max_norm "0"/);
  using h = Tensor.from(gpu, new Uint16Array(4), [4], "f16", { label: "h" });
  assert.throws(() => gradNorm([h]), /"h" has dtype f16/);
});
