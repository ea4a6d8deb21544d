/**
 * SwiGLU reference: the activation of the Llama / Mistral / Qwen2 MLP,
 * down_proj(silu(gate_proj(x)) ⊙ up_proj(x)); this file is the part between the projections.
 *
 * T = tokens, F = ffn (intermediate) size.
 *
 * Forward:  σ = sigmoid(g) = 1 / (1 + e^(−g));  silu(g) = g·σ;  h = silu(g) ⊙ u
 * Backward: dg = dh ⊙ u ⊙ σ·(1 + g·(1 − σ))   (d silu / dg = σ + g·σ·(1 − σ))
 *           du = dh ⊙ silu(g)
 * @module
 */
import { alloc, expectLength, type Floats } from "./_dense.ts";

function sigmoid(z: number): number {
  return 1 / (1 + Math.exp(-z));
}

/**
 * h = silu(g) ⊙ u.
 *
 * @param g g[T,F] (gate_proj output)
 * @param u u[T,F] (up_proj output)
 * @returns h[T,F]
 */
export function swiglu_forward<A extends Floats>(g: A, u: Floats): A {
  expectLength("u[T,F] (same shape as g)", u, g.length);
  const h = alloc(g, g.length);
  for (let i = 0; i < g.length; i++) h[i] = g[i] * sigmoid(g[i]) * u[i];
  return h;
}

/**
 * Gradients of {@link swiglu_forward}.
 *
 * @param dh dh[T,F]
 * @param g g[T,F]
 * @param u u[T,F]
 * @returns dg[T,F] and du[T,F]
 */
export function swiglu_backward<A extends Floats>(dh: A, g: Floats, u: Floats): { dg: A; du: A } {
  expectLength("g[T,F] (same shape as dh)", g, dh.length);
  expectLength("u[T,F] (same shape as dh)", u, dh.length);
  const dg = alloc(dh, dh.length);
  const du = alloc(dh, dh.length);
  for (let i = 0; i < dh.length; i++) {
    const s = sigmoid(g[i]);
    dg[i] = dh[i] * u[i] * s * (1 + g[i] * (1 - s));
    du[i] = dh[i] * g[i] * s;
  }
  return { dg, du };
}
