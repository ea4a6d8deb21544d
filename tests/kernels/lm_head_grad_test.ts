/**
 * GPU lm_head weight gradient (fused with cross-entropy, chunked over the vocabulary) against the
 * CPU reference `lm_head_cross_entropy_backward(..., wantDW = true, weights)`.
 *
 * T = tokens, D = hidden, V = vocab. The GPU's lse comes from crossEntropyForward, the reference's
 * from its own forward. dW starts from random values (the op adds to it), and the expected dW is
 * dW₀ + the reference's gradient. Tolerance |gpu − ref| ≤ atol + rtol·|ref| with scale = max |ref
 * gradient| (dW₀ is drawn at half that scale, so it cannot loosen the bound much): f32 atol 1e-5·scale,
 * rtol 1e-4; f16 x and W atol 1e-3·scale, rtol 1e-2 (the reference sees the same f16-rounded
 * inputs; the GPU's sums are f32). Measured on lavapipe: ≤ 6e-7·scale for f32 and for f16.
 */
import assert from "node:assert/strict";
import { crossEntropyBackward, crossEntropyForward } from "../../kernels/ops/cross_entropy.ts";
import { lmHeadWeightGrad, lmHeadWeightGradChunk } from "../../kernels/ops/lm_head_grad.ts";
import {
  count_trained,
  IGNORE_INDEX,
  lm_head_cross_entropy_backward,
  lm_head_cross_entropy_forward,
} from "../../kernels/reference/cross_entropy.ts";
import type { Gpu } from "../../kernels/device.ts";
import { type DType, Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, randn, randu, rng, roundF16, type Tolerance } from "./_harness.ts";

interface Case {
  T: number;
  D: number;
  V: number;
  /** Fraction of tokens whose target is -100. */
  ignored: number;
  seed: number;
}

const BASE: Case = { T: 37, D: 64, V: 1000, ignored: 0.3, seed: 21 };

function makeCase({ T, D, V, ignored, seed }: Case) {
  const x = randn(T * D, seed, 1);
  const W = randn(V * D, seed + 1, 0.5);
  const next = rng(seed + 2);
  const targets = Int32Array.from(
    { length: T },
    () => next() < ignored ? IGNORE_INDEX : Math.floor(next() * V),
  );
  // Per-token weights of a sequence objective: both signs, nonzero on ignored tokens too (unused).
  const weights = randu(T, seed + 3, -2, 2);
  return { x, W, targets, weights };
}
type Data = ReturnType<typeof makeCase>;

interface Grad {
  /** N, and the upstream gradient. */
  n: number;
  dloss: number;
  /** Use the per-token weights (then N = 1 and dloss = 1, as the model's weighted backward). */
  weighted: boolean;
}

/** The reference gradients: dW[V,D] and dhidden[T,D] (f64 sums, read as f32). */
function reference(c: Case, data: Data, g: Grad, f16: boolean) {
  const x = f16 ? roundF16(data.x) : data.x;
  const W = f16 ? roundF16(data.W) : data.W;
  const dims = { T: c.T, V: c.V, D: c.D, n: g.n, chunk: 128 };
  const { lse } = lm_head_cross_entropy_forward(x, W, data.targets, dims);
  const weights = g.weighted ? data.weights : null;
  const { dW, dhidden } = lm_head_cross_entropy_backward(
    x,
    W,
    data.targets,
    lse,
    dims,
    g.dloss,
    true,
    weights,
  );
  return { dW: dW!, dh: dhidden };
}

interface RunOptions {
  dtype?: DType;
  chunk?: number;
  /** Rows per buffer of W and of dW (splits them into row chunks). */
  wChunkRows?: number;
  dWChunkRows?: number;
  /** Also ask for dh. */
  dh?: boolean;
}

/** crossEntropyForward for lse, then lmHeadWeightGrad into a dW that starts at dW0. */
async function runGpu(gpu: Gpu, c: Case, data: Data, g: Grad, dW0: Float32Array, o: RunOptions = {}) {
  const { T, D, V } = c;
  const dtype = o.dtype ?? "f32";
  const bytes = dtype === "f16" ? 2 : 4;
  using x = Tensor.from(gpu, data.x, [T, D], dtype, { label: "x" });
  using W = Tensor.from(gpu, data.W, [V, D], dtype, {
    label: "W",
    maxChunkBytes: o.wChunkRows && o.wChunkRows * D * bytes,
  });
  using targets = Tensor.from(gpu, data.targets, [T], "i32", { label: "targets" });
  using weights = Tensor.from(gpu, data.weights, [T], "f32", { label: "weights" });
  using dW = Tensor.from(gpu, dW0, [V, D], "f32", {
    label: "dW",
    maxChunkBytes: o.dWChunkRows && o.dWChunkRows * D * 4,
  });
  if (o.wChunkRows !== undefined) assert.ok(W.chunked, "W is split into row chunks");
  if (o.dWChunkRows !== undefined) assert.ok(dW.chunked, "dW is split into row chunks");
  // Forward chunks of 128 rows: the same cuts with W whole or in buffers of 384 rows, so the
  // same lse bits, and the runs can be compared byte for byte.
  const fwd = crossEntropyForward(x, W, targets, { n: g.n, chunk: 128 });
  using lse = fwd.lse;
  fwd.loss.destroy();
  fwd.correct.destroy();
  using dh = Tensor.empty(gpu, [T, D], "f32", { label: "dh" });
  const out = lmHeadWeightGrad(x, W, targets, lse, {
    dW,
    n: g.n,
    dloss: g.dloss,
    weights: g.weighted ? weights : undefined,
    chunk: o.chunk,
    dh: o.dh ? dh : undefined,
  });
  assert.equal(out, dW, "returns the dW it added to");
  return { dW: await dW.readF32(), dh: o.dh ? await dh.readF32() : null };
}

function tolerance(grad: ArrayLike<number>, f16: boolean, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < grad.length; i++) scale = Math.max(scale, Math.abs(grad[i]));
  return f16 ? { atol: 1e-3 * scale, rtol: 1e-2, name } : { atol: 1e-5 * scale, rtol: 1e-4, name };
}

/** dW₀ of the magnitude of the gradient, so the tolerance's rtol part stays tight. */
function startValues(grad: ArrayLike<number>, seed: number): Float32Array {
  let scale = 0;
  for (let i = 0; i < grad.length; i++) scale = Math.max(scale, Math.abs(grad[i]));
  return randn(grad.length, seed, scale / 2);
}

/** Asserts dW = dW₀ + ref within the tolerance of the gradient's scale. */
function assertAdded(
  got: Float32Array,
  dW0: Float32Array,
  ref: ArrayLike<number>,
  f16: boolean,
  name: string,
) {
  const expected = Float64Array.from(dW0, (v, i) => v + ref[i]);
  assertClose(got, expected, { ...tolerance(ref, f16, name), name });
}

function equalBytes(a: Float32Array, b: Float32Array, name: string): void {
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  const i = ua.findIndex((v, k) => v !== ub[k]);
  assert.ok(ua.length === ub.length && i < 0, `${name}: element ${i} differs (${a[i]} vs ${b[i]})`);
}

const data = makeCase(BASE);
const trained = count_trained(data.targets);
/** SFT: this micro-batch holds half the step's trained tokens; dloss ≠ 1 to check it scales. */
const MEAN: Grad = { n: 2 * trained, dloss: 0.5, weighted: false };
/** A sequence objective: per-token weights, N = 1, as the model's weighted backward passes them. */
const WEIGHTED: Grad = { n: 1, dloss: 1, weighted: true };

Deno.test("the lm_head case has trained and ignored tokens", () => {
  assert.ok(trained > 0 && trained < BASE.T);
  assert.notEqual(BASE.V % 256, 0, "V is not a multiple of the chunk");
});

for (const dtype of ["f32", "f16"] as const) {
  for (const [what, g] of [["the mean loss's 1/N", MEAN], ["per-token weights", WEIGHTED]] as const) {
    gpuTest(
      `lmHeadWeightGrad adds the reference's dW with ${what} (${dtype} x and W, ignored tokens, V = 1000 in chunks of 256)`,
      async (gpu) => {
        const ref = reference(BASE, data, g, dtype === "f16");
        const dW0 = startValues(ref.dW, 7);
        const got = await runGpu(gpu, BASE, data, g, dW0, { dtype, chunk: 256 });
        assertAdded(got.dW, dW0, ref.dW, dtype === "f16", `dW ${dtype}`);
      },
      { needsF16: dtype === "f16" },
    );
  }
}

gpuTest("lmHeadWeightGrad is deterministic and gives the same bits for every chunk size", async (gpu) => {
  // T and D are below matmul's split-K threshold, and every tile of a kernel family gives the
  // same bits, so each dW element is the same sum whatever the chunk: the bytes must agree.
  const ref = reference(BASE, data, WEIGHTED, false);
  const dW0 = startValues(ref.dW, 8);
  const first = await runGpu(gpu, BASE, data, WEIGHTED, dW0, { chunk: 256 });
  const again = await runGpu(gpu, BASE, data, WEIGHTED, dW0, { chunk: 256 });
  equalBytes(again.dW, first.dW, "two runs");
  for (const chunk of [37, 1000]) {
    const got = await runGpu(gpu, BASE, data, WEIGHTED, dW0, { chunk });
    equalBytes(got.dW, first.dW, `chunk ${chunk} vs 256`);
  }
  const auto = await runGpu(gpu, BASE, data, WEIGHTED, dW0);
  using x = Tensor.empty(gpu, [BASE.T, BASE.D]);
  using W = Tensor.empty(gpu, [BASE.V, BASE.D]);
  assert.equal(lmHeadWeightGradChunk(x, W), BASE.V, "the default chunk is the whole vocabulary here");
  equalBytes(auto.dW, first.dW, "default chunk vs 256");
});

gpuTest("lmHeadWeightGrad cuts its chunks at the row chunks of W and of dW", async (gpu) => {
  const ref = reference(BASE, data, MEAN, false);
  const dW0 = startValues(ref.dW, 9);
  const whole = await runGpu(gpu, BASE, data, MEAN, dW0, { chunk: 256 });
  // W in buffers of 384 rows, dW of 500: chunks [0,256) [256,384) [384,500) [500,640) ...
  const split = await runGpu(gpu, BASE, data, MEAN, dW0, { chunk: 256, wChunkRows: 384, dWChunkRows: 500 });
  assertAdded(split.dW, dW0, ref.dW, false, "dW split");
  equalBytes(split.dW, whole.dW, "split vs whole");
});

gpuTest("lmHeadWeightGrad's dh is crossEntropyBackward's, bit for bit, in the same pass", async (gpu) => {
  const ref = reference(BASE, data, WEIGHTED, false);
  const dW0 = startValues(ref.dW, 10);
  const got = await runGpu(gpu, BASE, data, WEIGHTED, dW0, { chunk: 256, dh: true });
  const alone = await runGpu(gpu, BASE, data, WEIGHTED, dW0, { chunk: 256 });
  equalBytes(got.dW, alone.dW, "dW with and without dh");
  assertClose(got.dh!, ref.dh, tolerance(ref.dh, false, "dh"));
  // The backward on its own, with the same chunks.
  using x = Tensor.from(gpu, data.x, [BASE.T, BASE.D], "f32");
  using W = Tensor.from(gpu, data.W, [BASE.V, BASE.D], "f32");
  using targets = Tensor.from(gpu, data.targets, [BASE.T], "i32");
  using weights = Tensor.from(gpu, data.weights, [BASE.T], "f32");
  const fwd = crossEntropyForward(x, W, targets, { n: 1, chunk: 128 });
  using lse = fwd.lse;
  fwd.loss.destroy();
  fwd.correct.destroy();
  using dh = crossEntropyBackward(x, W, targets, lse, { n: 1, weights, chunk: 256 });
  equalBytes(got.dh!, await dh.readF32(), "dh vs crossEntropyBackward");
});

gpuTest("lmHeadWeightGrad refuses operands of the wrong shape or dtype, and N ≤ 0", (gpu) => {
  const { T, D, V } = BASE;
  using x = Tensor.empty(gpu, [T, D], "f32", { label: "x" });
  using W = Tensor.empty(gpu, [V, D], "f32", { label: "W" });
  using targets = Tensor.empty(gpu, [T], "i32", { label: "targets" });
  using lse = Tensor.empty(gpu, [T], "f32", { label: "lse" });
  using dW = Tensor.empty(gpu, [V, D], "f32", { label: "dW" });
  using dWHalf = Tensor.empty(gpu, [V, D], "u32", { label: "dW_u32" });
  using short = Tensor.empty(gpu, [T - 1], "f32", { label: "short" });
  const run = (o: Partial<Parameters<typeof lmHeadWeightGrad>[4]>, l = lse) =>
    lmHeadWeightGrad(x, W, targets, l, { dW, n: 1, ...o });
  assert.throws(() => run({ dW: dWHalf }), /dW "dW_u32" is u32\[1000,64\]; f32 \[1000,64\] expected/);
  assert.throws(() => run({ weights: short }), /weights "short" is f32\[36\]; f32 \[37\] expected/);
  assert.throws(() => run({}, short), /lse "short"/);
  assert.throws(() => run({ n: 0 }), /the normaliser N "0" must be positive/);
  assert.throws(() => run({ chunk: 0 }), /chunk "0" must be a positive integer/);
});
