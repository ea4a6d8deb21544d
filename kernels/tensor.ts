/**
 * Tensors: GPU buffers with a shape and a dtype, drawn from a size-bucketed pool.
 *
 * Layout is row-major. A tensor's rows are its first dimension; a tensor larger than the
 * adapter's storage binding limit (`maxStorageBufferBindingSize`) is split into row chunks,
 * each its own buffer (`chunks[i] = { rowStart, rows, buffer }`), and the ops handle chunks.
 * Chunk boundaries depend on the shape alone (elements counted at 4 bytes whatever the dtype),
 * so tensors of one shape always split at the same rows. f16 tensors hold u16 bit patterns; bf16 exists only on the host and
 * is converted at load (see `half.ts`). Every buffer is padded to a multiple of 4 bytes.
 *
 * `reshape` gives a view: another shape over the same buffers, never a copy. The buffers belong
 * to a reference-counted storage that every view holds once; they go back to the pool when the
 * last holder is destroyed.
 * @module
 */
import type { Gpu } from "./device.ts";
import { f16ArrayToF32, f32ArrayToF16 } from "./half.ts";
import { recorder } from "./recorder.ts";

/** Element types a tensor can hold on the GPU. */
export type DType = "f32" | "f16" | "u8" | "u32" | "i32";

/** Bytes per element of each dtype. */
export const DTYPE_BYTES: Readonly<Record<DType, number>> = { f32: 4, f16: 2, u8: 1, u32: 4, i32: 4 };

/**
 * Bytes per element used to place row-chunk boundaries, for every dtype: tensors of one shape
 * split at the same rows (see {@link Tensor.empty}).
 */
export const SPLIT_ELEMENT_BYTES = 4;

/** Host arrays a tensor reads back into: f16 as u16 bit patterns. */
export type HostArray = Float32Array | Uint16Array | Uint8Array | Uint32Array | Int32Array;

/** One row range of a tensor and the buffer that holds it. */
export interface TensorChunk {
  /** First row (index along the first dimension). */
  readonly rowStart: number;
  /** Number of rows. */
  readonly rows: number;
  /** The buffer; its size may exceed `byteLength` (pool buckets). */
  readonly buffer: GPUBuffer;
  /** Bytes of tensor data in this chunk. */
  readonly byteLength: number;
}

/** Options for creating a tensor. */
export interface TensorOptions {
  /** Names the tensor in buffer labels and error messages. */
  label?: string;
  /** Largest bytes per chunk (default: the adapter's storage binding limit); tests lower it. */
  maxChunkBytes?: number;
}

/**
 * The buffers behind a tensor and its views. Each holder (the tensor that allocated them, and
 * every view) counts once; the buffers return to the pool when the last holder lets go.
 */
class Storage {
  readonly #gpu: Gpu;
  readonly #buffers: readonly GPUBuffer[];
  #holders = 1;

  constructor(gpu: Gpu, buffers: readonly GPUBuffer[]) {
    this.#gpu = gpu;
    this.#buffers = buffers;
  }

  retain(): void {
    this.#holders++;
  }

  release(): void {
    if (--this.#holders > 0) return;
    const p = pool(this.#gpu);
    for (const b of this.#buffers) p.release(b);
  }
}

/**
 * A tensor on the GPU. Call `destroy()` (or declare it with `using`) to let go of its buffers;
 * they return to the pool once no view of them is left.
 */
export class Tensor implements Disposable {
  readonly gpu: Gpu;
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly label: string;
  #chunks: readonly TensorChunk[];
  readonly #storage: Storage;

  private constructor(
    gpu: Gpu,
    shape: readonly number[],
    dtype: DType,
    label: string,
    chunks: readonly TensorChunk[],
    storage: Storage,
  ) {
    this.gpu = gpu;
    this.shape = shape;
    this.dtype = dtype;
    this.label = label;
    this.#chunks = chunks;
    this.#storage = storage;
  }

  /**
   * Uploads host data. `f16` accepts a Float32Array (rounded to nearest even) or u16 bit
   * patterns; `f32` accepts a Float32Array or numbers.
   *
   * @example
   * ```ts
   * const x = Tensor.from(gpu, new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3], "f16");
   * console.log(await x.readF32()); // Float32Array [1, 2, 3, 4, 5, 6]
   * ```
   */
  static from(
    gpu: Gpu,
    data: HostArray | readonly number[],
    shape: readonly number[],
    dtype: DType = "f32",
    options: TensorOptions = {},
  ): Tensor {
    const host = toHost(data, dtype);
    const n = shapeSize(shape);
    if (host.length !== n) {
      throw new RangeError(
        `Cannot create tensor "${
          options.label ?? "tensor"
        }": shape [${shape}] holds ${n} elements, data has ${host.length}`,
      );
    }
    const t = Tensor.empty(gpu, shape, dtype, options);
    // Queue writes run before commands still being recorded: submit those first, so a pooled
    // buffer that a recorded dispatch still reads is not overwritten under it.
    recorder(gpu).flush();
    const bytes = new Uint8Array(host.buffer as ArrayBuffer, host.byteOffset, host.byteLength);
    const rowBytes = t.rowSize * DTYPE_BYTES[dtype];
    for (const c of t.#chunks) {
      const start = c.rowStart * rowBytes;
      writePadded(gpu.device, c.buffer, bytes.subarray(start, start + c.byteLength));
    }
    return t;
  }

  /** A tensor with unspecified contents (a pooled buffer may hold earlier data). */
  static empty(
    gpu: Gpu,
    shape: readonly number[],
    dtype: DType = "f32",
    options: TensorOptions = {},
  ): Tensor {
    gpu.assertAlive();
    for (const d of shape) {
      if (!Number.isInteger(d) || d < 0) throw new RangeError(`Cannot create tensor: bad shape [${shape}]`);
    }
    const label = options.label ?? "tensor";
    const rows = shape.length === 0 ? 1 : shape[0];
    const rowBytes = shapeSize(shape.slice(1)) * DTYPE_BYTES[dtype];
    const total = rows * rowBytes;
    const limit = Math.floor((options.maxChunkBytes ?? gpu.maxBindingBytes) / 4) * 4;
    // Where a tensor splits depends on its shape alone: rows are counted at SPLIT_ELEMENT_BYTES
    // whatever the dtype, so an f16 activation and its f32 twin (a cast, a gradient) have the
    // same chunks and elementwise ops pair them chunk by chunk. Narrow dtypes give up at most
    // half (f16) or three quarters (u8) of a binding, and only in tensors that split at all.
    const splitRowBytes = shapeSize(shape.slice(1)) * SPLIT_ELEMENT_BYTES;
    const chunks: TensorChunk[] = [];
    const p = pool(gpu);
    if (rows * splitRowBytes <= limit) {
      chunks.push({ rowStart: 0, rows, buffer: p.acquire(total, label), byteLength: total });
    } else {
      const perChunk = Math.floor(limit / splitRowBytes);
      if (perChunk === 0) {
        throw new RangeError(
          `Cannot allocate "${label}": one row of ${splitRowBytes} bytes (counted at ${SPLIT_ELEMENT_BYTES} ` +
            `per element) exceeds the binding limit of ${limit} bytes`,
        );
      }
      for (let r = 0; r < rows; r += perChunk) {
        const n = Math.min(perChunk, rows - r);
        chunks.push({
          rowStart: r,
          rows: n,
          buffer: p.acquire(n * rowBytes, `${label}[rows ${r}..${r + n})`),
          byteLength: n * rowBytes,
        });
      }
    }
    const storage = new Storage(gpu, chunks.map((c) => c.buffer));
    return new Tensor(gpu, [...shape], dtype, label, chunks, storage);
  }

  /** A tensor of zeros (cleared on the GPU, in stream order). */
  static zeros(
    gpu: Gpu,
    shape: readonly number[],
    dtype: DType = "f32",
    options: TensorOptions = {},
  ): Tensor {
    const t = Tensor.empty(gpu, shape, dtype, options);
    const rec = recorder(gpu);
    for (const c of t.chunks) rec.clearBuffer(c.buffer, 0, pad4(c.byteLength));
    return t;
  }

  /** The row chunks (one chunk for an unsplit tensor). Throws once destroyed. */
  get chunks(): readonly TensorChunk[] {
    if (this.#chunks.length === 0) throw new Error(`Cannot use tensor "${this.label}": it was destroyed`);
    return this.#chunks;
  }

  /** The single buffer of an unsplit tensor. */
  get buffer(): GPUBuffer {
    const chunks = this.chunks;
    if (chunks.length !== 1) {
      throw new Error(
        `Cannot bind tensor "${this.label}" as one buffer: it is split into ${chunks.length} row chunks`,
      );
    }
    return chunks[0].buffer;
  }

  /** Whether the tensor is split into more than one row chunk. */
  get chunked(): boolean {
    return this.chunks.length > 1;
  }

  /** Whether `destroy()` was called. */
  get destroyed(): boolean {
    return this.#chunks.length === 0;
  }

  /** Number of elements. */
  get size(): number {
    return shapeSize(this.shape);
  }

  /** Size of the first dimension (1 for a scalar). */
  get rows(): number {
    return this.shape.length === 0 ? 1 : this.shape[0];
  }

  /** Elements per row (product of all dimensions but the first). */
  get rowSize(): number {
    return shapeSize(this.shape.slice(1));
  }

  /** Bytes of tensor data (without padding). */
  get byteLength(): number {
    return this.size * DTYPE_BYTES[this.dtype];
  }

  /** Reads the tensor back (f16 as u16 bit patterns). */
  async read(): Promise<HostArray> {
    return (await readTensors([this]))[0];
  }

  /** Reads the tensor back as f32 (f16 converted exactly; integer dtypes converted by value). */
  async readF32(): Promise<Float32Array> {
    const host = await this.read();
    if (host instanceof Float32Array) return host;
    if (host instanceof Uint16Array) return f16ArrayToF32(host);
    return Float32Array.from(host);
  }

  /**
   * The same elements under another shape: a view sharing this tensor's buffers, never a copy
   * (writes through either are seen by both). One dimension may be -1, inferred from the others.
   * An unsplit tensor takes any shape with the same element count; a tensor split into row
   * chunks keeps its first dimension (its chunks hold whole rows), and another first dimension
   * throws a RangeError, as does another element count.
   *
   * The view holds the buffers as the tensor does: they return to the pool when the last of
   * the tensor and its views is destroyed, in any order.
   *
   * @param shape the view's shape
   * @param label names the view (default: this tensor's label)
   * @example
   * ```ts
   * const v = vProj.reshape([T, Hkv, hd], "v"); // [T, Hkv·hd] seen as [T, Hkv, hd]
   * vProj.destroy(); // the buffer stays alive for v
   * v.destroy(); // back to the pool
   * ```
   */
  reshape(shape: readonly number[], label: string = this.label): Tensor {
    const chunks = this.chunks;
    const target = resolveShape(this, shape);
    let viewChunks: readonly TensorChunk[];
    if (chunks.length === 1) {
      const c = chunks[0];
      viewChunks = [{
        rowStart: 0,
        rows: target.length === 0 ? 1 : target[0],
        buffer: c.buffer,
        byteLength: c.byteLength,
      }];
    } else if (target.length > 0 && target[0] === this.rows) {
      viewChunks = chunks;
    } else {
      throw new RangeError(
        `Cannot reshape tensor "${this.label}" [${this.shape}] to [${shape}] without a copy: it is split into ` +
          `${chunks.length} row chunks of whole rows, so a view must keep the first dimension ${this.rows}`,
      );
    }
    this.#storage.retain();
    return new Tensor(this.gpu, target, this.dtype, label, viewChunks, this.#storage);
  }

  /**
   * Lets go of the buffers: they return to the pool when no view of them is left. Safe to call
   * twice; commands already recorded still run.
   */
  destroy(): void {
    if (this.#chunks.length === 0) return;
    this.#chunks = [];
    this.#storage.release();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }

  toString(): string {
    return `Tensor("${this.label}", ${this.dtype}[${this.shape.join(",")}]${
      this.#chunks.length > 1 ? `, ${this.#chunks.length} chunks` : ""
    })`;
  }
}

/**
 * Reads several tensors back with one staging buffer and one `mapAsync`.
 *
 * @example
 * ```ts
 * const [loss, norm] = await readTensors([lossTensor, normTensor]);
 * ```
 */
export async function readTensors(tensors: readonly Tensor[]): Promise<HostArray[]> {
  if (tensors.length === 0) return [];
  const rec = recorder(tensors[0].gpu);
  const ranges = tensors.flatMap((t) => t.chunks.map((c) => ({ buffer: c.buffer, size: c.byteLength })));
  const parts = await rec.read(ranges);
  let i = 0;
  return tensors.map((t) => {
    const bytes = new Uint8Array(t.byteLength);
    let offset = 0;
    for (let c = 0; c < t.chunks.length; c++) {
      bytes.set(parts[i], offset);
      offset += parts[i++].length;
    }
    return hostView(bytes.buffer, t.dtype);
  });
}

/** `shape` with a -1 resolved against `t`'s element count; throws when the counts differ. */
function resolveShape(t: Tensor, shape: readonly number[]): number[] {
  const fail = (why: string): never => {
    throw new RangeError(`Cannot reshape tensor "${t.label}" [${t.shape}] to [${shape}]: ${why}`);
  };
  const free = shape.indexOf(-1);
  if (free !== shape.lastIndexOf(-1)) fail("only one dimension may be -1");
  for (const d of shape) {
    if (d !== -1 && (!Number.isInteger(d) || d < 0)) fail(`dimension "${d}" is not a size`);
  }
  const n = t.size;
  if (free === -1) {
    const m = shapeSize(shape);
    if (m !== n) fail(`it holds ${n} elements, the shape ${m}`);
    return [...shape];
  }
  const known = shapeSize(shape.filter((_, i) => i !== free));
  if (known === 0) fail(`the -1 dimension cannot be inferred next to a dimension of 0`);
  if (n % known !== 0) fail(`its ${n} elements are not a multiple of ${known}`);
  return shape.map((d, i) => i === free ? n / known : d);
}

/** Number of elements of a shape (1 for a scalar). */
export function shapeSize(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Memory held by a device's tensors. */
export interface MemoryStats {
  /** Bytes of buffers held by live tensors (bucket sizes). */
  liveBytes: number;
  /** Highest `liveBytes` since creation or the last `resetPeakMemory`. */
  peakBytes: number;
  /** Bytes of freed buffers kept for reuse. */
  pooledBytes: number;
  /** Buffers held by live tensors. */
  liveBuffers: number;
  /** Buffers created since the pool was made (reuse keeps this flat). */
  created: number;
}

/** Memory figures of a device's pool (the benchmarks' peak-memory figure is `peakBytes`). */
export function memoryStats(gpu: Gpu): MemoryStats {
  return pool(gpu).stats();
}

/** Starts a new peak-memory measurement at the current live bytes. */
export function resetPeakMemory(gpu: Gpu): void {
  pool(gpu).resetPeak();
}

/** Destroys the pooled (free) buffers, after submitting recorded work that may use them. */
export function trimPool(gpu: Gpu): void {
  pool(gpu).trim();
}

/**
 * The pool's bucket for a request: at least 256 bytes, then 4 sizes per power of two
 * (2ᵏ·{1, 1.25, 1.5, 1.75}), so a reused buffer wastes at most 25%.
 */
export function bucketSize(bytes: number): number {
  if (bytes <= 256) return 256;
  const k = Math.floor(Math.log2(bytes - 1));
  const step = 2 ** (k - 2);
  return Math.ceil(bytes / step) * step;
}

const pools = new WeakMap<Gpu, BufferPool>();

function pool(gpu: Gpu): BufferPool {
  let p = pools.get(gpu);
  if (p === undefined) pools.set(gpu, p = new BufferPool(gpu));
  return p;
}

/** Size-bucketed free lists of storage buffers. */
class BufferPool {
  #gpu: Gpu;
  #free = new Map<number, GPUBuffer[]>();
  #live = 0;
  #liveBuffers = 0;
  #peak = 0;
  #pooled = 0;
  #created = 0;

  constructor(gpu: Gpu) {
    this.#gpu = gpu;
  }

  acquire(bytes: number, label: string): GPUBuffer {
    let size = bucketSize(bytes);
    // A buffer is bound whole, so its bucket may not pass the binding limit.
    if (size > this.#gpu.maxBindingBytes) size = pad4(bytes);
    const list = this.#free.get(size);
    let buffer = list?.pop();
    if (buffer !== undefined) {
      this.#pooled -= size;
      buffer.label = label;
    } else {
      buffer = this.#gpu.device.createBuffer({
        label,
        size,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      });
      this.#created++;
    }
    this.#live += size;
    this.#liveBuffers++;
    if (this.#live > this.#peak) this.#peak = this.#live;
    return buffer;
  }

  release(buffer: GPUBuffer): void {
    const size = buffer.size;
    this.#live -= size;
    this.#liveBuffers--;
    this.#pooled += size;
    let list = this.#free.get(size);
    if (list === undefined) this.#free.set(size, list = []);
    list.push(buffer);
  }

  trim(): void {
    const rec = recorder(this.#gpu);
    rec.flush();
    for (const list of this.#free.values()) {
      for (const b of list) {
        rec.forget(b);
        b.destroy();
      }
    }
    this.#free.clear();
    this.#pooled = 0;
  }

  resetPeak(): void {
    this.#peak = this.#live;
  }

  stats(): MemoryStats {
    return {
      liveBytes: this.#live,
      peakBytes: this.#peak,
      pooledBytes: this.#pooled,
      liveBuffers: this.#liveBuffers,
      created: this.#created,
    };
  }
}

function pad4(n: number): number {
  return Math.ceil(n / 4) * 4;
}

/** writeBuffer needs a multiple of 4 bytes: the last partial word goes through a padded copy. */
function writePadded(device: GPUDevice, buffer: GPUBuffer, bytes: Uint8Array<ArrayBuffer>): void {
  const whole = bytes.length & ~3;
  if (whole > 0) device.queue.writeBuffer(buffer, 0, bytes, 0, whole);
  if (whole < bytes.length) {
    const tail = new Uint8Array(4);
    tail.set(bytes.subarray(whole));
    device.queue.writeBuffer(buffer, whole, tail);
  }
}

function toHost(data: HostArray | readonly number[], dtype: DType): HostArray {
  switch (dtype) {
    case "f32":
      if (data instanceof Float32Array) return data;
      if (Array.isArray(data)) return Float32Array.from(data);
      break;
    case "f16":
      if (data instanceof Uint16Array) return data;
      if (data instanceof Float32Array) return f32ArrayToF16(data);
      if (Array.isArray(data)) return f32ArrayToF16(Float32Array.from(data));
      break;
    case "u8":
      if (data instanceof Uint8Array) return data;
      if (Array.isArray(data)) return Uint8Array.from(data);
      break;
    case "u32":
      if (data instanceof Uint32Array) return data;
      if (Array.isArray(data)) return Uint32Array.from(data);
      break;
    case "i32":
      if (data instanceof Int32Array) return data;
      if (Array.isArray(data)) return Int32Array.from(data);
      break;
  }
  throw new TypeError(`Cannot create a ${dtype} tensor from a ${data.constructor.name}`);
}

function hostView(buffer: ArrayBuffer, dtype: DType): HostArray {
  switch (dtype) {
    case "f32":
      return new Float32Array(buffer);
    case "f16":
      return new Uint16Array(buffer);
    case "u8":
      return new Uint8Array(buffer);
    case "u32":
      return new Uint32Array(buffer);
    case "i32":
      return new Int32Array(buffer);
  }
}
