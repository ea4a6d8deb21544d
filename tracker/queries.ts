/**
 * The questions the `runs` command asks of the index: list runs, one run in detail, two
 * runs compared (config key paths that differ, final metrics side by side), a metric's
 * series for plotting, and the resolution of a run id prefix to one run.
 * @module
 */
import type { DuckDBConnection, Json } from "@duckdb/node-api";
import { LatheError } from "../foundation/errors.ts";
import { queryRows } from "./db.ts";

/** One row of {@link listRuns}. */
export interface RunListRow {
  runId: string;
  recipe: string | null;
  status: string;
  nSteps: number;
  nCached: number;
  nFailed: number;
  startedAt: string | null;
  wallSeconds: number | null;
  gitCommit: string | null;
  gitDirty: boolean | null;
  origin: string;
}

const str = (v: Json | undefined): string | null => v === null || v === undefined ? null : String(v);
const num = (v: Json | undefined): number | null => {
  if (v === null || v === undefined) return null;
  const n = Number(v);
  return Number.isFinite(n) ? n : null;
};

/**
 * Resolves a run id or a unique prefix of one. An unknown id is an error listing run ids
 * that contain it (or the latest runs); an ambiguous prefix lists the runs it matches.
 */
export async function resolveRunId(conn: DuckDBConnection, idOrPrefix: string): Promise<string> {
  const exact = await queryRows(conn, "SELECT run_id FROM runs WHERE run_id = ?", [idOrPrefix]);
  if (exact.length === 1) return idOrPrefix;
  const matches = (await queryRows(
    conn,
    "SELECT run_id FROM runs WHERE starts_with(run_id, ?) ORDER BY run_id DESC",
    [idOrPrefix],
  )).map((r) => String(r.run_id));
  if (matches.length === 1) return matches[0];
  const list = (ids: string[], total: number) =>
    ids.map((id) => `  ${id}`).join("\n") +
    (total > ids.length ? `\n  ... and ${total - ids.length} more` : "");
  if (matches.length > 1) {
    throw new LatheError(
      `Cannot choose a run for "${idOrPrefix}": it is the prefix of ${matches.length} runs:\n${
        list(matches.slice(0, 10), matches.length)
      }`,
      { hint: "give more of the run id" },
    );
  }
  const near = (await queryRows(
    conn,
    "SELECT run_id FROM runs WHERE contains(run_id, ?) ORDER BY run_id DESC LIMIT 10",
    [idOrPrefix],
  )).map((r) => String(r.run_id));
  const latest = near.length > 0 ? near : (await queryRows(
    conn,
    "SELECT run_id FROM runs ORDER BY started_at DESC NULLS LAST, run_id DESC LIMIT 5",
  )).map((r) => String(r.run_id));
  const label = near.length > 0 ? "run ids that contain it" : "the latest runs";
  throw new LatheError(
    `Cannot find run "${idOrPrefix}": no run id starts with it${
      latest.length > 0 ? `; ${label}:\n${list(latest, latest.length)}` : " (the index holds no runs)"
    }`,
    { hint: "`deno task runs ls` lists the runs; `deno task runs reindex` picks up runs made elsewhere" },
  );
}

/** Lists runs, newest first. */
export async function listRuns(
  conn: DuckDBConnection,
  options: { recipe?: string; limit?: number } = {},
): Promise<{ rows: RunListRow[]; total: number }> {
  const where = options.recipe === undefined ? "" : "WHERE recipe = ?";
  const params = options.recipe === undefined ? [] : [options.recipe];
  const total = Number(
    (await queryRows(conn, `SELECT count(*) AS n FROM run_summary ${where}`, params))[0].n,
  );
  const limit = options.limit ?? 20;
  const rows = await queryRows(
    conn,
    `SELECT * FROM run_summary ${where} ORDER BY started_at DESC NULLS LAST, run_id DESC LIMIT ${
      Math.max(0, Math.floor(limit))
    }`,
    params,
  );
  return {
    total,
    rows: rows.map((r) => ({
      runId: String(r.run_id),
      recipe: str(r.recipe),
      status: String(r.status),
      nSteps: num(r.n_steps) ?? 0,
      nCached: num(r.n_cached) ?? 0,
      nFailed: num(r.n_failed) ?? 0,
      startedAt: str(r.started_at),
      wallSeconds: num(r.wall_seconds),
      gitCommit: str(r.git_commit),
      gitDirty: r.git_dirty === null ? null : Boolean(r.git_dirty),
      origin: String(r.origin),
    })),
  };
}

/** One step of a run, as {@link runDetail} returns it. */
export interface StepRow {
  step: string;
  status: string;
  cachedFrom: string | null;
  seconds: number | null;
  key: string | null;
  configHash: string | null;
  seed: number | null;
  gpu: string | null;
  error: string | null;
  manifestPath: string | null;
}

/** A final scalar of a step: numbers and booleans in `value`, strings (and booleans) in `text`. */
export interface FinalMetric {
  step: string;
  name: string;
  value: number | null;
  text: string | null;
}

/** An output file of a step. */
export interface ArtifactRow {
  step: string;
  name: string;
  path: string;
  sha256: string;
  bytes: number;
}

/** Everything `runs show` prints about one run. */
export interface RunDetail {
  run: Record<string, Json>;
  steps: StepRow[];
  metrics: FinalMetric[];
  artifacts: ArtifactRow[];
}

/** The run, its steps (in the order they started), final metrics and artifacts. */
export async function runDetail(conn: DuckDBConnection, runId: string): Promise<RunDetail> {
  const [run] = await queryRows(conn, "SELECT * FROM run_summary WHERE run_id = ?", [runId]);
  if (!run) throw new LatheError(`Cannot find run "${runId}" in the index`);
  const steps = (await queryRows(
    conn,
    "SELECT * FROM steps WHERE run_id = ? ORDER BY started_at NULLS LAST, step",
    [runId],
  )).map((r) => ({
    step: String(r.step),
    status: String(r.status),
    cachedFrom: str(r.cached_from),
    seconds: num(r.seconds),
    key: str(r.key),
    configHash: str(r.config_hash),
    seed: num(r.seed),
    gpu: str(r.gpu),
    error: str(r.error),
    manifestPath: str(r.manifest_path),
  }));
  return { run, steps, metrics: await finalMetrics(conn, runId), artifacts: await artifacts(conn, runId) };
}

async function finalMetrics(conn: DuckDBConnection, runId: string): Promise<FinalMetric[]> {
  return (await queryRows(
    conn,
    `SELECT m.step, m.name, m.value, m.text FROM final_metrics m
     LEFT JOIN steps s USING (run_id, step)
     WHERE m.run_id = ? ORDER BY s.started_at NULLS LAST, m.step, m.name`,
    [runId],
  )).map((r) => ({ step: String(r.step), name: String(r.name), value: num(r.value), text: str(r.text) }));
}

async function artifacts(conn: DuckDBConnection, runId: string): Promise<ArtifactRow[]> {
  return (await queryRows(
    conn,
    `SELECT a.* FROM artifacts a LEFT JOIN steps s USING (run_id, step)
     WHERE a.run_id = ? ORDER BY s.started_at NULLS LAST, a.step, a.name`,
    [runId],
  )).map((r) => ({
    step: String(r.step),
    name: String(r.name),
    path: String(r.path),
    sha256: String(r.sha256),
    bytes: num(r.bytes) ?? 0,
  }));
}

/**
 * Flattens a config to `key.path -> value` (JSON text; strings as they are). Objects are
 * walked; arrays and empty objects are leaves, compared as a whole.
 */
export function flattenConfig(
  value: unknown,
  prefix = "",
  out = new Map<string, string>(),
): Map<string, string> {
  if (value !== null && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length > 0) {
    for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
      flattenConfig(v, prefix === "" ? k : `${prefix}.${k}`, out);
    }
  } else {
    out.set(prefix === "" ? "(config)" : prefix, typeof value === "string" ? value : JSON.stringify(value));
  }
  return out;
}

/** One config key that differs between two runs' step; null = absent on that side. */
export interface ConfigDiff {
  step: string;
  key: string;
  a: string | null;
  b: string | null;
}

/** One final metric of two runs side by side; `delta` = b - a when both are numbers. */
export interface MetricComparison {
  step: string;
  name: string;
  a: number | string | null;
  b: number | string | null;
  delta: number | null;
}

/** What {@link compareRuns} found. */
export interface Comparison {
  a: string;
  b: string;
  /** Run-level fields that differ (recipe, status, git commit, ...). */
  runDiffs: { field: string; a: string | null; b: string | null }[];
  /** Steps present in only one of the runs. */
  onlyIn: { step: string; run: "a" | "b" }[];
  /** Steps present in both with the same key (identical inputs, config and code version). */
  sameKey: string[];
  configDiffs: ConfigDiff[];
  metrics: MetricComparison[];
}

async function stepConfigs(
  conn: DuckDBConnection,
  runId: string,
): Promise<Map<string, { key: string | null; seed: string; version: string; config: Map<string, string> }>> {
  const rows = await queryRows(
    conn,
    "SELECT step, key, seed, step_version, config FROM steps WHERE run_id = ? ORDER BY started_at NULLS LAST, step",
    [runId],
  );
  return new Map(rows.map((r) => {
    const config = typeof r.config === "string" ? JSON.parse(r.config) : r.config;
    return [String(r.step), {
      key: str(r.key),
      seed: String(r.seed),
      version: String(r.step_version),
      config: flattenConfig(config),
    }];
  }));
}

/** Compares two runs step by step: config key paths that differ, and final metrics with deltas. */
export async function compareRuns(conn: DuckDBConnection, a: string, b: string): Promise<Comparison> {
  const [ra] = await queryRows(conn, "SELECT * FROM runs WHERE run_id = ?", [a]);
  const [rb] = await queryRows(conn, "SELECT * FROM runs WHERE run_id = ?", [b]);
  const runDiffs: Comparison["runDiffs"] = [];
  for (const field of ["recipe", "status", "git_commit", "git_branch", "git_dirty"]) {
    const va = str(ra?.[field]);
    const vb = str(rb?.[field]);
    if (va !== vb) runDiffs.push({ field, a: va, b: vb });
  }
  const ca = await stepConfigs(conn, a);
  const cb = await stepConfigs(conn, b);
  const stepOrder = [...ca.keys(), ...[...cb.keys()].filter((s) => !ca.has(s))];
  const onlyIn: Comparison["onlyIn"] = [];
  const sameKey: string[] = [];
  const configDiffs: ConfigDiff[] = [];
  for (const step of stepOrder) {
    const sa = ca.get(step);
    const sb = cb.get(step);
    if (!sa || !sb) {
      onlyIn.push({ step, run: sa ? "a" : "b" });
      continue;
    }
    if (sa.key !== null && sa.key === sb.key) sameKey.push(step);
    const fa = new Map([["(version)", sa.version], ["(seed)", sa.seed], ...sa.config]);
    const fb = new Map([["(version)", sb.version], ["(seed)", sb.seed], ...sb.config]);
    const keys = [...new Set([...fa.keys(), ...fb.keys()])].sort();
    for (const key of keys) {
      const va = fa.get(key) ?? null;
      const vb = fb.get(key) ?? null;
      if (va !== vb) configDiffs.push({ step, key, a: va, b: vb });
    }
  }
  const ma = await finalMetrics(conn, a);
  const mb = await finalMetrics(conn, b);
  const id = (m: FinalMetric) => `${m.step}\0${m.name}`;
  const ia = new Map(ma.map((m) => [id(m), m]));
  const ib = new Map(mb.map((m) => [id(m), m]));
  const valueOf = (m: FinalMetric | undefined) => m === undefined ? null : m.text ?? m.value;
  const metrics: MetricComparison[] = [...ma, ...mb.filter((m) => !ia.has(id(m)))].map((m) => {
    const xa = ia.get(id(m));
    const xb = ib.get(id(m));
    const numeric = xa?.text === null && xb?.text === null && xa.value !== null && xb.value !== null;
    return {
      step: m.step,
      name: m.name,
      a: valueOf(xa),
      b: valueOf(xb),
      delta: numeric ? (xb!.value as number) - (xa!.value as number) : null,
    };
  });
  return { a, b, runDiffs, onlyIn, sameKey, configDiffs, metrics };
}

/** One plotted line: a metric of one step over `step_index`. */
export interface Series {
  step: string;
  name: string;
  points: { x: number; y: number }[];
}

/**
 * The streamed points of the named metrics of a run, one series per (step, metric), in
 * step-index order. A name the run never logged is an error listing the ones it did.
 */
export async function metricSeries(
  conn: DuckDBConnection,
  runId: string,
  names: string[],
): Promise<Series[]> {
  const available = (await queryRows(
    conn,
    "SELECT DISTINCT name FROM metrics WHERE run_id = ? AND step_index IS NOT NULL ORDER BY name",
    [runId],
  )).map((r) => String(r.name));
  const missing = names.filter((n) => !available.includes(n));
  if (missing.length > 0) {
    throw new LatheError(
      `Cannot plot ${missing.map((n) => `"${n}"`).join(", ")} for run "${runId}": ${
        available.length > 0
          ? `it logged only ${available.map((n) => `"${n}"`).join(", ")}`
          : "it logged no metric points (metrics.jsonl)"
      }`,
      {
        hint: available.length > 0 ? `pass --metric ${available[0]}` : "plots need a step that logs metrics",
      },
    );
  }
  const rows = await queryRows(
    conn,
    `SELECT m.step, m.name, m.step_index, m.value FROM metrics m LEFT JOIN steps s USING (run_id, step)
     WHERE m.run_id = ? AND m.step_index IS NOT NULL AND m.name IN (${names.map(() => "?").join(", ")})
     ORDER BY s.started_at NULLS LAST, m.step, m.name, m.step_index, m.time`,
    [runId, ...names],
  );
  const series = new Map<string, Series>();
  for (const r of rows) {
    const key = `${r.step}\0${r.name}`;
    let s = series.get(key);
    if (!s) series.set(key, s = { step: String(r.step), name: String(r.name), points: [] });
    const y = num(r.value);
    if (y !== null) s.points.push({ x: Number(r.step_index), y });
  }
  return [...series.values()];
}
