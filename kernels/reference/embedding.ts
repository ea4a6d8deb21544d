/**
 * Token embedding reference: a gather of rows of embed_tokens.
 *
 * T = tokens, V = vocab, D = hidden.
 *
 * Forward:  out[t,:] = E[ids[t],:]
 * Backward: dE[v,:] = Σ_{t : ids[t] = v} dout[t,:]   (scatter-add; only needed when E trains;
 *           the gradient of the input path stops at out)
 * @module
 */
import { alloc, expectLength, expectPositiveInt, type Floats } from "./_dense.ts";

/** Sizes of the embedding table. */
export interface EmbeddingDims {
  /** Vocab rows of E. */
  V: number;
  /** Hidden size. */
  D: number;
}

function checkIds(ids: ArrayLike<number>, V: number): void {
  for (let t = 0; t < ids.length; t++) {
    const id = ids[t];
    if (!Number.isInteger(id) || id < 0 || id >= V) {
      throw new RangeError(`Cannot embed token ${t}: id "${id}" is outside the vocabulary [0, ${V})`);
    }
  }
}

/**
 * out[T,D] = E[ids].
 *
 * @param E E[V,D]
 * @param ids ids[T]
 * @returns out[T,D]
 */
export function embedding_forward<A extends Floats>(E: A, ids: ArrayLike<number>, dims: EmbeddingDims): A {
  const { V, D } = dims;
  expectPositiveInt("D", D);
  expectLength("E[V,D]", E, V * D);
  checkIds(ids, V);
  const out = alloc(E, ids.length * D);
  for (let t = 0; t < ids.length; t++) out.set(E.subarray(ids[t] * D, ids[t] * D + D), t * D);
  return out;
}

/**
 * dE[V,D] by scatter-add of dout rows.
 *
 * @param dout dout[T,D]
 * @param ids ids[T]
 * @returns dE[V,D]
 */
export function embedding_backward<A extends Floats>(
  dout: A,
  ids: ArrayLike<number>,
  dims: EmbeddingDims,
): A {
  const { V, D } = dims;
  expectLength("dout[T,D]", dout, ids.length * D);
  checkIds(ids, V);
  const dE = new Float64Array(V * D);
  for (let t = 0; t < ids.length; t++) {
    for (let d = 0; d < D; d++) dE[ids[t] * D + d] += dout[t * D + d];
  }
  const result = alloc(dout, V * D);
  result.set(dE);
  return result;
}
