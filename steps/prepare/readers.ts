/**
 * Reading rows from data files. JSONL is streamed line by line (a file never has to fit in
 * memory); JSON is parsed whole (an array of objects, or `{"data": [...]}`; a `.json` file
 * holding one object per line is read as JSONL); CSV and Parquet are read through DuckDB
 * (`read_csv_auto` with a header row and every column as text, `read_parquet`) in chunks.
 *
 * Each row carries where it came from: `<file>:<line>` for JSONL (the physical line,
 * counting blank lines) and `<file>:row <n>` for the others (`n` counts rows from 1).
 * @module
 */
import { DuckDBInstance } from "@duckdb/node-api";
import { LatheError } from "../../foundation/errors.ts";
import type { FileFormat } from "./files.ts";
import { describeType, isRecord, RowError } from "./row_error.ts";

/** One input row, or the reason it could not be parsed. */
export interface RawRow {
  /** The parsed row (absent when `error` is set). */
  value?: unknown;
  /** `<file>:<line>` or `<file>:row <n>`. */
  where: string;
  /** Why the row could not be parsed (a syntax error on a JSONL line). */
  error?: RowError;
}

/** Options of {@link readRows}. */
export interface ReadOptions {
  /** How the file is named in row locations and messages. */
  label: string;
  /** Called with the number of bytes consumed, for progress. */
  onBytes?: (bytes: number) => void;
}

const CHUNK = 1 << 20;

/** Yields the lines of a file as bytes (without "\n"), with 1-based line numbers. */
async function* byteLines(
  path: string,
  onBytes: (bytes: number) => void,
): AsyncGenerator<{ bytes: Uint8Array; line: number }> {
  const file = await Deno.open(path, { read: true });
  try {
    const buf = new Uint8Array(CHUNK);
    let carry: Uint8Array = new Uint8Array(0);
    let line = 0;
    while (true) {
      const n = await file.read(buf);
      if (n === null) break;
      onBytes(n);
      let chunk = buf.subarray(0, n);
      if (carry.length > 0) {
        const joined = new Uint8Array(carry.length + n);
        joined.set(carry);
        joined.set(chunk, carry.length);
        chunk = joined;
      }
      let start = 0;
      for (let nl = chunk.indexOf(10, start); nl !== -1; nl = chunk.indexOf(10, start)) {
        yield { bytes: chunk.subarray(start, nl), line: ++line };
        start = nl + 1;
      }
      carry = chunk.slice(start);
    }
    if (carry.length > 0) yield { bytes: carry, line: ++line };
  } finally {
    file.close();
  }
}

/** Streams a JSONL file; blank lines are skipped, a line that is not JSON yields an error row. */
export async function* readJsonl(path: string, opts: ReadOptions): AsyncGenerator<RawRow> {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  for await (const { bytes, line } of byteLines(path, opts.onBytes ?? (() => {}))) {
    const where = `${opts.label}:${line}`;
    let text: string;
    try {
      text = decoder.decode(bytes);
    } catch {
      yield { where, error: new RowError("", "is not valid UTF-8") };
      continue;
    }
    if (text.trim() === "") continue;
    try {
      yield { value: JSON.parse(text), where };
    } catch (error) {
      yield { where, error: new RowError("", `is not valid JSON (${(error as Error).message})`) };
    }
  }
}

/** Reads a JSON file: an array of rows or `{"data": [...]}`; one object per line reads as JSONL. */
export async function* readJson(path: string, opts: ReadOptions): AsyncGenerator<RawRow> {
  const bytes = await Deno.readFile(path);
  const text = new TextDecoder().decode(bytes);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    if (text.trimStart().startsWith("{")) {
      yield* readJsonl(path, opts);
      return;
    }
    throw new LatheError(`Cannot prepare "${opts.label}": not valid JSON (${(error as Error).message})`, {
      hint: 'a .json source holds an array of rows, {"data": [rows]}, or one JSON object per line',
    });
  }
  opts.onBytes?.(bytes.length);
  let rows: unknown[];
  if (Array.isArray(parsed)) rows = parsed;
  else if (isRecord(parsed) && Array.isArray(parsed.data)) rows = parsed.data;
  else {
    const what = isRecord(parsed)
      ? `an object with keys ${Object.keys(parsed).map((k) => `"${k}"`).join(", ") || "(none)"}`
      : describeType(parsed);
    throw new LatheError(
      `Cannot prepare "${opts.label}": expected a list of rows or {"data": [...]}, got ${what}`,
    );
  }
  for (let i = 0; i < rows.length; i++) yield { value: rows[i], where: `${opts.label}:row ${i + 1}` };
}

/** A SQL string literal. */
function sqlString(text: string): string {
  return `'${text.replaceAll("'", "''")}'`;
}

/** Reads a CSV (every column as text; empty cells are null) or Parquet file through DuckDB. */
export async function* readWithDuckDb(
  path: string,
  format: "csv" | "parquet",
  opts: ReadOptions,
): AsyncGenerator<RawRow> {
  const instance = await DuckDBInstance.create(":memory:");
  const connection = await instance.connect();
  try {
    const table = format === "csv"
      ? `read_csv_auto(${sqlString(path)}, header = true, all_varchar = true)`
      : `read_parquet(${sqlString(path)})`;
    const cannotRead = (error: unknown) =>
      new LatheError(
        `Cannot prepare "${opts.label}": DuckDB cannot read it as ${format.toUpperCase()} (${
          (error as Error).message.split("\n")[0]
        })`,
        { hint: `check that the file is ${format.toUpperCase()}; the extension decides how it is read` },
      );
    let chunks: AsyncIterableIterator<Record<string, unknown>[]>;
    // Parquet knows its row count from the footer; it paces the progress of a file.
    let total = 0;
    try {
      if (format === "parquet") {
        const counted = await connection.runAndReadAll(`SELECT count(*) AS n FROM ${table}`);
        total = Number(counted.getRowObjectsJS()[0].n);
      }
      chunks = (await connection.stream(`SELECT * FROM ${table}`)).yieldRowObjectJs();
    } catch (error) {
      throw cannotRead(error);
    }
    const size = (await Deno.stat(path)).size;
    let n = 0;
    let ticked = 0;
    while (true) {
      let next: IteratorResult<Record<string, unknown>[]>;
      try {
        next = await chunks.next();
      } catch (error) {
        throw cannotRead(error);
      }
      if (next.done) break;
      for (const row of next.value) yield { value: row, where: `${opts.label}:row ${++n}` };
      if (total > 0) {
        const now = Math.floor((size * n) / total);
        opts.onBytes?.(now - ticked);
        ticked = now;
      }
    }
    opts.onBytes?.(size - ticked);
  } finally {
    connection.closeSync();
    instance.closeSync();
  }
}

/** Reads the rows of a data file in `format`; see the module doc. */
export function readRows(path: string, format: FileFormat, opts: ReadOptions): AsyncGenerator<RawRow> {
  switch (format) {
    case "jsonl":
      return readJsonl(path, opts);
    case "json":
      return readJson(path, opts);
    case "csv":
    case "parquet":
      return readWithDuckDb(path, format, opts);
  }
}
