/**
 * Opening the tracker database. DuckDB lets one process write a file at a time (or many
 * read it), so every user opens it, does its work and closes it at once; an open that
 * finds the lock held retries with jittered exponential backoff for up to ~30 s.
 * Inside one process, opens of the same file are queued: two DuckDB instances on one
 * file in one process would not see each other's lock.
 * @module
 */
import { dirname, resolve } from "node:path";
import { DuckDBInstance } from "@duckdb/node-api";
import type { DuckDBConnection, DuckDBValue, Json } from "@duckdb/node-api";
import { LatheError } from "../foundation/errors.ts";

/** Options for {@link withDb}. */
export interface DbOptions {
  /** Open read-only: many readers may share the file, no writer meanwhile. */
  readOnly?: boolean;
  /** How long to keep retrying a held lock, in milliseconds (default 30000). */
  lockTimeoutMs?: number;
}

/** True for DuckDB's error when another process holds the file lock. */
export function isLockError(error: unknown): boolean {
  const message = error instanceof Error ? error.message : String(error);
  return /Could not set lock|Conflicting lock/i.test(message);
}

/** The queue of opens per database file in this process. */
const queues = new Map<string, Promise<unknown>>();

async function inQueue<T>(key: string, body: () => Promise<T>): Promise<T> {
  const before = queues.get(key) ?? Promise.resolve();
  const mine = before.catch(() => {}).then(body);
  const settled = mine.catch(() => {});
  queues.set(key, settled);
  try {
    return await mine;
  } finally {
    if (queues.get(key) === settled) queues.delete(key);
  }
}

/**
 * Backoff before retry `attempt` (0-based): exponential from 20 ms, capped at 1 s, with
 * full jitter so processes that collided once do not collide again in step.
 */
export function backoffMs(attempt: number, random: () => number = Math.random): number {
  const cap = Math.min(1000, 20 * 2 ** attempt);
  return Math.max(5, Math.round(cap * random()));
}

async function openInstance(path: string, options: DbOptions): Promise<DuckDBInstance> {
  const deadline = Date.now() + (options.lockTimeoutMs ?? 30_000);
  const config: Record<string, string> = options.readOnly ? { access_mode: "READ_ONLY" } : {};
  for (let attempt = 0;; attempt++) {
    try {
      return await DuckDBInstance.create(path, config);
    } catch (error) {
      if (!isLockError(error)) {
        const message = error instanceof Error ? error.message : String(error);
        throw new LatheError(`Cannot open the run index "${path}": ${message}`, {
          cause: error,
          hint: "the index is rebuilt from the manifests: delete the file and run `deno task runs reindex`",
        });
      }
      const wait = backoffMs(attempt);
      if (Date.now() + wait > deadline) {
        throw new LatheError(
          `Cannot open the run index "${path}": another process has held its lock for ${
            Math.round((options.lockTimeoutMs ?? 30_000) / 1000)
          }s`,
          {
            cause: error,
            hint:
              "wait for the other lathe process to finish (or stop it), or point LATHE_DB at another file",
          },
        );
      }
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}

/**
 * Opens the database at `path`, runs `body` with a connection and closes it again.
 *
 * @example
 * ```ts
 * import { withDb, queryRows } from "./db.ts";
 * const rows = await withDb("/tmp/x.duckdb", {}, (conn) => queryRows(conn, "SELECT 42 AS answer"));
 * ```
 */
export async function withDb<T>(
  path: string,
  options: DbOptions,
  body: (conn: DuckDBConnection) => Promise<T>,
): Promise<T> {
  const abs = resolve(path);
  return await inQueue(abs, async () => {
    if (!options.readOnly) await Deno.mkdir(dirname(abs), { recursive: true });
    const instance = await openInstance(abs, options);
    try {
      const conn = await instance.connect();
      try {
        return await body(conn);
      } finally {
        conn.closeSync();
      }
    } finally {
      instance.closeSync();
    }
  });
}

/** Runs `body` inside a transaction: committed when it returns, rolled back when it throws. */
export async function inTransaction<T>(conn: DuckDBConnection, body: () => Promise<T>): Promise<T> {
  await conn.run("BEGIN TRANSACTION");
  try {
    const result = await body();
    await conn.run("COMMIT");
    return result;
  } catch (error) {
    await conn.run("ROLLBACK").catch(() => {});
    throw error;
  }
}

/** A query's result as row objects with JSON values (BIGINT and timestamps as strings). */
export async function queryRows(
  conn: DuckDBConnection,
  sql: string,
  params?: DuckDBValue[],
): Promise<Record<string, Json>[]> {
  return (await conn.runAndReadAll(sql, params)).getRowObjectsJson();
}

/** A query's result as column names and rows of JSON values. */
export async function queryTable(
  conn: DuckDBConnection,
  sql: string,
  params?: DuckDBValue[],
): Promise<{ columns: string[]; rows: Json[][] }> {
  const reader = await conn.runAndReadAll(sql, params);
  return { columns: reader.deduplicatedColumnNames(), rows: reader.getRowsJson() };
}

/** Quotes a string as an SQL literal (for table functions that take a path). */
export function sqlString(value: string): string {
  return `'${value.replaceAll("'", "''")}'`;
}

/**
 * Inserts `rows` into `table` in batches of multi-row VALUES. `exprs` gives, per column,
 * the SQL for its placeholder (default `?`), e.g. `TRY_CAST(? AS TIMESTAMP)`.
 */
export async function insertRows(
  conn: DuckDBConnection,
  table: string,
  columns: string[],
  rows: DuckDBValue[][],
  exprs: Record<string, string> = {},
): Promise<void> {
  const tuple = `(${columns.map((c) => exprs[c] ?? "?").join(", ")})`;
  const batch = Math.max(1, Math.floor(2000 / columns.length));
  for (let i = 0; i < rows.length; i += batch) {
    const chunk = rows.slice(i, i + batch);
    await conn.run(
      `INSERT INTO ${table} (${columns.join(", ")}) VALUES ${chunk.map(() => tuple).join(", ")}`,
      chunk.flat(),
    );
  }
}
