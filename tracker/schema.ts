/**
 * The tracker's tables and views (DESIGN §5). The database is an index of the manifests
 * under the runs root; every row can be rebuilt from them, so a schema change simply
 * drops the old tables and reindexes. `docs/tracker.md` describes every column.
 * @module
 */
import type { DuckDBConnection } from "@duckdb/node-api";

/** Version of the table layout; a database with another version is rebuilt from the manifests. */
export const SCHEMA_VERSION = 1;

/** The tables, in the order exports and imports walk them. */
export const TABLES = ["runs", "steps", "metrics", "artifacts"] as const;
/** One of {@link TABLES}. */
export type TableName = typeof TABLES[number];

/** The views, built on the tables. */
export const VIEWS = ["final_metrics", "latest_steps", "run_summary"] as const;

const TABLE_DDL = [
  `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`,
  // One row per run, derived from its steps: status is "failed" when any step failed.
  // origin: "local" for runs indexed from manifests here, else the export directory imported.
  `CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    recipe VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    status VARCHAR NOT NULL,
    git_commit VARCHAR,
    git_branch VARCHAR,
    git_dirty BOOLEAN,
    n_steps INTEGER NOT NULL,
    origin VARCHAR NOT NULL
  )`,
  // One row per (run, step): the latest manifest.json or failure.json of that step.
  `CREATE TABLE IF NOT EXISTS steps (
    run_id VARCHAR NOT NULL,
    step VARCHAR NOT NULL,
    step_version VARCHAR,
    status VARCHAR NOT NULL,
    key VARCHAR,
    config_hash VARCHAR,
    config JSON,
    seed BIGINT,
    cached_from VARCHAR,
    recipe VARCHAR,
    git_commit VARCHAR,
    git_branch VARCHAR,
    git_dirty BOOLEAN,
    deno VARCHAR,
    lathe VARCHAR,
    os VARCHAR,
    arch VARCHAR,
    gpu VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    seconds DOUBLE,
    error VARCHAR,
    manifest_path VARCHAR,
    PRIMARY KEY (run_id, step)
  )`,
  // Streamed points (step_index = the training step) and final scalars (step_index NULL).
  // Numbers and booleans (1/0) go to value; strings and booleans ("true"/"false") to text.
  `CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR NOT NULL,
    step VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    step_index BIGINT,
    value DOUBLE,
    text VARCHAR,
    time TIMESTAMP
  )`,
  // Output files of successful steps; path is relative to the step directory.
  `CREATE TABLE IF NOT EXISTS artifacts (
    run_id VARCHAR NOT NULL,
    step VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (run_id, step, name)
  )`,
  // Export directories merged with `runs import`; reindex merges them again.
  `CREATE TABLE IF NOT EXISTS imports (
    source VARCHAR PRIMARY KEY,
    imported_at TIMESTAMP NOT NULL,
    n_runs INTEGER NOT NULL
  )`,
];

const VIEW_DDL = [
  `CREATE OR REPLACE VIEW final_metrics AS
    SELECT run_id, step, name, value, text FROM metrics WHERE step_index IS NULL`,
  // The most recent successful run of each step name.
  `CREATE OR REPLACE VIEW latest_steps AS
    SELECT * FROM steps WHERE status = 'success'
    QUALIFY row_number() OVER (PARTITION BY step ORDER BY finished_at DESC, run_id DESC) = 1`,
  // One row per run: step seconds summed, wall time, and the final loss-like scalars of
  // the last step that reports each (train: "loss" / "train_loss"; eval: "eval_loss" / "val_loss").
  `CREATE OR REPLACE VIEW run_summary AS
    WITH per_run AS (
      SELECT run_id,
        sum(seconds) AS step_seconds,
        count(*) FILTER (WHERE cached_from IS NOT NULL) AS n_cached,
        count(*) FILTER (WHERE status = 'failed') AS n_failed
      FROM steps GROUP BY run_id
    ), finals AS (
      SELECT m.run_id,
        arg_max(m.value, s.finished_at) FILTER (WHERE m.name IN ('loss', 'train_loss')) AS loss,
        arg_max(m.value, s.finished_at) FILTER (WHERE m.name IN ('eval_loss', 'val_loss')) AS eval_loss
      FROM metrics m JOIN steps s USING (run_id, step)
      WHERE m.step_index IS NULL AND m.value IS NOT NULL
      GROUP BY m.run_id
    )
    SELECT r.run_id, r.recipe, r.status, r.n_steps,
      coalesce(p.n_cached, 0) AS n_cached, coalesce(p.n_failed, 0) AS n_failed,
      r.started_at, r.finished_at,
      epoch(r.finished_at - r.started_at) AS wall_seconds,
      p.step_seconds,
      f.loss, f.eval_loss,
      r.git_commit, r.git_branch, r.git_dirty, r.origin
    FROM runs r LEFT JOIN per_run p USING (run_id) LEFT JOIN finals f USING (run_id)`,
];

/** The schema version recorded in the database, or null when there is none (new or foreign file). */
export async function storedSchemaVersion(conn: DuckDBConnection): Promise<number | null> {
  try {
    const rows = (await conn.runAndReadAll("SELECT max(version) AS v FROM schema_version"))
      .getRowObjectsJson();
    const v = rows[0]?.v;
    return typeof v === "number" ? v : null;
  } catch {
    return null;
  }
}

/** Drops every tracker table and view (the data lives on in the manifests). */
export async function dropSchema(conn: DuckDBConnection): Promise<void> {
  for (const view of VIEWS) await conn.run(`DROP VIEW IF EXISTS ${view}`);
  for (const table of [...TABLES, "imports", "schema_version"]) {
    await conn.run(`DROP TABLE IF EXISTS ${table}`);
  }
}

/** Creates the tables and views if missing and records {@link SCHEMA_VERSION}; idempotent. */
export async function createSchema(conn: DuckDBConnection): Promise<void> {
  for (const ddl of TABLE_DDL) await conn.run(ddl);
  for (const ddl of VIEW_DDL) await conn.run(ddl);
  await conn.run("DELETE FROM schema_version");
  await conn.run("INSERT INTO schema_version VALUES ($1)", [SCHEMA_VERSION]);
}
