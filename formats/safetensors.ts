/**
 * safetensors: a hardened streaming reader, a deterministic writer, and sharded model
 * directories (`model.safetensors.index.json`).
 *
 * Layout (https://github.com/huggingface/safetensors):
 * ```
 * [0, 8)          N: u64 little-endian, the header length
 * [8, 8+N)        UTF-8 JSON: {"__metadata__": {str: str}, "<name>": {"dtype", "shape", "data_offsets": [a, b]}}
 *                 padded with spaces (0x20) so that 8+N is a multiple of 8
 * [8+N, end)      data; a tensor's bytes are [8+N+a, 8+N+b), little-endian, row-major
 * ```
 * The reader enforces what the reference implementation (the `safetensors` Rust crate)
 * enforces: N ≤ 100 000 000 and inside the file, known dtypes,
 * `b − a = numel(shape) · size(dtype)`, and tensors that tile the data section exactly
 * (sorted by offset: no overlap, no gap, no trailing bytes); and, as the format's
 * specification requires, a header that starts with `{`.
 *
 * The writer produces the reference implementation's bytes (a test compares against a
 * file written by safetensors 0.8.0): tensors ordered by dtype
 * alignment (descending, the crate's `Dtype` order) then by name, compact JSON with
 * `__metadata__` first and entries as `{"dtype","shape","data_offsets"}`, spaces to a
 * multiple of 8. The crate keeps `__metadata__` in a hash map (unordered); here its keys
 * are sorted so the output is deterministic.
 * @module
 */
import { basename, dirname, isAbsolute, join, normalize, resolve, sep } from "node:path";
import { LatheError } from "../foundation/errors.ts";
import { exists, writeJsonAtomic } from "../foundation/atomic.ts";
import { Progress } from "../foundation/progress.ts";

/** Largest header accepted, as in the reference implementation. */
export const MAX_HEADER_BYTES = 100_000_000;

/**
 * Element size in bytes and rank in the reference `Dtype` enum (increasing alignment;
 * the writer sorts by descending rank). Ranks 1–3 (F4, F6_E2M3, F6_E3M2: sub-byte types)
 * are not supported.
 */
export const DTYPES = {
  BOOL: { size: 1, rank: 0 },
  U8: { size: 1, rank: 4 },
  I8: { size: 1, rank: 5 },
  F8_E5M2: { size: 1, rank: 6 },
  F8_E4M3: { size: 1, rank: 7 },
  F8_E8M0: { size: 1, rank: 8 },
  I16: { size: 2, rank: 9 },
  U16: { size: 2, rank: 10 },
  F16: { size: 2, rank: 11 },
  BF16: { size: 2, rank: 12 },
  I32: { size: 4, rank: 13 },
  U32: { size: 4, rank: 14 },
  F32: { size: 4, rank: 15 },
  C64: { size: 8, rank: 16 },
  F64: { size: 8, rank: 17 },
  I64: { size: 8, rank: 18 },
  U64: { size: 8, rank: 19 },
} as const;

/** A safetensors dtype name as written in the header. */
export type Dtype = keyof typeof DTYPES;

/** True when `name` is a dtype this module reads and writes. */
export function isDtype(name: unknown): name is Dtype {
  return typeof name === "string" && Object.hasOwn(DTYPES, name);
}

/** One tensor entry of a header. Offsets are relative to the start of the data section. */
export interface TensorInfo {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  readonly dataOffsets: readonly [number, number];
  /** Number of elements: the product of `shape` (1 for a scalar `[]`). */
  readonly numel: number;
  /** `dataOffsets[1] − dataOffsets[0]`. */
  readonly byteLength: number;
}

/** A parsed and validated header. */
export interface SafetensorsHeader {
  /** N, the header length in bytes (padding included). */
  readonly headerLength: number;
  /** 8 + N: where the data section starts in the file. */
  readonly dataStart: number;
  /** Bytes in the data section. */
  readonly dataLength: number;
  /** Tensors in file order (ascending offsets). */
  readonly tensors: readonly TensorInfo[];
  /** `__metadata__`, or null when absent. */
  readonly metadata: Readonly<Record<string, string>> | null;
}

function fail(file: string, what: string, hint?: string): never {
  throw new LatheError(`Cannot read safetensors file "${file}": ${what}`, {
    hint: hint ?? "The file is damaged or not a safetensors file; re-download or re-export it.",
  });
}

/** numel(shape), or null when it is not a safe integer. */
function product(shape: readonly number[]): number | null {
  let n = 1;
  for (const d of shape) {
    n *= d;
    if (!Number.isSafeInteger(n)) return null;
  }
  return n;
}

const isCount = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

/**
 * Reads N from the first 8 bytes and checks it against the limit and the file size.
 * `file` names the file in errors.
 */
export function readHeaderLength(prefix: Uint8Array, fileSize: number, file: string): number {
  if (fileSize < 8 || prefix.length < 8) {
    fail(file, `it is ${fileSize} bytes long, shorter than the 8-byte header length`);
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) {
    fail(file, `header length ${n} exceeds the limit of ${MAX_HEADER_BYTES} bytes`);
  }
  const length = Number(n);
  if (8 + length > fileSize) {
    fail(
      file,
      `header length ${length} runs past the end of the file (${fileSize} bytes)`,
      "The file is truncated (an interrupted download or copy?); re-download it.",
    );
  }
  return length;
}

/**
 * Parses and validates the JSON header `json` (the N bytes after the length) of a file of
 * `fileSize` bytes. Every rule of the module banner is checked; errors name `file` and
 * the tensor.
 */
export function parseHeader(json: Uint8Array, fileSize: number, file: string): SafetensorsHeader {
  const headerLength = json.length;
  const dataStart = 8 + headerLength;
  const dataLength = fileSize - dataStart;
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(json);
  } catch {
    fail(file, "the header is not valid UTF-8");
  }
  if (!text.startsWith("{")) fail(file, `the header does not start with "{"`);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    fail(file, `the header is not valid JSON (${(error as Error).message})`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    fail(file, "the header is not a JSON object");
  }
  let metadata: Record<string, string> | null = null;
  const tensors: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(raw as Record<string, unknown>)) {
    if (name === "__metadata__") {
      metadata = parseMetadata(entry, file);
      continue;
    }
    tensors.push(parseEntry(name, entry, dataLength, file));
  }
  // Tensors must tile [0, dataLength) exactly, as the reference implementation requires.
  tensors.sort((a, b) => a.dataOffsets[0] - b.dataOffsets[0] || a.dataOffsets[1] - b.dataOffsets[1]);
  let end = 0;
  let previous: TensorInfo | null = null;
  for (const t of tensors) {
    const [a, b] = t.dataOffsets;
    if (a < end) {
      fail(
        file,
        `tensor "${t.name}" (data_offsets [${a}, ${b}]) overlaps tensor "${previous!.name}" ` +
          `(data_offsets [${previous!.dataOffsets[0]}, ${previous!.dataOffsets[1]}])`,
      );
    }
    if (a > end) {
      fail(
        file,
        `bytes [${end}, ${a}) of the data section belong to no tensor (before tensor "${t.name}"); ` +
          "tensors must cover the data section without gaps",
      );
    }
    end = b;
    previous = t;
  }
  if (end !== dataLength) {
    fail(
      file,
      `the data section is ${dataLength} bytes but its tensors end at byte ${end}`,
      end < dataLength
        ? "The file has trailing bytes after the last tensor; it was not written by a safetensors writer."
        : undefined,
    );
  }
  return { headerLength, dataStart, dataLength, tensors, metadata };
}

function parseMetadata(entry: unknown, file: string): Record<string, string> {
  if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
    fail(file, `"__metadata__" is not a JSON object of strings`);
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
    if (typeof v !== "string") {
      fail(file, `"__metadata__.${k}" is ${JSON.stringify(v)}, not a string`);
    }
    out[k] = v;
  }
  return out;
}

function parseEntry(name: string, entry: unknown, dataLength: number, file: string): TensorInfo {
  const where = `tensor "${name}"`;
  if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
    fail(file, `${where} is not a JSON object with dtype, shape and data_offsets`);
  }
  const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
  if (!isDtype(dtype)) {
    fail(
      file,
      `${where} has unknown dtype ${JSON.stringify(dtype)} (known: ${Object.keys(DTYPES).join(", ")})`,
      "This dtype is not supported; convert the checkpoint to F32, F16 or BF16.",
    );
  }
  if (!Array.isArray(shape) || !shape.every(isCount)) {
    fail(file, `${where} has shape ${JSON.stringify(shape)}; expected a list of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount)) {
    fail(file, `${where} has data_offsets ${JSON.stringify(offsets)}; expected [begin, end] integers`);
  }
  const [a, b] = offsets as [number, number];
  if (b < a) fail(file, `${where} has data_offsets [${a}, ${b}] with end before begin`);
  if (b > dataLength) {
    fail(
      file,
      `${where} has data_offsets [${a}, ${b}] outside the data section (${dataLength} bytes)`,
      "The file is truncated or damaged; re-download it.",
    );
  }
  const numel = product(shape);
  const need = numel === null ? null : numel * DTYPES[dtype].size;
  if (need === null || !Number.isSafeInteger(need)) {
    fail(file, `${where} has shape ${JSON.stringify(shape)} whose size overflows`);
  }
  if (b - a !== need) {
    fail(
      file,
      `${where} has data_offsets [${a}, ${b}] spanning ${b - a} bytes, ` +
        `but shape ${JSON.stringify(shape)} of ${dtype} needs ${need} bytes`,
    );
  }
  return { name, dtype, shape: [...shape], dataOffsets: [a, b], numel: numel!, byteLength: need };
}

/**
 * An open safetensors file. The header is read and validated on open; tensors are read
 * one at a time into buffers of exactly their size, so multi-GB files never sit in memory.
 *
 * @example
 * ```ts
 * using st = await SafetensorsFile.open("model.safetensors");
 * const w = await st.readFloat32("model.norm.weight"); // bf16/f16/f64 converted
 * ```
 */
export class SafetensorsFile implements Disposable {
  /** The path the file was opened with. */
  readonly path: string;
  /** The validated header. */
  readonly header: SafetensorsHeader;
  #file: Deno.FsFile;
  #byName: Map<string, TensorInfo>;
  // Reads seek a shared handle, so they run one at a time.
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;

  private constructor(path: string, file: Deno.FsFile, header: SafetensorsHeader) {
    this.path = path;
    this.#file = file;
    this.header = header;
    this.#byName = new Map(header.tensors.map((t) => [t.name, t]));
  }

  /** Opens `path` and validates its header. */
  static async open(path: string): Promise<SafetensorsFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) {
        throw new LatheError(`Cannot open safetensors file "${path}": it does not exist`, { cause: error });
      }
      throw new LatheError(`Cannot open safetensors file "${path}": ${(error as Error).message}`, {
        cause: error,
      });
    }
    try {
      const stat = await file.stat();
      if (!stat.isFile) fail(path, "it is not a regular file", "Pass the path of a .safetensors file.");
      const prefix = await readExactly(file, 0, Math.min(8, stat.size), path);
      const n = readHeaderLength(prefix, stat.size, path);
      const json = await readExactly(file, 8, n, path);
      return new SafetensorsFile(path, file, parseHeader(json, stat.size, path));
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /** `__metadata__`, or null. */
  get metadata(): Readonly<Record<string, string>> | null {
    return this.header.metadata;
  }

  /** Tensor names in file order. */
  names(): string[] {
    return this.header.tensors.map((t) => t.name);
  }

  /** True when the file holds tensor `name`. */
  has(name: string): boolean {
    return this.#byName.has(name);
  }

  /** The header entry of `name`; a LatheError when absent. */
  info(name: string): TensorInfo {
    const info = this.#byName.get(name);
    if (!info) {
      throw new LatheError(`Cannot read tensor "${name}" from "${this.path}": no such tensor`, {
        hint: `The file holds ${this.#byName.size} tensors, e.g. ${quoteSome(this.names())}.`,
      });
    }
    return info;
  }

  /** The raw little-endian bytes of `name`, in a buffer of exactly its size. */
  readBytes(name: string): Promise<Uint8Array> {
    const info = this.info(name);
    return this.#read(name, info.dataOffsets[0], info.byteLength);
  }

  /**
   * Rows [rowStart, rowEnd) of `name` along its first dimension, as raw bytes: a large
   * tensor (an embedding) can be read in row chunks without holding all of it.
   */
  readRows(name: string, rowStart: number, rowEnd: number): Promise<Uint8Array> {
    const info = this.info(name);
    const rows = info.shape[0] ?? 1;
    if (
      !(Number.isInteger(rowStart) && Number.isInteger(rowEnd) && 0 <= rowStart && rowStart <= rowEnd &&
        rowEnd <= rows)
    ) {
      throw new RangeError(
        `Cannot read rows [${rowStart}, ${rowEnd}) of tensor "${name}": it has ${rows} rows`,
      );
    }
    const rowBytes = rows === 0 ? 0 : info.byteLength / rows;
    return this.#read(name, info.dataOffsets[0] + rowStart * rowBytes, (rowEnd - rowStart) * rowBytes);
  }

  #read(name: string, offset: number, length: number): Promise<Uint8Array> {
    if (this.#closed) throw new Error(`Cannot read tensor "${name}": "${this.path}" is closed`);
    const run = this.#queue.then(() =>
      readExactly(this.#file, this.header.dataStart + offset, length, this.path)
    );
    this.#queue = run.catch(() => {});
    return run;
  }

  /** Tensor `name` converted to f32 (see {@link toFloat32} for the conversions). */
  async readFloat32(name: string): Promise<Float32Array> {
    const info = this.info(name);
    return toFloat32(info.dtype, await this.readBytes(name), `tensor "${name}" of "${this.path}"`);
  }

  /** Closes the file handle. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#file.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Reads exactly `length` bytes at `position`; a short file is a LatheError. */
async function readExactly(
  file: Deno.FsFile,
  position: number,
  length: number,
  path: string,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await file.seek(position, Deno.SeekMode.Start);
  let filled = 0;
  while (filled < length) {
    const n = await file.read(buf.subarray(filled));
    if (n === null) {
      fail(
        path,
        `expected ${length} bytes at offset ${position} but the file ends after ${filled}`,
        "The file is truncated or changed while it was read; re-download it.",
      );
    }
    filled += n;
  }
  return buf;
}

function quoteSome(names: string[], k = 3): string {
  const shown = names.slice(0, k).map((n) => `"${n}"`).join(", ");
  return names.length > k ? `${shown}, …` : shown || "(none)";
}

// ---------------------------------------------------------------------------------------
// Element conversions. The host is little-endian (every Deno target), like the file format.

let f16Table: Float32Array | null = null;

/** f16 bits -> f32 value, exact (subnormals, ±inf and NaN payloads preserved). */
export function f16BitsToFloat32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

function f16Lookup(): Float32Array {
  if (f16Table) return f16Table;
  const table = new Float32Array(65536);
  const bits = new Uint32Array(table.buffer);
  for (let h = 0; h < 65536; h++) {
    const exp = (h >>> 10) & 0x1f;
    const mant = h & 0x3ff;
    // NaN keeps its payload and sign, like a hardware f16->f32 conversion.
    if (exp === 31 && mant !== 0) bits[h] = ((h & 0x8000) << 16) | 0x7f800000 | (mant << 13);
    else table[h] = f16BitsToFloat32(h);
  }
  return (f16Table = table);
}

/** f32 value -> f16 bits, rounding to nearest even; overflow goes to ±inf, NaN stays NaN. */
export function float32ToF16Bits(value: number): number {
  const x = f32Bits(value);
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    // f16 subnormal: value / 2^-24, from the 24-bit significand m = 1.mant · 2^23.
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e;
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1))) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry out of the mantissa bumps the exponent, up to 0x7c00 = inf: still correct.
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++;
  return sign | half;
}

/** f32 value -> bf16 bits (the upper half), rounding to nearest even; NaN -> quiet NaN. */
export function float32ToBf16Bits(value: number): number {
  const x = f32Bits(value);
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) return ((x >>> 16) | 0x40) & 0xffff;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);
function f32Bits(value: number): number {
  scratchF32[0] = value;
  return scratchU32[0];
}

/**
 * Converts tensor bytes of `dtype` to f32: F32 copied; F16 and BF16 exact (bf16 is the
 * upper half of an f32); F64 rounded to nearest; F8_E4M3 (E4M3FN: no inf, S.1111.111 = NaN)
 * and F8_E5M2 exact; integer and BOOL types by value (I64/U64 rounded). `where` names the
 * tensor in errors. C64 and F8_E8M0 have no f32 reading and are rejected.
 */
export function toFloat32(dtype: Dtype, bytes: Uint8Array, where: string): Float32Array {
  const size = DTYPES[dtype].size;
  if (bytes.length % size !== 0) {
    throw new LatheError(
      `Cannot convert ${where} to f32: ${bytes.length} bytes is not a multiple of ${size}`,
    );
  }
  const n = bytes.length / size;
  const out = new Float32Array(n);
  // Typed views need an aligned offset; misaligned input is copied once to align it.
  const aligned = bytes.byteOffset % size === 0 ? bytes : bytes.slice();
  const src = aligned.buffer;
  const at = aligned.byteOffset;
  switch (dtype) {
    case "F32":
      out.set(new Float32Array(src, at, n));
      break;
    case "F16":
      f16Widen(new Uint16Array(src, at, n), f16Lookup(), out);
      break;
    case "BF16":
      bf16Widen(new Uint16Array(src, at, n), new Int32Array(out.buffer));
      break;
    case "F64":
      out.set(new Float64Array(src, at, n));
      break;
    case "F8_E5M2": {
      // E5M2 is the upper byte of an f16.
      const table = f16Lookup();
      for (let i = 0; i < n; i++) out[i] = table[bytes[i] << 8];
      break;
    }
    case "F8_E4M3":
      for (let i = 0; i < n; i++) out[i] = e4m3ToFloat(bytes[i]);
      break;
    case "BOOL":
    case "U8":
      out.set(bytes);
      break;
    case "I8":
      out.set(new Int8Array(src, at, n));
      break;
    case "I16":
      out.set(new Int16Array(src, at, n));
      break;
    case "U16":
      out.set(new Uint16Array(src, at, n));
      break;
    case "I32":
      out.set(new Int32Array(src, at, n));
      break;
    case "U32":
      out.set(new Uint32Array(src, at, n));
      break;
    case "I64": {
      const v = new BigInt64Array(src, at, n);
      for (let i = 0; i < n; i++) out[i] = Number(v[i]);
      break;
    }
    case "U64": {
      const v = new BigUint64Array(src, at, n);
      for (let i = 0; i < n; i++) out[i] = Number(v[i]);
      break;
    }
    default:
      throw new LatheError(`Cannot convert ${where} to f32: dtype ${dtype} has no f32 reading`);
  }
  return out;
}

// The hot conversions live in small functions of their own: inside the large switch above the
// JIT keeps their loops ~4× slower (the quantize step converts every weight twice).

/** bf16 → f32: the bf16 bits are the upper half of the f32's (written as i32 bit patterns). */
function bf16Widen(h: Uint16Array, o: Int32Array): void {
  for (let i = 0; i < h.length; i++) o[i] = h[i] << 16;
}

/** f16 → f32 through the 65536-entry table. */
function f16Widen(h: Uint16Array, table: Float32Array, out: Float32Array): void {
  for (let i = 0; i < h.length; i++) out[i] = table[h[i]];
}

// E4M3FN: bias 7, subnormals m · 2^-9, S.1111.111 is NaN, no infinities.
function e4m3ToFloat(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const exp = (b >>> 3) & 0xf;
  const mant = b & 7;
  if (exp === 15 && mant === 7) return NaN;
  if (exp === 0) return sign * mant * 2 ** -9;
  return sign * (1 + mant / 8) * 2 ** (exp - 7);
}

/**
 * Encodes f32 values as little-endian bytes of `dtype`: F32 as is, F16 and BF16 rounded to
 * nearest even, F64 widened exactly.
 */
export function fromFloat32(values: Float32Array, dtype: "F32" | "F16" | "BF16" | "F64"): Uint8Array {
  switch (dtype) {
    case "F32":
      return new Uint8Array(values.slice().buffer);
    case "F64":
      return new Uint8Array(Float64Array.from(values).buffer);
    case "F16":
    case "BF16": {
      const out = new Uint16Array(values.length);
      const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
      if (dtype === "BF16") {
        for (let i = 0; i < values.length; i++) {
          const x = bits[i];
          out[i] = (x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0
            ? (x >>> 16) | 0x40
            : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
        }
      } else {
        for (let i = 0; i < values.length; i++) out[i] = float32ToF16Bits(values[i]);
      }
      return new Uint8Array(out.buffer);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Writing.

/** A tensor to write. `data` may be produced lazily so large files stream to disk. */
export interface TensorSource {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  readonly data: Uint8Array | (() => Uint8Array | Promise<Uint8Array>);
}

/** Where each tensor lands, and the encoded prefix (length + padded header). */
export interface SafetensorsPlan {
  /** The 8-byte length followed by the padded JSON header. */
  readonly prefix: Uint8Array;
  /** Tensors in file order with their offsets. */
  readonly tensors: readonly TensorInfo[];
  /** Bytes in the data section. */
  readonly dataLength: number;
}

const utf8 = new TextEncoder();

function compareUtf8(a: string, b: string): number {
  const x = utf8.encode(a);
  const y = utf8.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/**
 * Lays out `tensors` (name, dtype, shape) and `metadata` exactly as the reference writer:
 * descending dtype alignment then name (byte order), contiguous offsets, compact JSON,
 * spaces to a multiple of 8.
 */
export function planSafetensors(
  tensors: readonly Pick<TensorSource, "name" | "dtype" | "shape">[],
  metadata?: Readonly<Record<string, string>> | null,
): SafetensorsPlan {
  const seen = new Set<string>();
  for (const t of tensors) {
    const where = `tensor "${t.name}"`;
    if (t.name === "" || t.name === "__metadata__") {
      throw new LatheError(`Cannot write safetensors: invalid tensor name ${JSON.stringify(t.name)}`);
    }
    if (seen.has(t.name)) throw new LatheError(`Cannot write safetensors: ${where} appears twice`);
    seen.add(t.name);
    if (!isDtype(t.dtype)) {
      throw new LatheError(`Cannot write safetensors: ${where} has unknown dtype "${t.dtype}"`);
    }
    if (!t.shape.every(isCount)) {
      throw new LatheError(`Cannot write safetensors: ${where} has shape ${JSON.stringify(t.shape)}`);
    }
  }
  const order = [...tensors].sort((a, b) =>
    DTYPES[b.dtype].rank - DTYPES[a.dtype].rank || compareUtf8(a.name, b.name)
  );
  const infos: TensorInfo[] = [];
  let offset = 0;
  for (const t of order) {
    const numel = product(t.shape);
    if (numel === null) throw new LatheError(`Cannot write safetensors: tensor "${t.name}" is too large`);
    const byteLength = numel * DTYPES[t.dtype].size;
    infos.push({
      name: t.name,
      dtype: t.dtype,
      shape: [...t.shape],
      dataOffsets: [offset, offset + byteLength],
      numel,
      byteLength,
    });
    offset += byteLength;
  }
  // JS objects move integer-like keys first, so the JSON is joined by hand to keep order.
  const parts: string[] = [];
  if (metadata) {
    const entries = Object.keys(metadata).sort(compareUtf8).map((k) => {
      if (typeof metadata[k] !== "string") {
        throw new LatheError(`Cannot write safetensors: metadata "${k}" is not a string`);
      }
      return `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`;
    });
    parts.push(`"__metadata__":{${entries.join(",")}}`);
  }
  for (const t of infos) {
    parts.push(
      `${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":${JSON.stringify(t.shape)},` +
        `"data_offsets":[${t.dataOffsets[0]},${t.dataOffsets[1]}]}`,
    );
  }
  const json = utf8.encode(`{${parts.join(",")}}`);
  const padded = Math.ceil(json.length / 8) * 8;
  const prefix = new Uint8Array(8 + padded);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(padded), true);
  prefix.set(json, 8);
  prefix.fill(0x20, 8 + json.length);
  return { prefix, tensors: infos, dataLength: offset };
}

async function tensorBytes(t: TensorSource, info: TensorInfo): Promise<Uint8Array> {
  const data = typeof t.data === "function" ? await t.data() : t.data;
  if (data.length !== info.byteLength) {
    throw new LatheError(
      `Cannot write safetensors: tensor "${t.name}" has ${data.length} bytes, ` +
        `but shape ${JSON.stringify(t.shape)} of ${t.dtype} needs ${info.byteLength}`,
    );
  }
  return data;
}

/** The whole file in memory (small files and tests). */
export async function serializeSafetensors(
  tensors: readonly TensorSource[],
  metadata?: Readonly<Record<string, string>> | null,
): Promise<Uint8Array> {
  const plan = planSafetensors(tensors, metadata);
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const out = new Uint8Array(plan.prefix.length + plan.dataLength);
  out.set(plan.prefix);
  for (const info of plan.tensors) {
    out.set(await tensorBytes(byName.get(info.name)!, info), plan.prefix.length + info.dataOffsets[0]);
  }
  return out;
}

/** Options for {@link writeSafetensors}. */
export interface WriteOptions {
  /** Progress label; no progress output when absent. */
  progress?: string;
}

/**
 * Writes a safetensors file atomically: streamed tensor by tensor into a temp file beside
 * `path` (each tensor's bytes made while the previous one is written), synced, then renamed.
 * Returns the file size.
 */
export async function writeSafetensors(
  path: string,
  tensors: readonly TensorSource[],
  metadata?: Readonly<Record<string, string>> | null,
  options: WriteOptions = {},
): Promise<number> {
  const plan = planSafetensors(tensors, metadata);
  const byName = new Map(tensors.map((t) => [t.name, t]));
  await Deno.mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  const progress = options.progress ? new Progress(options.progress, plan.dataLength, "B") : null;
  try {
    {
      using file = await Deno.open(tmp, { write: true, create: true, truncate: true });
      await writeAll(file, plan.prefix);
      // A tensor's bytes are produced (read, converted, quantized) while the previous one is
      // written: at most two tensors are held.
      let writing: Promise<void> = Promise.resolve();
      try {
        for (const info of plan.tensors) {
          const bytes = await tensorBytes(byName.get(info.name)!, info);
          await writing;
          writing = writeAll(file, bytes).then(() => progress?.tick(info.byteLength));
        }
        await writing;
      } catch (error) {
        await writing.catch(() => {});
        throw error;
      }
      await file.syncData();
    }
    await Deno.rename(tmp, path);
  } catch (error) {
    await Deno.remove(tmp).catch(() => {});
    throw error;
  }
  progress?.done();
  return plan.prefix.length + plan.dataLength;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await file.write(bytes.subarray(written));
}

// ---------------------------------------------------------------------------------------
// Model directories: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.

/** The index file transformers writes beside shards. */
export const INDEX_FILE = "model.safetensors.index.json";
/** The single-file weights name. */
export const SINGLE_FILE = "model.safetensors";

/** A tensor entry with the file that holds it. */
export interface ModelTensorInfo extends TensorInfo {
  /** Path of the holding file, relative to the model directory. */
  readonly file: string;
}

/**
 * All tensors of a model directory across its shards, read by name.
 *
 * @example
 * ```ts
 * using weights = await ModelWeights.open("models/tiny-llama");
 * for (const name of weights.names()) console.log(name, weights.info(name).shape);
 * ```
 */
export class ModelWeights implements Disposable {
  /** The model directory. */
  readonly dir: string;
  /** The weight files (relative paths), in index order. */
  readonly files: readonly string[];
  #shards: Map<string, SafetensorsFile>;
  #where: Map<string, string>;

  private constructor(dir: string, shards: Map<string, SafetensorsFile>, where: Map<string, string>) {
    this.dir = dir;
    this.#shards = shards;
    this.#where = where;
    this.files = [...shards.keys()];
  }

  /**
   * Opens `dir` (or a single `.safetensors` file). As in transformers, `model.safetensors`
   * wins over `model.safetensors.index.json`. The index and every shard header are
   * validated up front, so a missing shard or a tensor missing from its shard fails here.
   */
  static async open(path: string): Promise<ModelWeights> {
    let stat: Deno.FileInfo;
    try {
      stat = await Deno.stat(path);
    } catch (error) {
      throw new LatheError(`Cannot open model weights "${path}": it does not exist`, { cause: error });
    }
    if (stat.isFile) {
      const file = await SafetensorsFile.open(path);
      const name = basename(path);
      return new ModelWeights(
        dirname(path),
        new Map([[name, file]]),
        new Map(file.names().map((n) => [n, name])),
      );
    }
    // transformers' precedence: the single file, then the index.
    if (await exists(join(path, SINGLE_FILE))) {
      const file = await SafetensorsFile.open(join(path, SINGLE_FILE));
      return new ModelWeights(
        path,
        new Map([[SINGLE_FILE, file]]),
        new Map(file.names().map((n) => [n, SINGLE_FILE])),
      );
    }
    const indexPath = join(path, INDEX_FILE);
    if (await exists(indexPath)) return await ModelWeights.#openSharded(path, indexPath);
    const hasBin = await exists(join(path, "pytorch_model.bin")) ||
      await exists(join(path, "pytorch_model.bin.index.json"));
    throw new LatheError(
      `Cannot open model weights in "${path}": neither "${SINGLE_FILE}" nor "${INDEX_FILE}" is there`,
      {
        hint: hasBin
          ? "The directory holds PyTorch pickle weights (pytorch_model.bin); lathe reads safetensors only. " +
            "Convert them (e.g. model.save_pretrained(dir, safe_serialization=True))."
          : "Point to a Hugging Face model directory with safetensors weights.",
      },
    );
  }

  static async #openSharded(dir: string, indexPath: string): Promise<ModelWeights> {
    const failIndex = (what: string, hint?: string): never => {
      throw new LatheError(`Cannot read "${indexPath}": ${what}`, {
        hint: hint ?? "The index is damaged; re-download the model.",
      });
    };
    let raw: unknown;
    try {
      raw = JSON.parse(await Deno.readTextFile(indexPath));
    } catch (error) {
      failIndex(`it is not valid JSON (${(error as Error).message})`);
    }
    const weightMap = (raw as { weight_map?: unknown })?.weight_map;
    if (weightMap === null || typeof weightMap !== "object" || Array.isArray(weightMap)) {
      failIndex(`"weight_map" is missing or not an object of tensor name -> file`);
    }
    const byFile = new Map<string, string[]>();
    for (const [name, file] of Object.entries(weightMap as Record<string, unknown>)) {
      if (typeof file !== "string" || file === "") failIndex(`"weight_map.${name}" is not a file name`);
      const f = file as string;
      const norm = normalize(f);
      if (isAbsolute(f) || norm.startsWith("..") || norm.split(sep).includes("..")) {
        failIndex(`"weight_map.${name}" points outside the model directory ("${f}")`);
      }
      byFile.set(f, [...(byFile.get(f) ?? []), name]);
    }
    const shards = new Map<string, SafetensorsFile>();
    try {
      for (const [file, names] of byFile) {
        const full = resolve(dir, file);
        if (!(await exists(full))) {
          throw new LatheError(
            `Cannot open model weights in "${dir}": shard "${file}" (listed in ${INDEX_FILE} for ` +
              `${names.length} tensors, e.g. ${quoteSome(names, 2)}) is missing`,
            { hint: "The download is incomplete; download the model again." },
          );
        }
        const st = await SafetensorsFile.open(full);
        shards.set(file, st);
        for (const name of names) {
          if (!st.has(name)) {
            throw new LatheError(
              `Cannot open model weights in "${dir}": ${INDEX_FILE} puts tensor "${name}" in "${file}", ` +
                "but that shard has no such tensor",
              { hint: "The index and the shards come from different exports; download the model again." },
            );
          }
        }
      }
    } catch (error) {
      for (const s of shards.values()) s.close();
      throw error;
    }
    const where = new Map<string, string>();
    for (const [file, names] of byFile) for (const n of names) where.set(n, file);
    return new ModelWeights(dir, shards, where);
  }

  /** All tensor names, sorted. */
  names(): string[] {
    return [...this.#where.keys()].sort();
  }

  /** True when the model has tensor `name`. */
  has(name: string): boolean {
    return this.#where.has(name);
  }

  /** The entry of `name` and the file holding it; a LatheError when absent. */
  info(name: string): ModelTensorInfo {
    const file = this.#where.get(name);
    if (file === undefined) {
      throw new LatheError(`Cannot read tensor "${name}" from model "${this.dir}": no such tensor`, {
        hint: `The model has ${this.#where.size} tensors, e.g. ${quoteSome(this.names())}.`,
      });
    }
    return { ...this.#shards.get(file)!.info(name), file };
  }

  /** Raw bytes of `name`. */
  readBytes(name: string): Promise<Uint8Array> {
    return this.#shards.get(this.info(name).file)!.readBytes(name);
  }

  /** `name` converted to f32. */
  readFloat32(name: string): Promise<Float32Array> {
    return this.#shards.get(this.info(name).file)!.readFloat32(name);
  }

  /** Raw bytes of rows [rowStart, rowEnd) of `name` (see {@link SafetensorsFile.readRows}). */
  readRows(name: string, rowStart: number, rowEnd: number): Promise<Uint8Array> {
    return this.#shards.get(this.info(name).file)!.readRows(name, rowStart, rowEnd);
  }

  /** Closes every shard. */
  close(): void {
    for (const f of this.#shards.values()) f.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Options for {@link writeModelWeights}. */
export interface ShardOptions {
  /** Largest shard in bytes of tensor data (transformers' `max_shard_size`); default 5 GB. */
  maxShardBytes?: number;
  /** safetensors `__metadata__` for every file; default `{"format": "pt"}` as transformers writes. */
  metadata?: Record<string, string>;
  /** Progress label. */
  progress?: string;
}

/**
 * Writes model weights as transformers' `save_pretrained` lays them out: one
 * `model.safetensors` when everything fits in `maxShardBytes`, else
 * `model-0000i-of-0000n.safetensors` shards filled greedily in the given tensor order
 * (a tensor larger than the limit gets a shard of its own) plus `model.safetensors.index.json`
 * (`{"metadata": {"total_size"}, "weight_map"}`, keys sorted, 2-space indent). The index
 * is written last. Returns the files written (relative names).
 */
export async function writeModelWeights(
  dir: string,
  tensors: readonly TensorSource[],
  options: ShardOptions = {},
): Promise<string[]> {
  const max = options.maxShardBytes ?? 5e9;
  const metadata = options.metadata ?? { format: "pt" };
  const groups: TensorSource[][] = [];
  let current: TensorSource[] = [];
  let currentBytes = 0;
  let total = 0;
  for (const t of tensors) {
    const bytes = (product(t.shape) ?? Infinity) * DTYPES[t.dtype].size;
    if (current.length > 0 && currentBytes + bytes > max) {
      groups.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(t);
    currentBytes += bytes;
    total += bytes;
  }
  if (current.length > 0 || groups.length === 0) groups.push(current);
  if (groups.length === 1) {
    await writeSafetensors(join(dir, SINGLE_FILE), groups[0], metadata, { progress: options.progress });
    return [SINGLE_FILE];
  }
  const n = groups.length;
  const pad = (i: number) => String(i).padStart(5, "0");
  const files: string[] = [];
  const weightMap: Record<string, string> = {};
  for (let i = 0; i < n; i++) {
    const file = `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
    await writeSafetensors(join(dir, file), groups[i], metadata, {
      progress: options.progress ? `${options.progress} ${i + 1}/${n}` : undefined,
    });
    files.push(file);
    for (const t of groups[i]) weightMap[t.name] = file;
  }
  const sortedMap: Record<string, string> = {};
  for (const k of Object.keys(weightMap).sort()) sortedMap[k] = weightMap[k];
  await writeJsonAtomic(join(dir, INDEX_FILE), { metadata: { total_size: total }, weight_map: sortedMap });
  return [...files, INDEX_FILE];
}
