/**
 * One split through the whole pipeline: JSONL lines -> chunks -> workers (tokenize, mask,
 * truncate) -> in input order -> packing -> shards + index.json, with the split's statistics.
 * @module
 */
import { basename } from "node:path";
import type { Chunk, ChunkResult } from "./chunk.ts";
import type { DataKind } from "./documents.ts";
import { Packer } from "./packing.ts";
import type { WorkerPool } from "./pool.ts";
import { type IndexMeta, type ShardIndex, ShardWriter } from "./shards.ts";

/** Characters of JSONL text per worker job. */
export const CHUNK_CHARS = 1 << 18;

/** Reads a JSONL file as chunks of whole lines; `onBytes` reports progress. */
export async function* readChunks(
  path: string,
  onBytes?: (n: number) => void,
  chunkChars = CHUNK_CHARS,
): AsyncGenerator<Omit<Chunk, "id">> {
  const file = basename(path);
  using handle = await Deno.open(path, { read: true });
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const buf = new Uint8Array(1 << 20);
  let pending = "";
  let line = 1;
  const cut = function* (final: boolean): Generator<Omit<Chunk, "id">> {
    while (pending.length > 0) {
      let end: number;
      if (pending.length >= chunkChars) {
        let at = pending.lastIndexOf("\n", chunkChars - 1);
        if (at < 0) at = pending.indexOf("\n", chunkChars);
        if (at < 0 && !final) return;
        end = at < 0 ? pending.length : at + 1;
      } else if (final) end = pending.length;
      else return;
      const text = pending.slice(0, end);
      pending = pending.slice(end);
      const chunk = { text, firstLine: line, file };
      for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) line++;
      yield chunk;
    }
  };
  while (true) {
    const n = await handle.read(buf);
    if (n === null) break;
    onBytes?.(n);
    pending += decoder.decode(buf.subarray(0, n), { stream: true });
    yield* cut(false);
  }
  pending += decoder.decode();
  yield* cut(true);
}

/** Nearest-rank percentile of sorted values. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

/** Statistics of one split. */
export interface SplitStats {
  index: ShardIndex;
  /** Input rows. */
  inputRows: number;
  overlongRows: number;
  emptyRows: number;
  /** Tokens produced before truncation or dropping. */
  tokenized: number;
  /** Document lengths (after truncation), sorted ascending. */
  docLengths: Uint32Array;
}

/** How a split is tokenized and stored. */
export interface SplitOptions {
  split: string;
  kind: DataKind;
  maxSeqLen: number;
  packing: boolean;
  shardTokens: number;
  /** Characters of JSONL per worker job (default {@link CHUNK_CHARS}). */
  chunkChars?: number;
  meta: Omit<IndexMeta, "split" | "kind" | "seq_len" | "packed" | "paired">;
}

/**
 * Tokenizes the JSONL file `input` with `pool` and writes the split into `dir`
 * (`<dir>/index.json` and its shards). `onProgress` gets input bytes read and tokens made.
 */
export async function tokenizeSplit(
  pool: WorkerPool,
  input: string,
  dir: string,
  opts: SplitOptions,
  onProgress?: (bytes: number, tokens: number) => void,
): Promise<SplitStats> {
  const paired = opts.kind === "preference";
  const packing = opts.packing && !paired;
  const writer = new ShardWriter(dir, opts.meta.vocab_size, opts.shardTokens);
  const rows: { tokens: Uint32Array; mask: Uint8Array; bounds: number[] }[] = [];
  const packer = new Packer(opts.maxSeqLen, opts.meta.pad_id, packing, (row) => rows.push(row));
  let lengths = new Uint32Array(1024);
  let docs = 0;
  let inputRows = 0, overlongRows = 0, emptyRows = 0, tokenized = 0;
  const flush = async () => {
    for (const row of rows) await writer.add(row.tokens, row.mask, row.bounds);
    rows.length = 0;
  };
  const onResult = async (r: ChunkResult) => {
    inputRows += r.rows;
    overlongRows += r.overlong;
    emptyRows += r.empty;
    tokenized += r.tokenized;
    let at = 0;
    for (let d = 0; d < r.lens.length; d++) {
      const n = r.lens[d];
      packer.add(r.ids.subarray(at, at + n), r.mask.subarray(at, at + n));
      at += n;
      if (docs === lengths.length) {
        const grown = new Uint32Array(2 * lengths.length);
        grown.set(lengths);
        lengths = grown;
      }
      lengths[docs++] = n;
    }
    await flush();
    onProgress?.(0, r.tokenized);
  };
  await pool.run(readChunks(input, (n) => onProgress?.(n, 0), opts.chunkChars), onResult);
  packer.finish();
  await flush();
  const index = await writer.finish({
    ...opts.meta,
    split: opts.split,
    kind: opts.kind,
    seq_len: opts.maxSeqLen,
    packed: packing,
    paired,
  });
  return {
    index,
    inputRows,
    overlongRows,
    emptyRows,
    tokenized,
    docLengths: lengths.slice(0, docs).sort(),
  };
}
