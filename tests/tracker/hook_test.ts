import assert from "node:assert/strict";
import { join } from "node:path";
import * as z from "zod";
import { defineStep } from "../../steps/define.ts";
import { runStep } from "../../steps/runner.ts";
import { queryRows } from "../../tracker/db.ts";
import { trackerHook } from "../../tracker/hook.ts";
import { readIndex } from "../../tracker/index.ts";
import { writeStep } from "./_fixtures.ts";

/** Runs `body` with a temp runs root, LATHE_DB and LATHE_NO_TRACKER unset, and stderr captured. */
async function withHookEnv(body: (root: string, errors: string[]) => Promise<void>): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  const saved = { db: Deno.env.get("LATHE_DB"), off: Deno.env.get("LATHE_NO_TRACKER") };
  Deno.env.delete("LATHE_DB");
  Deno.env.delete("LATHE_NO_TRACKER");
  const errors: string[] = [];
  const consoleError = console.error;
  console.error = (...args: unknown[]) => errors.push(args.map(String).join(" "));
  try {
    await body(root, errors);
  } finally {
    console.error = consoleError;
    if (saved.db !== undefined) Deno.env.set("LATHE_DB", saved.db);
    if (saved.off !== undefined) Deno.env.set("LATHE_NO_TRACKER", saved.off);
    else Deno.env.delete("LATHE_NO_TRACKER");
    await Deno.remove(root, { recursive: true });
  }
}

Deno.test("trackerHook() indexes a manifest into <runs>/lathe.duckdb", async () => {
  await withHookEnv(async (root, errors) => {
    const { path, manifest } = await writeStep(root, {
      runId: "20261122-100000-hook-abcd",
      step: "train-sft",
      points: [{ name: "loss", step: 0, value: 2 }],
      metrics: { loss: 2 },
    });
    await trackerHook(root)(path, manifest);
    assert.deepEqual(errors, []);
    const rows = await readIndex(
      join(root, "lathe.duckdb"),
      root,
      (conn) => queryRows(conn, "SELECT step, status, manifest_path FROM steps"),
    );
    assert.deepEqual(rows, [{
      step: "train-sft",
      status: "success",
      manifest_path: "20261122-100000-hook-abcd/train-sft/manifest.json",
    }]);
  });
});

Deno.test("trackerHook() prints one warning line and resolves when the index cannot be written", async () => {
  await withHookEnv(async (root, errors) => {
    const { path, manifest } = await writeStep(root, { runId: "20261122-100000-hook-abcd", step: "prepare" });
    await Deno.writeTextFile(join(root, "lathe.duckdb"), "this is not a database ".repeat(200));
    await trackerHook(root)(path, manifest);
    assert.equal(errors.length, 1);
    assert.match(
      errors[0],
      /^warning: run not indexed \(Cannot open the run index ".*"\: .*\); `deno task runs reindex` rebuilds the index$/,
    );
  });
});

Deno.test("LATHE_NO_TRACKER=1 makes trackerHook() skip indexing", async () => {
  await withHookEnv(async (root, errors) => {
    const { path, manifest } = await writeStep(root, { runId: "20261122-100000-hook-abcd", step: "prepare" });
    Deno.env.set("LATHE_NO_TRACKER", "1");
    await trackerHook(root)(path, manifest);
    assert.deepEqual(errors, []);
    await assert.rejects(Deno.stat(join(root, "lathe.duckdb")), Deno.errors.NotFound);
  });
});

Deno.test("runStep() with trackerHook indexes the step, its logged points and its failure", async () => {
  await withHookEnv(async (root, errors) => {
    const step = defineStep({
      name: "count",
      version: "1",
      description: "logs a falling loss, fails when asked",
      config: z.strictObject({ n: z.number().int().default(5), fail: z.boolean().default(false) }),
      inputs: {},
      run: async (ctx, config) => {
        for (let i = 0; i < config.n; i++) ctx.log("loss", i, 1 / (i + 1));
        if (config.fail) throw new Error("asked to fail");
        await Deno.writeTextFile(await ctx.out("n.txt"), String(config.n));
        return { outputs: { n: "n.txt" }, metrics: { loss: 1 / config.n } };
      },
    });
    const common = {
      runsRoot: root,
      recipe: "test",
      seed: 1,
      projectRoot: root,
      quiet: true,
      onFinish: trackerHook(root),
    };
    await runStep(step, { ...common, runId: "20261122-100000-ok-0001", config: { n: 5 } });
    await assert.rejects(
      runStep(step, { ...common, runId: "20261122-100000-bad-0002", config: { fail: true } }),
    );
    assert.deepEqual(errors, []);
    await readIndex(join(root, "lathe.duckdb"), root, async (conn) => {
      const runs = await queryRows(conn, "SELECT run_id, status FROM runs ORDER BY run_id");
      assert.deepEqual(runs, [
        { run_id: "20261122-100000-bad-0002", status: "failed" },
        { run_id: "20261122-100000-ok-0001", status: "success" },
      ]);
      const points = await queryRows(
        conn,
        "SELECT step_index, value FROM metrics WHERE run_id = '20261122-100000-ok-0001' AND step_index IS NOT NULL ORDER BY step_index",
      );
      assert.deepEqual(points.map((p) => p.value), [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]);
      const artifacts = await queryRows(conn, "SELECT name FROM artifacts ORDER BY name");
      assert.deepEqual(artifacts.map((a) => a.name), ["metrics_log", "n"]);
      const [failed] = await queryRows(
        conn,
        "SELECT error, manifest_path FROM steps WHERE run_id = '20261122-100000-bad-0002'",
      );
      assert.deepEqual(failed, {
        error: "asked to fail",
        manifest_path: "20261122-100000-bad-0002/count/failure.json",
      });
    });
  });
});
