import assert from "node:assert/strict";
import {
  adamw_step,
  clip_grad_norm,
  grad_norm,
  TORCH_ADAMW_DEFAULTS,
} from "../../../kernels/reference/adamw.ts";
import { assertClose } from "./_check.ts";

// Expected values: a Python transcription of torch.optim.AdamW's single-tensor update
// (param.mul_(1 − lr·wd); exp_avg.lerp_(g, 1 − β1); exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2);
//  param.addcdiv_(exp_avg, exp_avg_sq.sqrt() / sqrt(1 − β2^t) + eps, value=−lr / (1 − β1^t))).
Deno.test("adamw_step matches PyTorch's AdamW for two steps by hand", () => {
  const config = { ...TORCH_ADAMW_DEFAULTS, lr: 0.1, weightDecay: 0.01 };
  const p = Float64Array.of(1);
  const m = new Float64Array(1);
  const v = new Float64Array(1);
  // step 1, g = 0.5: p = 0.999 − 0.1 · 0.5 / (0.5 + 1e-8)
  adamw_step(p, Float64Array.of(0.5), m, v, 1, config);
  assertClose(p, [0.899000002], { atol: 0, rtol: 1e-15 });
  assertClose(m, [0.05], { atol: 0, rtol: 1e-14 });
  assertClose(v, [0.00025], { atol: 0, rtol: 1e-14 });
  // step 2, g = −1
  adamw_step(p, Float64Array.of(-1), m, v, 2, config);
  assertClose(p, [0.9347113542385653], { atol: 0, rtol: 1e-14 });
  assertClose(m, [-0.055], { atol: 0, rtol: 1e-14 });
  assertClose(v, [0.00124975], { atol: 0, rtol: 1e-14 });
});

Deno.test("adamw_step's first update is lr·sign(g) without weight decay, and nothing for g = 0", () => {
  const p = Float32Array.of(0.5, -2, 3);
  adamw_step(p, Float32Array.of(1e-3, -40, 0), new Float32Array(3), new Float32Array(3), 1, {
    ...TORCH_ADAMW_DEFAULTS,
    lr: 0.01,
    weightDecay: 0,
  });
  assertClose(p, [0.49, -1.99, 3], { atol: 1e-6, rtol: 0 });
});

Deno.test("adamw_step decays the weight before the Adam update (decoupled)", () => {
  // g = 0 leaves m = v = 0 and the Adam term 0: only p·(1 − lr·wd) remains
  const p = Float64Array.of(2);
  adamw_step(p, Float64Array.of(0), new Float64Array(1), new Float64Array(1), 3, {
    ...TORCH_ADAMW_DEFAULTS,
    lr: 0.5,
    weightDecay: 0.1,
  });
  assertClose(p, [2 * 0.95], { atol: 0, rtol: 1e-15 });
  assert.throws(() => adamw_step(p, p, p, p, 0, { ...TORCH_ADAMW_DEFAULTS, lr: 1 }), /step "0"/);
});

Deno.test("clip_grad_norm scales by max_norm / (norm + 1e-6) only when that is below 1", () => {
  const a = Float64Array.of(3);
  const b = Float64Array.of(0, 4);
  assert.equal(grad_norm([a, b]), 5);
  const clipped = clip_grad_norm([a, b], 1);
  assert.equal(clipped.totalNorm, 5);
  assertClose([a[0], b[1]], [0.599999880000024, 0.799999840000032], { atol: 0, rtol: 1e-15 });
  const c = Float64Array.of(3, 4);
  assert.deepEqual(clip_grad_norm([c], 10), { totalNorm: 5, scale: 1 });
  assert.deepEqual([...c], [3, 4]);
});
