// RMSNorm forward (LlamaRMSNorm): T = tokens (rows of this dispatch), D = hidden.
//
//   x[T,D], w[D] -> y[T,D] = x · rstd · w,   rstd[T] = 1 / sqrt(mean_d(x²) + eps)
//
// One workgroup normalises one row t. Its WG invocations each sum x² over the columns
// d ≡ lid (mod WG); a tree reduction in workgroup memory gives Σ_d x²; then each invocation
// writes its columns of y, and invocation 0 writes rstd[t] (kept for the backward). Sums are
// f32 whatever the storage types of x and y (A) and of w (W).
//
// Entry `main` reads x. Entry `main_residual` first adds the residual branch into the stream,
// x[t,d] += res[t,d] (written `+=`, in place, rounded to A), then normalises the sum it stored;
// each invocation re-reads only the columns it wrote itself, so no barrier is needed between.
//
// Host sizing: one workgroup per row (linear id wg.y·nwg.x + wg.x, spread over x and y when the
// rows exceed the per-dimension limit); WG is a power of two chosen by kernels/ops/rmsnorm.ts.
// y and rstd are written `=`. The *_off fields are element offsets of the dispatch's first row
// in its buffers (a row range inside one chunk of a split tensor).

alias A = f32;
alias W = f32;

override WG: u32;

struct Params {
  rows: u32,
  D: u32,
  eps: f32,
  x_off: u32,
  y_off: u32,
  r_off: u32,
  res_off: u32,
}

var<workgroup> partial: array<f32, WG>;

// Σ of v over the workgroup (every invocation calls it, in uniform control flow).
fn workgroup_sum(lid: u32, v: f32) -> f32 {
  partial[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) {
      partial[lid] += partial[lid + s];
    }
    workgroupBarrier();
  }
  return partial[0];
}

@group(0) @binding(0) var<storage, read> x: array<A>; // x[T,D]
@group(0) @binding(1) var<storage, read> weight: array<W>; // w[D]
@group(0) @binding(2) var<storage, read_write> y: array<A>; // y[T,D]
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>; // rstd[T]
@group(0) @binding(4) var<uniform> u: Params;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= u.rows) {
    return;
  }
  let xb = u.x_off + t * u.D;
  var ss = 0.0;
  for (var d = lid; d < u.D; d += WG) {
    let v = f32(x[xb + d]);
    ss += v * v;
  }
  let r = 1.0 / sqrt(workgroup_sum(lid, ss) / f32(u.D) + u.eps);
  let yb = u.y_off + t * u.D;
  for (var d = lid; d < u.D; d += WG) {
    y[yb + d] = A(f32(x[xb + d]) * r * f32(weight[d]));
  }
  if (lid == 0u) {
    rstd[u.r_off + t] = r;
  }
}

@group(0) @binding(0) var<storage, read_write> stream: array<A>; // x[T,D], += res
@group(0) @binding(4) var<storage, read> res: array<A>; // res[T,D]
@group(0) @binding(5) var<uniform> ur: Params;

@compute @workgroup_size(WG)
fn main_residual(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= ur.rows) {
    return;
  }
  let xb = ur.x_off + t * ur.D;
  let rb = ur.res_off + t * ur.D;
  var ss = 0.0;
  for (var d = lid; d < ur.D; d += WG) {
    let sum = A(f32(stream[xb + d]) + f32(res[rb + d]));
    stream[xb + d] = sum;
    let v = f32(sum);
    ss += v * v;
  }
  let r = 1.0 / sqrt(workgroup_sum(lid, ss) / f32(ur.D) + ur.eps);
  let yb = ur.y_off + t * ur.D;
  for (var d = lid; d < ur.D; d += WG) {
    y[yb + d] = A(f32(stream[xb + d]) * r * f32(weight[d]));
  }
  if (lid == 0u) {
    rstd[ur.r_off + t] = r;
  }
}
