/**
 * Private helpers shared by the CPU references: the array type they accept, shape checks,
 * and three plain matrix products. Every sum is accumulated in f64 (JavaScript numbers).
 *
 * A reference returns arrays of the same type as its main input: Float32Array in gives
 * Float32Array out (what GPU kernels are compared against); Float64Array in gives Float64Array
 * out, so the finite-difference tests run end to end in f64.
 * @module
 */

/** Row-major values: f32 for kernel comparisons, f64 for finite-difference checks. */
export type Floats = Float32Array | Float64Array;

/** A zeroed array of `n` values with the same element type as `like`. */
export function alloc<A extends Floats>(like: A, n: number): A {
  return (like instanceof Float64Array ? new Float64Array(n) : new Float32Array(n)) as A;
}

/** Throws a RangeError unless `array` holds exactly `n` values (`what` names it, with its shape). */
export function expectLength(what: string, array: ArrayLike<number>, n: number): void {
  if (array.length !== n) {
    throw new RangeError(`Cannot use ${what}: it holds ${array.length} values, the shape needs ${n}`);
  }
}

/** Throws a RangeError unless `value` is a positive integer. */
export function expectPositiveInt(what: string, value: number): void {
  if (!Number.isInteger(value) || value <= 0) {
    throw new RangeError(`Cannot use ${what} "${value}": it must be a positive integer`);
  }
}

// M, K, N: the product dimensions of each helper below.

/** C[M,N] = A[M,K] · B[N,K]ᵀ (the layout of y = x·Wᵀ). */
export function mul_nt<A extends Floats>(a: A, b: Floats, M: number, K: number, N: number): A {
  const c = alloc(a, M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc += a[m * K + k] * b[n * K + k];
      c[m * N + n] = acc;
    }
  }
  return c;
}

/** C[M,N] = A[M,K] · B[K,N] (the layout of dx = dy·W). */
export function mul_nn<A extends Floats>(a: A, b: Floats, M: number, K: number, N: number): A {
  const c = alloc(a, M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc += a[m * K + k] * b[k * N + n];
      c[m * N + n] = acc;
    }
  }
  return c;
}

/** C[M,N] = A[K,M]ᵀ · B[K,N] (the layout of dW = dyᵀ·x). */
export function mul_tn<A extends Floats>(a: A, b: Floats, M: number, K: number, N: number): A {
  const c = alloc(a, M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc += a[k * M + m] * b[k * N + n];
      c[m * N + n] = acc;
    }
  }
  return c;
}
