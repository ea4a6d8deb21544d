// Global gradient norm, pass 2: the norm and the clip scale from the partial sums.
//
// One workgroup of WG invocations strides over the P partials, sums them in a tree (fixed
// order, deterministic), and invocation 0 writes
//   out[0] = norm  = sqrt(Σ partials)
//   out[1] = scale = min(1, max_norm / (norm + 1e-6))   (1 when u.clip = 0)
// as torch.nn.utils.clip_grad_norm_. AdamW multiplies every gradient by out[1].
//
// Host sizing: 1 workgroup, WG a power of two. partials is read; out[2] is written `=`.

override WG: u32;

struct Params {
  P: u32,
  max_norm: f32,
  clip: u32,
  pad: u32,
}

@group(0) @binding(0) var<storage, read> partials: array<f32>; // [P]
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // (norm, scale)
@group(0) @binding(2) var<uniform> u: Params;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
  var acc = 0.0;
  for (var i = lid; i < u.P; i += WG) {
    acc += partials[i];
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
    let norm = sqrt(part[0]);
    var scale = 1.0;
    if (u.clip != 0u) {
      scale = min(1.0, u.max_norm / (norm + 1e-6));
    }
    out[0] = norm;
    out[1] = scale;
  }
}
