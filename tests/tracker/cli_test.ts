import assert from "node:assert/strict";
import { LatheError } from "../../foundation/errors.ts";
import { runs, withRoot } from "./_cli.ts";
import { RUN_A, RUN_B, RUN_C, writeStandardRuns } from "./_fixtures.ts";

/** Splits an aligned table into rows of cells (columns separated by two or more spaces). */
function cells(table: string): string[][] {
  return table.split("\n").map((l) => l.trim().split(/\s{2,}/));
}

Deno.test("runs ls lists runs newest first with status, steps, start, duration and commit", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const rows = cells(await runs(root, "ls"));
    assert.deepEqual(rows[0], ["run id", "recipe", "status", "steps", "started", "duration", "commit"]);
    assert.deepEqual(rows.slice(2), [
      [RUN_C, "tiny-dpo", "failed", "2 (1 failed)", "2026-11-23 09:00:00", "5s", "01234567"],
      [RUN_B, "tiny-demo", "success", "3 (1 cached)", "2026-11-22 11:00:00", "1m44s", "01234567 dirty"],
      [RUN_A, "tiny-demo", "success", "3", "2026-11-22 10:00:00", "1m15s", "01234567"],
    ]);
  });
});

Deno.test("runs ls --recipe filters and --limit cuts the list with a note", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const out = await runs(root, "ls", "--recipe", "tiny-demo", "--limit", "1");
    const lines = out.split("\n");
    assert.equal(lines.length, 4);
    assert.match(lines[2], new RegExp(`^${RUN_B} `));
    assert.equal(lines[3], "(1 of 2 runs; --limit shows more)");
    await assert.rejects(
      runs(root, "ls", "--limit", "0"),
      /Cannot use --limit "0": expected a positive integer/,
    );
  });
});

Deno.test("runs show accepts a unique prefix and prints steps, errors, final metrics and artifacts", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const out = await runs(root, "show", "20261123");
    assert.match(out, new RegExp(`^run +${RUN_C}$`, "m"));
    assert.match(out, /^status +failed \(2 steps\)$/m);
    assert.match(out, /^train-dpo +failed +- +3\.0 +[0-9a-f]{12}/m);
    assert.match(out, /^error in train-dpo: Cannot allocate "embed_tokens": out of memory$/m);
    const b = await runs(root, "show", RUN_B);
    assert.match(b, new RegExp(`^prepare +success +${RUN_A} +0\\.0 `, "m"));
    assert.match(b, /^train-sft +loss +0\.9$/m);
    assert.match(b, /^eval +verdict +better$/m);
    assert.match(b, /^train-sft +adapter +adapter_model\.safetensors +9 B +[0-9a-f]{12}$/m);
  });
});

Deno.test("runs show with an ambiguous prefix lists the matching runs", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    await assert.rejects(runs(root, "show", "20261122"), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(error.message, /^Cannot choose a run for "20261122": it is the prefix of 2 runs:/);
      assert.ok(error.message.includes(`  ${RUN_A}`) && error.message.includes(`  ${RUN_B}`));
      assert.ok(!error.message.includes(RUN_C));
      return true;
    });
  });
});

Deno.test("runs show with an unknown id is an error listing candidates", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    await assert.rejects(runs(root, "show", "tiny-dpo"), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(
        error.message,
        /^Cannot find run "tiny-dpo": no run id starts with it; run ids that contain it:/,
      );
      assert.ok(error.message.includes(RUN_C));
      assert.match(error.hint ?? "", /runs ls/);
      return true;
    });
    await assert.rejects(runs(root, "show", "1999"), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(error.message, /^Cannot find run "1999": no run id starts with it; the latest runs:/);
      assert.ok([RUN_A, RUN_B, RUN_C].every((id) => error.message.includes(id)));
      return true;
    });
  });
});

Deno.test("runs compare shows only the config keys that differ, and final metrics with deltas", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const out = await runs(root, "compare", "20261122-10", "20261122-11");
    const section = (title: string) => {
      const start = out.indexOf(`\n${title}\n`);
      assert.ok(start >= 0, `no section "${title}" in:\n${out}`);
      const rest = out.slice(start + title.length + 2);
      const end = rest.indexOf("\n\n");
      return cells(end < 0 ? rest : rest.slice(0, end));
    };
    assert.match(out, /^identical steps \(same key\): prepare, eval$/m);
    assert.deepEqual(section("config differences").slice(2), [
      ["train-sft", "lora.r", "8", "16"],
      ["train-sft", "lr", "0.0002", "0.0001"],
    ]);
    const metrics = section("final metrics").slice(2);
    assert.deepEqual(metrics.find((r) => r[1] === "loss"), ["train-sft", "loss", "1.2", "0.9", "-0.3"]);
    assert.deepEqual(metrics.find((r) => r[1] === "eval_loss"), [
      "eval",
      "eval_loss",
      "1.5",
      "1.25",
      "-0.25",
    ]);
    assert.deepEqual(metrics.find((r) => r[1] === "verdict"), ["eval", "verdict", "ok", "better", "-"]);
    assert.deepEqual(section("run").slice(2), [["git_dirty", "false", "true"]]);
  });
});

Deno.test("runs compare names the steps only one run has", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const out = await runs(root, "compare", RUN_A, RUN_C);
    assert.match(out, /^steps only in a: train-sft, eval$/m);
    assert.match(out, /^steps only in b: train-dpo$/m);
    assert.match(out, /^prepare +format +messages +preference$/m);
  });
});

Deno.test("runs sql prints any query as a table, as JSON or as CSV", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const q = "SELECT run_id, loss, eval_loss FROM run_summary ORDER BY run_id";
    const table = cells(await runs(root, "sql", q));
    assert.deepEqual(table[0], ["run_id", "loss", "eval_loss"]);
    assert.deepEqual(table.slice(2), [
      [RUN_A, "1.2", "1.5"],
      [RUN_B, "0.9", "1.25"],
      [RUN_C, "NULL", "NULL"],
      ["(3 rows)"],
    ]);
    const json = JSON.parse(await runs(root, "sql", q, "--json"));
    assert.deepEqual(json[1], { run_id: RUN_B, loss: 0.9, eval_loss: 1.25 });
    const csv = await runs(root, "sql", "SELECT 'a,b' AS x, 'say \"hi\"' AS y, NULL AS z", "--csv");
    assert.equal(csv, 'x,y,z\r\n"a,b","say ""hi""",');
  });
});

Deno.test("runs sql reports a bad query and a write as LatheErrors", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    await assert.rejects(runs(root, "sql", "SELEKT 1"), /^LatheError: Cannot run query: Parser Error/);
    await assert.rejects(runs(root, "sql", "DELETE FROM runs"), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(error.hint ?? "", /read-only/);
      return true;
    });
  });
});

Deno.test("runs with an unknown command or wrong arguments is a clear error", async () => {
  await withRoot(async (root) => {
    await assert.rejects(runs(root, "lsit"), /Cannot run "runs lsit": unknown command; known: ls, show/);
    await assert.rejects(runs(root, "show"), /Cannot run "runs show": it takes <id>, got none/);
    await assert.rejects(runs(root, "ls", "--bogus"), /Cannot parse the arguments: .*--bogus/);
    assert.match(await runs(root, "--help"), /^usage: deno task runs <command>/);
  });
});

Deno.test("runs ls on an empty runs root says so", async () => {
  await withRoot(async (root) => {
    assert.match(await runs(root, "ls"), /^no runs in the index \(runs root: /);
  });
});
