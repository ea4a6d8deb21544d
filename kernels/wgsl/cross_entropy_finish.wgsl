// Cross-entropy over a vocabulary chunk, forward: the per-token log-sum-exp, the summed loss and
// the count of correctly predicted tokens.
//
// T = tokens, V = vocab, N = normaliser (trained tokens of the whole accumulated batch).
// One workgroup of WG invocations: each strides over the tokens, writes
// lse[t] = m[t] + log s[t], adds lse[t] − z_target[t] for every trained token (target not
// -100) and counts the trained tokens whose argmax is the target; trees in workgroup memory sum
// the WG partial sums and counts in a fixed order (deterministic), and invocation 0 writes
// loss = Σ / N and correct = Σ [argmax = y]. A target that is neither -100 nor in [0, V) adds
// NaN, so bad targets can never pass as a plausible loss.
//
// Host sizing: 1 workgroup, WG a power of two, one dispatch per row chunk of the state (tokens
// [t0, t0 + T) of the batch). state and targets are read; lse[t0 .. t0 + T) is written `=`;
// loss[0] is written `=`, or `+=` with bit 0 of u.accumulate (micro-batches of one step, later
// state chunks); correct[0] likewise with bit 1.

override WG: u32;

struct Params {
  T: u32,
  V: u32,
  n: f32,
  accumulate: u32,
  t0: u32,
}

struct State {
  m: f32,
  s: f32,
  z_target: f32,
  argmax: u32,
}

@group(0) @binding(0) var<storage, read> state: array<State>; // tokens [t0, t0 + T)
@group(0) @binding(1) var<storage, read> targets: array<i32>; // y[T]
@group(0) @binding(2) var<storage, read_write> lse: array<f32>; // lse[T]
@group(0) @binding(3) var<storage, read_write> loss: array<f32>; // loss[1]
@group(0) @binding(4) var<storage, read_write> correct: array<u32>; // correct[1]
@group(0) @binding(5) var<uniform> u: Params;

var<workgroup> part: array<f32, WG>;
var<workgroup> hits: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
  let nan = bitcast<f32>(0x7fc00000u);
  var acc = 0.0;
  var count = 0u;
  for (var t = lid; t < u.T; t += WG) {
    let st = state[t];
    let l = st.m + log(st.s);
    lse[u.t0 + t] = l;
    let y = targets[u.t0 + t];
    if (y != -100) {
      if (y >= 0 && u32(y) < u.V) {
        acc += l - st.z_target;
        count += select(0u, 1u, st.argmax == u32(y));
      } else {
        acc += nan;
      }
    }
  }
  part[lid] = acc;
  hits[lid] = count;
  workgroupBarrier();
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    if (lid < k) {
      part[lid] += part[lid + k];
      hits[lid] += hits[lid + k];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    var previous = 0.0;
    if ((u.accumulate & 1u) != 0u) {
      previous = loss[0];
    }
    loss[0] = previous + part[0] / u.n;
    var before = 0u;
    if ((u.accumulate & 2u) != 0u) {
      before = correct[0];
    }
    correct[0] = before + hits[0];
  }
}
