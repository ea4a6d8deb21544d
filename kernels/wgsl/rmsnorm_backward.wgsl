// RMSNorm backward, input gradient: T = tokens (rows of this dispatch), D = hidden.
//
//   dy[T,D], x[T,D], w[D], rstd[T] -> dx[T,D]
//   s = Σ_d dy·w·x,  c = rstd · s / D  (= mean_d(dy·w·x̂), x̂ = x·rstd)
//   dx = rstd · (dy·w − x·rstd·c)
//
// One workgroup handles one row t: its WG invocations each sum dy·w·x over the columns
// d ≡ lid (mod WG), a tree reduction in workgroup memory gives s, then each invocation writes
// its columns of dx. Sums are f32 whatever the storage types of dy and dx (G), x (A), w (W).
//
// Host sizing: one workgroup per row (linear id wg.y·nwg.x + wg.x); WG is a power of two chosen
// by kernels/ops/rmsnorm.ts. dx is written `=`, or `+=` when bit 0 of flags is set (the norm's
// input gradient added to the residual stream's). Offsets are in elements (see rmsnorm.wgsl).

alias A = f32;
alias G = f32;
alias W = f32;

override WG: u32;

struct Params {
  rows: u32,
  D: u32,
  flags: u32,
  dy_off: u32,
  x_off: u32,
  r_off: u32,
  dx_off: u32,
}

@group(0) @binding(0) var<storage, read> dy: array<G>; // dy[T,D]
@group(0) @binding(1) var<storage, read> x: array<A>; // x[T,D]
@group(0) @binding(2) var<storage, read> weight: array<W>; // w[D]
@group(0) @binding(3) var<storage, read> rstd: array<f32>; // rstd[T]
@group(0) @binding(4) var<storage, read_write> dx: array<G>; // dx[T,D]
@group(0) @binding(5) var<uniform> u: Params;

var<workgroup> partial: array<f32, WG>;

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
  let gb = u.dy_off + t * u.D;
  let xb = u.x_off + t * u.D;
  var s = 0.0;
  for (var d = lid; d < u.D; d += WG) {
    s += f32(dy[gb + d]) * f32(weight[d]) * f32(x[xb + d]);
  }
  partial[lid] = s;
  workgroupBarrier();
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    if (lid < k) {
      partial[lid] += partial[lid + k];
    }
    workgroupBarrier();
  }
  let r = rstd[u.r_off + t];
  let c = r * partial[0] / f32(u.D);
  let ob = u.dx_off + t * u.D;
  let accumulate = (u.flags & 1u) != 0u;
  for (var d = lid; d < u.D; d += WG) {
    var v = r * (f32(dy[gb + d]) * f32(weight[d]) - f32(x[xb + d]) * r * c);
    if (accumulate) {
      v += f32(dx[ob + d]);
    }
    dx[ob + d] = G(v);
  }
}
