/**
 * Host-side model loading: a Hugging Face model directory's `config.json` and every weight
 * the config needs, as f32 arrays by HF name (bf16, f16 and f64 checkpoints converted on read).
 * This is what the CPU reference backend holds in memory; the WebGPU graph streams weights to
 * the device itself.
 * @module
 */
import { ModelWeights } from "../../formats/safetensors.ts";
import { LatheError } from "../../foundation/errors.ts";
import type { Progress } from "../../foundation/progress.ts";
import {
  checkWeights,
  expectedTensors,
  loadModelConfig,
  type ModelConfig,
} from "../../formats/model_config.ts";

/** A model held on the host. */
export interface HostModel {
  /** The model directory. */
  readonly dir: string;
  readonly config: ModelConfig;
  /** Every tensor of {@link expectedTensors}, row-major f32, by HF name. */
  readonly weights: Map<string, Float32Array>;
}

/** Options for {@link loadHostModel}. */
export interface LoadOptions {
  /** Makes a progress reporter over the bytes to read; no progress when absent. */
  progress?: (totalBytes: number) => Progress;
}

/**
 * Reads `dir/config.json` and the weights it names, checked against the config (every
 * tensor present with its shape, nothing unexpected). Pre-quantized checkpoints are refused:
 * their 4-bit weights are dequantized on the GPU, not here.
 *
 * @example
 * ```ts
 * const { config, weights } = await loadHostModel("models/tiny-llama");
 * weights.get("model.norm.weight"); // Float32Array [D]
 * ```
 */
export async function loadHostModel(dir: string, options: LoadOptions = {}): Promise<HostModel> {
  const config = await loadModelConfig(dir);
  if (config.quantizationConfig) {
    throw new LatheError(
      `Cannot load model "${dir}" on the host: it is quantized (quantization_config.quant_method ` +
        `"${String(config.quantizationConfig.quant_method ?? "?")}")`,
      { hint: "Use the unquantized checkpoint with the cpu-reference backend, or the webgpu backend." },
    );
  }
  using files = await ModelWeights.open(dir);
  checkWeights(config, files.names().map((n) => files.info(n)), dir);
  const expected = expectedTensors(config);
  let total = 0;
  for (const name of expected.keys()) total += files.info(name).byteLength;
  const progress = options.progress?.(total) ?? null;
  const weights = new Map<string, Float32Array>();
  for (const name of expected.keys()) {
    weights.set(name, await files.readFloat32(name));
    progress?.tick(files.info(name).byteLength);
  }
  progress?.done();
  return { dir, config, weights };
}
