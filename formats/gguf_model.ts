/**
 * A Hugging Face model directory (Llama, Mistral, Qwen2) → one GGUF file llama.cpp runs, as
 * llama.cpp's `convert_hf_to_gguf.py` followed by `llama-quantize` would make it.
 *
 * - Architecture: `llama` for Llama and Mistral, `qwen2` for Qwen2, with llama.cpp's hyperparameter
 *   keys (`<arch>.context_length`, …; FORMATS.md "GGUF").
 * - Tensors renamed (`model.layers.{i}.self_attn.q_proj.weight` → `blk.{i}.attn_q.weight`, …) with
 *   ggml shapes (`ne` reversed: a PyTorch `[out, in]` weight is `ne = [in, out]`), written in layer
 *   order: token_embd, blk.0 …, output_norm, output, rope_freqs.
 * - For `llama`, the rows of Q and K (weights and biases) are permuted from transformers'
 *   rotate-half RoPE layout to llama.cpp's interleaved one:
 *     W'[h·hd + 2i + j] = W[h·hd + j·hd/2 + i]   (h < n_head, i < hd/2, j ∈ {0, 1})
 *   i.e. `w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`, with `n_head_kv` for K. Qwen2 keeps its
 *   layout (llama.cpp applies NEOX-style RoPE to it).
 * - Llama 3 RoPE scaling travels as `rope_freqs.weight`, the factor each frequency is divided by:
 *   base_inv_freq[i] / scaled_inv_freq[i] (`ropeFactors`, which the caller computes with
 *   kernels/rope_frequencies.ts: this layer sits below the kernels).
 * - Each tensor's type is the file type's choice for it (formats/gguf_quants.ts `tensorType`: 1-D
 *   tensors F32, Q4_K_M's per-tensor mix, fallbacks for rows that are not a multiple of a block).
 *
 * Streaming: one tensor is read, converted and written at a time.
 * @module
 */
import { join } from "node:path";
import { LatheError } from "../foundation/errors.ts";
import { gguf, type GgufTensor, type GgufValue, writeGguf } from "./gguf.ts";
import {
  GGML_TYPE,
  ggmlBytes,
  type GgmlTypeName,
  type GgufFileType,
  LLAMA_FTYPE,
  llamaQuantizeOrder,
  MixCounters,
  tensorType,
} from "./gguf_quants.ts";
import { QuantizePool } from "./gguf_quant_pool.ts";
import { ggufTokenizerMetadata } from "./gguf_tokenizer.ts";
import { loadModelConfig, type ModelConfig } from "./model_config.ts";
import { ModelWeights, toFloat32 } from "./safetensors.ts";

/** GGUF file types the export writes. */
export const GGUF_FILE_TYPES: readonly GgufFileType[] = [
  "F16",
  "BF16",
  "Q8_0",
  "Q4_0",
  "Q4_K_M",
  "Q5_K_M",
  "Q6_K",
];

/** The llama.cpp architecture of a model, or a clear refusal. */
export function ggufArchitecture(config: ModelConfig): "llama" | "qwen2" {
  switch (config.architecture) {
    case "LlamaForCausalLM":
    case "MistralForCausalLM":
      return "llama";
    case "Qwen2ForCausalLM":
      return "qwen2";
  }
}

const LAYER_NAMES: Record<string, string> = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
};
/** Order of a layer's tensors in the file (llama.cpp's converter order). */
const LAYER_ORDER = Object.values(LAYER_NAMES);

/** The GGUF name of a Hugging Face tensor name, or null for tensors llama.cpp has no use for. */
export function ggufTensorName(hfName: string): string | null {
  if (hfName === "model.embed_tokens.weight") return "token_embd.weight";
  if (hfName === "model.norm.weight") return "output_norm.weight";
  if (hfName === "lm_head.weight") return "output.weight";
  const m = /^model\.layers\.(\d+)\.(.+)\.(weight|bias)$/.exec(hfName);
  if (!m || !(m[2] in LAYER_NAMES)) return null;
  return `blk.${m[1]}.${LAYER_NAMES[m[2]]}.${m[3]}`;
}

/**
 * Permutes the rows of Q or K from rotate-half to interleaved RoPE order (see module doc).
 * `values` holds `nHead·hd` rows of `rowLength`; returns a new array.
 */
export function permuteRope(values: Float32Array, nHead: number, rowLength: number): Float32Array {
  const rows = values.length / rowLength;
  const hd = rows / nHead;
  if (!Number.isInteger(hd) || hd % 2 !== 0) {
    throw new LatheError(
      `Cannot permute ${rows} rows for ${nHead} heads: the head size is not an even integer`,
    );
  }
  const half = hd / 2;
  const out = new Float32Array(values.length);
  for (let h = 0; h < nHead; h++) {
    for (let i = 0; i < half; i++) {
      for (let j = 0; j < 2; j++) {
        const to = (h * hd + 2 * i + j) * rowLength;
        const from = (h * hd + j * half + i) * rowLength;
        out.set(values.subarray(from, from + rowLength), to);
      }
    }
  }
  return out;
}

/** Whether a GGUF tensor name is llama's Q or K (weight or bias) and its head count. */
function ropeHeads(name: string, config: ModelConfig): number | null {
  if (/\.attn_q\.(weight|bias)$/.test(name)) return config.numHeads;
  if (/\.attn_k\.(weight|bias)$/.test(name)) return config.numKvHeads;
  return null;
}

/** The hyperparameter metadata of `config` for llama.cpp's `arch`. */
export function ggufModelMetadata(config: ModelConfig, arch: "llama" | "qwen2"): [string, GgufValue][] {
  const out: [string, GgufValue][] = [
    [`${arch}.vocab_size`, gguf.u32(config.vocabSize)],
    [`${arch}.context_length`, gguf.u32(config.maxPositionEmbeddings)],
    [`${arch}.embedding_length`, gguf.u32(config.hiddenSize)],
    [`${arch}.block_count`, gguf.u32(config.numLayers)],
    [`${arch}.feed_forward_length`, gguf.u32(config.intermediateSize)],
    [`${arch}.attention.head_count`, gguf.u32(config.numHeads)],
    [`${arch}.attention.head_count_kv`, gguf.u32(config.numKvHeads)],
    [`${arch}.rope.freq_base`, gguf.f32(config.ropeTheta)],
    [`${arch}.attention.layer_norm_rms_epsilon`, gguf.f32(config.rmsNormEps)],
    [`${arch}.rope.dimension_count`, gguf.u32(config.headDim)],
  ];
  if (config.headDim * config.numHeads !== config.hiddenSize) {
    out.push([`${arch}.attention.key_length`, gguf.u32(config.headDim)]);
    out.push([`${arch}.attention.value_length`, gguf.u32(config.headDim)]);
  }
  const s = config.ropeScaling;
  if (s?.type === "linear") {
    out.push([`${arch}.rope.scaling.type`, gguf.str("linear")], [
      `${arch}.rope.scaling.factor`,
      gguf.f32(s.factor),
    ]);
  }
  return out;
}

/** What the model cannot carry into llama.cpp (refused) and what llama.cpp will do differently (warned). */
function checkSupported(config: ModelConfig, where: string): string[] {
  const s = config.ropeScaling;
  if (s && s.type !== "linear" && s.type !== "llama3") {
    throw new LatheError(`Cannot export "${where}" to GGUF: RoPE scaling "${s.type}" is not exported`, {
      hint: "GGUF export supports plain RoPE, linear and llama3 scaling",
    });
  }
  if (config.mlpBias) {
    throw new LatheError(`Cannot export "${where}" to GGUF: its MLP projections have biases (mlp_bias)`, {
      hint: "llama.cpp's llama architecture has no MLP biases",
    });
  }
  const warnings: string[] = [];
  const windows = config.layerWindows.filter((w): w is number => w !== null);
  if (windows.some((w) => w < config.maxPositionEmbeddings)) {
    warnings.push(
      `the model attends through a sliding window of ${
        Math.min(...windows)
      } tokens; llama.cpp's ${config.architecture} architecture attends to the whole context, so outputs past that length differ`,
    );
  }
  return warnings;
}

/** Options for {@link writeModelGguf}. */
export interface WriteModelGgufOptions {
  fileType: GgufFileType;
  /** `general.name`. */
  name: string;
  /** Whether transformers adds BOS / EOS to a plain text (steps/tokenize `textSpecials`). */
  addBos: boolean;
  addEos: boolean;
  /** The chat template, or null. */
  chatTemplate: string | null;
  /**
   * For Llama 3 RoPE scaling: base_inv_freq[i] / scaled_inv_freq[i] for i < hd/2, written as
   * `rope_freqs.weight` (kernels/rope_frequencies.ts `ropeFreqFactors`). Required with llama3 scaling.
   */
  ropeFactors?: Float32Array | null;
  /** Extra `general.*` metadata (e.g. provenance), appended after the standard keys. */
  extra?: [string, GgufValue][];
  /** Quantization workers (default: the machine's cores; 1: the calling thread only). */
  threads?: number;
  /** Called after each tensor with its index, the tensor count and its GGUF name. */
  onTensor?: (done: number, total: number, name: string) => void;
}

/** What {@link writeModelGguf} wrote. */
export interface ModelGgufResult {
  path: string;
  bytes: number;
  arch: "llama" | "qwen2";
  fileType: GgufFileType;
  /** Tensor count by ggml type name. */
  types: Record<string, number>;
  /** What llama.cpp will do differently from transformers. */
  warnings: string[];
}

async function readJson(path: string): Promise<Record<string, unknown>> {
  try {
    return JSON.parse(await Deno.readTextFile(path));
  } catch (error) {
    throw new LatheError(`Cannot export to GGUF: "${path}" cannot be read (${(error as Error).message})`);
  }
}

/** Converts the model in `dir` to a GGUF file at `path` (see module doc). */
export async function writeModelGguf(
  dir: string,
  path: string,
  options: WriteModelGgufOptions,
): Promise<ModelGgufResult> {
  const config = await loadModelConfig(dir);
  if (config.quantizationConfig) {
    throw new LatheError(`Cannot export "${dir}" to GGUF: it is a 4-bit checkpoint`, {
      hint: "export the merged 16-bit model (the merge step's output)",
    });
  }
  if (!GGUF_FILE_TYPES.includes(options.fileType)) {
    throw new LatheError(`Cannot export to GGUF type "${options.fileType}"`, {
      hint: `supported types: ${GGUF_FILE_TYPES.join(", ")}`,
    });
  }
  const arch = ggufArchitecture(config);
  const warnings = checkSupported(config, dir);
  const rawConfig = await readJson(join(dir, "config.json"));
  const tokenizer = ggufTokenizerMetadata({
    tokenizerJson: await readJson(join(dir, "tokenizer.json")),
    tokenizerConfig: await readJson(join(dir, "tokenizer_config.json")),
    modelConfig: rawConfig,
    chatTemplate: options.chatTemplate,
    vocabSize: config.vocabSize,
    addBos: options.addBos,
    addEos: options.addEos,
    where: dir,
  });
  using weights = await ModelWeights.open(dir);
  using pool = new QuantizePool(options.threads);
  const present = new Set(weights.names());

  // Tensors in layer order, each with its GGUF name and ggml shape.
  const plan: { hf: string | null; name: string; ne: number[] }[] = [];
  const add = (hf: string) => {
    const name = ggufTensorName(hf);
    if (name === null || !present.has(hf)) return;
    plan.push({ hf, name, ne: [...weights.info(hf).shape].reverse() });
  };
  add("model.embed_tokens.weight");
  for (let i = 0; i < config.numLayers; i++) {
    const names = weights.names().filter((n) => n.startsWith(`model.layers.${i}.`));
    const order = (n: string) => {
      const g = ggufTensorName(n) ?? "";
      return LAYER_ORDER.indexOf(g.split(".")[2]) * 2 + (g.endsWith(".bias") ? 1 : 0);
    };
    for (const n of names.filter((n) => ggufTensorName(n) !== null).sort((a, b) => order(a) - order(b))) {
      add(n);
    }
  }
  add("model.norm.weight");
  if (!config.tieWordEmbeddings) add("lm_head.weight");
  let ropeFactors: Float32Array | null = null;
  if (config.ropeScaling?.type === "llama3") {
    ropeFactors = options.ropeFactors ?? null;
    if (ropeFactors?.length !== config.headDim / 2) {
      throw new Error(
        `writeModelGguf: llama3 RoPE scaling needs ropeFactors of length ${config.headDim / 2}`,
      );
    }
    plan.push({ hf: null, name: "rope_freqs.weight", ne: [config.headDim / 2] });
  }

  // Types chosen as llama-quantize visits the tensors (its counters depend on the order).
  const counters = new MixCounters(plan.map((p) => p.name));
  const model = {
    nLayers: config.numLayers,
    nHead: config.numHeads,
    nHeadKv: config.numKvHeads,
    tiedEmbeddings: config.tieWordEmbeddings,
    architecture: arch,
  };
  const chosen = new Map<string, GgmlTypeName>();
  const byName = new Map(plan.map((p) => [p.name, p]));
  for (const n of llamaQuantizeOrder(byName.keys())) {
    const p = byName.get(n)!;
    chosen.set(n, tensorType(options.fileType, { name: p.name, shape: p.ne }, model, counters));
  }
  const types: Record<string, number> = {};
  const tensors: GgufTensor[] = plan.map((p, index) => {
    const type = chosen.get(p.name)!;
    types[type] = (types[type] ?? 0) + 1;
    const count = p.ne.reduce((a, b) => a * b, 1);
    return {
      name: p.name,
      ne: p.ne,
      type: GGML_TYPE[type],
      bytes: ggmlBytes(type, count),
      data: async () => {
        let values: Float32Array;
        if (p.hf === null) values = ropeFactors!;
        else {
          const info = weights.info(p.hf);
          values = toFloat32(info.dtype, await weights.readBytes(p.hf), `${dir}: ${p.hf}`);
          const heads = arch === "llama" ? ropeHeads(p.name, config) : null;
          if (heads !== null) values = permuteRope(values, heads, p.ne.length > 1 ? p.ne[0] : 1);
        }
        const bytes = await pool.quantize(type, values, p.ne[0]);
        options.onTensor?.(index + 1, plan.length, p.name);
        return bytes;
      },
    };
  });
  const metadata: [string, GgufValue][] = [
    ["general.architecture", gguf.str(arch)],
    ["general.type", gguf.str("model")],
    ["general.name", gguf.str(options.name)],
    ...(options.extra ?? []),
    ...ggufModelMetadata(config, arch),
    ["general.file_type", gguf.u32(LLAMA_FTYPE[options.fileType])],
    ["general.quantization_version", gguf.u32(2)],
    ...tokenizer,
  ];
  const bytes = await writeGguf(path, metadata, tensors);
  return { path, bytes, arch, fileType: options.fileType, types, warnings };
}
