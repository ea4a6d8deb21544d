// Rotary position embedding in the Hugging Face rotate_half layout (dimension i pairs with
// i + h2). T = tokens (rows of this dispatch), nH = heads rotated, hd = head dim, h2 = hd/2.
//
//   x[T, ·, hd] (rows of x_stride elements; heads x_head .. x_head + nH rotated), position[T],
//   freq[h2] -> y (rows of y_stride elements, heads from y_head)
//   angle = position[t] · inv_freq[i];  c = af·cos(angle),  s = sign · af·sin(angle)
//   y[i] = a·c − b·s,  y[i + h2] = b·c + a·s   with a = x[i], b = x[i + h2]
// sign = +1 is the forward; sign = −1 rotates by −angle, the backward (dx from dy). af is the
// attention factor (yarn's mscale; 1 otherwise).
//
// The angle is reduced to [−π, π] without f32 rounding growing with the position: freq[i]
// holds q = inv_freq/(2π) (turns per position) split into three f32 parts (q1, q2, q3), q1 and
// q2 of 12 significant bits, and the position is split as p = ph + pl with ph a multiple of
// 4096 and pl < 4096. Products of two 12-bit values are exact in f32, so fract(ph·q1),
// fract(ph·q2), fract(pl·q1) and fract(pl·q2) are exact; the q3 terms are below 2·q in size.
// The turns are summed modulo 1 and only then multiplied by 2π (exact for positions < 2²⁴).
//
// One invocation rotates one pair (t, head, i): index = (t·nH + head)·h2 + i. Host sizing:
// ceil(count / WG) workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y), WG chosen by
// kernels/ops/rope.ts. Entry `main` writes y `=` from x; entry `main_inplace` rotates xy in
// place. Offsets are in elements (a row range inside one chunk of a split tensor).

alias A = f32;

override WG: u32;

struct Params {
  count: u32, // T·nH·h2
  nH: u32,
  h2: u32,
  x_stride: u32,
  y_stride: u32,
  x_head: u32,
  y_head: u32,
  x_off: u32,
  y_off: u32,
  p_off: u32,
  af: f32,
  sign: f32,
}

const TAU: f32 = 6.283185307179586;

// v − round(v): the part of v in [−0.5, 0.5] turns.
fn wrap(v: f32) -> f32 {
  return v - round(v);
}

// (cos, sin) of position · inv_freq, with q the split turns per position (see above).
fn rotation(position: u32, q: vec4<f32>) -> vec2<f32> {
  let ph = f32(position >> 12u) * 4096.0;
  let pl = f32(position & 4095u);
  var t = wrap(ph * q.x);
  t = wrap(t + wrap(ph * q.y));
  t = wrap(t + ph * q.z);
  t = wrap(t + wrap(pl * q.x));
  t = wrap(t + pl * q.y);
  t = wrap(t + pl * q.z);
  let angle = t * TAU;
  return vec2<f32>(cos(angle), sin(angle));
}

struct Pair {
  // Element indices of a and b in x, then in y.
  xa: u32,
  ya: u32,
  // (c, s) with the attention factor and the sign applied.
  cs: vec2<f32>,
}

fn pair(index: u32, p: Params) -> Pair {
  let i = index % p.h2;
  let th = index / p.h2;
  let head = th % p.nH;
  let t = th / p.nH;
  let hd = 2u * p.h2;
  var r: Pair;
  r.xa = p.x_off + t * p.x_stride + (p.x_head + head) * hd + i;
  r.ya = p.y_off + t * p.y_stride + (p.y_head + head) * hd + i;
  let cs = rotation(position[p.p_off + t], freq[i]) * p.af;
  r.cs = vec2<f32>(cs.x, cs.y * p.sign);
  return r;
}

fn rotate(a: f32, b: f32, cs: vec2<f32>) -> vec2<f32> {
  return vec2<f32>(a * cs.x - b * cs.y, b * cs.x + a * cs.y);
}

@group(0) @binding(0) var<storage, read> position: array<u32>; // position[T]
@group(0) @binding(1) var<storage, read> freq: array<vec4<f32>>; // (q1, q2, q3, 0)[h2]

@group(0) @binding(2) var<storage, read> x: array<A>;
@group(0) @binding(3) var<storage, read_write> y: array<A>;
@group(0) @binding(4) var<uniform> u: Params;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let index = (wg.y * nwg.x + wg.x) * WG + lid;
  if (index >= u.count) {
    return;
  }
  let p = pair(index, u);
  let h2 = u.h2;
  let r = rotate(f32(x[p.xa]), f32(x[p.xa + h2]), p.cs);
  y[p.ya] = A(r.x);
  y[p.ya + h2] = A(r.y);
}

@group(0) @binding(2) var<storage, read_write> xy: array<A>;
@group(0) @binding(3) var<uniform> ui: Params;

@compute @workgroup_size(WG)
fn main_inplace(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let index = (wg.y * nwg.x + wg.x) * WG + lid;
  if (index >= ui.count) {
    return;
  }
  let p = pair(index, ui);
  let h2 = ui.h2;
  let r = rotate(f32(xy[p.xa]), f32(xy[p.xa + h2]), p.cs);
  xy[p.xa] = A(r.x);
  xy[p.xa + h2] = A(r.y);
}
