/**
 * RoPE frequencies, as transformers' `modeling_rope_utils` computes them: the host-side part of
 * rotary embeddings that the GPU op (ops/rope.ts), the decoder graph and the CPU reference
 * (reference/rope.ts) all use. hd = head dim, h2 = hd/2; for i in [0, h2):
 *   default: inv_freq[i] = 1 / theta^(2i/hd), attention factor 1
 *   linear:  inv_freq[i] / factor (the same as dividing positions by factor)
 *   dynamic: default; transformers only rescales theta past the original length, which is refused
 *   llama3:  wavelen = 2π / inv_freq; low = orig / low_freq_factor, high = orig / high_freq_factor;
 *            wavelen < high: unchanged; wavelen > low: inv_freq / factor; otherwise, with
 *            smooth = (orig / wavelen − low_freq_factor) / (high_freq_factor − low_freq_factor):
 *            (1 − smooth) · inv_freq / factor + smooth · inv_freq
 *   yarn:    see {@link rope_inv_freq}; the attention factor multiplies cos and sin.
 * @module
 */

/**
 * RoPE scaling, as the `rope_scaling` block of a Hugging Face config.json (camelCase keys); a
 * superset of formats/model_config.ts `RopeScaling`, so a parsed config can be passed as is.
 */
export type RopeScaling =
  | { type: "default" }
  | { type: "linear"; factor: number }
  | {
    /** Dynamic NTK: plain RoPE up to the original length (longer sequences are refused). */
    type: "dynamic";
    factor: number;
    /** config.max_position_embeddings when absent. */
    originalMaxPositionEmbeddings?: number;
  }
  | {
    type: "llama3";
    factor: number;
    lowFreqFactor: number;
    highFreqFactor: number;
    originalMaxPositionEmbeddings: number;
  }
  | {
    type: "yarn";
    factor: number;
    /** Context length the model was pretrained with; config.max_position_embeddings when absent. */
    originalMaxPositionEmbeddings?: number;
    /** Default 32. */
    betaFast?: number;
    /** Default 1. */
    betaSlow?: number;
    /** Overrides the computed attention factor when not null. */
    attentionFactor?: number | null;
    mscale?: number | null;
    mscaleAllDim?: number | null;
    /** Round the correction range outwards to whole dimensions (default true). */
    truncate?: boolean;
  };

/** What the RoPE frequencies depend on. */
export interface RopeConfig {
  /** hd, even. */
  headDim: number;
  /** Base (config.rope_theta). */
  theta: number;
  /** null or `{ type: "default" }`: unscaled. */
  scaling: RopeScaling | null;
  /** config.max_position_embeddings (yarn falls back to it for the original length). */
  maxPositionEmbeddings?: number;
}

/** Frequencies and the factor that multiplies cos and sin. */
export interface RopeFrequencies {
  /** inv_freq[h2]. */
  invFreq: Float64Array;
  /** 1 except for yarn. */
  attentionFactor: number;
}

/**
 * inv_freq[h2] and the attention factor for a RoPE configuration, as transformers'
 * `ROPE_INIT_FUNCTIONS[rope_type](config)`.
 *
 * yarn (with the user's `factor` taken as given, as transformers does since the fix for
 * huggingface/transformers#38224):
 *   corr_dim(n) = hd · ln(orig / (2π·n)) / (2 · ln theta)
 *   low = max(floor(corr_dim(beta_fast)), 0), high = min(ceil(corr_dim(beta_slow)), hd − 1)
 *   (no floor/ceil when truncate is false; high += 0.001 when low == high)
 *   ramp[i] = clamp((i − low) / (high − low), 0, 1);  extrapolation weight e[i] = 1 − ramp[i]
 *   inv_freq[i] = (1/(factor·theta^(2i/hd))) · (1 − e[i]) + (1/theta^(2i/hd)) · e[i]
 *   attention factor: given, or get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when
 *   both are set, else get_mscale(factor) with get_mscale(s, m = 1) = s <= 1 ? 1 : 0.1·m·ln(s) + 1.
 */
export function rope_inv_freq(config: RopeConfig): RopeFrequencies {
  const { headDim: hd, theta } = config;
  if (!Number.isInteger(hd) || hd <= 0) {
    throw new RangeError(`Cannot use headDim "${hd}": it must be a positive integer`);
  }
  if (hd % 2 !== 0) throw new RangeError(`Cannot build RoPE tables: headDim "${hd}" is odd`);
  const h2 = hd / 2;
  const base = new Float64Array(h2);
  for (let i = 0; i < h2; i++) base[i] = 1 / Math.pow(theta, (2 * i) / hd);
  const scaling = config.scaling ?? { type: "default" as const };
  switch (scaling.type) {
    case "default":
      return { invFreq: base, attentionFactor: 1 };
    case "linear":
      return { invFreq: base.map((f) => f / scaling.factor), attentionFactor: 1 };
    case "dynamic":
      return { invFreq: base, attentionFactor: 1 };
    case "llama3": {
      const { factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings: orig } = scaling;
      const lowFreqWavelen = orig / lowFreqFactor;
      const highFreqWavelen = orig / highFreqFactor;
      const invFreq = base.map((f) => {
        const wavelen = (2 * Math.PI) / f;
        if (wavelen < highFreqWavelen) return f;
        if (wavelen > lowFreqWavelen) return f / factor;
        const smooth = (orig / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor);
        return (1 - smooth) * f / factor + smooth * f;
      });
      return { invFreq, attentionFactor: 1 };
    }
    case "yarn": {
      const factor = scaling.factor;
      const orig = scaling.originalMaxPositionEmbeddings ?? config.maxPositionEmbeddings;
      if (orig === undefined) {
        throw new RangeError(
          "Cannot build yarn RoPE tables: neither rope_scaling.original_max_position_embeddings " +
            "nor max_position_embeddings is given",
        );
      }
      const getMscale = (s: number, m = 1) => (s <= 1 ? 1 : 0.1 * m * Math.log(s) + 1);
      let attentionFactor = scaling.attentionFactor ?? null;
      if (attentionFactor === null) {
        attentionFactor = scaling.mscale && scaling.mscaleAllDim
          ? getMscale(factor, scaling.mscale) / getMscale(factor, scaling.mscaleAllDim)
          : getMscale(factor);
      }
      const betaFast = scaling.betaFast || 32;
      const betaSlow = scaling.betaSlow || 1;
      const corrDim = (rotations: number) =>
        (hd * Math.log(orig / (rotations * 2 * Math.PI))) / (2 * Math.log(theta));
      let low = corrDim(betaFast);
      let high = corrDim(betaSlow);
      if (scaling.truncate ?? true) {
        low = Math.floor(low);
        high = Math.ceil(high);
      }
      low = Math.max(low, 0);
      high = Math.min(high, hd - 1);
      if (low === high) high += 0.001;
      const invFreq = new Float64Array(h2);
      for (let i = 0; i < h2; i++) {
        const ramp = Math.min(Math.max((i - low) / (high - low), 0), 1);
        const extrapolation = 1 - ramp;
        invFreq[i] = (base[i] / factor) * (1 - extrapolation) + base[i] * extrapolation;
      }
      return { invFreq, attentionFactor };
    }
    default:
      throw new RangeError(
        `Cannot build RoPE tables: rope_scaling type "${(scaling as { type: string }).type}" is not ` +
          `one of "default", "linear", "dynamic", "llama3", "yarn"`,
      );
  }
}

/**
 * Throws unless every position is within what the scaling models: dynamic NTK changes theta once
 * a sequence is longer than its original length (transformers' `dynamic_rope_update`), which the
 * references do not model.
 *
 * @param positions position[T]
 */
export function rope_check_positions(config: RopeConfig, positions: ArrayLike<number>): void {
  const scaling = config.scaling;
  if (scaling?.type !== "dynamic") return;
  const orig = scaling.originalMaxPositionEmbeddings ?? config.maxPositionEmbeddings;
  if (orig === undefined) {
    throw new RangeError(
      "Cannot build dynamic RoPE tables: neither original_max_position_embeddings nor " +
        "max_position_embeddings is given",
    );
  }
  let max = -1;
  for (let t = 0; t < positions.length; t++) max = Math.max(max, positions[t]);
  if (max + 1 > orig) {
    throw new RangeError(
      `Cannot build dynamic RoPE tables: position ${max} is past the original length ${orig}, where ` +
        "dynamic NTK scaling would change theta",
    );
  }
}

/**
 * The factor each RoPE frequency is divided by under `scaling`: base_inv_freq[i] / scaled_inv_freq[i]
 * (i < hd/2), as llama.cpp's `rope_freqs` tensor carries Llama 3 scaling in GGUF.
 */
export function ropeFreqFactors(config: RopeConfig): Float32Array {
  const base = rope_inv_freq({ ...config, scaling: null }).invFreq;
  const scaled = rope_inv_freq(config).invFreq;
  return Float32Array.from(base, (b, i) => b / scaled[i]);
}
