// Token embedding: a gather of rows of the table (forward) and its scatter-add (backward).
// T = tokens (rows of this dispatch), V = vocab, D = hidden, C = vocab rows of the bound chunk.
//
// `forward`: ids[T], E[V,D] -> out[T,D] = E[ids[t], :]
//   The table may be split into row chunks (vocab ranges [v_start, v_start + C)), one dispatch
//   each; a dispatch writes only the tokens whose id lies in its chunk. The last chunk's dispatch
//   (last = 1) also writes NaN rows for ids ≥ V, so an id outside the vocabulary shows up as NaN
//   instead of stale data. One workgroup handles one token: its WG invocations stride over d.
//   Host sizing: T workgroups (linear id wg.y·nwg.x + wg.x). out is written `=`. The table's
//   storage type is E, the output's A (f16 tables are widened exactly, math is f32).
//
// `backward`: dout[T,D], ids -> dE[V,D] += Σ_{t : ids[t] = v} dout[t, :]
//   Race-free without atomics: the host groups the tokens by id (a stable sort) into `plan`:
//   uniq[G] (the distinct ids, ascending), starts[G + 1] and order[T] (token indices grouped by
//   id), so group k's tokens are order[starts[k] .. starts[k+1]). One workgroup sums one group:
//   its WG invocations stride over d and each adds its column sum to dE[uniq[k] − v_start, d].
//   Host sizing: one workgroup per group of the bound chunk (groups g_first .. g_first + G).
//   dE is f32 and written `+=` (the op clears it first unless asked to accumulate).

alias E = f32;
alias A = f32;

override WG: u32;

struct ForwardParams {
  rows: u32,
  D: u32,
  ids_off: u32,
  out_off: u32,
  v_start: u32,
  v_rows: u32,
  last: u32,
  nan: u32, // f32 quiet-NaN bits, passed at run time: a WGSL constant cannot be NaN
}

@group(0) @binding(0) var<storage, read> ids: array<u32>; // ids[T]
@group(0) @binding(1) var<storage, read> table: array<E>; // E[C,D]
@group(0) @binding(2) var<storage, read_write> out: array<A>; // out[T,D]
@group(0) @binding(3) var<uniform> fp: ForwardParams;

@compute @workgroup_size(WG)
fn forward(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= fp.rows) {
    return;
  }
  let id = ids[fp.ids_off + t];
  let ob = fp.out_off + t * fp.D;
  if (id >= fp.v_start && id - fp.v_start < fp.v_rows) {
    let eb = (id - fp.v_start) * fp.D;
    for (var d = lid; d < fp.D; d += WG) {
      out[ob + d] = A(f32(table[eb + d]));
    }
  } else if (fp.last != 0u && id >= fp.v_start + fp.v_rows) {
    let nan = A(bitcast<f32>(fp.nan));
    for (var d = lid; d < fp.D; d += WG) {
      out[ob + d] = nan;
    }
  }
}

struct BackwardParams {
  groups: u32,
  D: u32,
  g_first: u32,
  dout_off: u32,
  v_start: u32,
  uniq_off: u32,
  starts_off: u32,
  order_off: u32,
}

@group(0) @binding(0) var<storage, read> dout: array<A>; // dout[T,D]
@group(0) @binding(1) var<storage, read> plan: array<u32>; // uniq[G], starts[G+1], order[T]
@group(0) @binding(2) var<storage, read_write> dE: array<f32>; // dE[C,D]
@group(0) @binding(3) var<uniform> bp: BackwardParams;

@compute @workgroup_size(WG)
fn backward(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = wg.y * nwg.x + wg.x;
  if (i >= bp.groups) {
    return;
  }
  let k = bp.g_first + i;
  let row = (plan[bp.uniq_off + k] - bp.v_start) * bp.D;
  let s0 = plan[bp.starts_off + k];
  let s1 = plan[bp.starts_off + k + 1u];
  for (var d = lid; d < bp.D; d += WG) {
    var sum = 0.0;
    for (var s = s0; s < s1; s++) {
      sum += f32(dout[bp.dout_off + plan[bp.order_off + s] * bp.D + d]);
    }
    dE[row + d] += sum;
  }
}
