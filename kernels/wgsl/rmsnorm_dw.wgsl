// RMSNorm backward, weight gradient: T = tokens, D = hidden, R = rows per block.
//
//   dy[T,D], x[T,D], rstd[T] -> dw[D] = Σ_t dy[t,d] · x[t,d] · rstd[t]
//
// A sum over T written by many workgroups needs either float atomics (WGSL has none) or two
// passes; this file holds both passes, race-free and deterministic:
//
// `partial`: one workgroup sums WG consecutive columns d over one block b of R rows,
//   [b·R, min(b·R + R, rows)); one invocation per column, so neighbouring invocations read
//   neighbouring elements of each row. Grid: (ceil(D/WG), blocks).
//   part[(p_row + b)·D + d] is written `=`, or `+=` when bit 0 of flags is set (a single-block
//   call writes dw directly this way).
// `reduce`: one invocation per column sums the blocks: dw[d] = Σ_b part[b·D + d], written `=`,
//   or `+=` when bit 0 of flags is set. Grid: ceil(D/WG).
//
// Sums are f32 whatever the storage types of dy (G) and x (A). WG is chosen by
// kernels/ops/rmsnorm.ts; offsets are in elements (see rmsnorm.wgsl).

alias A = f32;
alias G = f32;

override WG: u32;

struct PartialParams {
  rows: u32,
  D: u32,
  R: u32,
  flags: u32,
  dy_off: u32,
  x_off: u32,
  r_off: u32,
  p_row: u32,
}

@group(0) @binding(0) var<storage, read> dy: array<G>; // dy[T,D]
@group(0) @binding(1) var<storage, read> x: array<A>; // x[T,D]
@group(0) @binding(2) var<storage, read> rstd: array<f32>; // rstd[T]
@group(0) @binding(3) var<storage, read_write> part: array<f32>; // part[blocks,D]
@group(0) @binding(4) var<uniform> pu: PartialParams;

@compute @workgroup_size(WG)
fn partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
  let d = gid.x;
  if (d >= pu.D) {
    return;
  }
  let first = wg.y * pu.R;
  let last = min(first + pu.R, pu.rows);
  var s = 0.0;
  for (var t = first; t < last; t++) {
    s += f32(dy[pu.dy_off + t * pu.D + d]) * (f32(x[pu.x_off + t * pu.D + d]) * rstd[pu.r_off + t]);
  }
  let o = (pu.p_row + wg.y) * pu.D + d;
  if ((pu.flags & 1u) != 0u) {
    s += part[o];
  }
  part[o] = s;
}

struct ReduceParams {
  D: u32,
  blocks: u32,
  flags: u32,
}

@group(0) @binding(0) var<storage, read> parts: array<f32>; // part[blocks,D]
@group(0) @binding(1) var<storage, read_write> dw: array<f32>; // dw[D]
@group(0) @binding(2) var<uniform> ru: ReduceParams;

@compute @workgroup_size(WG)
fn reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
  let d = gid.x;
  if (d >= ru.D) {
    return;
  }
  var s = 0.0;
  for (var b = 0u; b < ru.blocks; b++) {
    s += parts[b * ru.D + d];
  }
  if ((ru.flags & 1u) != 0u) {
    s += dw[d];
  }
  dw[d] = s;
}
