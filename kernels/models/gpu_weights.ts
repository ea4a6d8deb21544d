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
 * 4-bit checkpoints (bitsandbytes NF4/FP4, from the `quantize` step or a `*-bnb-4bit` model):
 * each 4-bit projection stays 4-bit on the GPU (kernels/ops/quant_4bit.ts), its packed codes
 * streamed from the file in slices, never widened on the host; everything else (embeddings,
 * norms, biases, lm_head, modules the checkpoint keeps in 16 bit) loads as above, in its
 * original precision or wider (prepare_model_for_kbit_training's rule). {@link GpuWeights.matrix}
 * gives a projection in the weight dtype either way.
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
import {
  checkQuantizedWeights,
  quantizedWeightNames,
  readQuantized4bitStats,
} from "../../formats/bnb4bit_checkpoint.ts";
import { dequantize4bitGpu, Quant4bitWeight } from "../ops/quant_4bit.ts";

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
  #quantized: Map<string, Quant4bitWeight>;

  constructor(
    dtype: WeightDType,
    tensors: Map<string, Tensor>,
    quantized: Map<string, Quant4bitWeight> = new Map(),
  ) {
    this.dtype = dtype;
    this.#tensors = tensors;
    this.#quantized = quantized;
  }

  /** The float tensor `name` (e.g. `model.norm.weight`); throws when absent or 4-bit (see {@link matrix}). */
  get(name: string): Tensor {
    const t = this.#tensors.get(name);
    if (t !== undefined) return t;
    if (this.#quantized.has(name)) {
      throw new Error(`Cannot use weight "${name}" as a float tensor: it is 4-bit (use matrix())`);
    }
    throw new Error(`Cannot use weight "${name}": it was not loaded`);
  }

  /**
   * The matrix `name` in the weight dtype, for one product: the stored tensor, or for a 4-bit
   * weight a dequantized copy that goes back to the pool when the handle is disposed (after the
   * product is recorded; recorded work runs in order, so the next copy may reuse its buffer).
   *
   * @example
   * ```ts
   * using W = weights.matrix("model.layers.0.self_attn.q_proj.weight");
   * matmul(x, W.tensor, { layout: "NT" });
   * ```
   */
  matrix(name: string): WeightMatrix {
    const q = this.#quantized.get(name);
    if (q === undefined) {
      const tensor = this.get(name);
      return { tensor, quantized: false, [Symbol.dispose]: () => {} };
    }
    const tensor = dequantize4bitGpu(q, this.dtype, { label: `${name}.dequantized` });
    return { tensor, quantized: true, [Symbol.dispose]: () => tensor.destroy() };
  }

  /** Whether `name` is held in 4 bits. */
  isQuantized(name: string): boolean {
    return this.#quantized.has(name);
  }

  /** Number of 4-bit weights. */
  get quantizedCount(): number {
    return this.#quantized.size;
  }

  /** The tensor `name`, or null when the model has none (e.g. a bias it does not use). */
  find(name: string): Tensor | null {
    return this.#tensors.get(name) ?? null;
  }

  /** Bytes of GPU memory the weights hold (tensor data, without pool rounding). */
  get byteLength(): number {
    let n = 0;
    for (const t of this.#tensors.values()) n += t.byteLength;
    for (const q of this.#quantized.values()) n += q.byteLength;
    return n;
  }

  /** Returns every buffer to the pool. */
  destroy(): void {
    for (const t of this.#tensors.values()) t.destroy();
    for (const q of this.#quantized.values()) q.destroy();
    this.#tensors.clear();
    this.#quantized.clear();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

/** A matrix lent by {@link GpuWeights.matrix} for one product. */
export interface WeightMatrix extends Disposable {
  /** [out, in] in the weight dtype. */
  readonly tensor: Tensor;
  /** Whether it is a dequantized copy of a 4-bit weight. */
  readonly quantized: boolean;
}

/** Whether `name` is a decoder projection's weight (what the layers multiply through {@link GpuWeights.matrix}). */
function isProjection(name: string): boolean {
  return /^model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj\.weight$/.test(name);
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
 * config, or the checkpoint is quantized in a format other than bitsandbytes 4-bit.
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
  using file = await ModelWeights.open(modelDir);
  const quantized = config.quantizationConfig === null
    ? new Set<string>()
    : quantizedWeightNames(file.names());
  if (config.quantizationConfig === null) {
    checkWeights(config, file.names().map((name) => ({ name, shape: file.info(name).shape })), modelDir);
  } else {
    checkQuantizedWeights(
      config,
      file.names().map((name) => ({ name, shape: file.info(name).shape, dtype: file.info(name).dtype })),
      modelDir,
    );
  }
  const expected = expectedTensors(config);
  let total = 0;
  for (const name of expected.keys()) total += file.info(name).byteLength;
  const tensors = new Map<string, Tensor>();
  const fourBit = new Map<string, Quant4bitWeight>();
  let read = 0;
  try {
    // Pooled buffers may still be read by recorded work: submit it before queue writes.
    recorder(gpu).flush();
    for (const [name, shape] of expected) {
      if (quantized.has(name)) {
        const stats = await readQuantized4bitStats(file, name, shape, modelDir);
        const w = new Quant4bitWeight(gpu, stats, name);
        await streamCodes(file, name, w);
        if (isProjection(name)) fourBit.set(name, w);
        else {
          // A 4-bit lm_head (transformers 4.x quantizes it when the skip list leaves it out): the
          // loss reads it in vocabulary chunks in place, so it is held dequantized.
          tensors.set(name, dequantize4bitGpu(w, dtype, { label: name }));
          w.destroy();
        }
      } else {
        const t = Tensor.empty(gpu, shape, keptF32(name) ? "f32" : dtype, { label: name });
        tensors.set(name, t);
        await streamFloat(gpu, file, name, t, modelDir);
      }
      read += file.info(name).byteLength;
      options.onProgress?.(read, total);
    }
  } catch (error) {
    for (const t of tensors.values()) t.destroy();
    for (const w of fourBit.values()) w.destroy();
    throw error;
  }
  return new GpuWeights(dtype, tensors, fourBit);
}

/** Uploads float tensor `name` into `t` one slice of rows at a time, converted to t's dtype. */
async function streamFloat(
  gpu: Gpu,
  file: ModelWeights,
  name: string,
  t: Tensor,
  modelDir: string,
): Promise<void> {
  const info = file.info(name);
  const target = t.dtype;
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
}

/** Copies the packed codes of 4-bit weight `name` (U8, one byte per row) as they are, in slices. */
async function streamCodes(file: ModelWeights, name: string, w: Quant4bitWeight): Promise<void> {
  const bytes = Math.ceil(w.size / 2);
  for (let at = 0; at < bytes; at += SLICE_BYTES) {
    w.writeCodes(at, await file.readRows(name, at, Math.min(bytes, at + SLICE_BYTES)));
  }
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
