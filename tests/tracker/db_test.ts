import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LatheError } from "../../foundation/errors.ts";
import { backoffMs, isLockError, queryRows, withDb } from "../../tracker/db.ts";
import { readIndex } from "../../tracker/index.ts";
import { writeStep } from "./_fixtures.ts";

const WRITER = fileURLToPath(new URL("./_writer.ts", import.meta.url));

function spawnWriter(args: string[]): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", WRITER, ...args],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

async function finish(child: Deno.ChildProcess): Promise<string> {
  const out = await child.output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, text);
  return text;
}

async function waitForFile(path: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      await Deno.stat(path);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  throw new Error(`${path} did not appear`);
}

Deno.test("two processes indexing at the same moment both land all their rows", async () => {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  try {
    const db = join(root, "lathe.duckdb");
    const perProcess = 6;
    const groups: string[][] = [[], []];
    for (let p = 0; p < 2; p++) {
      for (let i = 0; i < perProcess; i++) {
        const runId = `20261122-10${p}0${i}0-writer-${p}${i}aa`;
        for (const step of ["prepare", "train-sft"]) {
          const { path } = await writeStep(root, {
            runId,
            step,
            points: step === "train-sft"
              ? [{ name: "loss", step: 0, value: 2 }, { name: "loss", step: 1, value: 1 }]
              : undefined,
          });
          groups[p].push(path);
        }
      }
    }
    // Both start at the same moment: each reports ready, then waits for the "go" file.
    const barrier = join(root, ".barrier");
    await Deno.mkdir(barrier);
    const children = groups.map((paths) => spawnWriter(["index", db, root, barrier, ...paths]));
    for (const child of children) await waitForFile(join(barrier, `ready-${child.pid}`));
    await Deno.writeTextFile(join(barrier, "go"), "");
    const outputs = await Promise.all(children.map(finish));
    for (const o of outputs) assert.match(o, new RegExp(`indexed ${perProcess * 2}`));
    const counts = await readIndex(db, root, async (conn) =>
      (await queryRows(
        conn,
        `SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM steps) AS steps,
                (SELECT count(*) FROM metrics WHERE step_index IS NOT NULL) AS points`,
      ))[0]);
    assert.deepEqual(counts, {
      runs: String(2 * perProcess),
      steps: String(4 * perProcess),
      points: String(4 * perProcess),
    });
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("withDb() waits while another process holds the lock, then opens", async () => {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  try {
    const db = join(root, "lathe.duckdb");
    const ready = join(root, "ready");
    const holder = spawnWriter(["hold", db, "800", ready]);
    await waitForFile(ready);
    const t0 = Date.now();
    const rows = await withDb(db, {}, (conn) => queryRows(conn, "SELECT count(*) AS n FROM held"));
    assert.deepEqual(rows, [{ n: "0" }]);
    assert.ok(Date.now() - t0 > 200, "the open should have waited for the holder");
    await finish(holder);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("withDb() gives up with a clear error when the lock is held past the timeout", async () => {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  try {
    const db = join(root, "lathe.duckdb");
    const ready = join(root, "ready");
    const release = join(root, "release");
    const holder = spawnWriter(["hold", db, "60000", ready, release]);
    await waitForFile(ready);
    await assert.rejects(
      withDb(db, { readOnly: true, lockTimeoutMs: 300 }, () => Promise.resolve()),
      (error: unknown) => {
        assert.ok(error instanceof LatheError);
        assert.match(
          error.message,
          /^Cannot open the run index ".*lathe\.duckdb": another process has held its lock/,
        );
        assert.match(error.hint ?? "", /LATHE_DB/);
        return true;
      },
    );
    await Deno.writeTextFile(release, "");
    await finish(holder);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("withDb() queues opens of one file inside a process", async () => {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  try {
    const db = join(root, "x.duckdb");
    await withDb(db, {}, (conn) => conn.run("CREATE TABLE t (i INTEGER)"));
    let inside = 0;
    let maxInside = 0;
    await Promise.all(Array.from({ length: 5 }, (_, i) =>
      withDb(db, {}, async (conn) => {
        maxInside = Math.max(maxInside, ++inside);
        await conn.run("INSERT INTO t VALUES (?)", [i]);
        await new Promise((r) => setTimeout(r, 10));
        inside--;
      })));
    assert.equal(maxInside, 1);
    const rows = await withDb(
      db,
      { readOnly: true },
      (conn) => queryRows(conn, "SELECT count(*) AS n FROM t"),
    );
    assert.deepEqual(rows, [{ n: "5" }]);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("a file that is not a DuckDB database is a LatheError that says how to rebuild", async () => {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  try {
    const db = join(root, "lathe.duckdb");
    await Deno.writeTextFile(
      db,
      "not a database, just text that is long enough to have a header".repeat(100),
    );
    await assert.rejects(withDb(db, {}, () => Promise.resolve()), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(error.message, /^Cannot open the run index/);
      assert.match(error.hint ?? "", /runs reindex/);
      return true;
    });
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("backoffMs() grows exponentially to a 1 s cap with full jitter", () => {
  assert.equal(backoffMs(0, () => 1), 20);
  assert.equal(backoffMs(3, () => 1), 160);
  assert.equal(backoffMs(20, () => 1), 1000);
  assert.equal(backoffMs(20, () => 0.5), 500);
  assert.equal(backoffMs(0, () => 0), 5);
  assert.ok(isLockError(new Error('IO Error: Could not set lock on file "x": Conflicting lock is held')));
  assert.ok(!isLockError(new Error("Parser Error: syntax error")));
});
