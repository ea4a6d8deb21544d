/**
 * Helpers for the reference tests: a seeded random source and a central finite-difference
 * gradient check in f64.
 * @module
 */
import assert from "node:assert/strict";
import { mulberry32 } from "../../../foundation/random.ts";

/** Uniform values in [-1, 1) from a 32-bit seed (mulberry32), reproducible across runs. */
export function random(seed: number): () => number {
  const next = mulberry32(seed);
  return () => next() * 2 - 1;
}

/** n values uniform in [-scale, scale) as f64. */
export function randomArray(rand: () => number, n: number, scale = 1): Float64Array {
  return Float64Array.from({ length: n }, () => rand() * scale);
}

/** Σ a·b. */
export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

/** Asserts |actual − expected| <= atol + rtol·|expected| element-wise, naming the first bad index. */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: { atol: number; rtol: number },
  what = "value",
): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    const err = Math.abs(actual[i] - expected[i]);
    if (!(err <= tol.atol + tol.rtol * Math.abs(expected[i]))) {
      assert.fail(`${what}[${i}]: got ${actual[i]}, expected ${expected[i]} (|diff| ${err})`);
    }
  }
}

/** The finite-difference step and tolerance every reference backward is checked with (f64). */
export const FD = { eps: 1e-6, atol: 1e-8, rtol: 1e-6 };

/**
 * Compares `analytic` with the central difference (L(x + eps) − L(x − eps)) / 2eps of `loss` w.r.t.
 * `param` (perturbed in place and restored), at `indices` (default: every element).
 * Tolerance: |fd − analytic| <= atol + rtol·|analytic|.
 */
export function checkGradient(
  what: string,
  param: Float64Array,
  analytic: ArrayLike<number>,
  loss: () => number,
  options: { indices?: number[]; eps?: number; atol?: number; rtol?: number } = {},
): void {
  const { eps, atol, rtol } = { ...FD, ...options };
  assert.equal(analytic.length, param.length, `${what}: gradient length`);
  const indices = options.indices ?? Array.from({ length: param.length }, (_, i) => i);
  for (const i of indices) {
    const old = param[i];
    param[i] = old + eps;
    const plus = loss();
    param[i] = old - eps;
    const minus = loss();
    param[i] = old;
    const fd = (plus - minus) / (2 * eps);
    const err = Math.abs(fd - analytic[i]);
    if (!(err <= atol + rtol * Math.abs(analytic[i]))) {
      assert.fail(`${what}[${i}]: analytic ${analytic[i]}, finite difference ${fd} (|diff| ${err})`);
    }
  }
}

/** A few distinct indices in [0, n) (all of them when n <= count). */
export function someIndices(rand: () => number, n: number, count: number): number[] {
  if (n <= count) return Array.from({ length: n }, (_, i) => i);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor((rand() + 1) / 2 * n));
  return [...chosen];
}
