/**
 * Indexing: one manifest (plus its step's `metrics.jsonl`) becomes rows in `steps`,
 * `metrics` and `artifacts`, and its run's row in `runs` is recomputed; all in one
 * transaction, replacing whatever that (run, step) had before. `reindex` drops the
 * tables and rebuilds them from every run directory under the runs root.
 * @module
 */
import { dirname, isAbsolute, join, relative, resolve } from "node:path";
import type { DuckDBConnection, DuckDBValue } from "@duckdb/node-api";
import { exists } from "../foundation/atomic.ts";
import { FAILURE_FILE, type Manifest, MANIFEST_FILE, readManifest } from "../foundation/manifest.ts";
import { Progress } from "../foundation/progress.ts";
import { insertRows, inTransaction, queryRows, withDb } from "./db.ts";
import { checkExport, importRows } from "./export.ts";
import { createSchema, dropSchema, SCHEMA_VERSION, storedSchemaVersion } from "./schema.ts";

/** File a step streams its metric points to, beside its manifest. */
export const METRICS_FILE = "metrics.jsonl";

/** One streamed point as `StepContext.log` writes it. */
export interface MetricPoint {
  name: string;
  step: number;
  value: number | null;
  time: string | null;
}

/** What {@link parseMetricsJsonl} found: the points, and the lines it skipped with why. */
export interface ParsedMetrics {
  points: MetricPoint[];
  skipped: { line: number; reason: string }[];
}

/**
 * Parses `metrics.jsonl` text. A line that is not a JSON object with a string `name` and
 * an integer `step` is skipped (a killed step can leave half a line at the end);
 * `value` null (JSON has no NaN) is kept as a gap.
 */
export function parseMetricsJsonl(text: string): ParsedMetrics {
  const points: MetricPoint[] = [];
  const skipped: ParsedMetrics["skipped"] = [];
  text.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (line === "") return;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch {
      skipped.push({ line: i + 1, reason: "not valid JSON" });
      return;
    }
    const r = row as Record<string, unknown>;
    if (typeof row !== "object" || row === null || typeof r.name !== "string" || !Number.isInteger(r.step)) {
      skipped.push({ line: i + 1, reason: 'expected {"name": string, "step": integer, "value": number}' });
      return;
    }
    if (r.value !== null && typeof r.value !== "number") {
      skipped.push({ line: i + 1, reason: `"value" is not a number` });
      return;
    }
    points.push({
      name: r.name,
      step: r.step as number,
      value: r.value as number | null,
      time: typeof r.time === "string" ? r.time : null,
    });
  });
  return { points, skipped };
}

/** Where a manifest's path is recorded: relative to the runs root when inside it. */
function recordedPath(runsRoot: string, path: string): string {
  const rel = relative(runsRoot, resolve(path));
  return rel.startsWith("..") || isAbsolute(rel) ? resolve(path) : rel;
}

function gpuText(m: Manifest): string | null {
  const gpu = m.env.gpu;
  return gpu ? `${gpu.description} (${gpu.backend})` : null;
}

function seconds(m: Manifest): number | null {
  const s = (Date.parse(m.finishedAt) - Date.parse(m.startedAt)) / 1000;
  return Number.isFinite(s) ? s : null;
}

const TS = "TRY_CAST(? AS TIMESTAMP)";

/** Deletes the rows of one (run, step) from the per-step tables. */
async function deleteStep(conn: DuckDBConnection, runId: string, step: string): Promise<void> {
  for (const table of ["steps", "metrics", "artifacts"]) {
    await conn.run(`DELETE FROM ${table} WHERE run_id = ? AND step = ?`, [runId, step]);
  }
}

/** Recomputes the `runs` row of `runId` from its steps (or removes it when none are left). */
export async function refreshRun(conn: DuckDBConnection, runId: string): Promise<void> {
  await conn.run("DELETE FROM runs WHERE run_id = ?", [runId]);
  await conn.run(
    `INSERT INTO runs
     SELECT run_id,
       arg_max(recipe, finished_at) FILTER (WHERE recipe IS NOT NULL),
       min(started_at), max(finished_at),
       CASE WHEN bool_or(status = 'failed') THEN 'failed' ELSE 'success' END,
       arg_max(git_commit, finished_at), arg_max(git_branch, finished_at), bool_or(git_dirty),
       count(*), 'local'
     FROM steps WHERE run_id = ? GROUP BY run_id`,
    [runId],
  );
}

/** Counts of what indexing one manifest wrote. */
export interface IndexedStep {
  runId: string;
  step: string;
  metrics: number;
  artifacts: number;
  /** Lines of metrics.jsonl that were skipped, as `file:line: reason`. */
  warnings: string[];
}

/**
 * Indexes one manifest (or failure record) at `path` into an open connection: replaces
 * the rows of its (run, step), reads `metrics.jsonl` beside a successful manifest, and
 * recomputes the run row, all in one transaction.
 */
export function indexManifest(
  conn: DuckDBConnection,
  runsRoot: string,
  path: string,
  m: Manifest,
): Promise<IndexedStep> {
  return inTransaction(conn, () => writeManifestRows(conn, runsRoot, path, m));
}

/** {@link indexManifest} without its own transaction (the caller holds one). */
async function writeManifestRows(
  conn: DuckDBConnection,
  runsRoot: string,
  path: string,
  m: Manifest,
): Promise<IndexedStep> {
  const stepDir = dirname(resolve(path));
  const warnings: string[] = [];
  let points: MetricPoint[] = [];
  // A failed attempt's staging directory (and its metrics.jsonl) is removed by the runner;
  // a metrics.jsonl beside failure.json belongs to an earlier successful attempt.
  if (m.status === "success") {
    const metricsPath = join(stepDir, METRICS_FILE);
    let text: string | null = null;
    try {
      text = await Deno.readTextFile(metricsPath);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    if (text !== null) {
      const parsed = parseMetricsJsonl(text);
      points = parsed.points;
      for (const s of parsed.skipped) warnings.push(`${metricsPath}:${s.line}: ${s.reason}`);
    }
  }

  const finals: DuckDBValue[][] = Object.entries(m.metrics).map(([name, v]) => {
    const value = typeof v === "number" ? v : typeof v === "boolean" ? (v ? 1 : 0) : null;
    const text = typeof v === "string" ? v : typeof v === "boolean" ? String(v) : null;
    return [m.runId, m.step, name, null, value, text, m.finishedAt];
  });
  const streamed: DuckDBValue[][] = points.map((
    p,
  ) => [m.runId, m.step, p.name, p.step, p.value, null, p.time]);
  const artifacts: DuckDBValue[][] = m.status === "success"
    ? Object.entries(m.outputs).map(([name, o]) => [m.runId, m.step, name, o.path, o.sha256, o.bytes])
    : [];

  await deleteStep(conn, m.runId, m.step);
  await insertRows(conn, "steps", [
    "run_id",
    "step",
    "step_version",
    "status",
    "key",
    "config_hash",
    "config",
    "seed",
    "cached_from",
    "recipe",
    "git_commit",
    "git_branch",
    "git_dirty",
    "deno",
    "lathe",
    "os",
    "arch",
    "gpu",
    "started_at",
    "finished_at",
    "seconds",
    "error",
    "manifest_path",
  ], [[
    m.runId,
    m.step,
    m.stepVersion,
    m.status,
    m.key,
    m.configHash,
    JSON.stringify(m.config),
    m.seed,
    m.cachedFrom,
    m.recipe,
    m.git.commit,
    m.git.branch,
    m.git.dirty,
    m.env.deno,
    m.env.lathe,
    m.env.os,
    m.env.arch,
    gpuText(m),
    m.startedAt,
    m.finishedAt,
    seconds(m),
    m.error,
    recordedPath(runsRoot, path),
  ]], { started_at: TS, finished_at: TS });
  const metricCols = ["run_id", "step", "name", "step_index", "value", "text", "time"];
  await insertRows(conn, "metrics", metricCols, [...finals, ...streamed], { time: TS });
  await insertRows(conn, "artifacts", ["run_id", "step", "name", "path", "sha256", "bytes"], artifacts);
  await refreshRun(conn, m.runId);
  return {
    runId: m.runId,
    step: m.step,
    metrics: finals.length + streamed.length,
    artifacts: artifacts.length,
    warnings,
  };
}

/** A step record found on disk: the manifest to index for one (run, step) directory. */
export interface FoundRecord {
  path: string;
  manifest: Manifest;
}

/** What a scan of the runs root found: records to index and files it could not read. */
export interface ScanResult {
  records: FoundRecord[];
  problems: string[];
}

/**
 * Finds, for every `<run>/<step>/` under `runsRoot` (names starting with "." skipped),
 * the record to index: `manifest.json` or `failure.json`, the later one when both exist
 * (a failed retry of a step that once succeeded).
 */
export async function scanRuns(runsRoot: string): Promise<ScanResult> {
  const records: FoundRecord[] = [];
  const problems: string[] = [];
  if (!(await exists(runsRoot))) return { records, problems };
  const runDirs: string[] = [];
  for await (const e of Deno.readDir(runsRoot)) {
    if (e.isDirectory && !e.name.startsWith(".")) runDirs.push(e.name);
  }
  for (const run of runDirs.sort()) {
    const stepDirs: string[] = [];
    for await (const e of Deno.readDir(join(runsRoot, run))) {
      if (e.isDirectory && !e.name.startsWith(".")) stepDirs.push(e.name);
    }
    for (const step of stepDirs.sort()) {
      let best: FoundRecord | null = null;
      for (const file of [MANIFEST_FILE, FAILURE_FILE]) {
        const path = join(runsRoot, run, step, file);
        if (!(await exists(path))) continue;
        try {
          const manifest = await readManifest(path);
          if (!best || Date.parse(manifest.finishedAt) > Date.parse(best.manifest.finishedAt)) {
            best = { path, manifest };
          }
        } catch (error) {
          problems.push((error as Error).message.split("\n")[0]);
        }
      }
      if (best) records.push(best);
    }
  }
  return { records, problems };
}

/** What {@link reindexConn} did. */
export interface ReindexResult {
  runs: number;
  steps: number;
  metrics: number;
  /** Unreadable manifests, skipped metric lines, imports that could not be merged again. */
  warnings: string[];
  /** Export directories merged again after the rebuild. */
  imports: string[];
}

async function recordedImports(conn: DuckDBConnection): Promise<string[]> {
  try {
    return (await queryRows(conn, "SELECT source FROM imports ORDER BY imported_at")).map((r) =>
      String(r.source)
    );
  } catch {
    return [];
  }
}

/**
 * Drops and rebuilds every table from the manifests under `runsRoot`, then merges again
 * the export directories earlier imports recorded (where they still exist).
 */
export async function reindexConn(
  conn: DuckDBConnection,
  runsRoot: string,
  options: { quiet?: boolean } = {},
): Promise<ReindexResult> {
  const imports = await recordedImports(conn);
  const { records, problems } = await scanRuns(runsRoot);
  const warnings = [...problems];
  const valid: string[] = [];
  for (const dir of imports) {
    try {
      await checkExport(dir);
      valid.push(dir);
    } catch (error) {
      warnings.push(`earlier import "${dir}" not merged again: ${(error as Error).message}`);
    }
  }
  const progress = new Progress("reindex", records.length, "steps", options.quiet || records.length < 50);
  let metrics = 0;
  const merged: string[] = [];
  // One transaction: a reindex that fails part way leaves the old index as it was.
  await inTransaction(conn, async () => {
    await dropSchema(conn);
    await createSchema(conn);
    for (const r of records) {
      const done = await writeManifestRows(conn, runsRoot, r.path, r.manifest);
      metrics += done.metrics;
      warnings.push(...done.warnings);
      progress.tick();
    }
    for (const dir of valid) {
      await importRows(conn, dir);
      merged.push(dir);
    }
  });
  progress.done();
  const runs = new Set(records.map((r) => r.manifest.runId)).size;
  return { runs, steps: records.length, metrics, warnings, imports: merged };
}

/**
 * Makes sure the open database holds the current schema; a new file or one with another
 * schema version is rebuilt from the manifests. Returns what the rebuild did, or null.
 */
export async function ensureIndex(conn: DuckDBConnection, runsRoot: string): Promise<ReindexResult | null> {
  if ((await storedSchemaVersion(conn)) === SCHEMA_VERSION) return null;
  return await reindexConn(conn, runsRoot, { quiet: true });
}

/**
 * Opens the index for writing (creating or rebuilding it first when needed), runs
 * `body`, and closes it.
 */
export function writeIndex<T>(
  dbPath: string,
  runsRoot: string,
  body: (conn: DuckDBConnection) => Promise<T>,
  options: { lockTimeoutMs?: number } = {},
): Promise<T> {
  return withDb(dbPath, { lockTimeoutMs: options.lockTimeoutMs }, async (conn) => {
    await ensureIndex(conn, runsRoot);
    return await body(conn);
  });
}

/**
 * Opens the index read-only and runs `body`. A missing database, or one with an older
 * schema, is first rebuilt from the manifests, so reading never needs a manual reindex.
 */
export async function readIndex<T>(
  dbPath: string,
  runsRoot: string,
  body: (conn: DuckDBConnection) => Promise<T>,
): Promise<T> {
  if (!(await exists(dbPath))) await writeIndex(dbPath, runsRoot, async () => {});
  const stale = Symbol("stale");
  const first = await withDb(dbPath, { readOnly: true }, async (conn) => {
    if ((await storedSchemaVersion(conn)) !== SCHEMA_VERSION) return stale;
    return await body(conn);
  });
  if (first !== stale) return first as T;
  await writeIndex(dbPath, runsRoot, async () => {});
  return await withDb(dbPath, { readOnly: true }, body);
}

/** Indexes the manifest at `path` into the database at `dbPath` (open, write, close). */
export async function indexManifestFile(
  dbPath: string,
  runsRoot: string,
  path: string,
  manifest?: Manifest,
): Promise<IndexedStep> {
  const m = manifest ?? await readManifest(path);
  return await writeIndex(dbPath, runsRoot, (conn) => indexManifest(conn, runsRoot, path, m));
}

/** Rebuilds the whole index at `dbPath` from the manifests under `runsRoot`. */
export function reindex(
  dbPath: string,
  runsRoot: string,
  options: { quiet?: boolean } = {},
): Promise<ReindexResult> {
  return withDb(dbPath, {}, (conn) => reindexConn(conn, runsRoot, options));
}
