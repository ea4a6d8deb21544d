// AdamW step (torch.optim.AdamW, amsgrad off), in place on one f32 parameter tensor.
//
// One invocation per element i, step t ≥ 1, g = grad[i] · clip[1] (the clip scale of the
// global gradient norm; 1 without clipping):
//   p ← p · (1 − lr·λ)                                 (decoupled weight decay, first)
//   m ← β1·m + (1 − β1)·g
//   v ← β2·v + (1 − β2)·g²
//   p ← p − step_size · m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 − β1^t) and bc2_sqrt = sqrt(1 − β2^t), computed on the host in f64
// (as PyTorch does for its Python-float hyper-parameters), like 1 − lr·λ, 1 − β1 and 1 − β2.
//
// Host sizing: ceil(n / WG) workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y).
// param, m and v are written `=`; grad is read, then set to 0 when u.zero_grad = 1; clip is read.

override WG: u32;

struct Params {
  n: u32,
  zero_grad: u32,
  decay: f32,
  step_size: f32,
  beta1: f32,
  one_minus_beta1: f32,
  beta2: f32,
  one_minus_beta2: f32,
  bc2_sqrt: f32,
  eps: f32,
}

@group(0) @binding(0) var<storage, read_write> param: array<f32>; // p[n]
@group(0) @binding(1) var<storage, read_write> grad: array<f32>; // g[n]
@group(0) @binding(2) var<storage, read_write> m: array<f32>; // exp_avg[n]
@group(0) @binding(3) var<storage, read_write> v: array<f32>; // exp_avg_sq[n]
@group(0) @binding(4) var<storage, read> clip: array<f32>; // (norm, scale)
@group(0) @binding(5) var<uniform> u: Params;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * WG + lid;
  if (i >= u.n) {
    return;
  }
  let g = grad[i] * clip[1];
  let p = param[i] * u.decay;
  let mi = u.beta1 * m[i] + u.one_minus_beta1 * g;
  let vi = u.beta2 * v[i] + u.one_minus_beta2 * g * g;
  m[i] = mi;
  v[i] = vi;
  param[i] = p - u.step_size * mi / (sqrt(vi) / u.bc2_sqrt + u.eps);
  if (u.zero_grad != 0u) {
    grad[i] = 0.0;
  }
}
