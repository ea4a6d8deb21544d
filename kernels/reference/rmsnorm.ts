/**
 * RMSNorm reference, as LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm (weight multiplies, no bias,
 * no `1 + w` offset).
 *
 * T = tokens, D = hidden.
 *
 * Forward:  rstd[t] = 1 / sqrt(mean_d(x[t,d]²) + eps);  x̂ = x · rstd;  y = x̂ · w.
 * Backward: with g = dy · w,
 *   dx[t,d] = rstd[t] · (g[t,d] − x̂[t,d] · mean_d(g[t,:] · x̂[t,:]))
 *   dw[d]   = Σ_t dy[t,d] · x̂[t,d]
 * @module
 */
import { alloc, expectLength, expectPositiveInt, type Floats } from "./_dense.ts";

/** Sizes of an RMSNorm call. */
export interface RmsNormDims {
  /** Tokens. */
  T: number;
  /** Hidden size (the normalised axis). */
  D: number;
}

/**
 * y = x / sqrt(mean(x²) + eps) · w.
 *
 * @param x x[T,D]
 * @param w w[D]
 * @returns y[T,D] and rstd[T] (1 / sqrt(mean(x²) + eps), kept for the backward)
 */
export function rmsnorm_forward<A extends Floats>(
  x: A,
  w: Floats,
  dims: RmsNormDims & { eps: number },
): { y: A; rstd: A } {
  const { T, D, eps } = dims;
  expectPositiveInt("D", D);
  expectLength("x[T,D]", x, T * D);
  expectLength("w[D]", w, D);
  const y = alloc(x, T * D);
  const rstd = alloc(x, T);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let d = 0; d < D; d++) ss += x[t * D + d] * x[t * D + d];
    const r = 1 / Math.sqrt(ss / D + eps);
    rstd[t] = r;
    for (let d = 0; d < D; d++) y[t * D + d] = x[t * D + d] * r * w[d];
  }
  return { y, rstd };
}

/**
 * Gradients of RMSNorm.
 *
 * @param dy dy[T,D]
 * @param x x[T,D] (the forward input)
 * @param w w[D]
 * @param rstd rstd[T] from {@link rmsnorm_forward} (recomputed when omitted)
 * @returns dx[T,D] and dw[D]
 */
export function rmsnorm_backward<A extends Floats>(
  dy: A,
  x: Floats,
  w: Floats,
  rstd: Floats | null,
  dims: RmsNormDims & { eps: number },
): { dx: A; dw: A } {
  const { T, D, eps } = dims;
  expectLength("dy[T,D]", dy, T * D);
  expectLength("x[T,D]", x, T * D);
  expectLength("w[D]", w, D);
  if (rstd) expectLength("rstd[T]", rstd, T);
  const dx = alloc(dy, T * D);
  const dw = new Float64Array(D);
  for (let t = 0; t < T; t++) {
    let r: number;
    if (rstd) {
      r = rstd[t];
    } else {
      let ss = 0;
      for (let d = 0; d < D; d++) ss += x[t * D + d] * x[t * D + d];
      r = 1 / Math.sqrt(ss / D + eps);
    }
    // mean_d(g · x̂) with g = dy · w, x̂ = x · r
    let dot = 0;
    for (let d = 0; d < D; d++) dot += dy[t * D + d] * w[d] * x[t * D + d] * r;
    dot /= D;
    for (let d = 0; d < D; d++) {
      const xhat = x[t * D + d] * r;
      dx[t * D + d] = r * (dy[t * D + d] * w[d] - xhat * dot);
      dw[d] += dy[t * D + d] * xhat;
    }
  }
  const dwOut = alloc(dy, D);
  dwOut.set(dw);
  return { dx, dw: dwOut };
}
