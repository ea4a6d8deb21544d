import assert from "node:assert/strict";
import { join } from "node:path";
import { readManifest } from "../../foundation/manifest.ts";
import { queryRows, withDb } from "../../tracker/db.ts";
import { indexManifestFile, parseMetricsJsonl, readIndex, reindex, scanRuns } from "../../tracker/index.ts";
import { SCHEMA_VERSION } from "../../tracker/schema.ts";
import { RUN_A, RUN_B, RUN_C, writeStandardRuns, writeStep } from "./_fixtures.ts";

async function withRuns(body: (root: string, db: string) => Promise<void>): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  try {
    await body(root, join(root, "lathe.duckdb"));
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

/** Every row of every table, sorted, as JSON text: equal dumps mean equal indexes. */
async function dump(db: string, root: string): Promise<Record<string, string[]>> {
  return await readIndex(db, root, async (conn) => {
    const out: Record<string, string[]> = {};
    for (const t of ["runs", "steps", "metrics", "artifacts"]) {
      out[t] = (await queryRows(conn, `SELECT * FROM ${t}`)).map((r) => JSON.stringify(r)).sort();
    }
    return out;
  });
}

Deno.test("indexManifestFile() writes steps, final and streamed metrics, artifacts and the run row", async () => {
  await withRuns(async (root, db) => {
    const paths = await writeStandardRuns(root);
    for (const p of paths) await indexManifestFile(db, root, p);
    let expectMetrics = 0;
    let expectArtifacts = 0;
    for (const p of paths) {
      const m = await readManifest(p);
      expectMetrics += Object.keys(m.metrics).length;
      expectArtifacts += Object.keys(m.outputs).length;
      if (m.status === "success") {
        const text = await Deno.readTextFile(join(p, "..", "metrics.jsonl")).catch(() => "");
        expectMetrics += text.split("\n").filter((l) => l.trim() !== "").length;
      }
    }
    await readIndex(db, root, async (conn) => {
      const count = async (sql: string) => Number((await queryRows(conn, sql))[0].n);
      assert.equal(await count("SELECT count(*) AS n FROM steps"), paths.length);
      assert.equal(await count("SELECT count(*) AS n FROM metrics"), expectMetrics);
      assert.equal(await count("SELECT count(*) AS n FROM artifacts"), expectArtifacts);
      const runs = await queryRows(
        conn,
        "SELECT run_id, recipe, status, n_steps, git_dirty FROM runs ORDER BY run_id",
      );
      assert.deepEqual(runs, [
        { run_id: RUN_A, recipe: "tiny-demo", status: "success", n_steps: 3, git_dirty: false },
        { run_id: RUN_B, recipe: "tiny-demo", status: "success", n_steps: 3, git_dirty: true },
        { run_id: RUN_C, recipe: "tiny-dpo", status: "failed", n_steps: 2, git_dirty: false },
      ]);
      const [failed] = await queryRows(
        conn,
        "SELECT status, error, seconds FROM steps WHERE run_id = ? AND step = ?",
        [
          RUN_C,
          "train-dpo",
        ],
      );
      assert.deepEqual(failed, {
        status: "failed",
        error: 'Cannot allocate "embed_tokens": out of memory',
        seconds: 3,
      });
      const finals = await queryRows(
        conn,
        "SELECT name, value, text FROM final_metrics WHERE run_id = ? AND step = 'train-sft' ORDER BY name",
        [RUN_A],
      );
      assert.deepEqual(finals, [
        { name: "converged", value: 1, text: "true" },
        { name: "loss", value: 1.2, text: null },
        { name: "tokens", value: 51200, text: null },
      ]);
      const points = await queryRows(
        conn,
        "SELECT step_index, value FROM metrics WHERE run_id = ? AND name = 'loss' AND step_index IS NOT NULL ORDER BY step_index",
        [RUN_B],
      );
      assert.equal(points.length, 30);
      assert.equal(points[0].step_index, "0");
      assert.equal(points[0].value, 3);
      const [summary] = await queryRows(
        conn,
        "SELECT loss, eval_loss, n_cached FROM run_summary WHERE run_id = ?",
        [
          RUN_B,
        ],
      );
      assert.deepEqual(summary, { loss: 0.9, eval_loss: 1.25, n_cached: "1" });
      const [cfg] = await queryRows(
        conn,
        "SELECT config->>'$.lora.r' AS r FROM steps WHERE run_id = ? AND step = 'train-sft'",
        [
          RUN_B,
        ],
      );
      assert.equal(cfg.r, "16");
    });
  });
});

Deno.test("indexing the same manifest twice leaves one copy of its rows", async () => {
  await withRuns(async (root, db) => {
    const paths = await writeStandardRuns(root);
    for (const p of paths) await indexManifestFile(db, root, p);
    const before = await dump(db, root);
    await indexManifestFile(db, root, paths[1]);
    await indexManifestFile(db, root, paths[1]);
    assert.deepEqual(await dump(db, root), before);
  });
});

Deno.test("reindex after deleting the database restores every row", async () => {
  await withRuns(async (root, db) => {
    const paths = await writeStandardRuns(root);
    for (const p of paths) await indexManifestFile(db, root, p);
    const before = await dump(db, root);
    assert.ok(before.metrics.length > 50);
    await Deno.remove(db);
    await Deno.remove(`${db}.wal`).catch(() => {});
    const result = await reindex(db, root, { quiet: true });
    assert.equal(result.runs, 3);
    assert.equal(result.steps, paths.length);
    assert.deepEqual(await dump(db, root), before);
  });
});

Deno.test("reading a missing index builds it from the manifests", async () => {
  await withRuns(async (root, db) => {
    await writeStandardRuns(root);
    const n = await readIndex(
      db,
      root,
      async (conn) => Number((await queryRows(conn, "SELECT count(*) AS n FROM runs"))[0].n),
    );
    assert.equal(n, 3);
  });
});

Deno.test("an index with another schema version is rebuilt when opened", async () => {
  await withRuns(async (root, db) => {
    await writeStandardRuns(root);
    await withDb(db, {}, async (conn) => {
      await conn.run("CREATE TABLE schema_version (version INTEGER)");
      await conn.run("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION + 100]);
      await conn.run("CREATE TABLE runs (run_id VARCHAR)");
    });
    const rows = await readIndex(
      db,
      root,
      (conn) => queryRows(conn, "SELECT run_id, status FROM runs ORDER BY run_id"),
    );
    assert.deepEqual(rows.map((r) => r.run_id), [RUN_A, RUN_B, RUN_C]);
    const version = await withDb(
      db,
      { readOnly: true },
      (conn) => queryRows(conn, "SELECT version FROM schema_version"),
    );
    assert.deepEqual(version, [{ version: SCHEMA_VERSION }]);
  });
});

Deno.test("scanRuns() takes the later of manifest.json and failure.json and skips dot directories", async () => {
  await withRuns(async (root) => {
    const run = "20261124-080000-retry-dddd";
    await writeStep(root, {
      runId: run,
      step: "train-sft",
      startedAt: "2026-11-24T08:00:00.000Z",
      seconds: 10,
    });
    await writeStep(root, {
      runId: run,
      step: "train-sft",
      status: "failed",
      error: "device lost",
      startedAt: "2026-11-24T09:00:00.000Z",
    });
    await writeStep(root, { runId: run, step: "eval", startedAt: "2026-11-24T07:00:00.000Z", seconds: 1 });
    await writeStep(root, {
      runId: run,
      step: "eval",
      status: "failed",
      error: "older failure",
      startedAt: "2026-11-24T06:00:00.000Z",
    });
    // A staging directory of a killed step and a hidden run directory are not runs.
    await writeStep(root, { runId: run, step: "prepare" });
    await Deno.rename(join(root, run, "prepare"), join(root, run, ".prepare.staging-1234abcd"));
    await writeStep(root, { runId: ".trash", step: "prepare" });
    const { records, problems } = await scanRuns(root);
    assert.deepEqual(problems, []);
    assert.deepEqual(
      records.map((r) => [r.manifest.step, r.manifest.status, r.manifest.error]),
      [["eval", "success", null], ["train-sft", "failed", "device lost"]],
    );
  });
});

Deno.test("reindex reports an unreadable manifest and indexes the rest", async () => {
  await withRuns(async (root, db) => {
    await writeStandardRuns(root);
    const bad = join(root, "20261125-000000-broken-eeee", "prepare");
    await Deno.mkdir(bad, { recursive: true });
    await Deno.writeTextFile(join(bad, "manifest.json"), '{"schema": "lathe.manifest/1"');
    const result = await reindex(db, root, { quiet: true });
    assert.equal(result.runs, 3);
    assert.equal(result.warnings.length, 1);
    assert.match(
      result.warnings[0],
      /Cannot read manifest ".*20261125-000000-broken-eeee\/prepare\/manifest\.json": not valid JSON/,
    );
  });
});

Deno.test("parseMetricsJsonl() keeps good points and names the lines it skips", () => {
  const text = [
    '{"name":"loss","step":0,"value":2.5,"time":"2026-11-22T10:00:00.000Z"}',
    "",
    '{"name":"loss","step":1,"value":null,"time":"2026-11-22T10:00:01.000Z"}',
    '{"name":"loss","step":"two","value":2}',
    '{"name":"loss","step":3,"val',
  ].join("\n");
  const { points, skipped } = parseMetricsJsonl(text);
  assert.deepEqual(points.map((p) => [p.step, p.value]), [[0, 2.5], [1, null]]);
  assert.deepEqual(skipped.map((s) => s.line), [4, 5]);
  assert.match(skipped[1].reason, /not valid JSON/);
});

Deno.test("a truncated last line of metrics.jsonl is skipped with a warning naming file and line", async () => {
  await withRuns(async (root, db) => {
    const { path } = await writeStep(root, {
      runId: "20261124-080000-killed-ffff",
      step: "train-sft",
      points: [{ name: "loss", step: 0, value: 2 }, { name: "loss", step: 1, value: 1.5 }],
      rawMetrics: '{"name":"loss","st',
    });
    const done = await indexManifestFile(db, root, path);
    assert.equal(done.metrics, 2);
    assert.equal(done.warnings.length, 1);
    assert.match(done.warnings[0], /train-sft\/metrics\.jsonl:3: not valid JSON$/);
  });
});
