/**
 * bitsandbytes 4-bit weights on the GPU, held as they are stored (kernels/wgsl/dequant_4bit.wgsl
 * has the layout and the formula), and their dequantization into a float matrix.
 *
 * W[out,in], n = out·in, B = blocksize, nb = ⌈n/B⌉, nn = ⌈nb/256⌉. GPU memory of one weight:
 *   codes   ⌈n/8⌉ u32 words (⌈n/2⌉ bytes of packed 4-bit codes, 0.5 byte per weight)
 *   absmax  ⌈nb/4⌉ u32 words of u8 codes (double quantization) or nb f32
 *   tables  16 + 256 + nn f32 (quant map, nested map, nested absmax)
 * NF4 with double quantization at B = 64 is 4.127 bits per weight.
 *
 * The engine multiplies by a 4-bit weight through a dequantized copy: {@link dequantize4bitGpu}
 * writes W in the weight dtype into a pooled temporary that lives for one projection's matmul
 * (forward y = x·Wᵀ, or input gradient dx = dy·W) and is released right after, so one such
 * copy (the largest projection) is alive at a time. The matmul then runs the tuned f16/f32
 * kernels with the LoRA term still fused. The reference is formats/bnb4bit.ts `dequantize4bit`.
 * @module
 */
import type { Quantized4bit, QuantType } from "../../formats/bnb4bit.ts";
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { type FloatDType, grid, loadWgsl, specializeWgsl } from "./_rowwise.ts";

/** A 4-bit weight's statistics: everything but the codes (formats/bnb4bit.ts). */
export type Quant4bitStats = Omit<Quantized4bit, "codes">;

/** Offsets of the sections of the tables buffer (kept in step with dequant_4bit.wgsl). */
const QUANT_MAP = 0, NESTED_MAP = 16, NESTED_ABSMAX = 272;

const WORKGROUP = 256;

/** A bitsandbytes 4-bit weight on the GPU. Made by {@link uploadQuant4bit}. */
export class Quant4bitWeight implements Disposable {
  readonly gpu: Gpu;
  /** [out, in] of the weight. */
  readonly shape: readonly [number, number];
  readonly quantType: QuantType;
  readonly blocksize: number;
  /** Whether the absmax are 8-bit codes with a nested absmax and offset. */
  readonly doubleQuant: boolean;
  readonly nestedBlocksize: number;
  readonly offset: number;
  /** ⌈n/2⌉ packed code bytes as u32 words. */
  readonly codes: Tensor;
  /** u8 absmax codes as u32 words, or f32 absmax bits. */
  readonly absmax: Tensor;
  /** quant_map[16] ‖ nested_map[256] ‖ nested_absmax[nn], f32. */
  readonly tables: Tensor;
  readonly label: string;

  constructor(gpu: Gpu, stats: Quant4bitStats, label: string) {
    if (stats.shape.length !== 2) {
      throw new RangeError(`Cannot hold 4-bit weight "${label}": shape [${stats.shape}] is not [out, in]`);
    }
    this.gpu = gpu;
    this.label = label;
    this.shape = [stats.shape[0], stats.shape[1]];
    this.quantType = stats.quantType;
    this.blocksize = stats.blocksize;
    this.doubleQuant = stats.nested !== undefined;
    this.nestedBlocksize = stats.nested?.blocksize ?? 256;
    this.offset = stats.nested?.offset ?? 0;
    const n = this.shape[0] * this.shape[1];
    const nb = Math.ceil(n / this.blocksize);
    if (stats.absmax.length !== nb) {
      throw new RangeError(
        `Cannot hold 4-bit weight "${label}": ${stats.absmax.length} absmax for ${nb} blocks`,
      );
    }
    const tables = new Float32Array(NESTED_ABSMAX + (stats.nested?.absmax.length ?? 0));
    tables.set(stats.quantMap, QUANT_MAP);
    if (stats.nested) {
      tables.set(stats.nested.quantMap, NESTED_MAP);
      tables.set(stats.nested.absmax, NESTED_ABSMAX);
    }
    const absmaxWords = stats.absmax instanceof Uint8Array
      ? wordsOf(stats.absmax)
      : new Uint32Array(stats.absmax.buffer, stats.absmax.byteOffset, stats.absmax.length).slice();
    this.codes = Tensor.empty(gpu, [Math.ceil(n / 8)], "u32", { label: `${label}.codes` });
    this.absmax = Tensor.from(gpu, absmaxWords, [absmaxWords.length], "u32", { label: `${label}.absmax` });
    this.tables = Tensor.from(gpu, tables, [tables.length], "f32", { label: `${label}.tables` });
    for (const t of [this.codes, this.absmax, this.tables]) {
      if (t.chunked) {
        this.destroy();
        throw new RangeError(
          `Cannot hold 4-bit weight "${label}" [${this.shape}]: its ${t.label} exceed one storage binding`,
        );
      }
    }
  }

  /** Elements of the weight. */
  get size(): number {
    return this.shape[0] * this.shape[1];
  }

  /** Bytes of GPU memory the weight holds (tensor data, without pool rounding). */
  get byteLength(): number {
    return this.codes.byteLength + this.absmax.byteLength + this.tables.byteLength;
  }

  /**
   * Writes packed code bytes starting at byte `offset` of the codes (a multiple of 4); the
   * last slice may end on any byte (the rest of its word is zero). Submits recorded work first,
   * since a queue write lands before work recorded earlier but not yet submitted.
   */
  writeCodes(offset: number, bytes: Uint8Array): void {
    if (offset % 4 !== 0) throw new RangeError(`Cannot write codes of "${this.label}" at byte ${offset}`);
    if (offset + bytes.length > Math.ceil(this.size / 2)) {
      throw new RangeError(`Cannot write ${bytes.length} code bytes at ${offset} into "${this.label}"`);
    }
    recorder(this.gpu).flush();
    const queue = this.gpu.device.queue;
    const whole = bytes.length & ~3;
    if (whole > 0) queue.writeBuffer(this.codes.buffer, offset, bytes as Uint8Array<ArrayBuffer>, 0, whole);
    if (whole < bytes.length) {
      const tail = new Uint8Array(4);
      tail.set(bytes.subarray(whole));
      queue.writeBuffer(this.codes.buffer, offset + whole, tail);
    }
  }

  destroy(): void {
    for (const t of [this.codes, this.absmax, this.tables]) if (t && !t.destroyed) t.destroy();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

/** Bytes packed little-endian into u32 words (the tail word zero-padded). */
function wordsOf(bytes: Uint8Array): Uint32Array {
  const padded = new Uint8Array(Math.ceil(bytes.length / 4) * 4);
  padded.set(bytes);
  return new Uint32Array(padded.buffer);
}

/**
 * Puts a 4-bit weight on the GPU: its statistics, and its codes when given (else write them
 * with {@link Quant4bitWeight.writeCodes}, e.g. streamed from a checkpoint).
 *
 * @example
 * ```ts
 * const q = quantize4bit(w, [out, inp]);          // formats/bnb4bit.ts
 * using gw = uploadQuant4bit(gpu, q, q.codes, "q_proj");
 * using W = dequantize4bitGpu(gw, "f16");         // W[out,in] f16
 * ```
 */
export function uploadQuant4bit(
  gpu: Gpu,
  stats: Quant4bitStats,
  codes: Uint8Array | null,
  label: string,
): Quant4bitWeight {
  const w = new Quant4bitWeight(gpu, stats, label);
  if (codes !== null) {
    if (codes.length !== Math.ceil(w.size / 2)) {
      w.destroy();
      throw new RangeError(`Cannot upload "${label}": ${codes.length} code bytes for ${w.size} weights`);
    }
    w.writeCodes(0, codes);
  }
  return w;
}

/** Options of {@link dequantize4bitGpu}. */
export interface Dequantize4bitOptions {
  /** Output W[out,in]; created when absent. */
  out?: Tensor;
  /** Label of a created output. */
  label?: string;
}

/**
 * W[out,in] = quant_map[code] · absmax[block] in `dtype` (f16 needs shader-f16): one dispatch
 * per row chunk of the output.
 */
export function dequantize4bitGpu(
  w: Quant4bitWeight,
  dtype: FloatDType,
  options: Dequantize4bitOptions = {},
): Tensor {
  const gpu = w.gpu;
  if (dtype === "f16" && !gpu.f16) {
    throw new TypeError(`Cannot dequantize "${w.label}" to f16: this adapter has no shader-f16`);
  }
  const [rows, cols] = w.shape;
  const out = options.out ??
    Tensor.empty(gpu, [rows, cols], dtype, { label: options.label ?? `${w.label}.dequantized` });
  if (out.dtype !== dtype || out.shape.length !== 2 || out.shape[0] !== rows || out.shape[1] !== cols) {
    throw new RangeError(
      `Cannot dequantize "${w.label}" [${w.shape}] into "${out.label}" [${out.shape}] ${out.dtype}`,
    );
  }
  const kernel = getKernel(gpu, {
    name: "dequant_4bit",
    params: { W: dtype },
    code: () => specializeWgsl(loadWgsl("dequant_4bit"), { W: dtype }),
    bindings: ["read", "read", "read", "write"],
    uniformBytes: 32,
  });
  const rec = recorder(gpu);
  const p = new ArrayBuffer(32);
  const u = new Uint32Array(p);
  const f = new Float32Array(p);
  for (const c of out.chunks) {
    const count = c.rows * cols;
    if (count === 0) continue;
    u.set([c.rowStart * cols, count, 0, w.blocksize, w.nestedBlocksize, w.doubleQuant ? 1 : 0]);
    f[6] = w.offset;
    u[7] = 0;
    rec.dispatch(
      kernel,
      [w.codes.buffer, w.absmax.buffer, w.tables.buffer, c.buffer],
      u,
      // One invocation per word of 8 codes that the range touches.
      grid(
        gpu,
        Math.ceil(
          (Math.floor((c.rowStart * cols + count - 1) / 8) - Math.floor(c.rowStart * cols / 8) + 1) /
            WORKGROUP,
        ),
      ),
    );
  }
  return out;
}
