/**
 * Linear layer with a LoRA adapter (PEFT `lora.Linear`), the frozen base weight W and bias kept
 * fixed: only lora_A and lora_B get gradients, and the input gets one for the layers below.
 *
 * T = tokens, K = in features, N = out features, r = LoRA rank.
 *
 * Forward, with s = lora_alpha / r (rslora: lora_alpha / sqrt(r)) and keep[T,K] ∈ {0,1}:
 *   z  = x ⊙ keep / (1 − p)          (dropout of the LoRA input only; z = x when p = 0)
 *   xa = z · Aᵀ                      xa[T,r]
 *   y  = x · Wᵀ + b + s · xa · Bᵀ    y[T,N]
 * Backward:
 *   dB  = s · dyᵀ · xa               dB[N,r]
 *   dxa = s · dy · B                 dxa[T,r]
 *   dA  = dxaᵀ · z                   dA[r,K]
 *   dx  = dy · W + (dxa · A) ⊙ keep / (1 − p)
 * @module
 */
import { alloc, expectLength, expectPositiveInt, type Floats, mul_nn, mul_nt, mul_tn } from "./_dense.ts";

/** A LoRA adapter on one linear layer (PEFT names: lora_A, lora_B, r, scaling). */
export interface LoraAdapter {
  /** lora_A.weight[r,K]. */
  A: Floats;
  /** lora_B.weight[N,r]. */
  B: Floats;
  /** Rank r. */
  r: number;
  /** s = lora_alpha / r, or lora_alpha / sqrt(r) with rslora: see {@link lora_scaling}. */
  scaling: number;
  /** Dropout on the adapter input: keep[T,K] (1 kept, 0 dropped) and its probability p < 1. */
  dropout?: { p: number; keep: Uint8Array } | null;
}

/** PEFT's scaling: alpha / r, or alpha / sqrt(r) when `useRslora`. */
export function lora_scaling(alpha: number, r: number, useRslora = false): number {
  expectPositiveInt("LoRA rank r", r);
  return useRslora ? alpha / Math.sqrt(r) : alpha / r;
}

// PCG hash (Jarzynski & Olano 2020): u32 -> u32, written for exact replay in WGSL u32 arithmetic.
function pcg_hash(x: number): number {
  const state = (Math.imul(x >>> 0, 747796405) + 2891336453) >>> 0;
  const word = Math.imul(((state >>> ((state >>> 28) + 4)) ^ state) >>> 0, 277803737) >>> 0;
  return ((word >>> 22) ^ word) >>> 0;
}

/**
 * A seeded dropout mask of n elements, reproducible on the GPU with u32 arithmetic:
 *   keep[i] = pcg_hash(i ^ pcg_hash(seed)) >= floor(p · 2³²)
 * where pcg_hash(x): state = x·747796405 + 2891336453; word = ((state >> ((state >> 28) + 4)) ^ state)
 * · 277803737; return (word >> 22) ^ word (all mod 2³²).
 *
 * @param seed u32 seed (one per layer and step)
 * @param p drop probability in [0, 1)
 */
export function dropout_mask(seed: number, n: number, p: number): Uint8Array {
  if (!(p >= 0 && p < 1)) throw new RangeError(`Cannot build a dropout mask: p "${p}" is not in [0, 1)`);
  const threshold = Math.floor(p * 4294967296);
  const salt = pcg_hash(seed);
  const keep = new Uint8Array(n);
  for (let i = 0; i < n; i++) keep[i] = pcg_hash((i ^ salt) >>> 0) >= threshold ? 1 : 0;
  return keep;
}

/** Sizes of a linear layer. */
export interface LinearDims {
  /** Tokens. */
  T: number;
  /** K. */
  inFeatures: number;
  /** N. */
  outFeatures: number;
}

function checkAdapter(lora: LoraAdapter, dims: LinearDims): void {
  const { T, inFeatures: K, outFeatures: N } = dims;
  expectPositiveInt("LoRA rank r", lora.r);
  expectLength("lora_A[r,K]", lora.A, lora.r * K);
  expectLength("lora_B[N,r]", lora.B, N * lora.r);
  if (lora.dropout) {
    const p = lora.dropout.p;
    if (!(p >= 0 && p < 1)) throw new RangeError(`Cannot apply LoRA dropout: p "${p}" is not in [0, 1)`);
    expectLength("dropout keep[T,K]", lora.dropout.keep, T * K);
  }
}

// z[T,K] = x ⊙ keep / (1 − p), or x itself without dropout.
function dropoutInput<A extends Floats>(x: A, lora: LoraAdapter): A {
  if (!lora.dropout) return x;
  const { p, keep } = lora.dropout;
  const z = alloc(x, x.length);
  for (let i = 0; i < x.length; i++) z[i] = keep[i] ? x[i] / (1 - p) : 0;
  return z;
}

/**
 * y = x·Wᵀ + b + s · (dropout(x)·Aᵀ)·Bᵀ.
 *
 * @param x x[T,K]
 * @param W W[N,K] (frozen)
 * @param bias b[N] or null
 * @param lora the adapter, or null for a plain linear layer
 * @returns y[T,N] and xa[T,r] = dropout(x)·Aᵀ (kept for the backward; null without adapter)
 */
export function linear_lora_forward<A extends Floats>(
  x: A,
  W: Floats,
  bias: Floats | null,
  lora: LoraAdapter | null,
  dims: LinearDims,
): { y: A; xa: A | null } {
  const { T, inFeatures: K, outFeatures: N } = dims;
  expectLength("x[T,K]", x, T * K);
  expectLength("W[N,K]", W, N * K);
  if (bias) expectLength("bias[N]", bias, N);
  const y = mul_nt(x, W, T, K, N);
  if (bias) { for (let t = 0; t < T; t++) for (let n = 0; n < N; n++) y[t * N + n] += bias[n]; }
  if (!lora) return { y, xa: null };
  checkAdapter(lora, dims);
  const r = lora.r;
  const xa = mul_nt(dropoutInput(x, lora), lora.A, T, K, r);
  const delta = mul_nt(xa, lora.B, T, r, N);
  for (let i = 0; i < y.length; i++) y[i] += lora.scaling * delta[i];
  return { y, xa };
}

/**
 * Gradients of {@link linear_lora_forward} w.r.t. x, lora_A and lora_B (W and b are frozen).
 *
 * @param dy dy[T,N]
 * @param x x[T,K]
 * @param W W[N,K]
 * @param xa xa[T,r] from the forward (null without adapter)
 * @returns dx[T,K], dA[r,K], dB[N,r] (null without adapter)
 */
export function linear_lora_backward<A extends Floats>(
  dy: A,
  x: Floats,
  W: Floats,
  lora: LoraAdapter | null,
  xa: Floats | null,
  dims: LinearDims,
): { dx: A; dA: A | null; dB: A | null } {
  const { T, inFeatures: K, outFeatures: N } = dims;
  expectLength("dy[T,N]", dy, T * N);
  expectLength("x[T,K]", x, T * K);
  expectLength("W[N,K]", W, N * K);
  const dx = mul_nn(dy, W, T, N, K);
  if (!lora) return { dx, dA: null, dB: null };
  checkAdapter(lora, dims);
  const r = lora.r;
  if (!xa) throw new TypeError("Cannot run the LoRA backward: xa from the forward is missing");
  expectLength("xa[T,r]", xa, T * r);
  const s = lora.scaling;
  const dB = mul_tn(dy, xa, N, T, r);
  for (let i = 0; i < dB.length; i++) dB[i] *= s;
  const dxa = mul_nn(dy, lora.B, T, N, r);
  for (let i = 0; i < dxa.length; i++) dxa[i] *= s;
  const z = dropoutInput(x, lora);
  const dA = mul_tn(dxa, z, r, T, K);
  const dz = mul_nn(dxa, lora.A, T, r, K);
  const p = lora.dropout?.p ?? 0;
  const keep = lora.dropout?.keep;
  for (let i = 0; i < dx.length; i++) dx[i] += keep ? (keep[i] ? dz[i] / (1 - p) : 0) : dz[i];
  return { dx, dA, dB };
}
