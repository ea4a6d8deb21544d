/**
 * Moving runs between machines: `export` writes every table as `<out>/<table>.parquet`
 * plus `<out>/export.json` (schema version, host, row counts); `import` merges such a
 * directory into this index. Exports from many machines, one directory each, also merge
 * in a single DuckDB query over a glob of the per-machine directories (`docs/tracker.md`).
 * @module
 */
import { join, resolve } from "node:path";
import type { DuckDBConnection } from "@duckdb/node-api";
import * as z from "zod";
import { exists, writeJsonAtomic } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import { inTransaction, queryRows, sqlString } from "./db.ts";
import { SCHEMA_VERSION, TABLES } from "./schema.ts";

/** Format tag of `export.json`. */
export const EXPORT_SCHEMA = "lathe.tracker-export/1";
/** Name of the description file in an export directory. */
export const EXPORT_INFO_FILE = "export.json";

/** `export.json`: what an export directory holds. */
export const ExportInfo = z.strictObject({
  schema: z.literal(EXPORT_SCHEMA),
  schemaVersion: z.number().int(),
  host: z.string(),
  exportedAt: z.string(),
  rows: z.record(z.string(), z.number().int().nonnegative()),
});
/** The parsed `export.json`. */
export type ExportInfo = z.infer<typeof ExportInfo>;

/** Path of one table's Parquet file in an export directory. */
export function parquetPath(dir: string, table: string): string {
  return join(dir, `${table}.parquet`);
}

function hostName(): string {
  try {
    return Deno.hostname();
  } catch {
    return "unknown";
  }
}

/**
 * Writes every table of the open index to `<outDir>/<table>.parquet` (each through a temp
 * name and a rename) and `export.json` last. Returns the description it wrote.
 */
export async function exportIndex(conn: DuckDBConnection, outDir: string): Promise<ExportInfo> {
  const dir = resolve(outDir);
  await Deno.mkdir(dir, { recursive: true });
  const rows: Record<string, number> = {};
  for (const table of TABLES) {
    const target = parquetPath(dir, table);
    const tmp = `${target}.${crypto.randomUUID().slice(0, 8)}.tmp`;
    try {
      await conn.run(`COPY (SELECT * FROM ${table}) TO ${sqlString(tmp)} (FORMAT parquet)`);
      await Deno.rename(tmp, target);
    } catch (error) {
      await Deno.remove(tmp).catch(() => {});
      throw error;
    }
    rows[table] = Number((await queryRows(conn, `SELECT count(*) AS n FROM ${table}`))[0].n);
  }
  const info: ExportInfo = {
    schema: EXPORT_SCHEMA,
    schemaVersion: SCHEMA_VERSION,
    host: hostName(),
    exportedAt: new Date().toISOString(),
    rows,
  };
  await writeJsonAtomic(join(dir, EXPORT_INFO_FILE), info);
  return info;
}

/** Reads and checks an export directory's `export.json` and Parquet files. */
export async function checkExport(dir: string): Promise<ExportInfo> {
  const infoPath = join(dir, EXPORT_INFO_FILE);
  let raw: unknown;
  try {
    raw = JSON.parse(await Deno.readTextFile(infoPath));
  } catch (error) {
    const why = error instanceof Deno.errors.NotFound ? "no such file" : (error as Error).message;
    throw new LatheError(`Cannot import runs from "${dir}": cannot read "${infoPath}" (${why})`, {
      hint: "pass a directory written by `deno task runs export`",
    });
  }
  const parsed = ExportInfo.safeParse(raw);
  if (!parsed.success) {
    throw new LatheError(
      `Cannot import runs from "${dir}": "${infoPath}" is not a lathe export description`,
      {
        hint: "pass a directory written by `deno task runs export`",
      },
    );
  }
  if (parsed.data.schemaVersion !== SCHEMA_VERSION) {
    throw new LatheError(
      `Cannot import runs from "${dir}": it has tracker schema version ${parsed.data.schemaVersion}, this lathe reads ${SCHEMA_VERSION}`,
      { hint: "export it again with this version of lathe on the machine that holds the runs" },
    );
  }
  for (const table of TABLES) {
    if (!(await exists(parquetPath(dir, table)))) {
      throw new LatheError(`Cannot import runs from "${dir}": "${parquetPath(dir, table)}" is missing`, {
        hint: "the export was interrupted; run `deno task runs export` again there",
      });
    }
  }
  return parsed.data;
}

/** What {@link importExport} merged. */
export interface ImportResult {
  source: string;
  /** Runs taken from the export (new, or replacing an earlier import of the same run). */
  imported: string[];
  /** Runs left alone because this machine holds their manifests. */
  skipped: string[];
}

/**
 * Merges an export directory into the open index without a transaction of its own.
 * Runs whose manifests live here (origin "local") win; every other run in the export
 * replaces what the index had for it.
 */
export async function importRows(conn: DuckDBConnection, dir: string): Promise<ImportResult> {
  const source = resolve(dir);
  const file = (t: string) => `read_parquet(${sqlString(parquetPath(source, t))})`;
  const incoming = (await queryRows(conn, `SELECT run_id FROM ${file("runs")} ORDER BY run_id`))
    .map((r) => String(r.run_id));
  const local = new Set(
    (await queryRows(conn, "SELECT run_id FROM runs WHERE origin = 'local'")).map((r) => String(r.run_id)),
  );
  const imported = incoming.filter((id) => !local.has(id));
  const skipped = incoming.filter((id) => local.has(id));
  await conn.run("CREATE OR REPLACE TEMP TABLE import_ids (run_id VARCHAR PRIMARY KEY)");
  for (let i = 0; i < imported.length; i += 500) {
    const chunk = imported.slice(i, i + 500);
    await conn.run(`INSERT INTO import_ids VALUES ${chunk.map(() => "(?)").join(", ")}`, chunk);
  }
  const chosen = "run_id IN (SELECT run_id FROM import_ids)";
  for (const table of TABLES) {
    await conn.run(`DELETE FROM ${table} WHERE ${chosen}`);
    const select = table === "runs"
      ? `SELECT * REPLACE (${sqlString(source)} AS origin) FROM ${file(table)}`
      : `SELECT * FROM ${file(table)}`;
    await conn.run(`INSERT INTO ${table} BY NAME ${select} WHERE ${chosen}`);
  }
  await conn.run("DROP TABLE import_ids");
  await conn.run("DELETE FROM imports WHERE source = ?", [source]);
  await conn.run("INSERT INTO imports VALUES (?, TRY_CAST(? AS TIMESTAMP), ?)", [
    source,
    new Date().toISOString(),
    imported.length,
  ]);
  return { source, imported, skipped };
}

/** Checks an export directory and merges it into the open index in one transaction. */
export async function importExport(conn: DuckDBConnection, dir: string): Promise<ImportResult> {
  await checkExport(dir);
  return await inTransaction(conn, () => importRows(conn, dir));
}
