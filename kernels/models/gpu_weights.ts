/**
 * The frozen base weights of a model on the GPU, uploaded from safetensors one slice of
 * rows at a time: a slice is read from disk, converted (bf16/f16/f32 → the GPU dtype) and
 * written into its buffer before the next one is read, so neither the file nor a whole
 * tensor is ever held in host memory (an 8B model's 1 GB embedding streams in 16 MiB reads).
 *
 * Precisions: the projection matrices, the embedding table and lm_head are stored in the
 * weight dtype (f16 where the adapter has `shader-f16`, else f32); RMSNorm weights and
 * biases are small and stay f32. Tensors larger than the binding limit are split into row
 * chunks by `Tensor` itself; each slice is written into the chunk that holds it.
 *
 * V = vocab, D = hidden, F = ffn; shapes as in {@link expectedTensors}.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import { ModelWeights, toFloat32 } from "../../formats/safetensors.ts";
import type { Gpu } from "../device.ts";
import { f32ArrayToF16 } from "../half.ts";
import { recorder } from "../recorder.ts";
import { DTYPE_BYTES, Tensor } from "../tensor.ts";
import { checkWeights, expectedTensors, type ModelConfig } from "../../formats/model_config.ts";

/** Float dtypes the weights can be held in on the GPU. */
export type WeightDType = "f16" | "f32";

/** Source bytes read from disk per slice (at least one row). */
const SLICE_BYTES = 16 * 1024 * 1024;

/** Options of {@link loadGpuWeights}. */
export interface LoadWeightsOptions {
  /** dtype of the matrices and the embedding (default: f16 when the adapter has shader-f16). */
  dtype?: WeightDType;
  /** Called after each tensor with the bytes read so far and the total (for progress lines). */
  onProgress?: (readBytes: number, totalBytes: number) => void;
}

/** The base weights on the GPU, by Hugging Face name. */
export class GpuWeights implements Disposable {
  /** dtype of the matrices and the embedding table. */
  readonly dtype: WeightDType;
  #tensors: Map<string, Tensor>;

  constructor(dtype: WeightDType, tensors: Map<string, Tensor>) {
    this.dtype = dtype;
    this.#tensors = tensors;
  }

  /** The tensor `name` (e.g. `model.layers.0.self_attn.q_proj.weight`); throws when absent. */
  get(name: string): Tensor {
    const t = this.#tensors.get(name);
    if (t === undefined) throw new Error(`Cannot use weight "${name}": it was not loaded`);
    return t;
  }

  /** The tensor `name`, or null when the model has none (e.g. a bias it does not use). */
  find(name: string): Tensor | null {
    return this.#tensors.get(name) ?? null;
  }

  /** Bytes of GPU memory the weights hold (tensor data, without pool rounding). */
  get byteLength(): number {
    let n = 0;
    for (const t of this.#tensors.values()) n += t.byteLength;
    return n;
  }

  /** Returns every buffer to the pool. */
  destroy(): void {
    for (const t of this.#tensors.values()) t.destroy();
    this.#tensors.clear();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

/** Whether a weight is held in f32 whatever the weight dtype (norm weights and biases). */
function keptF32(name: string): boolean {
  return name.endsWith("norm.weight") || name.endsWith(".bias");
}

/**
 * Opens the safetensors weights of `modelDir` (single file or sharded), checks that they
 * match `config`, and uploads every tensor the model needs (a tied checkpoint's stored
 * `lm_head.weight` is skipped).
 *
 * @example
 * ```ts
 * using weights = await loadGpuWeights(gpu, config, "models/tiny-llama");
 * weights.get("model.embed_tokens.weight").shape; // [V, D]
 * ```
 * @throws {LatheError} when the directory has no safetensors weights, they do not match the
 * config, or the checkpoint is quantized.
 */
export async function loadGpuWeights(
  gpu: Gpu,
  config: ModelConfig,
  modelDir: string,
  options: LoadWeightsOptions = {},
): Promise<GpuWeights> {
  const dtype = options.dtype ?? (gpu.f16 ? "f16" : "f32");
  if (dtype === "f16" && !gpu.f16) {
    throw new LatheError(`Cannot load weights "${modelDir}" as f16: this adapter has no shader-f16`, {
      hint: 'Load them as f32 (dtype: "f32").',
    });
  }
  if (config.quantizationConfig !== null) {
    throw new LatheError(
      `Cannot load weights "${modelDir}" into the LoRA graph: the checkpoint is quantized ` +
        `(quantization_config ${JSON.stringify(config.quantizationConfig)})`,
      { hint: "Train quantized bases with QLoRA, or point to the unquantized checkpoint." },
    );
  }
  using file = await ModelWeights.open(modelDir);
  checkWeights(config, file.names().map((name) => ({ name, shape: file.info(name).shape })), modelDir);
  const expected = expectedTensors(config);
  let total = 0;
  for (const name of expected.keys()) total += file.info(name).byteLength;
  const tensors = new Map<string, Tensor>();
  let read = 0;
  try {
    // Pooled buffers may still be read by recorded work: submit it before queue writes.
    recorder(gpu).flush();
    for (const [name, shape] of expected) {
      const info = file.info(name);
      const target = keptF32(name) ? "f32" : dtype;
      const t = Tensor.empty(gpu, shape, target, { label: name });
      tensors.set(name, t);
      const rows = t.rows;
      const rowElems = t.rowSize;
      const srcRowBytes = rows === 0 ? 0 : info.byteLength / rows;
      // Even row counts keep f16 slices a whole number of 4-byte words.
      let sliceRows = Math.max(1, Math.floor(SLICE_BYTES / Math.max(1, srcRowBytes)));
      if (sliceRows > 1) sliceRows -= sliceRows % 2;
      else if ((rowElems * DTYPE_BYTES[target]) % 4 !== 0) sliceRows = 2;
      for (const chunk of t.chunks) {
        for (let r = 0; r < chunk.rows; r += sliceRows) {
          const n = Math.min(sliceRows, chunk.rows - r);
          const start = chunk.rowStart + r;
          const bytes = await file.readRows(name, start, start + n);
          const f32 = toFloat32(info.dtype, bytes, `tensor "${name}" of "${modelDir}"`);
          const host = target === "f16" ? f32ArrayToF16(f32) : f32;
          writeWords(gpu, chunk.buffer, r * rowElems * DTYPE_BYTES[target], host);
        }
      }
      read += info.byteLength;
      options.onProgress?.(read, total);
    }
  } catch (error) {
    for (const t of tensors.values()) t.destroy();
    throw error;
  }
  return new GpuWeights(dtype, tensors);
}

/** Writes `host` at byte `offset`; a trailing partial word is zero-padded (buffers are padded to 4). */
function writeWords(gpu: Gpu, buffer: GPUBuffer, offset: number, host: Float32Array | Uint16Array): void {
  const bytes = new Uint8Array(host.buffer as ArrayBuffer, host.byteOffset, host.byteLength);
  const whole = bytes.length & ~3;
  if (whole > 0) gpu.device.queue.writeBuffer(buffer, offset, bytes, 0, whole);
  if (whole < bytes.length) {
    const tail = new Uint8Array(4);
    tail.set(bytes.subarray(whole));
    gpu.device.queue.writeBuffer(buffer, offset + whole, tail);
  }
}
