/**
 * GPU AdamW against the CPU reference (torch.optim.AdamW), with and without weight decay and
 * gradient clipping, over steps t = 1..3.
 *
 * Tolerance, |gpu − ref| ≤ atol + rtol·|ref|: f32 atol 1e-5·scale, rtol 1e-4, scale = max |ref|
 * of the compared array (f32 arithmetic on the GPU against f64 arithmetic stored as f32).
 */
import assert from "node:assert/strict";
import { axpy } from "../../kernels/ops/elementwise.ts";
import { adamwState, adamwStep, type AdamWTensors } from "../../kernels/ops/adamw.ts";
import { gradNorm } from "../../kernels/ops/grad_norm.ts";
import { adamw_step, type AdamWConfig, clip_grad_norm } from "../../kernels/reference/adamw.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, randn } from "./_harness.ts";

const SHAPES = [[5, 7], [129], [3, 300]];

function tol(ref: Float32Array, name: string) {
  const scale = ref.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  return { atol: 1e-5 * scale, rtol: 1e-4, name };
}

async function runSteps(
  gpu: Parameters<Parameters<typeof gpuTest>[1]>[0],
  config: AdamWConfig,
  maxNorm?: number,
) {
  const size = (s: number[]) => s.reduce((a, b) => a * b, 1);
  const host = SHAPES.map((s, i) => ({
    param: randn(size(s), 10 + i),
    m: new Float32Array(size(s)),
    v: new Float32Array(size(s)),
  }));
  const tensors: AdamWTensors[] = SHAPES.map((s, i) => {
    const param = Tensor.from(gpu, host[i].param, s, "f32", { label: `p${i}` });
    return { param, grad: Tensor.zeros(gpu, s, "f32", { label: `g${i}` }), ...adamwState(param) };
  });
  for (let step = 1; step <= 3; step++) {
    const grads = SHAPES.map((s, i) => randn(size(s), 100 * step + i, 0.5 * step));
    // Two micro-batches of half the gradient each add up to it exactly (the last step zeroed it).
    tensors.forEach((t, i) => {
      using half = Tensor.from(gpu, grads[i].map((g) => g / 2), SHAPES[i], "f32");
      axpy(t.grad, 1, half);
      axpy(t.grad, 1, half);
    });
    const clip = maxNorm === undefined ? undefined : gradNorm(tensors.map((t) => t.grad), { maxNorm });
    adamwStep(tensors, { ...config, step, clip, zeroGrad: true });
    const refGrads = grads.map((g) => g.slice());
    if (maxNorm !== undefined) clip_grad_norm(refGrads, maxNorm);
    host.forEach((h, i) => adamw_step(h.param, refGrads[i], h.m, h.v, step, config));
    for (let i = 0; i < SHAPES.length; i++) {
      const [p, m, v, g] = await Promise.all(
        ["param", "m", "v", "grad"].map((k) => tensors[i][k as keyof AdamWTensors].readF32()),
      );
      assertClose(p, host[i].param, tol(host[i].param, `param ${i} at step ${step}`));
      assertClose(m, host[i].m, tol(host[i].m, `exp_avg ${i} at step ${step}`));
      assertClose(v, host[i].v, tol(host[i].v, `exp_avg_sq ${i} at step ${step}`));
      assert.ok(g.every((x) => x === 0), "the gradient is zeroed after the step");
    }
    clip?.destroy();
  }
  for (const t of tensors) for (const x of Object.values(t)) x.destroy();
}

const BASE: AdamWConfig = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 };

gpuTest("adamwStep matches torch.optim.AdamW over steps 1..3 without weight decay", async (gpu) => {
  await runSteps(gpu, BASE);
});

gpuTest("adamwStep applies decoupled weight decay as torch.optim.AdamW", async (gpu) => {
  await runSteps(gpu, { ...BASE, weightDecay: 0.1, beta1: 0.8, beta2: 0.95 });
});

gpuTest("adamwStep scales gradients by the clip scale of gradNorm", async (gpu) => {
  // The gradients' norm is about 16·step, so max_norm 1 clips every step (m and v show it).
  await runSteps(gpu, { ...BASE, weightDecay: 0.01 }, 1);
});

gpuTest("adamwStep keeps the gradient without zeroGrad", async (gpu) => {
  using param = Tensor.from(gpu, [1, 2, 3], [3], "f32");
  using grad = Tensor.from(gpu, [0.5, -0.5, 0], [3], "f32");
  const { m, v } = adamwState(param);
  adamwStep([{ param, grad, m, v }], { ...BASE, step: 1 });
  assert.deepEqual([...await grad.readF32()], [0.5, -0.5, 0]);
  const p = new Float32Array([1, 2, 3]);
  adamw_step(p, new Float32Array([0.5, -0.5, 0]), new Float32Array(3), new Float32Array(3), 1, BASE);
  assertClose(await param.readF32(), p, { atol: 1e-6, rtol: 1e-5, name: "param" });
  m.destroy();
  v.destroy();
});

gpuTest("adamwStep refuses a step below 1 and mismatched moments", (gpu) => {
  using param = Tensor.zeros(gpu, [3], "f32", { label: "p" });
  using grad = Tensor.zeros(gpu, [3], "f32");
  using m = Tensor.zeros(gpu, [3], "f32");
  using v = Tensor.zeros(gpu, [4], "f32", { label: "v4" });
  assert.throws(() => adamwStep([{ param, grad, m, v: m }], { ...BASE, step: 0 }), /step "0"/);
  assert.throws(() => adamwStep([{ param, grad, m, v }], { ...BASE, step: 1 }), /"v4" \[4\] differs/);
});
