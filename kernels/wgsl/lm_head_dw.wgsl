// lm_head weight gradient, one vocabulary chunk: adds the chunk's product into its rows of dW.
//
// T = tokens, D = hidden, V = vocab, C = vocabulary rows in this chunk, v0 = its first row.
//   part[C,D] = dzᵀ[C,T] · x[T,D]          (matmul TN, f32; dz from cross_entropy_grad)
//   dW[v0 + c, d] += part[c, d]             for c < C, d < D
// The product cannot write into rows v0.. of dW itself (a matmul output is a whole tensor), so
// it lands in part and this kernel adds it: one invocation per element, each reading one f32
// and updating one f32 that no other invocation touches (no atomics; the same bits every run).
//
// Host sizing: ceil(C·D / WG) workgroups (linear id wg.y·nwg.x + wg.x, spread over x and y),
// one dispatch per vocabulary chunk, binding the row chunk of dW that holds rows [v0, v0 + C);
// u.off = (v0 − that chunk's first row)·D. part is read; dW is written `+=`.

override WG: u32;

struct Params {
  n: u32, // C·D
  off: u32, // element of the bound dW chunk where row v0 starts
}

@group(0) @binding(0) var<storage, read> part: array<f32>; // part[C,D]
@group(0) @binding(1) var<storage, read_write> dW: array<f32>; // a row chunk of dW[V,D]
@group(0) @binding(2) var<uniform> u: Params;

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
  dW[u.off + i] += part[i];
}
