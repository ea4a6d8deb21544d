// Cross-entropy over a vocabulary chunk, forward: the online log-sum-exp and argmax update of one
// chunk.
//
// T = tokens, C = vocabulary rows in this chunk, v0 = first vocabulary row of the chunk.
// One workgroup handles one token t: its WG invocations stride over the chunk's logits
// z[t, 0..C), each keeping a running (max m, sum s = Σ e^(z − m)) and the vocabulary index a of
// its first maximum, then combine the triples in a tree in workgroup memory:
//   (m1, s1) ⊕ (m2, s2) = (m, s1·e^(m1 − m) + s2·e^(m2 − m)), m = max(m1, m2)
//   a = the index of the larger max, the lower index when the maxima are equal
// so the argmax resolves ties to the lowest index (torch.argmax), whatever the chunking.
// Invocation 0 merges the chunk's triple into the token's running state by the same rules and,
// when the target y[t] lies in [v0, v0 + C), records its logit z[t, y − v0]. The argmax never
// enters m or s: the loss is the same bits with or without it. A NaN logit is never the argmax.
//
// Host sizing: one dispatch per row chunk of the state, tokens [t0, t0 + T) of the batch: T
// workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y), WG a power of two. logits and
// targets (of the whole batch) are read; the chunk's state[t − t0] = (m, s, z_target, argmax) is
// written `=` (u.first = 1, the first vocabulary chunk) or merged into (later chunks).

override WG: u32;

struct Params {
  T: u32,
  C: u32,
  v0: u32,
  first: u32,
  t0: u32,
}

struct State {
  m: f32,
  s: f32,
  z_target: f32,
  argmax: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>; // z[T,C]
@group(0) @binding(1) var<storage, read> targets: array<i32>; // y[T], -100 = ignored
@group(0) @binding(2) var<storage, read_write> state: array<State>; // tokens [t0, t0 + T)
@group(0) @binding(3) var<uniform> u: Params;

// Stands for −∞ in a running max: e^(LOWEST − m) is 0 for any real m, and 0·e^0 stays 0.
const LOWEST: f32 = -3.0e38;
// The argmax of no logit yet: above every vocabulary index, so any real index wins a tie with it.
const NONE: u32 = 0xffffffffu;

var<workgroup> wm: array<f32, WG>;
var<workgroup> ws: array<f32, WG>;
var<workgroup> wa: array<u32, WG>;

fn combine(m1: f32, s1: f32, m2: f32, s2: f32) -> vec2<f32> {
  let m = max(m1, m2);
  return vec2<f32>(m, s1 * exp(m1 - m) + s2 * exp(m2 - m));
}

// The argmax of two parts with maxima m1, m2 and argmaxes a1, a2: ties go to the lower index.
fn pick(m1: f32, a1: u32, m2: f32, a2: u32) -> u32 {
  if (m2 > m1) {
    return a2;
  }
  if (m1 > m2) {
    return a1;
  }
  return min(a1, a2);
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
  let row = (u.t0 + t) * u.C;
  var m = LOWEST;
  var s = 0.0;
  var a = NONE;
  // c rises, and only a strictly larger logit moves the argmax: the first maximum is kept.
  for (var c = lid; c < u.C; c += WG) {
    let z = logits[row + c];
    if (z > m) {
      s = s * exp(m - z) + 1.0;
      m = z;
      a = u.v0 + c;
    } else {
      s += exp(z - m);
    }
  }
  wm[lid] = m;
  ws[lid] = s;
  wa[lid] = a;
  workgroupBarrier();
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    if (lid < k) {
      let r = combine(wm[lid], ws[lid], wm[lid + k], ws[lid + k]);
      wa[lid] = pick(wm[lid], wa[lid], wm[lid + k], wa[lid + k]);
      wm[lid] = r.x;
      ws[lid] = r.y;
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var st = State(LOWEST, 0.0, 0.0, NONE);
    if (u.first == 0u) {
      st = state[t];
    }
    let r = combine(st.m, st.s, wm[0], ws[0]);
    let best = pick(st.m, st.argmax, wm[0], wa[0]);
    let c = targets[u.t0 + t] - i32(u.v0);
    if (c >= 0 && c < i32(u.C)) {
      st.z_target = logits[row + u32(c)];
    }
    state[t] = State(r.x, r.y, st.z_target, best);
  }
}
