/**
 * Random-weight Hugging Face checkpoints with the real configuration of 7B/8B models, for the
 * training benchmark: `config.json` as the model's repository has it, and bf16 weights in
 * `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`, laid out as
 * formats/safetensors.ts `writeModelWeights` lays them out (same greedy sharding, each file's
 * header and tensor order from its `planSafetensors`, the same index). Unlike it, shards are not
 * synced to disk: the checkpoint is read back at once and deleted, so the page cache may hold it
 * and the write runs at memory speed rather than the disk's (each shard is still renamed into
 * place when complete).
 *
 * Speed: drawing 7·10⁹ normals in JavaScript would take minutes, so one block of
 * {@link BLOCK_ELEMENTS} values ~ N(0, initializer_range²) is drawn once (PCG32), encoded as bf16,
 * and repeated into one pattern buffer as large as the largest tensor (plus one block). Every
 * matrix, embedding and bias is a slice of that buffer starting at its own offset inside the first
 * block, so tensors differ in phase but nothing is copied per tensor; RMSNorm weights are 1 as
 * transformers initialises them. Writing is then bound by copies into the page cache (the shards
 * are written concurrently) or, once the kernel throttles dirty pages, by the disk.
 * Host memory: the pattern buffer (256 MiB for Mistral 7B, 1 GiB for Llama 3 8B's embedding).
 *
 * Letters: V = vocab, D = hidden, F = ffn, L = layers.
 * @module
 */
import { join } from "node:path";
import { writeFileAtomic, writeJsonAtomic } from "../foundation/atomic.ts";
import { canonicalJson } from "../foundation/hash.ts";
import { LatheError } from "../foundation/errors.ts";
import { fromFloat32, INDEX_FILE, planSafetensors, SINGLE_FILE } from "../formats/safetensors.ts";
import { Progress } from "../foundation/progress.ts";
import { expectedTensors, type ModelConfig, parseModelConfig } from "../formats/model_config.ts";
import { Pcg32 } from "../foundation/random.ts";

/**
 * `config.json` of the benchmarked shapes, field for field as their Hugging Face repositories
 * publish them (mistralai/Mistral-7B-v0.3, meta-llama/Meta-Llama-3-8B, Qwen/Qwen2-7B).
 */
export const SHAPES = {
  "mistral-7b": {
    architectures: ["MistralForCausalLM"],
    attention_dropout: 0.0,
    bos_token_id: 1,
    eos_token_id: 2,
    hidden_act: "silu",
    hidden_size: 4096,
    initializer_range: 0.02,
    intermediate_size: 14336,
    max_position_embeddings: 32768,
    model_type: "mistral",
    num_attention_heads: 32,
    num_hidden_layers: 32,
    num_key_value_heads: 8,
    rms_norm_eps: 1e-5,
    rope_theta: 1000000.0,
    sliding_window: null,
    tie_word_embeddings: false,
    torch_dtype: "bfloat16",
    use_cache: true,
    vocab_size: 32768,
  },
  "llama3-8b": {
    architectures: ["LlamaForCausalLM"],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: 128000,
    eos_token_id: 128001,
    hidden_act: "silu",
    hidden_size: 4096,
    initializer_range: 0.02,
    intermediate_size: 14336,
    max_position_embeddings: 8192,
    model_type: "llama",
    num_attention_heads: 32,
    num_hidden_layers: 32,
    num_key_value_heads: 8,
    pretraining_tp: 1,
    rms_norm_eps: 1e-5,
    rope_scaling: null,
    rope_theta: 500000.0,
    tie_word_embeddings: false,
    torch_dtype: "bfloat16",
    use_cache: true,
    vocab_size: 128256,
  },
  "qwen2-7b": {
    architectures: ["Qwen2ForCausalLM"],
    attention_dropout: 0.0,
    bos_token_id: 151643,
    eos_token_id: 151643,
    hidden_act: "silu",
    hidden_size: 3584,
    initializer_range: 0.02,
    intermediate_size: 18944,
    max_position_embeddings: 131072,
    max_window_layers: 28,
    model_type: "qwen2",
    num_attention_heads: 28,
    num_hidden_layers: 28,
    num_key_value_heads: 4,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000.0,
    sliding_window: 131072,
    tie_word_embeddings: false,
    torch_dtype: "bfloat16",
    use_cache: true,
    use_sliding_window: false,
    vocab_size: 152064,
  },
} as const satisfies Record<string, Record<string, unknown>>;

/** One of the keys of {@link SHAPES}. */
export type ShapeName = keyof typeof SHAPES;

/** Values drawn once and repeated: 2²⁰ (2 MiB of bf16). */
export const BLOCK_ELEMENTS = 1 << 20;

/** Shard size as transformers' `save_pretrained` default (5 GB): Mistral 7B gets 3 shards. */
export const DEFAULT_SHARD_BYTES = 5e9;

/**
 * The `config.json` object of shape `name`, with `overrides` (HF keys) applied on top, keys
 * sorted: e.g. `{ num_hidden_layers: 4 }` for a shallower model of the same width.
 */
export function shapeConfigJson(
  name: string,
  overrides: Record<string, unknown> = {},
): Record<string, unknown> {
  if (!Object.hasOwn(SHAPES, name)) {
    throw new LatheError(`Cannot make a "${name}" checkpoint: the shape is unknown`, {
      hint: `Known shapes: ${Object.keys(SHAPES).join(", ")}.`,
    });
  }
  return JSON.parse(canonicalJson({ ...SHAPES[name as ShapeName], ...overrides }));
}

/** Options of {@link writeRandomCheckpoint}. */
export interface RandomCheckpointOptions {
  /** Seed of the repeated block (PCG32 stream 0); default 0. */
  seed?: number;
  /** Largest shard in bytes of tensor data; default {@link DEFAULT_SHARD_BYTES}. */
  maxShardBytes?: number;
  /** Elements of the repeated block; default {@link BLOCK_ELEMENTS}. */
  blockElements?: number;
  /** Progress label for the weights (stderr); none when absent. */
  progress?: string;
}

/** What {@link writeRandomCheckpoint} wrote. */
export interface RandomCheckpoint {
  config: ModelConfig;
  /** Files written, relative to the directory (shards, index, config.json). */
  files: string[];
  /** Bytes of tensor data. */
  weightBytes: number;
}

/**
 * Writes a random bf16 checkpoint for `configJson` (an HF `config.json` object, e.g. from
 * {@link shapeConfigJson}) into `dir`, which must exist. See the module documentation for how
 * the values are made.
 */
export async function writeRandomCheckpoint(
  dir: string,
  configJson: Record<string, unknown>,
  options: RandomCheckpointOptions = {},
): Promise<RandomCheckpoint> {
  const config = parseModelConfig(configJson, `${dir}/config.json`);
  const blockElements = options.blockElements ?? BLOCK_ELEMENTS;
  const expected = expectedTensors(config);
  const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
  const isNorm = (name: string) => name.endsWith("norm.weight");
  let largest = 0;
  let normLargest = 0;
  let weightBytes = 0;
  for (const [name, shape] of expected) {
    const n = numel(shape);
    weightBytes += 2 * n;
    if (isNorm(name)) normLargest = Math.max(normLargest, n);
    else largest = Math.max(largest, n);
  }
  const block = new Pcg32(options.seed ?? 0, 0).fillNormal(
    new Float32Array(blockElements),
    0,
    config.initializerRange,
  );
  // pattern = block repeated: tensor i reads [phase_i, phase_i + numel) with phase_i < blockElements.
  const pattern = new Uint8Array(2 * (largest + blockElements));
  pattern.set(fromFloat32(block, "BF16"));
  for (let filled = 2 * blockElements; filled < pattern.length; filled *= 2) {
    pattern.copyWithin(filled, 0, Math.min(filled, pattern.length - filled));
  }
  const ones = new Uint8Array(new Uint16Array(normLargest).fill(0x3f80).buffer); // bf16 1.0
  const sources = [...expected].map(([name, shape], i) => {
    const bytes = 2 * numel(shape);
    // 7919 is prime, so consecutive tensors start far apart inside the block.
    const phase = 2 * ((i * 7919) % blockElements);
    return {
      name,
      dtype: "BF16" as const,
      shape,
      bytes,
      data: isNorm(name) ? ones.subarray(0, bytes) : pattern.subarray(phase, phase + bytes),
    };
  });
  // Shards as writeModelWeights fills them: greedily, in state_dict order.
  const max = options.maxShardBytes ?? DEFAULT_SHARD_BYTES;
  const groups: (typeof sources)[] = [[]];
  let groupBytes = 0;
  for (const t of sources) {
    if (groups.at(-1)!.length > 0 && groupBytes + t.bytes > max) {
      groups.push([]);
      groupBytes = 0;
    }
    groups.at(-1)!.push(t);
    groupBytes += t.bytes;
  }
  const n = groups.length;
  const pad = (k: number) => String(k).padStart(5, "0");
  const names = n === 1
    ? [SINGLE_FILE]
    : groups.map((_, k) => `model-${pad(k + 1)}-of-${pad(n)}.safetensors`);
  const progress = options.progress ? new Progress(options.progress, weightBytes, "B") : null;
  const weightMap: Record<string, string> = {};
  // Shards are written concurrently: each write copies into the page cache on its own thread.
  await Promise.all(groups.map(async (group, k) => {
    const byName = new Map(group.map((t) => [t.name, t]));
    const plan = planSafetensors(group, { format: "pt" });
    const path = join(dir, names[k]);
    const tmp = `${path}.tmp`;
    {
      using file = await Deno.open(tmp, { write: true, create: true, truncate: true });
      await writeAll(file, plan.prefix);
      for (const info of plan.tensors) {
        await writeAll(file, byName.get(info.name)!.data);
        progress?.tick(info.byteLength);
      }
    }
    await Deno.rename(tmp, path);
    for (const t of group) weightMap[t.name] = names[k];
  }));
  progress?.done();
  if (n > 1) {
    const sorted: Record<string, string> = {};
    for (const key of Object.keys(weightMap).sort()) sorted[key] = weightMap[key];
    await writeJsonAtomic(join(dir, INDEX_FILE), {
      metadata: { total_size: weightBytes },
      weight_map: sorted,
    });
    names.push(INDEX_FILE);
  }
  await writeFileAtomic(join(dir, "config.json"), JSON.stringify(configJson, null, 2) + "\n");
  return { config, files: [...names, "config.json"], weightBytes };
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await file.write(bytes.subarray(written));
}
