/**
 * Tiny random-init checkpoints in Hugging Face format, for tests and the demo: a model
 * directory with `config.json` (real HF field names and architectures), safetensors
 * weights (one file, or shards with `model.safetensors.index.json`),
 * `generation_config.json` and the tokenizer files copied from a tokenizer directory.
 *
 * Letters: V = vocab, D = hidden, F = ffn, L = layers, H = heads, Hkv = kv heads, hd = head dim.
 *
 * | arch    | class              | exercises                                                   |
 * | ------- | ------------------ | ----------------------------------------------------------- |
 * | llama   | LlamaForCausalLM   | tied embeddings, llama3 RoPE scaling (all three bands)      |
 * | mistral | MistralForCausalLM | sliding window 32, untied lm_head                           |
 * | qwen2   | Qwen2ForCausalLM   | q/k/v biases, θ = 1e6, untied lm_head                       |
 *
 * Init as transformers' `_init_weights`: linear weights and embeddings ~ N(0, 0.02²),
 * RMSNorm weights = 1. Biases, which transformers zeroes, are drawn from N(0, 0.02²) here
 * so that tests see them act. Each tensor draws from its own PCG32 stream
 * (seed, stream = the tensor's index in {@link expectedTensors} order), so the bytes are a
 * function of (arch, size, seed, dtype, sharding) alone; bf16 weights are the f32 values
 * rounded to nearest even.
 * @module
 */
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { writeFileAtomic } from "../../foundation/atomic.ts";
import { canonicalJson } from "../../foundation/hash.ts";
import {
  fromFloat32,
  INDEX_FILE,
  SINGLE_FILE,
  type TensorSource,
  writeModelWeights,
} from "../../formats/safetensors.ts";
import { expectedTensors, type ModelConfig, parseModelConfig } from "../../formats/model_config.ts";
import { Pcg32 } from "../../foundation/random.ts";

/** Architectures the generator writes. */
export const TINY_ARCHS = ["llama", "mistral", "qwen2"] as const;
/** One of {@link TINY_ARCHS}. */
export type TinyArch = typeof TINY_ARCHS[number];

/** Sizes: D, L, H, Hkv, F (hd = D / H). */
export const TINY_SIZES = {
  nano: { hidden: 64, layers: 2, heads: 4, kvHeads: 2, ffn: 128 },
  micro: { hidden: 128, layers: 4, heads: 4, kvHeads: 2, ffn: 256 },
  /** Rows that are multiples of 256: GGUF's K-quant blocks (Q4_K, Q5_K, Q6_K) fit without fallback. */
  milli: { hidden: 256, layers: 2, heads: 4, kvHeads: 2, ffn: 512 },
} as const;
/** One of the keys of {@link TINY_SIZES}. */
export type TinySize = keyof typeof TINY_SIZES;

/** Storage precision of the weights. */
export type TinyDtype = "f32" | "bf16";

/** Files copied from the tokenizer directory when present (tokenizer.json is required). */
export const TOKENIZER_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
] as const;

/** What the config needs from the tokenizer. */
export interface TokenizerInfo {
  /** V: highest token id + 1 (base vocabulary and added tokens). */
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  readonly padTokenId: number | null;
}

/** Options for {@link writeTinyModel}. */
export interface TinyModelOptions {
  readonly arch: TinyArch;
  readonly size: TinySize;
  /** Seed of the weight init; default 0. */
  readonly seed?: number;
  /** Weight precision; default "f32". */
  readonly dtype?: TinyDtype;
  /** Split the weights into shards of at most this many bytes; default one file. */
  readonly maxShardBytes?: number;
  /** Directory with tokenizer.json (and tokenizer_config.json). */
  readonly tokenizerDir: string;
}

function tokenContent(value: unknown): string | null {
  if (typeof value === "string") return value;
  if (value && typeof value === "object" && typeof (value as { content?: unknown }).content === "string") {
    return (value as { content: string }).content;
  }
  return null;
}

/**
 * Reads the vocabulary size and the bos/eos/pad ids from `tokenizer.json` and
 * `tokenizer_config.json` in `dir`.
 */
export async function readTokenizerInfo(dir: string): Promise<TokenizerInfo> {
  const path = join(dir, "tokenizer.json");
  let tokenizer: {
    model?: { vocab?: Record<string, number> | [string, number][] };
    added_tokens?: { id: number; content: string }[];
  };
  try {
    tokenizer = JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    throw new LatheError(`Cannot read tokenizer "${path}": ${(error as Error).message}`, {
      hint: "Pass a directory with a Hugging Face tokenizer.json (e.g. data/demo/tokenizer).",
      cause: error,
    });
  }
  const ids = new Map<string, number>();
  const vocab = tokenizer.model?.vocab;
  // BPE/WordPiece store {token: id}; Unigram stores [[token, score], ...] with id = position.
  if (Array.isArray(vocab)) vocab.forEach(([token], i) => ids.set(token, i));
  else for (const [token, id] of Object.entries(vocab ?? {})) ids.set(token, id);
  for (const t of tokenizer.added_tokens ?? []) ids.set(t.content, t.id);
  if (ids.size === 0) throw new LatheError(`Cannot read tokenizer "${path}": it has no vocabulary`);
  let config: Record<string, unknown> = {};
  try {
    config = JSON.parse(await Deno.readTextFile(join(dir, "tokenizer_config.json")));
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  const idOf = (key: string): number | null => {
    const content = tokenContent(config[key]);
    return content === null ? null : ids.get(content) ?? null;
  };
  return {
    vocabSize: Math.max(...ids.values()) + 1,
    bosTokenId: idOf("bos_token"),
    eosTokenId: idOf("eos_token"),
    padTokenId: idOf("pad_token"),
  };
}

/** The `config.json` object of a tiny model, keys sorted as transformers writes them. */
export function tinyConfigJson(
  arch: TinyArch,
  size: TinySize,
  tokenizer: TokenizerInfo,
  dtype: TinyDtype = "f32",
): Record<string, unknown> {
  const s = TINY_SIZES[size];
  const common = {
    attention_dropout: 0.0,
    bos_token_id: tokenizer.bosTokenId,
    eos_token_id: tokenizer.eosTokenId,
    hidden_act: "silu",
    hidden_size: s.hidden,
    initializer_range: 0.02,
    intermediate_size: s.ffn,
    max_position_embeddings: 2048,
    num_attention_heads: s.heads,
    num_hidden_layers: s.layers,
    num_key_value_heads: s.kvHeads,
    torch_dtype: dtype === "bf16" ? "bfloat16" : "float32",
    use_cache: true,
    vocab_size: tokenizer.vocabSize,
  };
  let config: Record<string, unknown>;
  switch (arch) {
    case "llama":
      config = {
        ...common,
        architectures: ["LlamaForCausalLM"],
        model_type: "llama",
        attention_bias: false,
        mlp_bias: false,
        head_dim: s.hidden / s.heads,
        pretraining_tp: 1,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        // Llama 3.2's scheme on a short context: with hd = 16 and θ = 5e5 the 8 frequencies
        // fall in all three bands (kept, interpolated, divided by factor).
        rope_scaling: {
          factor: 8.0,
          high_freq_factor: 4.0,
          low_freq_factor: 1.0,
          original_max_position_embeddings: 256,
          rope_type: "llama3",
        },
        tie_word_embeddings: true,
      };
      break;
    case "mistral":
      config = {
        ...common,
        architectures: ["MistralForCausalLM"],
        model_type: "mistral",
        head_dim: s.hidden / s.heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        sliding_window: 32,
        tie_word_embeddings: false,
      };
      break;
    case "qwen2":
      config = {
        ...common,
        architectures: ["Qwen2ForCausalLM"],
        model_type: "qwen2",
        max_window_layers: s.layers,
        rms_norm_eps: 1e-6,
        rope_scaling: null,
        rope_theta: 1000000.0,
        sliding_window: 2048,
        tie_word_embeddings: false,
        use_sliding_window: false,
      };
      break;
  }
  return JSON.parse(canonicalJson(config));
}

/**
 * The tensors of a tiny model, generated lazily (one tensor in memory at a time), in
 * transformers' state_dict order.
 */
export function tinyModelTensors(config: ModelConfig, seed: number, dtype: TinyDtype): TensorSource[] {
  const std = config.initializerRange;
  return [...expectedTensors(config)].map(([name, shape], stream) => ({
    name,
    dtype: dtype === "bf16" ? "BF16" : "F32",
    shape,
    data: () => {
      const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
      if (name.endsWith("norm.weight")) values.fill(1);
      else new Pcg32(seed, stream).fillNormal(values, 0, std);
      return fromFloat32(values, dtype === "bf16" ? "BF16" : "F32");
    },
  }));
}

function isOwnedFile(name: string): boolean {
  return name === "config.json" || name === "generation_config.json" || name === SINGLE_FILE ||
    name === INDEX_FILE || /^model-\d{5}-of-\d{5}\.safetensors$/.test(name) ||
    (TOKENIZER_FILES as readonly string[]).includes(name);
}

/**
 * Writes a tiny model into `dir`. Files a previous run wrote there (config, weights,
 * shards, index, tokenizer) are removed first so a layout change leaves nothing stale;
 * other files are left alone. Returns the parsed config and the files written.
 */
export async function writeTinyModel(
  dir: string,
  options: TinyModelOptions,
): Promise<{ config: ModelConfig; files: string[] }> {
  const { arch, size, seed = 0, dtype = "f32" } = options;
  if (!(TINY_ARCHS as readonly string[]).includes(arch)) {
    throw new LatheError(`Cannot make tiny model: arch "${arch}" is not one of ${TINY_ARCHS.join(", ")}`);
  }
  if (!Object.hasOwn(TINY_SIZES, size)) {
    throw new LatheError(
      `Cannot make tiny model: size "${size}" is not one of ${Object.keys(TINY_SIZES).join(", ")}`,
    );
  }
  const tokenizer = await readTokenizerInfo(options.tokenizerDir);
  const json = tinyConfigJson(arch, size, tokenizer, dtype);
  const config = parseModelConfig(json, `tiny ${arch}-${size}`);
  await Deno.mkdir(dir, { recursive: true });
  for (const entry of Deno.readDirSync(dir)) {
    if (entry.isFile && isOwnedFile(entry.name)) await Deno.remove(join(dir, entry.name));
  }
  const files: string[] = [];
  for (const name of TOKENIZER_FILES) {
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(join(options.tokenizerDir, name));
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) continue;
      throw error;
    }
    await writeFileAtomic(join(dir, name), bytes);
    files.push(name);
  }
  files.push(
    ...await writeModelWeights(dir, tinyModelTensors(config, seed, dtype), {
      maxShardBytes: options.maxShardBytes,
    }),
  );
  const generation: Record<string, unknown> = { _from_model_config: true };
  if (tokenizer.bosTokenId !== null) generation.bos_token_id = tokenizer.bosTokenId;
  if (tokenizer.eosTokenId !== null) generation.eos_token_id = tokenizer.eosTokenId;
  if (tokenizer.padTokenId !== null) generation.pad_token_id = tokenizer.padTokenId;
  await writeFileAtomic(join(dir, "generation_config.json"), JSON.stringify(generation, null, 2) + "\n");
  await writeFileAtomic(join(dir, "config.json"), JSON.stringify(json, null, 2) + "\n");
  files.push("generation_config.json", "config.json");
  return { config, files };
}
