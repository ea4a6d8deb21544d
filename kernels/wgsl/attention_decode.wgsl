// Attention of one new query per sequence against its key/value cache (KV-cache decoding).
//
// B = sequences, H = query heads, Hkv = kv heads (H multiple of Hkv, head h reads kv head
// h / (H / Hkv)), hd = head dim, L = cache length (slots per sequence), n_b = keys of sequence b
// (its tokens so far, the new one included), w = sliding window (0: none).
//
//   q[B,H,hd], K, V[B,L,Hkv,hd] (slots 0 .. n_b − 1 of sequence b filled), len[B] = n_b
//   keys of b: j in [lo, n_b), lo = max(0, n_b − w) with a window (Mistral: the new token at
//   position n_b − 1 sees positions > n_b − 1 − w, as the training kernel's mask), else 0
//   s_j = (q·K_j) / √hd;  out[b,h] = Σ_j softmax(s)_j · V_j     (f32 accumulation)
//
// One workgroup per (b, h), WG = hd invocations (hd ≤ 256): invocation d owns output dimension
// d. Keys go TK at a time: each invocation writes q_d·K_j[d] for the tile's keys into workgroup
// memory, invocation j < TK sums its key's row into a score, and every invocation then folds
// the tile's scores into the running max m and sum l (the same values in every invocation)
// and its own o_d += e^(s_j − m)·V_j[d] (rescaled when m grows). out = o / l.
//
// Host sizing: B·H workgroups (linear id wg.y·nwg.x + wg.x = b·H + h); q and out in Q's dtype,
// K and V in KV's; len u32.

alias Q = f32;
alias KV = f32;

override HD: u32;
const TK: u32 = 8u;

struct Params {
  B: u32,
  H: u32,
  Hkv: u32,
  L: u32,
  window: u32,
  scale: f32,
}

@group(0) @binding(0) var<storage, read> q: array<Q>; // [B,H,hd]
@group(0) @binding(1) var<storage, read> kc: array<KV>; // [B,L,Hkv,hd]
@group(0) @binding(2) var<storage, read> vc: array<KV>; // [B,L,Hkv,hd]
@group(0) @binding(3) var<storage, read> lens: array<u32>; // [B]
@group(0) @binding(4) var<storage, read_write> out: array<Q>; // [B,H,hd]
@group(0) @binding(5) var<uniform> u: Params;

var<workgroup> qs: array<f32, 256>;
var<workgroup> part: array<f32, 2048>; // TK·HD partial products (HD ≤ 256)
var<workgroup> scores: array<f32, TK>;

@compute @workgroup_size(HD)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) d: u32,
) {
  let id = wg.y * nwg.x + wg.x;
  if (id >= u.B * u.H) {
    return;
  }
  let b = id / u.H;
  let h = id - b * u.H;
  let kvh = h / (u.H / u.Hkv);
  let n = lens[b];
  var lo = 0u;
  if (u.window > 0u && n > u.window) {
    lo = n - u.window;
  }
  qs[d] = f32(q[(b * u.H + h) * HD + d]);
  workgroupBarrier();
  var m = -3.0e38;
  var l = 0.0;
  var o = 0.0;
  let rowStride = u.Hkv * HD;
  let base = b * u.L * rowStride + kvh * HD;
  for (var j0 = lo; j0 < n; j0 += TK) {
    let count = min(TK, n - j0);
    for (var t = 0u; t < count; t++) {
      part[t * HD + d] = qs[d] * f32(kc[base + (j0 + t) * rowStride + d]);
    }
    workgroupBarrier();
    if (d < count) {
      var s = 0.0;
      for (var e = 0u; e < HD; e++) {
        s += part[d * HD + e];
      }
      scores[d] = s * u.scale;
    }
    workgroupBarrier();
    var mt = m;
    for (var t = 0u; t < count; t++) {
      mt = max(mt, scores[t]);
    }
    let r = exp(m - mt);
    l *= r;
    o *= r;
    for (var t = 0u; t < count; t++) {
      let p = exp(scores[t] - mt);
      l += p;
      o += p * f32(vc[base + (j0 + t) * rowStride + d]);
    }
    m = mt;
    workgroupBarrier();
  }
  out[(b * u.H + h) * HD + d] = Q(o / l);
}
