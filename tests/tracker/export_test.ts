import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { queryRows, sqlString, withDb } from "../../tracker/db.ts";
import { runs, withRoot } from "./_cli.ts";
import { RUN_A, RUN_B, RUN_C, writeStandardRuns, writeStep } from "./_fixtures.ts";

const TABLES = ["runs", "steps", "metrics", "artifacts"];

async function counts(db: string, from: (t: string) => string): Promise<Record<string, number>> {
  return await withDb(db, { readOnly: true }, async (conn) => {
    const out: Record<string, number> = {};
    for (const t of TABLES) {
      out[t] = Number((await queryRows(conn, `SELECT count(*) AS n FROM ${from(t)}`))[0].n);
    }
    return out;
  });
}

Deno.test("runs export writes Parquet files that DuckDB reads back with the same row counts", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const out = join(root, "exports", "machine-a");
    await runs(root, "export", "--out", out);
    const db = join(root, "lathe.duckdb");
    const inIndex = await counts(db, (t) => t);
    const inParquet = await counts(db, (t) => `read_parquet(${sqlString(join(out, `${t}.parquet`))})`);
    assert.deepEqual(inParquet, inIndex);
    assert.ok(inIndex.metrics > 50);
    const info = JSON.parse(await Deno.readTextFile(join(out, "export.json")));
    assert.deepEqual(info.rows, inIndex);
    const leftovers = [...Deno.readDirSync(out)].map((e) => e.name).sort();
    assert.deepEqual(leftovers, [
      "artifacts.parquet",
      "export.json",
      "metrics.parquet",
      "runs.parquet",
      "steps.parquet",
    ]);
  });
});

Deno.test("exports from two machines merge in one read_parquet query and by runs import", async () => {
  await withRoot(async (top) => {
    const machineA = join(top, "a");
    const machineB = join(top, "b");
    await writeStandardRuns(machineA);
    const other = "20261124-120000-remote-9999";
    await writeStep(machineB, { runId: other, step: "prepare", metrics: { rows: 7 } });
    await writeStep(machineB, {
      runId: other,
      step: "train-sft",
      points: [{ name: "loss", step: 0, value: 1 }],
    });
    await runs(machineA, "export", "--out", join(top, "exports", "a"));
    await runs(machineB, "export", "--out", join(top, "exports", "b"));
    const merged = await runs(
      machineA,
      "sql",
      `SELECT run_id FROM read_parquet(${
        sqlString(join(top, "exports", "*", "runs.parquet"))
      }) ORDER BY run_id`,
      "--json",
    );
    assert.deepEqual(JSON.parse(merged).map((r: { run_id: string }) => r.run_id), [
      RUN_A,
      RUN_B,
      RUN_C,
      other,
    ]);

    const report = await runs(machineA, "import", join(top, "exports", "b"));
    assert.match(report, /^imported 1 run from /);
    const ls = await runs(machineA, "ls");
    assert.match(
      ls,
      new RegExp(`^${other} .* ${join(top, "exports", "b").replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`, "m"),
    );
    const steps = JSON.parse(
      await runs(
        machineA,
        "sql",
        `SELECT count(*)::INTEGER AS n FROM steps WHERE run_id = '${other}'`,
        "--json",
      ),
    );
    assert.deepEqual(steps, [{ n: 2 }]);

    // The index is rebuilt from this machine's manifests and the recorded import.
    const reindexed = await runs(machineA, "reindex");
    assert.match(reindexed, /merged again: .*exports\/b$/m);
    const after = JSON.parse(
      await runs(machineA, "sql", "SELECT run_id, origin FROM runs ORDER BY run_id", "--json"),
    );
    assert.deepEqual(after.map((r: { run_id: string }) => r.run_id), [RUN_A, RUN_B, RUN_C, other]);
    assert.equal(after.filter((r: { origin: string }) => r.origin === "local").length, 3);

    // Importing this machine's own export keeps the local rows (the manifests win).
    const again = await runs(machineA, "import", join(top, "exports", "a"));
    assert.match(again, /^imported 0 runs from .*\nkept 3 run\(s\) whose manifests are on this machine/);
  });
});

Deno.test("runs import of a directory that is not an export is a clear error", async () => {
  await withRoot(async (root) => {
    await assert.rejects(runs(root, "import", join(root, "nowhere")), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(
        error.message,
        /^Cannot import runs from ".*nowhere": cannot read ".*export\.json" \(no such file\)$/,
      );
      assert.match(error.hint ?? "", /runs export/);
      return true;
    });
  });
});
