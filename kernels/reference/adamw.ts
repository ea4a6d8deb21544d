/**
 * AdamW and gradient clipping references, following torch.optim.AdamW (amsgrad off, maximize off)
 * and torch.nn.utils.clip_grad_norm_ (2-norm). Updates are in place; the arithmetic is f64 and the
 * results are stored in the arrays' own precision.
 *
 * One AdamW step t (1-based) on each element, in PyTorch's order:
 *   p ← p · (1 − lr·λ)                              (decoupled weight decay, applied first)
 *   m ← β1·m + (1 − β1)·g
 *   v ← β2·v + (1 − β2)·g²
 *   p ← p − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
 * which is p − lr · m̂ / (sqrt(v̂) + eps) with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t).
 *
 * Clipping: total = sqrt(Σ over all gradients of g²); coef = max_norm / (total + 1e-6);
 * when coef < 1 every gradient is multiplied by coef. The norm before clipping is returned
 * (what the trainer logs as grad_norm).
 * @module
 */
import { expectLength, type Floats } from "./_dense.ts";

/** AdamW hyper-parameters (torch names: lr, betas, eps, weight_decay). */
export interface AdamWConfig {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** λ, decoupled. */
  weightDecay: number;
}

/** torch.optim.AdamW's defaults (lr must be chosen): betas (0.9, 0.999), eps 1e-8, weight_decay 0.01. */
export const TORCH_ADAMW_DEFAULTS: Omit<AdamWConfig, "lr"> = {
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
};

/**
 * One AdamW step, in place on param, m (exp_avg) and v (exp_avg_sq).
 *
 * @param param p[n]
 * @param grad g[n]
 * @param m m[n] (zeros before step 1)
 * @param v v[n] (zeros before step 1)
 * @param step t, 1 for the first step
 */
export function adamw_step(
  param: Floats,
  grad: Floats,
  m: Floats,
  v: Floats,
  step: number,
  config: AdamWConfig,
): void {
  const { lr, beta1, beta2, eps, weightDecay } = config;
  if (!Number.isInteger(step) || step < 1) {
    throw new RangeError(`Cannot take an AdamW step: step "${step}" must be an integer >= 1`);
  }
  const n = param.length;
  expectLength("grad (same shape as param)", grad, n);
  expectLength("exp_avg (same shape as param)", m, n);
  expectLength("exp_avg_sq (same shape as param)", v, n);
  const bc1 = 1 - Math.pow(beta1, step);
  const bc2Sqrt = Math.sqrt(1 - Math.pow(beta2, step));
  const stepSize = lr / bc1;
  for (let i = 0; i < n; i++) {
    const p = param[i] * (1 - lr * weightDecay);
    const g = grad[i];
    const mi = beta1 * m[i] + (1 - beta1) * g;
    const vi = beta2 * v[i] + (1 - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = p - stepSize * mi / (Math.sqrt(vi) / bc2Sqrt + eps);
  }
}

/** Global 2-norm of all gradients together: sqrt(Σ g²). */
export function grad_norm(grads: readonly Floats[]): number {
  let ss = 0;
  for (const g of grads) for (let i = 0; i < g.length; i++) ss += g[i] * g[i];
  return Math.sqrt(ss);
}

/**
 * clip_grad_norm_: scales all gradients in place by max_norm / (total + 1e-6) when that is below 1.
 *
 * @returns the norm before clipping, and the factor applied (1 when not clipped)
 */
export function clip_grad_norm(
  grads: readonly Floats[],
  maxNorm: number,
): { totalNorm: number; scale: number } {
  const totalNorm = grad_norm(grads);
  const coef = maxNorm / (totalNorm + 1e-6);
  const scale = Math.min(coef, 1);
  if (scale < 1) { for (const g of grads) for (let i = 0; i < g.length; i++) g[i] *= scale; }
  return { totalNorm, scale };
}
