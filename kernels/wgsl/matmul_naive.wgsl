// matmul_naive: the readable reference kernel, kept beside the tiled one (ops/matmul_wgsl.ts)
// for tests and for the benchmark's baseline.
//
// C[M,N] = alpha·op(A)·op(B) (+ bias[N]) (+ C), f32 only. One invocation computes one element
// of C by a plain loop over K; a 16×16 workgroup covers a 16×16 block of C.
// Host sizing: workgroups = (ceil(N/16), ceil(M/16), batch). C is written `=`, or `+=` when
// `accumulate` is 1. `layout_code`: 0 = NN (A[M,K], B[K,N]), 1 = NT (B[N,K]), 2 = TN (A[K,M]).
// Offsets and batch strides are in elements.

struct Params {
  M: u32, N: u32, K: u32, lda: u32,
  ldb: u32, ldc: u32, a_off: u32, b_off: u32,
  c_off: u32, bias_off: u32, stride_a: u32, stride_b: u32,
  stride_c: u32, alpha: f32, layout_code: u32, flags: u32, // flags: bit 0 accumulate, bit 1 bias
}

@group(0) @binding(0) var<storage, read> A: array<f32>;
@group(0) @binding(1) var<storage, read> B: array<f32>;
@group(0) @binding(2) var<storage, read> BIAS: array<f32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;
@group(0) @binding(4) var<uniform> u: Params;

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let n = gid.x;
  let m = gid.y;
  if (m >= u.M || n >= u.N) {
    return;
  }
  let a_base = u.a_off + gid.z * u.stride_a;
  let b_base = u.b_off + gid.z * u.stride_b;
  var sum = 0.0;
  for (var k = 0u; k < u.K; k++) {
    var a: f32;
    var b: f32;
    if (u.layout_code == 2u) {
      a = A[a_base + k * u.lda + m];
    } else {
      a = A[a_base + m * u.lda + k];
    }
    if (u.layout_code == 1u) {
      b = B[b_base + n * u.ldb + k];
    } else {
      b = B[b_base + k * u.ldb + n];
    }
    sum += a * b;
  }
  var value = sum * u.alpha;
  if ((u.flags & 2u) != 0u) {
    value += BIAS[u.bias_off + n];
  }
  let ci = u.c_off + gid.z * u.stride_c + m * u.ldc + n;
  if ((u.flags & 1u) != 0u) {
    value += C[ci];
  }
  C[ci] = value;
}
