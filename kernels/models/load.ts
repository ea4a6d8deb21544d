/**
 * Host-side model loading: a Hugging Face model directory's `config.json` and every weight
 * the config needs, as f32 arrays by HF name (bf16, f16 and f64 checkpoints converted on read).
 * This is what the CPU reference backend holds in memory; the WebGPU graph streams weights to
 * the device itself.
 *
 * bitsandbytes 4-bit checkpoints (a `*-bnb-4bit` model, or the quantize step's output) load
 * too: each 4-bit weight is read with its companions (formats/bnb4bit_checkpoint.ts) and
 * dequantized here in f32, w[k] = quant_map[code_k] · absmax[k / blocksize]
 * (formats/bnb4bit.ts `dequantize4bit`), the values the GPU's dequantization gives; the
 * weights such a checkpoint keeps in 16 bit read as floats.
 * @module
 */
import { dequantize4bit } from "../../formats/bnb4bit.ts";
import {
  checkQuantizedWeights,
  companionOf,
  quantizedWeightNames,
  readQuantized4bit,
} from "../../formats/bnb4bit_checkpoint.ts";
import { ModelWeights } from "../../formats/safetensors.ts";
import type { Progress } from "../../foundation/progress.ts";
import { expectedTensors, loadModelConfig, type ModelConfig } from "../../formats/model_config.ts";

/** A model held on the host. */
export interface HostModel {
  /** The model directory. */
  readonly dir: string;
  readonly config: ModelConfig;
  /** Every tensor of {@link expectedTensors}, row-major f32 (a 4-bit weight dequantized), by HF name. */
  readonly weights: Map<string, Float32Array>;
}

/** Options for {@link loadHostModel}. */
export interface LoadOptions {
  /** Makes a progress reporter over the bytes to read; no progress when absent. */
  progress?: (totalBytes: number) => Progress;
}

/**
 * Reads `dir/config.json` and the weights it names, checked against the config (every
 * tensor present with its shape, nothing unexpected). A bitsandbytes 4-bit checkpoint's 4-bit
 * weights are dequantized to f32 (checked first as formats/bnb4bit_checkpoint.ts
 * `checkQuantizedWeights` does); other quantizations (8-bit, GPTQ, AWQ, …) are refused.
 *
 * @example
 * ```ts
 * const { config, weights } = await loadHostModel("models/tiny-llama");
 * weights.get("model.norm.weight"); // Float32Array [D]
 * ```
 */
export async function loadHostModel(dir: string, options: LoadOptions = {}): Promise<HostModel> {
  const config = await loadModelConfig(dir);
  using files = await ModelWeights.open(dir);
  const names = files.names();
  checkQuantizedWeights(config, names.map((n) => files.info(n)), dir);
  const quantized = quantizedWeightNames(names);
  const expected = expectedTensors(config);
  // Bytes read per weight: a 4-bit weight's codes and its companions.
  const bytes = new Map<string, number>();
  for (const name of names) {
    const owner = companionOf(name) ?? name;
    if (expected.has(owner)) bytes.set(owner, (bytes.get(owner) ?? 0) + files.info(name).byteLength);
  }
  let total = 0;
  for (const name of expected.keys()) total += bytes.get(name) ?? 0;
  const progress = options.progress?.(total) ?? null;
  const weights = new Map<string, Float32Array>();
  for (const [name, shape] of expected) {
    weights.set(
      name,
      quantized.has(name)
        ? dequantize4bit(await readQuantized4bit(files, name, shape, dir))
        : await files.readFloat32(name),
    );
    progress?.tick(bytes.get(name) ?? 0);
  }
  progress?.done();
  return { dir, config, weights };
}
