// Cross-entropy over a vocabulary chunk, forward: the online log-sum-exp update of one chunk.
//
// T = tokens, C = vocabulary rows in this chunk, v0 = first vocabulary row of the chunk.
// One workgroup handles one token t: its WG invocations stride over the chunk's logits
// z[t, 0..C), each keeping a running (max m, sum s = Σ e^(z − m)), then combine the pairs in a
// tree in workgroup memory: (m1, s1) ⊕ (m2, s2) = (m, s1·e^(m1 − m) + s2·e^(m2 − m)), m = max.
// Invocation 0 merges the chunk's pair into the token's running state and, when the target
// y[t] lies in [v0, v0 + C), records its logit z[t, y − v0].
//
// Host sizing: T workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y), WG a power of
// two. logits and targets are read; state[t] = (m, s, z_target, 0) is written `=` (u.first = 1,
// the first chunk) or merged into (later chunks).

override WG: u32;

struct Params {
  T: u32,
  C: u32,
  v0: u32,
  first: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>; // z[T,C]
@group(0) @binding(1) var<storage, read> targets: array<i32>; // y[T], -100 = ignored
@group(0) @binding(2) var<storage, read_write> state: array<vec4<f32>>; // (m, s, z_target, 0)[T]
@group(0) @binding(3) var<uniform> u: Params;

// Stands for −∞ in a running max: e^(LOWEST − m) is 0 for any real m, and 0·e^0 stays 0.
const LOWEST: f32 = -3.0e38;

var<workgroup> wm: array<f32, WG>;
var<workgroup> ws: array<f32, WG>;

fn combine(m1: f32, s1: f32, m2: f32, s2: f32) -> vec2<f32> {
  let m = max(m1, m2);
  return vec2<f32>(m, s1 * exp(m1 - m) + s2 * exp(m2 - m));
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= u.T) {
    return;
  }
  let row = t * u.C;
  var m = LOWEST;
  var s = 0.0;
  for (var c = lid; c < u.C; c += WG) {
    let z = logits[row + c];
    if (z > m) {
      s = s * exp(m - z) + 1.0;
      m = z;
    } else {
      s += exp(z - m);
    }
  }
  wm[lid] = m;
  ws[lid] = s;
  workgroupBarrier();
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    if (lid < k) {
      let r = combine(wm[lid], ws[lid], wm[lid + k], ws[lid + k]);
      wm[lid] = r.x;
      ws[lid] = r.y;
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var st = vec4<f32>(LOWEST, 0.0, 0.0, 0.0);
    if (u.first == 0u) {
      st = state[t];
    }
    let r = combine(st.x, st.y, wm[0], ws[0]);
    let c = targets[t] - i32(u.v0);
    if (c >= 0 && c < i32(u.C)) {
      st.z = logits[row + u32(c)];
    }
    state[t] = vec4<f32>(r.x, r.y, st.z, 0.0);
  }
}
