/**
 * GGUF v3, the container llama.cpp reads: a streaming, deterministic writer.
 *
 * Layout (little-endian; llama.cpp's `ggml/src/gguf.cpp`, FORMATS.md "GGUF"):
 * ```
 * "GGUF" u32 version=3  u64 n_tensors  u64 n_kv
 * n_kv ×     key: u64 len + UTF-8 | u32 value type | value
 *            (string = u64 len + UTF-8; array = u32 item type + u64 count + items)
 * n_tensors × name | u32 n_dims | u64 ne[n_dims] (ne[0] contiguous) | u32 ggml type | u64 offset
 * zero padding to a multiple of `general.alignment` (32)
 * data:      each tensor at its offset (a multiple of the alignment), zero padding between
 * ```
 * Everything but the tensor bytes is known before the first byte is written (sizes come from the
 * ggml type), so the header is written once and tensors are produced one at a time: host memory
 * holds one tensor, never the model. The file appears under its name only when complete (temp name,
 * then rename).
 * @module
 */
import { LatheError } from "../foundation/errors.ts";

/** GGUF metadata value types (`gguf_type`). */
export const GGUF_VALUE = {
  u8: 0,
  i8: 1,
  u16: 2,
  i16: 3,
  u32: 4,
  i32: 5,
  f32: 6,
  bool: 7,
  string: 8,
  array: 9,
  u64: 10,
  i64: 11,
  f64: 12,
} as const;

/** A scalar metadata type. */
export type GgufScalarType = Exclude<keyof typeof GGUF_VALUE, "array">;

/** One metadata value: a typed scalar, or an array of one scalar type. */
export type GgufValue =
  | { type: Exclude<GgufScalarType, "string" | "bool" | "u64" | "i64">; value: number }
  | { type: "u64" | "i64"; value: bigint | number }
  | { type: "bool"; value: boolean }
  | { type: "string"; value: string }
  | { type: "array"; itemType: GgufScalarType; values: readonly (number | string | boolean | bigint)[] };

/** Builders for metadata values, named as llama.cpp's readers expect them typed. */
export const gguf = {
  u32: (value: number): GgufValue => ({ type: "u32", value }),
  i32: (value: number): GgufValue => ({ type: "i32", value }),
  f32: (value: number): GgufValue => ({ type: "f32", value }),
  bool: (value: boolean): GgufValue => ({ type: "bool", value }),
  str: (value: string): GgufValue => ({ type: "string", value }),
  strings: (values: readonly string[]): GgufValue => ({ type: "array", itemType: "string", values }),
  i32s: (values: readonly number[]): GgufValue => ({ type: "array", itemType: "i32", values }),
  f32s: (values: readonly number[]): GgufValue => ({ type: "array", itemType: "f32", values }),
};

/** One tensor to write: its ggml shape (`ne`, ne[0] contiguous), type, byte size and bytes. */
export interface GgufTensor {
  name: string;
  /** ggml `ne`: a PyTorch `[out, in]` weight is `[in, out]`. */
  ne: readonly number[];
  /** ggml type id (formats/gguf_quants.ts GGML_TYPE). */
  type: number;
  /** Exact size in bytes of the encoded tensor. */
  bytes: number;
  /** Produces the encoded bytes (called once, in file order). */
  data: () => Promise<Uint8Array> | Uint8Array;
}

/** Default and llama.cpp's `GGUF_DEFAULT_ALIGNMENT`. */
export const GGUF_ALIGNMENT = 32;

const encoder = new TextEncoder();

/** A growable little-endian byte buffer for the header. */
class ByteWriter {
  #buf = new Uint8Array(1 << 16);
  #view = new DataView(this.#buf.buffer);
  length = 0;

  #reserve(n: number) {
    if (this.length + n <= this.#buf.length) return;
    let size = this.#buf.length * 2;
    while (size < this.length + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.#buf.subarray(0, this.length));
    this.#buf = next;
    this.#view = new DataView(next.buffer);
  }
  u8(v: number) {
    this.#reserve(1);
    this.#view.setUint8(this.length, v);
    this.length += 1;
  }
  i8(v: number) {
    this.#reserve(1);
    this.#view.setInt8(this.length, v);
    this.length += 1;
  }
  u16(v: number) {
    this.#reserve(2);
    this.#view.setUint16(this.length, v, true);
    this.length += 2;
  }
  i16(v: number) {
    this.#reserve(2);
    this.#view.setInt16(this.length, v, true);
    this.length += 2;
  }
  u32(v: number) {
    this.#reserve(4);
    this.#view.setUint32(this.length, v, true);
    this.length += 4;
  }
  i32(v: number) {
    this.#reserve(4);
    this.#view.setInt32(this.length, v, true);
    this.length += 4;
  }
  f32(v: number) {
    this.#reserve(4);
    this.#view.setFloat32(this.length, v, true);
    this.length += 4;
  }
  f64(v: number) {
    this.#reserve(8);
    this.#view.setFloat64(this.length, v, true);
    this.length += 8;
  }
  u64(v: bigint | number) {
    this.#reserve(8);
    this.#view.setBigUint64(this.length, BigInt(v), true);
    this.length += 8;
  }
  i64(v: bigint | number) {
    this.#reserve(8);
    this.#view.setBigInt64(this.length, BigInt(v), true);
    this.length += 8;
  }
  string(s: string) {
    const bytes = encoder.encode(s);
    this.u64(bytes.length);
    this.#reserve(bytes.length);
    this.#buf.set(bytes, this.length);
    this.length += bytes.length;
  }
  zeros(n: number) {
    this.#reserve(n);
    this.#buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  bytes(): Uint8Array {
    return this.#buf.slice(0, this.length);
  }
}

function writeScalar(
  w: ByteWriter,
  type: GgufScalarType,
  v: number | string | boolean | bigint,
  key: string,
) {
  const bad = () =>
    new LatheError(`Cannot write GGUF metadata "${key}": ${JSON.stringify(String(v))} is not a ${type}`);
  if (type === "string") {
    if (typeof v !== "string") throw bad();
    return w.string(v);
  }
  if (type === "bool") {
    if (typeof v !== "boolean") throw bad();
    return w.u8(v ? 1 : 0);
  }
  if (type === "u64" || type === "i64") {
    if (typeof v !== "bigint" && !Number.isInteger(v)) throw bad();
    return type === "u64" ? w.u64(v as bigint | number) : w.i64(v as bigint | number);
  }
  if (typeof v !== "number" || Number.isNaN(v) && type !== "f32" && type !== "f64") throw bad();
  if (type !== "f32" && type !== "f64" && !Number.isInteger(v)) throw bad();
  w[type](v);
}

/** Rounds `n` up to a multiple of `align`. */
export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/** The header (everything before the data section, padding included) and each tensor's offset. */
export function ggufHeader(
  metadata: ReadonlyArray<readonly [string, GgufValue]>,
  tensors: readonly Omit<GgufTensor, "data">[],
  alignment = GGUF_ALIGNMENT,
): { header: Uint8Array; offsets: number[]; dataBytes: number } {
  const seen = new Set<string>();
  for (const [key] of metadata) {
    if (seen.has(key)) throw new LatheError(`Cannot write GGUF: metadata key "${key}" appears twice`);
    seen.add(key);
  }
  const names = new Set<string>();
  for (const t of tensors) {
    if (names.has(t.name)) throw new LatheError(`Cannot write GGUF: tensor "${t.name}" appears twice`);
    names.add(t.name);
    if (t.ne.length < 1 || t.ne.length > 4 || t.ne.some((n) => !Number.isInteger(n) || n <= 0)) {
      throw new LatheError(
        `Cannot write GGUF tensor "${t.name}": shape [${t.ne}] is not 1 to 4 positive sizes`,
      );
    }
  }
  const w = new ByteWriter();
  w.u32(0x46554747); // "GGUF" read as a little-endian u32
  w.u32(3);
  w.u64(tensors.length);
  w.u64(metadata.length);
  for (const [key, value] of metadata) {
    w.string(key);
    w.u32(GGUF_VALUE[value.type]);
    if (value.type === "array") {
      w.u32(GGUF_VALUE[value.itemType]);
      w.u64(value.values.length);
      for (const item of value.values) writeScalar(w, value.itemType, item, key);
    } else writeScalar(w, value.type, value.value, key);
  }
  const offsets: number[] = [];
  let offset = 0;
  for (const t of tensors) {
    w.string(t.name);
    w.u32(t.ne.length);
    for (const n of t.ne) w.u64(n);
    w.u32(t.type);
    w.u64(offset);
    offsets.push(offset);
    offset = alignUp(offset + t.bytes, alignment);
  }
  w.zeros(alignUp(w.length, alignment) - w.length);
  const last = tensors.length ? offsets[offsets.length - 1] + tensors[tensors.length - 1].bytes : 0;
  return { header: w.bytes(), offsets, dataBytes: last };
}

/** Options for {@link writeGguf}. */
export interface WriteGgufOptions {
  /** Called after each tensor is written. */
  onTensor?: (tensor: GgufTensor, index: number) => void;
}

/**
 * Writes a GGUF file at `path`: the header, then each tensor's bytes (checked against its declared
 * size) at its aligned offset. The file is written under a temp name and renamed when complete;
 * a failure removes the temp file. `general.alignment`, when present in `metadata`, must be a u32.
 * Returns the file's size in bytes.
 */
export async function writeGguf(
  path: string,
  metadata: ReadonlyArray<readonly [string, GgufValue]>,
  tensors: readonly GgufTensor[],
  options: WriteGgufOptions = {},
): Promise<number> {
  const alignEntry = metadata.find(([k]) => k === "general.alignment")?.[1];
  const alignment = alignEntry?.type === "u32" ? alignEntry.value : GGUF_ALIGNMENT;
  const { header, offsets, dataBytes } = ggufHeader(metadata, tensors, alignment);
  const tmp = `${path}.tmp`;
  const file = await Deno.open(tmp, { write: true, create: true, truncate: true });
  try {
    await writeAll(file, header);
    let at = 0;
    for (const [i, t] of tensors.entries()) {
      if (offsets[i] > at) await writeAll(file, new Uint8Array(offsets[i] - at));
      const bytes = await t.data();
      if (bytes.length !== t.bytes) {
        throw new LatheError(
          `Cannot write GGUF tensor "${t.name}": it encoded to ${bytes.length} bytes, ${t.bytes} were declared`,
        );
      }
      await writeAll(file, bytes);
      at = offsets[i] + bytes.length;
      options.onTensor?.(t, i);
    }
    if (at !== dataBytes) throw new Error(`GGUF writer: data section ${at} ≠ ${dataBytes}`);
    await file.sync();
    file.close();
  } catch (error) {
    file.close();
    await Deno.remove(tmp).catch(() => {});
    throw error;
  }
  await Deno.rename(tmp, path);
  return header.length + dataBytes;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array) {
  let done = 0;
  while (done < bytes.length) done += await file.write(bytes.subarray(done));
}
