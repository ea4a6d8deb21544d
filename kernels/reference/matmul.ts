/**
 * CPU reference of the matmul kernels: plain loops, f64 accumulation.
 *
 * M, N, K as in C[M,N] = alpha·op(A)[M,K]·op(B)[K,N] (+ bias[N]) (+ C0); Bt = batch.
 * Layouts (row-major): NN a[M,K]·b[K,N]; NT a[M,K]·b[N,K]ᵀ; TN a[K,M]ᵀ·b[K,N].
 * With `batch`, a, c and (when `bBatched`) b hold Bt matrices back to back.
 * @module
 */

/** Operand layouts: N = as stored, T = transposed. */
export type MatmulLayout = "NN" | "NT" | "TN";

/** Problem description for the reference. */
export interface MatmulRefOptions {
  layout: MatmulLayout;
  M: number;
  N: number;
  K: number;
  /** Number of products (default 1). */
  batch?: number;
  /** Whether b holds one matrix per batch entry (default: shared). */
  bBatched?: boolean;
  /** Scale of the product (default 1). */
  alpha?: number;
  /** bias[N] added to every row. */
  bias?: Float32Array;
  /** Initial C[Bt,M,N] to accumulate into. */
  c0?: Float32Array;
}

/** Element accessors op(A)(m,k) and op(B)(k,n) for one batch entry. */
function accessors(a: Float32Array, b: Float32Array, o: MatmulRefOptions, bt: number) {
  const { layout, M, N, K } = o;
  const ao = bt * M * K;
  const bo = o.bBatched ? bt * K * N : 0;
  const getA = layout === "TN"
    ? (m: number, k: number) => a[ao + k * M + m]
    : (m: number, k: number) => a[ao + m * K + k];
  const getB = layout === "NT"
    ? (k: number, n: number) => b[bo + n * K + k]
    : (k: number, n: number) => b[bo + k * N + n];
  return { getA, getB, ao, bo };
}

/** c[Bt,M,N] = alpha·op(a)·op(b) (+ bias) (+ c0). */
export function matmul_forward(a: Float32Array, b: Float32Array, o: MatmulRefOptions): Float32Array {
  const { M, N, K } = o;
  const batch = o.batch ?? 1;
  const alpha = o.alpha ?? 1;
  const c = new Float32Array(batch * M * N);
  for (let bt = 0; bt < batch; bt++) {
    const { getA, getB } = accessors(a, b, o, bt);
    for (let m = 0; m < M; m++) {
      for (let n = 0; n < N; n++) {
        let sum = 0; // f64
        for (let k = 0; k < K; k++) sum += getA(m, k) * getB(k, n);
        const i = bt * M * N + m * N + n;
        c[i] = alpha * sum + (o.bias ? o.bias[n] : 0) + (o.c0 ? o.c0[i] : 0);
      }
    }
  }
  return c;
}

/** Gradients of {@link matmul_forward}: da and db in the stored layouts of a and b, dbias[N]. */
export function matmul_backward(
  dc: Float32Array,
  a: Float32Array,
  b: Float32Array,
  o: MatmulRefOptions,
): { da: Float32Array; db: Float32Array; dbias: Float32Array } {
  const { layout, M, N, K } = o;
  const batch = o.batch ?? 1;
  const alpha = o.alpha ?? 1;
  const da = new Float32Array(a.length);
  const db = new Float32Array(b.length);
  const dbias = new Float32Array(N);
  const dbAcc = new Float64Array(b.length);
  for (let bt = 0; bt < batch; bt++) {
    const { getA, getB, ao, bo } = accessors(a, b, o, bt);
    const dC = (m: number, n: number) => dc[bt * M * N + m * N + n];
    for (let m = 0; m < M; m++) {
      for (let k = 0; k < K; k++) {
        let sum = 0; // dA(m,k) = alpha·Σn dC(m,n)·B(k,n)
        for (let n = 0; n < N; n++) sum += dC(m, n) * getB(k, n);
        da[layout === "TN" ? ao + k * M + m : ao + m * K + k] = alpha * sum;
      }
    }
    for (let k = 0; k < K; k++) {
      for (let n = 0; n < N; n++) {
        let sum = 0; // dB(k,n) = alpha·Σm A(m,k)·dC(m,n), summed over batch when b is shared
        for (let m = 0; m < M; m++) sum += getA(m, k) * dC(m, n);
        dbAcc[layout === "NT" ? bo + n * K + k : bo + k * N + n] += alpha * sum;
      }
    }
    for (let n = 0; n < N; n++) {
      let sum = 0;
      for (let m = 0; m < M; m++) sum += dC(m, n);
      dbias[n] += sum;
    }
  }
  db.set(dbAcc);
  return { da, db, dbias };
}
