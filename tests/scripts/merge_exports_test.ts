import assert from "node:assert/strict";
import { join, resolve } from "node:path";
import { DuckDBInstance } from "@duckdb/node-api";
import type { DuckDBConnection } from "@duckdb/node-api";
import { type LegInfo, mergeExports, renderSummary } from "../../scripts/merge_exports.ts";
import { exportIndex } from "../../tracker/export.ts";
import { createSchema } from "../../tracker/schema.ts";

const NVIDIA = ["self-hosted", "linux", "nvidia"];
const AMD = ["self-hosted", "linux", "amd"];

interface LegFixture {
  leg?: LegInfo;
  adapter?: unknown;
  /** SQL run against a fresh tracker schema before `runs export` writes the Parquet files. */
  sql?: string[];
}

/** Writes a leg directory as the GPU matrix uploads it: leg.json, adapter.json, a real tracker export. */
async function writeLeg(root: string, name: string, fixture: LegFixture): Promise<string> {
  const dir = join(root, name);
  await Deno.mkdir(dir, { recursive: true });
  if (fixture.leg) await Deno.writeTextFile(join(dir, "leg.json"), JSON.stringify(fixture.leg));
  if (fixture.adapter) await Deno.writeTextFile(join(dir, "adapter.json"), JSON.stringify(fixture.adapter));
  if (fixture.sql) {
    await withMemoryDb(async (conn) => {
      await createSchema(conn);
      for (const sql of fixture.sql!) await conn.run(sql);
      await exportIndex(conn, dir);
    });
  }
  return dir;
}

async function withMemoryDb<T>(body: (conn: DuckDBConnection) => Promise<T>): Promise<T> {
  const instance = await DuckDBInstance.create(":memory:");
  const conn = await instance.connect();
  try {
    return await body(conn);
  } finally {
    conn.closeSync();
    instance.closeSync();
  }
}

async function withTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-merge-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function runRow(id: string, recipe: string, status: string, start: string, end: string): string {
  return `INSERT INTO runs (run_id, recipe, started_at, finished_at, status, n_steps, origin)
    VALUES ('${id}', '${recipe}', TIMESTAMP '${start}', TIMESTAMP '${end}', '${status}', 2, 'local')`;
}

function stepRow(id: string, step: string, status: string, end: string): string {
  return `INSERT INTO steps (run_id, step, status, finished_at) VALUES ('${id}', '${step}', '${status}', TIMESTAMP '${end}')`;
}

function metricRows(id: string, step: string, points: [string, number | null, number][]): string {
  const values = points.map(([name, index, value]) =>
    `('${id}', '${step}', '${name}', ${index ?? "NULL"}, ${value})`
  );
  return `INSERT INTO metrics (run_id, step, name, step_index, value) VALUES ${values.join(", ")}`;
}

Deno.test("mergeExports() reports status, tokens/s, final and eval loss and seconds per recipe and runner", async () => {
  await withTempDir(async (root) => {
    const good = "20261122-100000-tiny-demo-aaaa";
    await writeLeg(root, "lathe-tiny-demo-nvidia-1", {
      leg: { recipe: "tiny-demo", runner: NVIDIA, attempt: 1, exitCode: 0, seconds: 123.44 },
      adapter: {
        vendor: "nvidia",
        architecture: "ada",
        device: "",
        description: "NVIDIA L4",
        isFallbackAdapter: false,
      },
      sql: [
        runRow(good, "tiny-demo", "success", "2026-11-22 10:00:00", "2026-11-22 10:10:00"),
        stepRow(good, "train-sft", "success", "2026-11-22 10:05:00"),
        stepRow(good, "train-dpo", "success", "2026-11-22 10:09:00"),
        stepRow(good, "eval", "success", "2026-11-22 10:10:00"),
        // Streamed points, then the final scalars (step_index NULL): the final of the last step wins.
        metricRows(good, "train-sft", [
          ["loss", 0, 2.0],
          ["loss", 1, 1.5],
          ["loss", null, 1.1],
          ["tokens_per_s", null, 950.5],
        ]),
        metricRows(good, "train-dpo", [["loss", 0, 0.9], ["loss", null, 0.7]]),
        metricRows(good, "eval", [["eval_loss", null, 1.3]]),
      ],
    });
    const bad = "20261122-100000-tiny-demo-bbbb";
    await writeLeg(root, "lathe-tiny-demo-amd-1", {
      leg: { recipe: "tiny-demo", runner: AMD, attempt: 1, exitCode: 3, seconds: null },
      adapter: { vendor: "amd", architecture: "rdna3", device: "7900" },
      sql: [
        runRow(bad, "tiny-demo", "failed", "2026-11-22 10:00:00", "2026-11-22 10:01:30"),
        stepRow(bad, "train-sft", "failed", "2026-11-22 10:01:30"),
        // No final scalars (the step died): the last streamed point is the final loss.
        metricRows(bad, "train-sft", [["loss", 0, 3.0], ["loss", 2, 2.5], ["loss", 1, 2.75]]),
      ],
    });

    const rows = await mergeExports(root);
    assert.deepEqual(
      rows.map((
        r,
      ) => [r.recipe, r.runner, r.adapter, r.status, r.tokensPerS, r.loss, r.evalLoss, r.seconds, r.runId]),
      [
        [
          "tiny-demo",
          "self-hosted, linux, amd",
          "amd rdna3 7900",
          "failed (exit 3)",
          null,
          2.5,
          null,
          90,
          bad,
        ],
        ["tiny-demo", "self-hosted, linux, nvidia", "NVIDIA L4", "success", 950.5, 0.7, 1.3, 123.44, good],
      ],
    );
    assert.deepEqual(rows.map((r) => r.notes), [[], []]);
  });
});

Deno.test("mergeExports() keeps only the newest attempt of a leg that was re-run", async () => {
  await withTempDir(async (root) => {
    for (const [attempt, exitCode] of [[1, 1], [3, 0], [2, 1]]) {
      const id = `20261122-10000${attempt}-qwen2-lora-000${attempt}`;
      await writeLeg(root, `lathe-qwen2-lora-nvidia-${attempt}`, {
        leg: { recipe: "qwen2-lora", runner: NVIDIA, attempt, exitCode, seconds: attempt },
        sql: [
          runRow(
            id,
            "qwen2-lora",
            exitCode === 0 ? "success" : "failed",
            "2026-11-22 10:00:00",
            "2026-11-22 10:00:01",
          ),
        ],
      });
    }
    const rows = await mergeExports(root);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].attempt, 3);
    assert.equal(rows[0].status, "success");
    assert.equal(rows[0].runId, "20261122-100003-qwen2-lora-0003");
  });
});

Deno.test("mergeExports() lines up legs whose exports have different columns (union_by_name)", async () => {
  await withTempDir(async (root) => {
    await writeLeg(root, "current", {
      leg: { recipe: "tiny-demo", runner: NVIDIA, attempt: 1, exitCode: 0, seconds: 10 },
      sql: [
        runRow("r-new", "tiny-demo", "success", "2026-11-22 10:00:00", "2026-11-22 10:00:10"),
        stepRow("r-new", "train-sft", "success", "2026-11-22 10:00:10"),
        metricRows("r-new", "train-sft", [["tokens_per_s", null, 100]]),
      ],
    });
    // An older exporter: fewer columns, in another order, and no steps.parquet at all.
    const old = join(root, "older");
    await Deno.mkdir(old);
    await Deno.writeTextFile(
      join(old, "leg.json"),
      JSON.stringify({ recipe: "tiny-demo", runner: "macos-apple", attempt: 1, exitCode: 0, seconds: 20 }),
    );
    await withMemoryDb(async (conn) => {
      await conn.run(
        `COPY (SELECT 'success' AS status, 'r-old' AS run_id, TIMESTAMP '2026-11-20 09:00:00' AS started_at)
        TO '${join(old, "runs.parquet")}' (FORMAT parquet)`,
      );
      await conn.run(
        `COPY (SELECT 'r-old' AS run_id, 'train-sft' AS step, 'train_loss' AS name, 4 AS step_index, 0.5 AS value)
        TO '${join(old, "metrics.parquet")}' (FORMAT parquet)`,
      );
    });

    const rows = await mergeExports(root);
    assert.deepEqual(
      rows.map((r) => [r.runner, r.status, r.tokensPerS, r.loss, r.runId]),
      [
        ["macos-apple", "success", null, 0.5, "r-old"],
        ["self-hosted, linux, nvidia", "success", 100, null, "r-new"],
      ],
    );
  });
});

Deno.test("mergeExports() gives a matrix leg that uploaded nothing a 'no result' row, in matrix order", async () => {
  await withTempDir(async (root) => {
    await writeLeg(root, "a", {
      leg: { recipe: "llama3-qlora", runner: AMD, attempt: 1, exitCode: 0, seconds: 5 },
      sql: [runRow("r1", "llama3-qlora", "success", "2026-11-22 10:00:00", "2026-11-22 10:00:05")],
    });
    const rows = await mergeExports(root, { recipes: ["tiny-demo", "llama3-qlora"], runners: [NVIDIA, AMD] });
    assert.deepEqual(
      rows.map((r) => [r.recipe, r.runner, r.status]),
      [
        ["tiny-demo", "self-hosted, linux, nvidia", "no result"],
        ["tiny-demo", "self-hosted, linux, amd", "no result"],
        ["llama3-qlora", "self-hosted, linux, nvidia", "no result"],
        ["llama3-qlora", "self-hosted, linux, amd", "success"],
      ],
    );
    assert.match(rows[0].notes[0], /uploaded nothing/);
  });
});

Deno.test("mergeExports() names a leg without leg.json by its directory and says what is missing", async () => {
  await withTempDir(async (root) => {
    await writeLeg(root, "lathe-mystery-leg", {
      sql: [runRow("r9", "mistral-qlora", "failed", "2026-11-22 10:00:00", "2026-11-22 10:00:05")],
    });
    await writeLeg(root, "lathe-broken-leg", {});
    await Deno.writeTextFile(join(root, "lathe-broken-leg", "leg.json"), '{"recipe": "x", "attempt": 0}');
    const rows = await mergeExports(root);
    assert.deepEqual(
      rows.map((r) => [r.recipe, r.runner, r.status, r.seconds]),
      [["lathe-broken-leg", "lathe-broken-leg", "no result", null], [
        "mistral-qlora",
        "lathe-mystery-leg",
        "failed",
        5,
      ]],
    );
    assert.match(rows[0].notes.join("\n"), /lathe-broken-leg\/leg\.json is not a leg description \(runner: /);
    assert.match(rows[0].notes.join("\n"), /lathe-broken-leg exported no runs/);
    assert.deepEqual(rows[1].notes, ["lathe-mystery-leg/leg.json is missing"]);
  });
});

Deno.test("renderSummary() escapes pipes, right-aligns numbers and pivots tokens/s by runner", () => {
  const base = { adapter: null, evalLoss: null, seconds: null, runId: null, attempt: 1, notes: [] };
  const markdown = renderSummary([
    {
      ...base,
      recipe: "tiny-demo",
      runner: "a|b",
      status: "success",
      tokensPerS: 1234.5678,
      loss: 1.25,
      seconds: 61.26,
      runId: "r1",
    },
    {
      ...base,
      recipe: "tiny-demo",
      runner: "c",
      status: "failed (exit 1)",
      tokensPerS: null,
      loss: null,
      notes: ["c: x|y"],
    },
  ]);
  const lines = markdown.split("\n");
  assert.equal(lines[0], "## GPU matrix");
  assert.equal(
    lines[2],
    "| recipe | runner | adapter | status | tokens/s | final loss | eval loss | seconds | run |",
  );
  assert.equal(lines[3], "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |");
  assert.equal(lines[4], "| tiny-demo | a\\|b | – | success | 1234.57 | 1.25 | – | 61.3 | `r1` |");
  assert.equal(lines[5], "| tiny-demo | c | – | failed (exit 1) | – | – | – | – | – |");
  assert.ok(
    markdown.includes(
      "### tokens/s by runner\n\n| recipe | a\\|b | c |\n| --- | ---: | ---: |\n| tiny-demo | 1234.57 | – |",
    ),
  );
  assert.ok(markdown.includes("### Notes\n\n- c: x\\|y"));
  assert.equal(renderSummary([]), "## GPU matrix\n\nNo leg uploaded any result.\n");
});

const SCRIPT = resolve(import.meta.dirname!, "../../scripts/merge_exports.ts");

async function runScript(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("merge_exports.ts appends the table to --summary and rejects a malformed --runners", async () => {
  await withTempDir(async (root) => {
    const legs = join(root, "legs");
    await writeLeg(legs, "one", {
      leg: { recipe: "tiny-demo", runner: NVIDIA, attempt: 1, exitCode: 0, seconds: 7 },
      sql: [runRow("r1", "tiny-demo", "success", "2026-11-22 10:00:00", "2026-11-22 10:00:07")],
    });
    const summary = join(root, "summary.md");
    await Deno.writeTextFile(summary, "earlier step\n");
    const ok = await runScript([
      "--in",
      legs,
      "--summary",
      summary,
      "--recipes",
      '["tiny-demo"]',
      "--runners",
      JSON.stringify([NVIDIA]),
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    const text = await Deno.readTextFile(summary);
    assert.ok(text.startsWith("earlier step\n## GPU matrix\n"), text);
    assert.match(
      text,
      /\| tiny-demo \| self-hosted, linux, nvidia \| – \| success \| – \| – \| – \| 7 \| `r1` \|/,
    );

    const bad = await runScript(["--in", legs, "--runners", '{"nvidia": 1}']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /error: Cannot read --runners: .* is not a list of the expected shape/);
    assert.doesNotMatch(bad.stderr, /\n\s+at /, "an input mistake prints no stack trace");

    const missing = await runScript(["--in", join(root, "nope")]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /error: Cannot merge exports: ".*nope" does not exist/);
  });
});
