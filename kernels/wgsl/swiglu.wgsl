// SwiGLU, the activation between the projections of the Llama / Mistral / Qwen2 MLP.
// T = tokens (rows of this dispatch), F = ffn (intermediate) size.
//
//   forward:  g[T,F], u[T,F] -> h[T,F] = silu(g) ⊙ u,   silu(g) = g·σ(g),  σ(g) = 1 / (1 + e^(−g))
//   backward: dh[T,F] -> dg = dh ⊙ u ⊙ σ·(1 + g·(1 − σ)),  du = dh ⊙ silu(g)
//
// Every operand is a view: element (t, j) of operand X sits at X_off + t·X_stride + j, so g and u
// may be the two halves of one fused gate_up[T,2F] buffer (bound twice, read-only), and the
// backward may write dg and du into the two halves of one dgate_up[T,2F] buffer (bit 0 of flags:
// du goes through the dg binding; the du binding is then not touched).
//
// `backward_in_place` writes dg over dh (one buffer, read then written by the same invocation),
// which saves a [T,F] buffer in the MLP's backward.
//
// One invocation computes one element (t, j), index = t·F + j. Host sizing: ceil(count / WG)
// workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y), WG chosen by
// kernels/ops/swiglu.ts. h, dg and du are written `=`. Math is f32 whatever the storage types:
// A for g, u and h; D for the gradients dh, dg, du (f32 gradients of f16 activations read the
// activations as they are, without an f32 copy).

alias A = f32;
alias D = f32;

override WG: u32;

fn sigmoid(v: f32) -> f32 {
  return 1.0 / (1.0 + exp(-v));
}

struct ForwardParams {
  count: u32, // T·F
  F: u32,
  g_off: u32,
  g_stride: u32,
  u_off: u32,
  u_stride: u32,
  h_off: u32,
  h_stride: u32,
}

@group(0) @binding(0) var<storage, read> g: array<A>; // g[T,F]
@group(0) @binding(1) var<storage, read> up: array<A>; // u[T,F]
@group(0) @binding(2) var<storage, read_write> h: array<A>; // h[T,F]
@group(0) @binding(3) var<uniform> fp: ForwardParams;

@compute @workgroup_size(WG)
fn forward(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let index = (wg.y * nwg.x + wg.x) * WG + lid;
  if (index >= fp.count) {
    return;
  }
  let t = index / fp.F;
  let j = index % fp.F;
  let gv = f32(g[fp.g_off + t * fp.g_stride + j]);
  let uv = f32(up[fp.u_off + t * fp.u_stride + j]);
  h[fp.h_off + t * fp.h_stride + j] = A(gv * sigmoid(gv) * uv);
}

struct BackwardParams {
  count: u32, // T·F
  F: u32,
  flags: u32,
  dh_off: u32,
  dh_stride: u32,
  g_off: u32,
  g_stride: u32,
  u_off: u32,
  u_stride: u32,
  dg_off: u32,
  dg_stride: u32,
  du_off: u32,
  du_stride: u32,
}

@group(0) @binding(0) var<storage, read> dh: array<D>; // dh[T,F]
@group(0) @binding(1) var<storage, read> bg: array<A>; // g[T,F]
@group(0) @binding(2) var<storage, read> bu: array<A>; // u[T,F]
@group(0) @binding(3) var<storage, read_write> dg: array<D>; // dg[T,F]
@group(0) @binding(4) var<storage, read_write> du: array<D>; // du[T,F]
@group(0) @binding(5) var<uniform> bp: BackwardParams;

/** (dg, du) at element (t, j) from dh's value d there. */
fn swiglu_grad(d: f32, t: u32, j: u32) -> vec2<f32> {
  let gv = f32(bg[bp.g_off + t * bp.g_stride + j]);
  let uv = f32(bu[bp.u_off + t * bp.u_stride + j]);
  let s = sigmoid(gv);
  return vec2<f32>(d * uv * s * (1.0 + gv * (1.0 - s)), d * gv * s);
}

@compute @workgroup_size(WG)
fn backward(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let index = (wg.y * nwg.x + wg.x) * WG + lid;
  if (index >= bp.count) {
    return;
  }
  let t = index / bp.F;
  let j = index % bp.F;
  let grad = swiglu_grad(f32(dh[bp.dh_off + t * bp.dh_stride + j]), t, j);
  dg[bp.dg_off + t * bp.dg_stride + j] = D(grad.x);
  let o = bp.du_off + t * bp.du_stride + j;
  if ((bp.flags & 1u) != 0u) {
    dg[o] = D(grad.y);
  } else {
    du[o] = D(grad.y);
  }
}

@group(0) @binding(0) var<storage, read_write> dhg: array<D>; // dh[T,F] in, dg[T,F] out

@compute @workgroup_size(WG)
fn backward_in_place(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let index = (wg.y * nwg.x + wg.x) * WG + lid;
  if (index >= bp.count) {
    return;
  }
  let t = index / bp.F;
  let j = index % bp.F;
  let at = bp.dh_off + t * bp.dh_stride + j;
  let grad = swiglu_grad(f32(dhg[at]), t, j);
  dhg[at] = D(grad.x);
  du[bp.du_off + t * bp.du_stride + j] = D(grad.y);
}
