/**
 * Token shards: the binary format the `tokenize` step writes and training reads
 * (docs/shards.md specifies it byte for byte).
 *
 * A split directory (`train/`, `eval/`) holds `index.json` and, per shard k (5 digits):
 * - `tokens-k.bin`: token ids, little-endian uint16 (vocab <= 65536) or uint32, rows back to back;
 * - `mask-k.bin`: one uint8 per token, 1 = loss target, 0 = not (context or padding);
 * - `docs-k.bin`: little-endian uint32, three arrays back to back:
 *   `row_ptr[rows+1]` (token offset of each row in the shard), `bound_ptr[rows+1]` (offset of
 *   each row's bounds), `bounds[...]` (per row: `0, end of doc 1, ..., end of doc m`, relative
 *   to the row start; tokens from the last bound to the row end are padding).
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import { dirname, join } from "node:path";
import * as z from "zod";
import { formatZodIssues, LatheError } from "../../foundation/errors.ts";

/** Version of the shard format. */
export const SHARDS_FORMAT = "lathe.shards/1";

const fileName = z.string().regex(
  /^[a-z]+-\d{5}\.bin$/,
  "expected a shard file name such as tokens-00000.bin",
);
const sha256 = z.string().regex(/^[0-9a-f]{64}$/);

/** One shard's entry in index.json. */
export const ShardEntry = z.strictObject({
  tokens: fileName,
  mask: fileName,
  docs: fileName,
  /** Index of the shard's first row among all rows of the split. */
  row_start: z.number().int().nonnegative(),
  rows: z.number().int().nonnegative(),
  /** Stored token slots (padding included). */
  num_tokens: z.number().int().nonnegative(),
  /** Length of the bounds array. */
  num_bounds: z.number().int().nonnegative(),
  sha256: z.strictObject({ tokens: sha256, mask: sha256, docs: sha256 }),
});
export type ShardEntry = z.infer<typeof ShardEntry>;

/** index.json of a split. */
export const ShardIndex = z.strictObject({
  format: z.literal(SHARDS_FORMAT),
  split: z.string(),
  /** Row format of the source data. */
  kind: z.enum(["sft", "text", "preference"]),
  dtype: z.enum(["uint16", "uint32"]),
  vocab_size: z.number().int().positive(),
  /** max_seq_len: the length of every packed row, the upper bound of every unpacked one. */
  seq_len: z.number().int().positive(),
  /** True: every row is exactly seq_len tokens (several documents + padding). */
  packed: z.boolean(),
  /** True: rows 2i and 2i+1 are the chosen and rejected sides of preference pair i. */
  paired: z.boolean(),
  rows: z.number().int().nonnegative(),
  /** Stored token slots (padding included). */
  tokens: z.number().int().nonnegative(),
  /** Non-padding tokens. */
  content_tokens: z.number().int().nonnegative(),
  /** Tokens with mask 1. */
  trained_tokens: z.number().int().nonnegative(),
  documents: z.number().int().nonnegative(),
  pad_id: z.number().int().nonnegative(),
  bos_id: z.number().int().nonnegative().nullable(),
  eos_id: z.number().int().nonnegative().nullable(),
  /** Special token strings (transformers' special_tokens_map names) -> ids. */
  special_ids: z.record(z.string(), z.number().int().nonnegative()),
  /** sha256 over the tokenizer files and the chat template in use (see docs/shards.md). */
  tokenizer_sha256: sha256,
  shards: z.array(ShardEntry),
});
export type ShardIndex = z.infer<typeof ShardIndex>;

/** Fields of index.json the writer does not compute itself. */
export type IndexMeta = Omit<
  ShardIndex,
  "format" | "dtype" | "rows" | "tokens" | "content_tokens" | "trained_tokens" | "documents" | "shards"
>;

/** Appends bytes to a file through a buffer while hashing them. */
class Sink {
  #file: Deno.FsFile;
  #hash: Hash = createHash("sha256");
  #buf = new Uint8Array(1 << 22);
  #used = 0;

  constructor(file: Deno.FsFile) {
    this.#file = file;
  }

  async write(bytes: Uint8Array): Promise<void> {
    this.#hash.update(bytes);
    if (this.#used + bytes.length > this.#buf.length) await this.flush();
    if (bytes.length > this.#buf.length) {
      await writeAll(this.#file, bytes);
      return;
    }
    this.#buf.set(bytes, this.#used);
    this.#used += bytes.length;
  }

  async flush(): Promise<void> {
    if (this.#used > 0) await writeAll(this.#file, this.#buf.subarray(0, this.#used));
    this.#used = 0;
  }

  async close(): Promise<string> {
    await this.flush();
    this.#file.close();
    return this.#hash.digest("hex");
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await file.write(bytes.subarray(off));
}

/** Whether this platform stores typed arrays little-endian (then they are the file bytes as they are). */
const LITTLE_ENDIAN = new Uint8Array(Uint16Array.of(1).buffer)[0] === 1;

/** Little-endian bytes of `values` as uint16 / uint32 (the platform byte order is not assumed). */
function packLE(values: ArrayLike<number>, width: 2 | 4): Uint8Array {
  if (LITTLE_ENDIAN) {
    // Conversion as DataView's setUint16 / setUint32 does it (modulo 2^16 / 2^32).
    const typed = width === 2 ? new Uint16Array(values) : new Uint32Array(values);
    return new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
  }
  const out = new Uint8Array(values.length * width);
  const view = new DataView(out.buffer);
  if (width === 2) { for (let i = 0; i < values.length; i++) view.setUint16(2 * i, values[i], true); }
  else for (let i = 0; i < values.length; i++) view.setUint32(4 * i, values[i], true);
  return out;
}

const shardName = (kind: string, k: number): string => `${kind}-${String(k).padStart(5, "0")}.bin`;

/**
 * Writes a split's shards and index.json into `dir`. Rows are never split across shards; a
 * shard is closed before the row that would take it past `shardTokens` token slots.
 */
export class ShardWriter {
  #dir: string;
  #dtype: "uint16" | "uint32";
  #shardTokens: number;
  #shards: ShardEntry[] = [];
  #cur: {
    tokens: Sink;
    mask: Sink;
    rowPtr: number[];
    boundPtr: number[];
    bounds: number[];
    rows: number;
    tokenCount: number;
  } | null = null;
  #rows = 0;
  #tokens = 0;
  #content = 0;
  #trained = 0;
  #documents = 0;

  constructor(dir: string, vocabSize: number, shardTokens: number) {
    this.#dir = dir;
    this.#dtype = vocabSize <= 65536 ? "uint16" : "uint32";
    this.#shardTokens = shardTokens;
  }

  /** Appends one row. */
  async add(tokens: ArrayLike<number>, mask: Uint8Array, bounds: readonly number[]): Promise<void> {
    const n = tokens.length;
    if (this.#cur && this.#cur.tokenCount > 0 && this.#cur.tokenCount + n > this.#shardTokens) {
      await this.#closeShard();
    }
    if (!this.#cur) await this.#openShard();
    const cur = this.#cur!;
    await cur.tokens.write(packLE(tokens, this.#dtype === "uint16" ? 2 : 4));
    await cur.mask.write(mask);
    cur.bounds.push(...bounds);
    cur.rows++;
    cur.tokenCount += n;
    cur.rowPtr.push(cur.tokenCount);
    cur.boundPtr.push(cur.bounds.length);
    this.#rows++;
    this.#tokens += n;
    this.#content += bounds[bounds.length - 1];
    this.#documents += bounds.length - 1;
    for (let i = 0; i < mask.length; i++) this.#trained += mask[i];
  }

  async #openShard(): Promise<void> {
    const k = this.#shards.length;
    await Deno.mkdir(this.#dir, { recursive: true });
    const open = (kind: string) =>
      Deno.open(join(this.#dir, shardName(kind, k)), { write: true, create: true, truncate: true });
    this.#cur = {
      tokens: new Sink(await open("tokens")),
      mask: new Sink(await open("mask")),
      rowPtr: [0],
      boundPtr: [0],
      bounds: [],
      rows: 0,
      tokenCount: 0,
    };
  }

  async #closeShard(): Promise<void> {
    const cur = this.#cur!;
    const k = this.#shards.length;
    const docsFile = await Deno.open(join(this.#dir, shardName("docs", k)), {
      write: true,
      create: true,
      truncate: true,
    });
    const docs = new Sink(docsFile);
    await docs.write(packLE(cur.rowPtr, 4));
    await docs.write(packLE(cur.boundPtr, 4));
    await docs.write(packLE(cur.bounds, 4));
    const entry: ShardEntry = {
      tokens: shardName("tokens", k),
      mask: shardName("mask", k),
      docs: shardName("docs", k),
      row_start: this.#rows - cur.rows,
      rows: cur.rows,
      num_tokens: cur.tokenCount,
      num_bounds: cur.bounds.length,
      sha256: { tokens: await cur.tokens.close(), mask: await cur.mask.close(), docs: await docs.close() },
    };
    this.#shards.push(entry);
    this.#cur = null;
  }

  /** Closes the last shard and writes index.json; returns the index. */
  async finish(meta: IndexMeta): Promise<ShardIndex> {
    if (this.#cur) await this.#closeShard();
    const index: ShardIndex = {
      format: SHARDS_FORMAT,
      split: meta.split,
      kind: meta.kind,
      dtype: this.#dtype,
      vocab_size: meta.vocab_size,
      seq_len: meta.seq_len,
      packed: meta.packed,
      paired: meta.paired,
      rows: this.#rows,
      tokens: this.#tokens,
      content_tokens: this.#content,
      trained_tokens: this.#trained,
      documents: this.#documents,
      pad_id: meta.pad_id,
      bos_id: meta.bos_id,
      eos_id: meta.eos_id,
      special_ids: meta.special_ids,
      tokenizer_sha256: meta.tokenizer_sha256,
      shards: this.#shards,
    };
    await Deno.mkdir(this.#dir, { recursive: true });
    await Deno.writeTextFile(join(this.#dir, "index.json"), JSON.stringify(index, null, 2) + "\n");
    return index;
  }
}

/** One row as training sees it. */
export interface ShardRow {
  /** Index of the row in its split. */
  index: number;
  tokens: Uint16Array | Uint32Array;
  mask: Uint8Array;
  /** [0, end of doc 1, ..., end of doc m]; from the last bound on the row is padding. */
  bounds: Uint32Array;
}

/** Start offsets of a row's documents (relative to the row). */
export function docStarts(row: ShardRow): number[] {
  return Array.from(row.bounds.subarray(0, row.bounds.length - 1));
}

/** Position ids: 0, 1, ... from each document's start; 0 on padding. */
export function positions(row: ShardRow): Int32Array {
  const pos = new Int32Array(row.tokens.length);
  for (let d = 0; d + 1 < row.bounds.length; d++) {
    for (let t = row.bounds[d]; t < row.bounds[d + 1]; t++) pos[t] = t - row.bounds[d];
  }
  return pos;
}

/** Document number of every token (0-based within the row); -1 on padding. */
export function documentIds(row: ShardRow): Int32Array {
  const ids = new Int32Array(row.tokens.length).fill(-1);
  for (let d = 0; d + 1 < row.bounds.length; d++) ids.fill(d, row.bounds[d], row.bounds[d + 1]);
  return ids;
}

/** A shard's arrays in memory. */
export interface ShardData {
  entry: ShardEntry;
  tokens: Uint16Array | Uint32Array;
  mask: Uint8Array;
  rowPtr: Uint32Array;
  boundPtr: Uint32Array;
  bounds: Uint32Array;
}

function readLE(bytes: Uint8Array, width: 2 | 4): Uint16Array | Uint32Array {
  const n = bytes.length / width;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (width === 2) {
    const out = new Uint16Array(n);
    for (let i = 0; i < n; i++) out[i] = view.getUint16(2 * i, true);
    return out;
  }
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = view.getUint32(4 * i, true);
  return out;
}

/** Reads a split written by {@link ShardWriter}: `await ShardReader.open("runs/x/tokenize/train/index.json")`. */
export class ShardReader {
  /** The validated index. */
  readonly index: ShardIndex;
  /** Absolute path of the split directory. */
  readonly dir: string;

  private constructor(index: ShardIndex, dir: string) {
    this.index = index;
    this.dir = dir;
  }

  /** Opens and validates an index.json. */
  static async open(indexPath: string): Promise<ShardReader> {
    let raw: unknown;
    try {
      raw = JSON.parse(await Deno.readTextFile(indexPath));
    } catch (error) {
      throw new LatheError(`Cannot read shard index "${indexPath}": ${(error as Error).message}`, {
        hint: "rerun the tokenize step",
      });
    }
    const parsed = ShardIndex.safeParse(raw);
    if (!parsed.success) {
      throw new LatheError(`Cannot read shard index "${indexPath}":\n${formatZodIssues(parsed.error)}`, {
        hint: "the index was written by another version or edited; rerun the tokenize step",
      });
    }
    return new ShardReader(parsed.data, dirname(indexPath));
  }

  /**
   * Loads shard `k` into memory, checking file sizes against the index (and, with
   * `verify`, the sha256 of each file).
   */
  async shard(k: number, verify = false): Promise<ShardData> {
    const entry = this.index.shards[k];
    if (!entry) throw new RangeError(`shard ${k} does not exist (the split has ${this.index.shards.length})`);
    const width = this.index.dtype === "uint16" ? 2 : 4;
    const read = async (name: string, bytes: number, sha: string): Promise<Uint8Array> => {
      const path = join(this.dir, name);
      const data = await Deno.readFile(path);
      if (data.length !== bytes) {
        throw new LatheError(
          `Cannot read shard file "${path}": ${data.length} bytes, the index says ${bytes}`,
          { hint: "the shard is truncated or was replaced; rerun the tokenize step" },
        );
      }
      if (verify && createHash("sha256").update(data).digest("hex") !== sha) {
        throw new LatheError(`Cannot read shard file "${path}": its sha256 does not match the index`, {
          hint: "rerun the tokenize step",
        });
      }
      return data;
    };
    const rows = entry.rows;
    const tokens = readLE(await read(entry.tokens, entry.num_tokens * width, entry.sha256.tokens), width);
    const mask = await read(entry.mask, entry.num_tokens, entry.sha256.mask);
    const docs = readLE(
      await read(entry.docs, 4 * (2 * (rows + 1) + entry.num_bounds), entry.sha256.docs),
      4,
    );
    return {
      entry,
      tokens,
      mask,
      rowPtr: docs.subarray(0, rows + 1) as Uint32Array,
      boundPtr: docs.subarray(rows + 1, 2 * (rows + 1)) as Uint32Array,
      bounds: docs.subarray(2 * (rows + 1)) as Uint32Array,
    };
  }

  /** Row `r` of a loaded shard (views, no copies). */
  static row(data: ShardData, r: number): ShardRow {
    const a = data.rowPtr[r];
    const b = data.rowPtr[r + 1];
    return {
      index: data.entry.row_start + r,
      tokens: data.tokens.subarray(a, b),
      mask: data.mask.subarray(a, b),
      bounds: data.bounds.subarray(data.boundPtr[r], data.boundPtr[r + 1]),
    };
  }

  /** Every row of the split, in order, one shard in memory at a time. */
  async *rows(verify = false): AsyncGenerator<ShardRow> {
    for (let k = 0; k < this.index.shards.length; k++) {
      const data = await this.shard(k, verify);
      for (let r = 0; r < data.entry.rows; r++) yield ShardReader.row(data, r);
    }
  }
}
