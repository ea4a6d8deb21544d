// Global gradient norm, pass 1: per-workgroup partial sums of squares of one f32 buffer.
//
// One workgroup reduces one block of WG·ITEMS consecutive elements: invocation l adds g² for
// elements block·WG·ITEMS + k·WG + l (k < ITEMS, coalesced), then a tree in workgroup memory
// sums the WG values in a fixed order. No atomics: each workgroup owns one partial.
//
// Host sizing: u.groups = ceil(n / (WG·ITEMS)) workgroups (linear id wg.y·nwg.x + wg.x, spread
// over x and y; ids ≥ groups return). grad is read; partials[u.base + id] is written `=`,
// u.base placing this buffer's partials after those of the buffers before it.

override WG: u32;
override ITEMS: u32;

struct Params {
  n: u32,
  base: u32,
  groups: u32,
  pad: u32,
}

@group(0) @binding(0) var<storage, read> grad: array<f32>; // g[n]
@group(0) @binding(1) var<storage, read_write> partials: array<f32>; // Σ g² per block
@group(0) @binding(2) var<uniform> u: Params;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let id = wg.y * nwg.x + wg.x;
  if (id >= u.groups) {
    return;
  }
  let start = id * WG * ITEMS;
  var acc = 0.0;
  for (var k = 0u; k < ITEMS; k++) {
    let i = start + k * WG + lid;
    if (i < u.n) {
      let g = grad[i];
      acc += g * g;
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
    partials[u.base + id] = part[0];
  }
}
