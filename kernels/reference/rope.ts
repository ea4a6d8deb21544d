/**
 * Rotary position embedding reference, in the Hugging Face "rotate_half" layout: dimension i is
 * paired with i + hd/2 (not interleaved pairs 2i, 2i+1), as in transformers' `apply_rotary_pos_emb`.
 *
 * T = tokens, nH = heads of the tensor being rotated (H for q, Hkv for k), hd = head dim, h2 = hd/2.
 *
 * Frequencies (transformers `modeling_rope_utils`), for i in [0, h2):
 *   default: inv_freq[i] = 1 / theta^(2i/hd), attention factor 1
 *   linear:  inv_freq[i] / factor (the same as dividing positions by factor)
 *   dynamic: default; transformers only rescales theta past the original length, which is refused
 *   llama3:  wavelen = 2π / inv_freq; low = orig / low_freq_factor, high = orig / high_freq_factor;
 *            wavelen < high: unchanged; wavelen > low: inv_freq / factor; otherwise, with
 *            smooth = (orig / wavelen − low_freq_factor) / (high_freq_factor − low_freq_factor):
 *            (1 − smooth) · inv_freq / factor + smooth · inv_freq
 *   yarn:    see {@link rope_inv_freq}; the attention factor multiplies cos and sin.
 *
 * Tables:  angle[t,i] = position[t] · inv_freq[i];  cos[t,i] = cos(angle) · af,  sin[t,i] = sin(angle) · af
 *          (positions are per token, so packed documents restart at 0).
 * Forward, per (t, head), with a = x[i], b = x[i + h2], c = cos[t,i], s = sin[t,i]:
 *   y[i] = a·c − b·s;   y[i + h2] = b·c + a·s        (x·cos + rotate_half(x)·sin)
 * Backward is the transpose, a rotation by −angle (scaled by af):
 *   dx[i] = dy[i]·c + dy[i + h2]·s;   dx[i + h2] = dy[i + h2]·c − dy[i]·s
 * @module
 */
import { alloc, expectLength, type Floats } from "./_dense.ts";
import {
  rope_check_positions,
  rope_inv_freq,
  type RopeConfig,
  type RopeFrequencies,
  type RopeScaling,
} from "../rope_frequencies.ts";

export { rope_check_positions, rope_inv_freq, type RopeConfig, type RopeFrequencies, type RopeScaling };

/**
 * cos[T,h2] and sin[T,h2] for per-token positions, already multiplied by the attention factor.
 *
 * @param positions position[T] (restarting at 0 for each packed document)
 */
export function rope_tables(
  freqs: RopeFrequencies,
  positions: ArrayLike<number>,
): { cos: Float64Array; sin: Float64Array } {
  const h2 = freqs.invFreq.length;
  const T = positions.length;
  const cos = new Float64Array(T * h2);
  const sin = new Float64Array(T * h2);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < h2; i++) {
      const angle = positions[t] * freqs.invFreq[i];
      cos[t * h2 + i] = Math.cos(angle) * freqs.attentionFactor;
      sin[t * h2 + i] = Math.sin(angle) * freqs.attentionFactor;
    }
  }
  return { cos, sin };
}

/** Sizes of a RoPE call on x[T, heads, headDim]. */
export interface RopeDims {
  T: number;
  /** nH: H for q, Hkv for k. */
  heads: number;
  headDim: number;
}

// y = x rotated by sign·angle per (token, pair).
function rotate<A extends Floats>(x: A, cos: Floats, sin: Floats, dims: RopeDims, sign: 1 | -1): A {
  const { T, heads, headDim: hd } = dims;
  const h2 = hd / 2;
  expectLength("x[T,nH,hd]", x, T * heads * hd);
  expectLength("cos[T,hd/2]", cos, T * h2);
  expectLength("sin[T,hd/2]", sin, T * h2);
  const y = alloc(x, x.length);
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < heads; h++) {
      const o = (t * heads + h) * hd;
      for (let i = 0; i < h2; i++) {
        const c = cos[t * h2 + i];
        const s = sign * sin[t * h2 + i];
        const a = x[o + i];
        const b = x[o + i + h2];
        y[o + i] = a * c - b * s;
        y[o + i + h2] = b * c + a * s;
      }
    }
  }
  return y;
}

/**
 * y = x·cos + rotate_half(x)·sin.
 *
 * @param x x[T,nH,hd]
 * @param cos cos[T,hd/2] from {@link rope_tables}
 * @param sin sin[T,hd/2]
 * @returns y[T,nH,hd]
 */
export function rope_forward<A extends Floats>(x: A, cos: Floats, sin: Floats, dims: RopeDims): A {
  return rotate(x, cos, sin, dims, 1);
}

/**
 * dx = dy rotated by −angle (the transpose of the forward rotation).
 *
 * @param dy dy[T,nH,hd]
 * @returns dx[T,nH,hd]
 */
export function rope_backward<A extends Floats>(dy: A, cos: Floats, sin: Floats, dims: RopeDims): A {
  return rotate(dy, cos, sin, dims, -1);
}
