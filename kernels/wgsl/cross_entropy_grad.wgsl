// Cross-entropy over a vocabulary chunk, backward: logits become dlogits, in place.
//
// T = tokens, C = vocabulary rows in this chunk, v0 = first vocabulary row of the chunk.
//   dz[t,c] = scale · (e^(z[t,c] − lse[t]) − [v0 + c = y[t]])   for trained t (y[t] ≠ -100)
//   dz[t,c] = 0                                                  for ignored t
// with scale = dloss / N; with u.weighted = 1, scale · w[t] instead (a sequence objective's
// per-token weight ∂loss/∂(−logp[t]), e.g. DPO's). One invocation per element of the chunk.
//
// Host sizing: ceil(T·C / WG) workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y).
// targets, lse and weights are read (weights only when weighted; unweighted calls bind lse in
// its place); logits[T,C] is overwritten `=` with dlogits.

override WG: u32;

struct Params {
  T: u32,
  C: u32,
  v0: u32,
  scale: f32,
  weighted: u32,
}

@group(0) @binding(0) var<storage, read_write> logits: array<f32>; // z[T,C] in, dz[T,C] out
@group(0) @binding(1) var<storage, read> targets: array<i32>; // y[T]
@group(0) @binding(2) var<storage, read> lse: array<f32>; // lse[T]
@group(0) @binding(3) var<storage, read> weights: array<f32>; // w[T]
@group(0) @binding(4) var<uniform> u: Params;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * WG + lid;
  if (i >= u.T * u.C) {
    return;
  }
  let t = i / u.C;
  let c = i - t * u.C;
  let y = targets[t];
  var g = 0.0;
  if (y != -100) {
    let p = exp(logits[i] - lse[t]);
    var scale = u.scale;
    if (u.weighted != 0u) {
      scale *= weights[t];
    }
    g = scale * (p - select(0.0, 1.0, i32(u.v0 + c) == y));
  }
  logits[i] = g;
}
