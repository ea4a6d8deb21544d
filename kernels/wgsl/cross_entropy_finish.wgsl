// Cross-entropy over a vocabulary chunk, forward: the per-token log-sum-exp and the summed loss.
//
// T = tokens, V = vocab, N = normaliser (trained tokens of the whole accumulated batch).
// One workgroup of WG invocations: each strides over the tokens, writes
// lse[t] = m[t] + log s[t] and adds lse[t] − z_target[t] for every trained token (target not
// -100); a tree in workgroup memory sums the WG partial sums in a fixed order (deterministic),
// and invocation 0 writes loss = Σ / N. A target that is neither -100 nor in [0, V) adds NaN,
// so bad targets can never pass as a plausible loss.
//
// Host sizing: 1 workgroup, WG a power of two. state and targets are read; lse[T] is written
// `=`; loss[0] is written `=`, or `+=` with u.accumulate = 1 (micro-batches of one step).

override WG: u32;

struct Params {
  T: u32,
  V: u32,
  n: f32,
  accumulate: u32,
}

@group(0) @binding(0) var<storage, read> state: array<vec4<f32>>; // (m, s, z_target, 0)[T]
@group(0) @binding(1) var<storage, read> targets: array<i32>; // y[T]
@group(0) @binding(2) var<storage, read_write> lse: array<f32>; // lse[T]
@group(0) @binding(3) var<storage, read_write> loss: array<f32>; // loss[1]
@group(0) @binding(4) var<uniform> u: Params;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
  let nan = bitcast<f32>(0x7fc00000u);
  var acc = 0.0;
  for (var t = lid; t < u.T; t += WG) {
    let st = state[t];
    let l = st.x + log(st.y);
    lse[t] = l;
    let y = targets[t];
    if (y != -100) {
      if (y >= 0 && u32(y) < u.V) {
        acc += l - st.z;
      } else {
        acc += nan;
      }
    }
  }
  part[lid] = acc;
  workgroupBarrier();
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    if (lid < k) {
      part[lid] += part[lid + k];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var previous = 0.0;
    if (u.accumulate != 0u) {
      previous = loss[0];
    }
    loss[0] = previous + part[0] / u.n;
  }
}
