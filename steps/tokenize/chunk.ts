/**
 * A chunk of JSONL lines -> compact tokenized documents: what a worker does with each job.
 * The result uses flat typed arrays so it crosses the worker boundary by transfer, not copy.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { DocumentBuilder } from "./documents.ts";

/** A piece of a JSONL file: whole lines, the first of them numbered `firstLine` (1-based). */
export interface Chunk {
  id: number;
  text: string;
  firstLine: number;
  /** The file name shown in errors. */
  file: string;
}

/** Documents of a chunk, in input order. */
export interface ChunkResult {
  id: number;
  /** All documents' token ids back to back. */
  ids: Uint32Array;
  /** All documents' masks back to back. */
  mask: Uint8Array;
  /** Length of each document. */
  lens: Uint32Array;
  /** Non-empty input lines. */
  rows: number;
  /** Rows longer than max_seq_len (dropped or truncated). */
  overlong: number;
  /** Rows dropped because no token was trained. */
  empty: number;
  /** Tokens produced before truncation or dropping (the work done, for tokens/s). */
  tokenized: number;
}

/** Tokenizes every line of `chunk` with `builder`. */
export function tokenizeChunk(builder: DocumentBuilder, chunk: Chunk): ChunkResult {
  const lines = chunk.text.split("\n");
  const docIds: Int32Array[] = [];
  const docMasks: Uint8Array[] = [];
  let rows = 0, overlong = 0, empty = 0, tokenized = 0, total = 0;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.trim() === "") continue;
    rows++;
    const lineNo = chunk.firstLine + i;
    let row: Record<string, unknown>;
    try {
      row = JSON.parse(line);
    } catch (error) {
      throw new LatheError(
        `Cannot tokenize ${chunk.file}:${lineNo}: not valid JSON (${(error as Error).message})`,
        {
          hint: "rerun the prepare step to rewrite its output",
        },
      );
    }
    if (!row || typeof row !== "object" || Array.isArray(row)) {
      throw new LatheError(`Cannot tokenize ${chunk.file}:${lineNo}: the line is not a JSON object`, {
        hint: "rerun the prepare step to rewrite its output",
      });
    }
    const source = typeof row.source === "string" ? ` (source ${row.source})` : "";
    const result = builder.typedRow(row, `${chunk.file}:${lineNo}${source}`);
    if (result.overlong) overlong++;
    if (result.empty) empty++;
    for (const d of result.docs) {
      docIds.push(d.ids);
      docMasks.push(d.mask);
      total += d.ids.length;
    }
    tokenized += result.tokenized;
  }
  const ids = new Uint32Array(total);
  const mask = new Uint8Array(total);
  const lens = new Uint32Array(docIds.length);
  let at = 0;
  for (let d = 0; d < docIds.length; d++) {
    ids.set(docIds[d], at);
    mask.set(docMasks[d], at);
    lens[d] = docIds[d].length;
    at += lens[d];
  }
  return { id: chunk.id, ids, mask, lens, rows, overlong, empty, tokenized };
}
