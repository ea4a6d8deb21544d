// LoRA dropout: applies the seeded keep mask of one linear layer's input, scaled by 1/(1 − p).
//
// The mask over the flattened [T,K] input, exactly as the CPU reference `dropout_mask`:
//   keep[i] = pcg_hash(i ^ pcg_hash(seed)) >= threshold,   threshold = floor(p · 2³²)
//   out[i]  = (u.accumulate ? out[i] : 0) + (keep[i] ? src[i] / (1 − p) : 0)
// Forward: z = dropout(x) before z·Aᵀ (out written `=`). Backward: dx += (dxa·A) ⊙ keep / (1 − p)
// (out added into). The mask is recomputed from the seed, never stored.
//
// One invocation per element. src and out may be row chunks of larger tensors: u.src_off and
// u.out_off are element offsets into the bound buffers, u.index0 the flat index of the range's
// first element (the mask is a function of the index in the whole [T,K] tensor).
// Host sizing: ceil(n / WG) workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y).
// The op replaces the `alias Src` line for an f16 source.

alias Src = f32;

override WG: u32;

struct Params {
  n: u32,
  src_off: u32,
  out_off: u32,
  index0: u32,
  seed: u32,
  threshold: u32,
  keep_prob: f32,
  accumulate: u32,
}

@group(0) @binding(0) var<storage, read> src: array<Src>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> u: Params;

// PCG hash (Jarzynski & Olano 2020), all arithmetic mod 2³².
fn pcg_hash(x: u32) -> u32 {
  let state = x * 747796405u + 2891336453u;
  let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
  return (word >> 22u) ^ word;
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * WG + lid;
  if (i >= u.n) {
    return;
  }
  let keep = pcg_hash((u.index0 + i) ^ pcg_hash(u.seed)) >= u.threshold;
  var value = 0.0;
  if (keep) {
    value = f32(src[u.src_off + i]) / u.keep_prob;
  }
  if (u.accumulate != 0u) {
    value += out[u.out_off + i];
  }
  out[u.out_off + i] = value;
}
