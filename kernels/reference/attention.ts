/**
 * Causal grouped-query attention reference with sliding window and per-document masks, in the
 * flash-attention formulation: the forward keeps the log-sum-exp per (token, head) and the backward
 * recomputes the probabilities from it.
 *
 * B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads, hd = head dim,
 * G = H / Hkv (query heads per kv head; head h reads kv head ⌊h / G⌋), W = sliding window.
 *
 * Within a row, query i may attend key j iff
 *   j <= i                      (causal)
 *   and j > i − W               (sliding window, when W is set: the W most recent keys, itself included)
 *   and doc[i] == doc[j]        (packing: only within the same document, when doc ids are given)
 * The window is transformers' `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`) under its
 * `causal_mask_function` (`kv_idx <= q_idx`), used by Mistral and Qwen2 sliding-window layers.
 * Rows never attend each other. Key i itself is always allowed, so no query row is empty.
 *
 * Forward, per row, head h, query i, with s[j] = scale · q[i]·k[j] over allowed j, scale = 1/sqrt(hd):
 *   lse[i] = log Σ_j exp(s[j]);  p[j] = exp(s[j] − lse[i]);  out[i] = Σ_j p[j] · v[j]
 * Backward, with Dᵢ = dout[i]·out[i]:
 *   dv[j] += p[j] · dout[i];  dp[j] = dout[i]·v[j];  ds[j] = p[j] · (dp[j] − Dᵢ)
 *   dq[i] += scale · Σ_j ds[j] · k[j];  dk[j] += scale · ds[j] · q[i]
 * dk and dv sum over the G query heads that share a kv head.
 * @module
 */
import { alloc, expectLength, expectPositiveInt, type Floats } from "./_dense.ts";

/** Sizes and masks of an attention call. */
export interface AttentionDims {
  /** Rows (packed sequences). */
  B: number;
  /** Tokens per row. */
  S: number;
  /** Query heads. */
  H: number;
  /** Key/value heads; divides H. */
  Hkv: number;
  /** Head dim. */
  hd: number;
  /** Sliding window W (key j allowed iff j > i − W); null or omitted: no window. */
  window?: number | null;
  /** doc[T]: document id per token; null or omitted: one document per row. */
  docIds?: ArrayLike<number> | null;
}

/**
 * Whether query position i may attend key position j of the same row.
 *
 * @param window W, or null for none
 * @param docI document id of query i (any equal pair when packing is not used)
 * @param docJ document id of key j
 */
export function attention_allowed(
  i: number,
  j: number,
  window: number | null,
  docI: number,
  docJ: number,
): boolean {
  if (j > i) return false;
  if (window !== null && j <= i - window) return false;
  return docI === docJ;
}

/**
 * doc[T] from per-token positions, as transformers finds packed sequences from position_ids:
 * a document starts at the first token of each row and wherever the position is 0.
 *
 * @param positions position[T]
 */
export function doc_ids_from_positions(positions: ArrayLike<number>, B: number, S: number): Int32Array {
  expectLength("positions[T]", positions, B * S);
  const doc = new Int32Array(B * S);
  let id = -1;
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < S; i++) {
      if (i === 0 || positions[b * S + i] === 0) id++;
      doc[b * S + i] = id;
    }
  }
  return doc;
}

function checkDims(dims: AttentionDims): { T: number; G: number; window: number | null } {
  const { B, S, H, Hkv, hd } = dims;
  for (const [name, value] of Object.entries({ B, S, H, Hkv, hd })) expectPositiveInt(name, value);
  if (H % Hkv !== 0) {
    throw new RangeError(`Cannot run attention: H "${H}" is not a multiple of Hkv "${Hkv}"`);
  }
  const window = dims.window ?? null;
  if (window !== null) expectPositiveInt("sliding window W", window);
  if (dims.docIds) expectLength("docIds[T]", dims.docIds, B * S);
  return { T: B * S, G: H / Hkv, window };
}

// Whether query i may attend key j of row b (row-local indices).
function allowedIn(dims: AttentionDims, window: number | null, b: number, i: number, j: number): boolean {
  const doc = dims.docIds;
  const S = dims.S;
  return attention_allowed(i, j, window, doc ? doc[b * S + i] : 0, doc ? doc[b * S + j] : 0);
}

/**
 * Masked causal GQA: out = softmax(scale · q·kᵀ + mask) · v.
 *
 * @param q q[T,H,hd]
 * @param k k[T,Hkv,hd]
 * @param v v[T,Hkv,hd]
 * @returns out[T,H,hd] and lse[T,H] (natural log of Σ_j exp(scale · q·k_j) over allowed j)
 */
export function attention_forward<A extends Floats>(
  q: A,
  k: Floats,
  v: Floats,
  dims: AttentionDims,
): { out: A; lse: A } {
  const { T, G, window } = checkDims(dims);
  const { B, S, H, Hkv, hd } = dims;
  expectLength("q[T,H,hd]", q, T * H * hd);
  expectLength("k[T,Hkv,hd]", k, T * Hkv * hd);
  expectLength("v[T,Hkv,hd]", v, T * Hkv * hd);
  const scale = 1 / Math.sqrt(hd);
  const out = alloc(q, T * H * hd);
  const lse = alloc(q, T * H);
  const s = new Float64Array(S);
  const acc = new Float64Array(hd);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / G);
      for (let i = 0; i < S; i++) {
        const qo = ((b * S + i) * H + h) * hd;
        let max = -Infinity;
        for (let j = 0; j <= i; j++) {
          if (!allowedIn(dims, window, b, i, j)) continue;
          const ko = ((b * S + j) * Hkv + kvh) * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qo + d] * k[ko + d];
          s[j] = scale * dot;
          if (s[j] > max) max = s[j];
        }
        let sum = 0;
        for (let j = 0; j <= i; j++) {
          if (allowedIn(dims, window, b, i, j)) sum += Math.exp(s[j] - max);
        }
        const l = max + Math.log(sum);
        lse[(b * S + i) * H + h] = l;
        acc.fill(0);
        for (let j = 0; j <= i; j++) {
          if (!allowedIn(dims, window, b, i, j)) continue;
          const p = Math.exp(s[j] - l);
          const vo = ((b * S + j) * Hkv + kvh) * hd;
          for (let d = 0; d < hd; d++) acc[d] += p * v[vo + d];
        }
        for (let d = 0; d < hd; d++) out[qo + d] = acc[d];
      }
    }
  }
  return { out, lse };
}

/**
 * Gradients of {@link attention_forward}.
 *
 * @param dout dout[T,H,hd]
 * @param q q[T,H,hd]
 * @param k k[T,Hkv,hd]
 * @param v v[T,Hkv,hd]
 * @param out out[T,H,hd] from the forward
 * @param lse lse[T,H] from the forward
 * @returns dq[T,H,hd], dk[T,Hkv,hd], dv[T,Hkv,hd]
 */
export function attention_backward<A extends Floats>(
  dout: A,
  q: Floats,
  k: Floats,
  v: Floats,
  out: Floats,
  lse: Floats,
  dims: AttentionDims,
): { dq: A; dk: A; dv: A } {
  const { T, G, window } = checkDims(dims);
  const { B, S, H, Hkv, hd } = dims;
  expectLength("dout[T,H,hd]", dout, T * H * hd);
  expectLength("q[T,H,hd]", q, T * H * hd);
  expectLength("k[T,Hkv,hd]", k, T * Hkv * hd);
  expectLength("v[T,Hkv,hd]", v, T * Hkv * hd);
  expectLength("out[T,H,hd]", out, T * H * hd);
  expectLength("lse[T,H]", lse, T * H);
  const scale = 1 / Math.sqrt(hd);
  const dq = new Float64Array(T * H * hd);
  const dk = new Float64Array(T * Hkv * hd);
  const dv = new Float64Array(T * Hkv * hd);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / G);
      for (let i = 0; i < S; i++) {
        const qo = ((b * S + i) * H + h) * hd;
        const l = lse[(b * S + i) * H + h];
        let Di = 0;
        for (let d = 0; d < hd; d++) Di += dout[qo + d] * out[qo + d];
        for (let j = 0; j <= i; j++) {
          if (!allowedIn(dims, window, b, i, j)) continue;
          const ko = ((b * S + j) * Hkv + kvh) * hd;
          let dot = 0;
          let dp = 0;
          for (let d = 0; d < hd; d++) {
            dot += q[qo + d] * k[ko + d];
            dp += dout[qo + d] * v[ko + d];
          }
          const p = Math.exp(scale * dot - l);
          const ds = p * (dp - Di);
          for (let d = 0; d < hd; d++) {
            dv[ko + d] += p * dout[qo + d];
            dq[qo + d] += scale * ds * k[ko + d];
            dk[ko + d] += scale * ds * q[qo + d];
          }
        }
      }
    }
  }
  const result = { dq: alloc(dout, dq.length), dk: alloc(dout, dk.length), dv: alloc(dout, dv.length) };
  result.dq.set(dq);
  result.dk.set(dk);
  result.dv.set(dv);
  return result;
}

/**
 * One query per sequence against its cached keys and values (KV-cache decoding):
 * out[b,h] = softmax_j(q[b,h]·K[b,j,h/g]/√hd)·V[b,j,h/g] over j in [lo_b, len_b), lo_b =
 * max(0, len_b − window) with a window, else 0; g = H/Hkv. f64 accumulation.
 *
 * @param q q[B,H,hd]
 * @param K K[B,L,Hkv,hd]
 * @param V V[B,L,Hkv,hd]
 * @param lens len[B]
 */
export function attention_decode(
  q: ArrayLike<number>,
  K: ArrayLike<number>,
  V: ArrayLike<number>,
  lens: ArrayLike<number>,
  dims: { B: number; H: number; Hkv: number; hd: number; L: number; window?: number | null },
): Float64Array {
  const { B, H, Hkv, hd, L } = dims;
  const out = new Float64Array(B * H * hd);
  const g = H / Hkv;
  for (let b = 0; b < B; b++) {
    const n = lens[b];
    const lo = dims.window && n > dims.window ? n - dims.window : 0;
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / g);
      const s: number[] = [];
      for (let j = lo; j < n; j++) {
        let dot = 0;
        for (let d = 0; d < hd; d++) dot += q[(b * H + h) * hd + d] * K[((b * L + j) * Hkv + kvh) * hd + d];
        s.push(dot / Math.sqrt(hd));
      }
      const m = Math.max(...s);
      const e = s.map((x) => Math.exp(x - m));
      const sum = e.reduce((a, x) => a + x, 0);
      for (let d = 0; d < hd; d++) {
        let acc = 0;
        for (let j = lo; j < n; j++) acc += e[j - lo] * V[((b * L + j) * Hkv + kvh) * hd + d];
        out[(b * H + h) * hd + d] = acc / sum;
      }
    }
  }
  return out;
}
