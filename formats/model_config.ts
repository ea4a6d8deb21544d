/**
 * The model configuration of a Hugging Face `config.json` for the Llama family
 * (LlamaForCausalLM: Llama 2/3/3.1/3.2; MistralForCausalLM: Mistral v0.1–v0.3;
 * Qwen2ForCausalLM: Qwen2/2.5), the tensors such a model has, and a checker that a
 * set of weights matches them.
 *
 * Letters: V = vocab, D = hidden, F = ffn (intermediate), L = layers, H = heads,
 * Hkv = kv heads, hd = head dim.
 *
 * Defaults follow transformers' config classes where a field is absent, except the five
 * size fields (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
 * num_attention_heads), which are required: defaulting them to a 7B shape would hide a
 * broken config.
 * @module
 */
import { join } from "node:path";
import * as z from "zod";
import { formatZodIssues, LatheError } from "../foundation/errors.ts";

/** Architectures lathe trains, as written in `config.json` `architectures[0]`. */
export const SUPPORTED_ARCHITECTURES = [
  "LlamaForCausalLM",
  "MistralForCausalLM",
  "Qwen2ForCausalLM",
] as const;

/** One of {@link SUPPORTED_ARCHITECTURES}. */
export type Architecture = typeof SUPPORTED_ARCHITECTURES[number];

/**
 * RoPE frequency scaling (`rope_scaling`, or `rope_parameters` in newer configs).
 * - `linear`: positions divided by `factor`.
 * - `dynamic` (dynamic NTK): transformers rescales θ only once the sequence is longer than
 *   `originalMaxPositionEmbeddings`; up to that length it is plain RoPE, which is what
 *   lathe computes. Longer sequences are refused by {@link checkSequenceLength}.
 * - `llama3`: Llama 3.1/3.2 wavelength-banded scaling.
 * - `yarn`: YaRN with `betaFast`/`betaSlow` ramps and attention factor (transformers' defaults).
 */
export type RopeScaling =
  | { type: "linear"; factor: number }
  | { type: "dynamic"; factor: number; originalMaxPositionEmbeddings: number }
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
    originalMaxPositionEmbeddings: number;
    betaFast: number;
    betaSlow: number;
    mscale: number | null;
    mscaleAllDim: number | null;
    /** Explicit attention factor; null means transformers' default 0.1·ln(factor) + 1. */
    attentionFactor: number | null;
  };

/** A validated model configuration. Field names are lathe's; comments give the HF key. */
export interface ModelConfig {
  /** `architectures[0]`. */
  readonly architecture: Architecture;
  /** `model_type`: "llama" | "mistral" | "qwen2". */
  readonly modelType: "llama" | "mistral" | "qwen2";
  /** V, `vocab_size`. */
  readonly vocabSize: number;
  /** D, `hidden_size`. */
  readonly hiddenSize: number;
  /** F, `intermediate_size`. */
  readonly intermediateSize: number;
  /** L, `num_hidden_layers`. */
  readonly numLayers: number;
  /** H, `num_attention_heads`. */
  readonly numHeads: number;
  /** Hkv, `num_key_value_heads` (default H). */
  readonly numKvHeads: number;
  /** hd, `head_dim` (default D / H). */
  readonly headDim: number;
  /** `rms_norm_eps`. */
  readonly rmsNormEps: number;
  /** RoPE base θ, `rope_theta` (or `rope_parameters.rope_theta`). */
  readonly ropeTheta: number;
  /** `rope_scaling` / `rope_parameters`; null for plain RoPE. */
  readonly ropeScaling: RopeScaling | null;
  /** `max_position_embeddings`. */
  readonly maxPositionEmbeddings: number;
  /** `hidden_act`; only SwiGLU's "silu" is supported. */
  readonly hiddenAct: "silu";
  /** q/k/v projections have a bias (Qwen2 always; Llama with `attention_bias`). */
  readonly qkvBias: boolean;
  /** o projection has a bias (Llama with `attention_bias`). */
  readonly oBias: boolean;
  /** gate/up/down projections have a bias (Llama `mlp_bias`). */
  readonly mlpBias: boolean;
  /** `tie_word_embeddings`: lm_head shares `model.embed_tokens.weight`. */
  readonly tieWordEmbeddings: boolean;
  /**
   * Sliding-window size per layer, or null for full causal attention. A query at
   * position i sees keys j with i − W < j ≤ i (transformers' `sliding_window_overlay`).
   * Mistral: `sliding_window` on every layer; Qwen2: only with `use_sliding_window`, on
   * layers ≥ `max_window_layers` (or as `layer_types` says).
   */
  readonly layerWindows: readonly (number | null)[];
  /** `bos_token_id`. */
  readonly bosTokenId: number | null;
  /** `eos_token_id`, always a list. */
  readonly eosTokenIds: readonly number[];
  /** `pad_token_id`. */
  readonly padTokenId: number | null;
  /** `torch_dtype` (or `dtype`): the checkpoint's stored precision, e.g. "bfloat16". */
  readonly torchDtype: string | null;
  /** `initializer_range` (std of the normal init). */
  readonly initializerRange: number;
  /** `quantization_config` as written, when present. */
  readonly quantizationConfig: Readonly<Record<string, unknown>> | null;
}

const MODEL_TYPES: Record<Architecture, ModelConfig["modelType"]> = {
  LlamaForCausalLM: "llama",
  MistralForCausalLM: "mistral",
  Qwen2ForCausalLM: "qwen2",
};

// transformers' defaults for fields a config may leave out.
const DEFAULTS: Record<ModelConfig["modelType"], { maxPositions: number; slidingWindow: number | null }> = {
  llama: { maxPositions: 2048, slidingWindow: null },
  mistral: { maxPositions: 4096 * 32, slidingWindow: 4096 },
  qwen2: { maxPositions: 32768, slidingWindow: 4096 },
};

const count = z.number().int().positive();
const tokenId = z.number().int().nonnegative();

const RawConfig = z.looseObject({
  architectures: z.array(z.string()).min(1),
  model_type: z.string().optional(),
  vocab_size: count,
  hidden_size: count,
  intermediate_size: count,
  num_hidden_layers: count,
  num_attention_heads: count,
  num_key_value_heads: count.nullish(),
  head_dim: count.nullish(),
  rms_norm_eps: z.number().positive().optional(),
  rope_theta: z.number().positive().optional(),
  rope_scaling: z.record(z.string(), z.unknown()).nullish(),
  rope_parameters: z.record(z.string(), z.unknown()).nullish(),
  max_position_embeddings: count.optional(),
  hidden_act: z.string().optional(),
  attention_bias: z.boolean().optional(),
  mlp_bias: z.boolean().optional(),
  tie_word_embeddings: z.boolean().optional(),
  sliding_window: count.nullish(),
  use_sliding_window: z.boolean().optional(),
  max_window_layers: z.number().int().nonnegative().optional(),
  layer_types: z.array(z.enum(["full_attention", "sliding_attention"])).nullish(),
  bos_token_id: tokenId.nullish(),
  eos_token_id: z.union([tokenId, z.array(tokenId)]).nullish(),
  pad_token_id: tokenId.nullish(),
  torch_dtype: z.string().nullish(),
  dtype: z.string().nullish(),
  initializer_range: z.number().positive().optional(),
  quantization_config: z.record(z.string(), z.unknown()).nullish(),
});

function configError(source: string, what: string, hint?: string): never {
  throw new LatheError(`Cannot load model config "${source}": ${what}`, {
    hint: hint ?? "Fix config.json, or point to the model's original config.json.",
  });
}

/**
 * Validates a parsed `config.json` object. `source` names the file in errors.
 *
 * @example
 * ```ts
 * const config = parseModelConfig(JSON.parse(text), "models/x/config.json");
 * config.headDim; // hd
 * ```
 */
export function parseModelConfig(raw: unknown, source = "config.json"): ModelConfig {
  const parsed = RawConfig.safeParse(raw);
  if (!parsed.success) {
    const issues = formatZodIssues(parsed.error).split("\n").join("\n  ");
    configError(source, `invalid fields\n  ${issues}`);
  }
  const c = parsed.data;
  const arch = c.architectures[0];
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(arch)) {
    configError(
      source,
      `architecture "${arch}" is not supported`,
      `Supported architectures: ${SUPPORTED_ARCHITECTURES.join(", ")}.`,
    );
  }
  const architecture = arch as Architecture;
  const modelType = MODEL_TYPES[architecture];
  if (c.model_type !== undefined && c.model_type !== modelType) {
    configError(
      source,
      `model_type "${c.model_type}" does not match architecture "${arch}" (expects "${modelType}")`,
    );
  }
  const hiddenAct = c.hidden_act ?? "silu";
  if (hiddenAct !== "silu") {
    configError(
      source,
      `hidden_act is "${hiddenAct}"; only "silu" (SwiGLU) is supported`,
      "Llama, Mistral and Qwen2 checkpoints use silu; this config describes another model.",
    );
  }
  const numHeads = c.num_attention_heads;
  const numKvHeads = c.num_key_value_heads ?? numHeads;
  if (numHeads % numKvHeads !== 0) {
    configError(
      source,
      `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`,
    );
  }
  let headDim = c.head_dim ?? null;
  if (headDim === null) {
    if (c.hidden_size % numHeads !== 0) {
      configError(source, `hidden_size ${c.hidden_size} is not divisible by num_attention_heads ${numHeads}`);
    }
    headDim = c.hidden_size / numHeads;
  }
  if (headDim % 2 !== 0) configError(source, `head_dim ${headDim} is odd; RoPE rotates pairs of dimensions`);
  const defaults = DEFAULTS[modelType];
  const maxPositionEmbeddings = c.max_position_embeddings ?? defaults.maxPositions;
  const { theta, scaling } = parseRope(c, maxPositionEmbeddings, source);
  const eos = c.eos_token_id;
  return {
    architecture,
    modelType,
    vocabSize: c.vocab_size,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: c.rms_norm_eps ?? 1e-6,
    ropeTheta: theta,
    ropeScaling: scaling,
    maxPositionEmbeddings,
    hiddenAct: "silu",
    qkvBias: modelType === "qwen2" || (modelType === "llama" && c.attention_bias === true),
    oBias: modelType === "llama" && c.attention_bias === true,
    mlpBias: modelType === "llama" && c.mlp_bias === true,
    tieWordEmbeddings: c.tie_word_embeddings ?? false,
    layerWindows: layerWindows(c, modelType, defaults.slidingWindow, source),
    bosTokenId: c.bos_token_id ?? null,
    eosTokenIds: eos === null || eos === undefined ? [] : Array.isArray(eos) ? eos : [eos],
    padTokenId: c.pad_token_id ?? null,
    torchDtype: c.torch_dtype ?? c.dtype ?? null,
    initializerRange: c.initializer_range ?? 0.02,
    quantizationConfig: c.quantization_config ?? null,
  };
}

function layerWindows(
  c: z.infer<typeof RawConfig>,
  modelType: ModelConfig["modelType"],
  defaultWindow: number | null,
  source: string,
): (number | null)[] {
  const L = c.num_hidden_layers;
  if (modelType === "llama") return Array(L).fill(null);
  const window = c.sliding_window === undefined ? defaultWindow : c.sliding_window;
  if (modelType === "mistral") return Array(L).fill(window);
  // Qwen2: the window applies only with use_sliding_window.
  if (!(c.use_sliding_window ?? false) || window === null) return Array(L).fill(null);
  if (c.layer_types) {
    if (c.layer_types.length !== L) {
      configError(source, `layer_types has ${c.layer_types.length} entries for ${L} layers`);
    }
    return c.layer_types.map((t) => (t === "sliding_attention" ? window : null));
  }
  const first = c.max_window_layers ?? 28;
  return Array.from({ length: L }, (_, i) => (i >= first ? window : null));
}

function parseRope(
  c: z.infer<typeof RawConfig>,
  maxPositions: number,
  source: string,
): { theta: number; scaling: RopeScaling | null } {
  const key = c.rope_parameters ? "rope_parameters" : "rope_scaling";
  const r = (c.rope_parameters ?? c.rope_scaling ?? null) as Record<string, unknown> | null;
  const thetaRaw = r && c.rope_parameters && r.rope_theta !== undefined
    ? r.rope_theta
    : c.rope_theta ?? 10000;
  if (typeof thetaRaw !== "number" || !(thetaRaw > 0)) {
    configError(source, `${key}.rope_theta is ${JSON.stringify(thetaRaw)}; expected a positive number`);
  }
  const theta = thetaRaw as number;
  if (!r) return { theta, scaling: null };
  const type = r.rope_type ?? r.type;
  if (type === undefined || type === "default") return { theta, scaling: null };
  const num = (field: string, fallback?: number | null): number => {
    const v = r[field] ?? fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      configError(source, `${key}.${field} is ${JSON.stringify(r[field])}; expected a positive number`);
    }
    return v as number;
  };
  const optional = (
    field: string,
  ): number | null => (r[field] === undefined || r[field] === null ? null : num(field));
  switch (type) {
    case "linear":
      return { theta, scaling: { type: "linear", factor: num("factor") } };
    case "dynamic":
      return {
        theta,
        scaling: {
          type: "dynamic",
          factor: num("factor"),
          originalMaxPositionEmbeddings: num("original_max_position_embeddings", maxPositions),
        },
      };
    case "llama3": {
      const scaling = {
        type: "llama3",
        factor: num("factor"),
        lowFreqFactor: num("low_freq_factor"),
        highFreqFactor: num("high_freq_factor"),
        originalMaxPositionEmbeddings: num("original_max_position_embeddings"),
      } as const;
      if (scaling.lowFreqFactor >= scaling.highFreqFactor) {
        configError(
          source,
          `${key}.low_freq_factor ${scaling.lowFreqFactor} must be below high_freq_factor ${scaling.highFreqFactor}`,
        );
      }
      return { theta, scaling };
    }
    case "yarn":
      return {
        theta,
        scaling: {
          type: "yarn",
          factor: num("factor"),
          originalMaxPositionEmbeddings: num("original_max_position_embeddings", maxPositions),
          betaFast: num("beta_fast", 32),
          betaSlow: num("beta_slow", 1),
          mscale: optional("mscale"),
          mscaleAllDim: optional("mscale_all_dim"),
          attentionFactor: optional("attention_factor"),
        },
      };
    default:
      configError(
        source,
        `${key} type ${JSON.stringify(type)} is not supported`,
        `Supported RoPE scalings: linear, dynamic, llama3, yarn (or none).`,
      );
  }
}

/** Reads and validates `<dir>/config.json`. */
export async function loadModelConfig(dir: string): Promise<ModelConfig> {
  const path = join(dir, "config.json");
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      configError(
        path,
        "the file does not exist",
        "Point to a Hugging Face model directory (with config.json).",
      );
    }
    throw error;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    configError(path, `it is not valid JSON (${(error as Error).message})`);
  }
  return parseModelConfig(raw, path);
}

/**
 * Refuses sequence lengths the configuration cannot serve: longer than
 * `max_position_embeddings`, or, with dynamic NTK scaling, longer than its original
 * maximum (where transformers would rescale θ on the fly).
 */
export function checkSequenceLength(config: ModelConfig, seqLen: number): void {
  const s = config.ropeScaling;
  if (s?.type === "dynamic" && seqLen > s.originalMaxPositionEmbeddings) {
    throw new LatheError(
      `Cannot train with sequence length ${seqLen}: dynamic NTK RoPE scaling changes θ beyond ` +
        `${s.originalMaxPositionEmbeddings} positions, which lathe does not model`,
      { hint: `Use a sequence length of at most ${s.originalMaxPositionEmbeddings}.` },
    );
  }
  if (seqLen > config.maxPositionEmbeddings) {
    throw new LatheError(
      `Cannot train with sequence length ${seqLen}: the model's max_position_embeddings is ` +
        `${config.maxPositionEmbeddings}`,
      { hint: `Use a sequence length of at most ${config.maxPositionEmbeddings}.` },
    );
  }
}

/** The seven linear projections of a decoder layer, as named in HF checkpoints. */
export const PROJECTIONS = [
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
] as const;

/** One of {@link PROJECTIONS}. */
export type Projection = typeof PROJECTIONS[number];

/** The HF module path of a projection in layer `i`, e.g. `model.layers.3.self_attn.q_proj`. */
export function projectionPath(layer: number, proj: Projection): string {
  const block = proj === "gate_proj" || proj === "up_proj" || proj === "down_proj" ? "mlp" : "self_attn";
  return `model.layers.${layer}.${block}.${proj}`;
}

/**
 * `[out, in]` of a projection's weight:
 * q [H·hd, D], k/v [Hkv·hd, D], o [D, H·hd], gate/up [F, D], down [D, F].
 */
export function projectionShape(config: ModelConfig, proj: Projection): [number, number] {
  const { hiddenSize: D, intermediateSize: F, numHeads: H, numKvHeads: Hkv, headDim: hd } = config;
  switch (proj) {
    case "q_proj":
      return [H * hd, D];
    case "k_proj":
    case "v_proj":
      return [Hkv * hd, D];
    case "o_proj":
      return [D, H * hd];
    case "gate_proj":
    case "up_proj":
      return [F, D];
    case "down_proj":
      return [D, F];
  }
}

function hasBias(config: ModelConfig, proj: Projection): boolean {
  if (proj === "q_proj" || proj === "k_proj" || proj === "v_proj") return config.qkvBias;
  if (proj === "o_proj") return config.oBias;
  return config.mlpBias;
}

/**
 * Every tensor the model needs, name -> shape, in transformers' `state_dict` order
 * (embeddings; per layer attention projections, MLP projections, the two norms; final
 * norm; lm_head). `lm_head.weight` [V, D] is listed only when embeddings are not tied.
 */
export function expectedTensors(config: ModelConfig): Map<string, number[]> {
  const { vocabSize: V, hiddenSize: D } = config;
  const out = new Map<string, number[]>();
  out.set("model.embed_tokens.weight", [V, D]);
  for (let i = 0; i < config.numLayers; i++) {
    for (const proj of PROJECTIONS) {
      const [o, inp] = projectionShape(config, proj);
      out.set(`${projectionPath(i, proj)}.weight`, [o, inp]);
      if (hasBias(config, proj)) out.set(`${projectionPath(i, proj)}.bias`, [o]);
    }
    out.set(`model.layers.${i}.input_layernorm.weight`, [D]);
    out.set(`model.layers.${i}.post_attention_layernorm.weight`, [D]);
  }
  out.set("model.norm.weight", [D]);
  if (!config.tieWordEmbeddings) out.set("lm_head.weight", [V, D]);
  return out;
}

// Buffers some older checkpoints carry that the model recomputes.
const IGNORED = /^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/;

/** Options for {@link checkWeights}. */
export interface CheckWeightsOptions {
  /** Names to leave out of the check (e.g. quantization side tensors, checked elsewhere). */
  ignore?: (name: string) => boolean;
  /**
   * Problems the caller found in the same tensors (e.g. a quantized layout), listed in the same
   * error after the missing, wrong-shape and unexpected ones; each item is a sentence.
   */
  problems?: readonly { readonly label: string; readonly items: readonly string[] }[];
  /** The error's hint when one of `problems` has items (default: the hint for mismatched weights). */
  hint?: string;
}

/**
 * Checks that `tensors` (name and shape of every stored tensor) are exactly what `config`
 * needs: every expected tensor present with its shape, nothing unexpected. A tied
 * checkpoint may still store `lm_head.weight` (transformers ignores it); its shape is
 * checked. Throws one LatheError listing every problem; `source` names the weights.
 */
export function checkWeights(
  config: ModelConfig,
  tensors: Iterable<{ readonly name: string; readonly shape: readonly number[] }>,
  source: string,
  options: CheckWeightsOptions = {},
): void {
  const expected = expectedTensors(config);
  const seen = new Set<string>();
  const mismatched: string[] = [];
  const extra: string[] = [];
  for (const t of tensors) {
    if (options.ignore?.(t.name) || IGNORED.test(t.name)) continue;
    seen.add(t.name);
    const want = expected.get(t.name) ??
      (t.name === "lm_head.weight" && config.tieWordEmbeddings
        ? [config.vocabSize, config.hiddenSize]
        : undefined);
    if (!want) extra.push(t.name);
    else if (want.length !== t.shape.length || want.some((d, i) => d !== t.shape[i])) {
      mismatched.push(`"${t.name}" is [${t.shape.join(", ")}], expected [${want.join(", ")}]`);
    }
  }
  const missing = [...expected.keys()].filter((n) => !seen.has(n));
  const further = (options.problems ?? []).filter((p) => p.items.length > 0);
  if (missing.length + mismatched.length + extra.length + further.length === 0) return;
  const list = (label: string, items: string[], quote: boolean): string[] =>
    items.length === 0 ? [] : [
      `${label} (${items.length}): ${items.slice(0, 5).map((s) => (quote ? `"${s}"` : s)).join("; ")}` +
      (items.length > 5 ? `; … and ${items.length - 5} more` : ""),
    ];
  const lines = [
    ...list("missing", missing, true),
    ...list("wrong shape", mismatched, false),
    ...list("unexpected", extra, true),
    ...further.flatMap((p) => list(p.label, [...p.items], false)),
  ];
  const hints = [
    missing.length + mismatched.length + extra.length > 0 || options.hint === undefined
      ? "The weights and config.json come from different models, or the download is incomplete."
      : null,
    further.length > 0 ? options.hint : null,
  ];
  throw new LatheError(
    `Cannot load weights "${source}": they do not match config.json (${config.architecture}, ` +
      `D=${config.hiddenSize}, L=${config.numLayers}, V=${config.vocabSize})\n  ${lines.join("\n  ")}`,
    { hint: hints.filter((h) => h).join(" ") },
  );
}
