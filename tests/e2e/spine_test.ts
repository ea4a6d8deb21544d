/**
 * End to end through the real programs (the training step is left out with `--only`: it is
 * covered by tests/steps/train_sft_test.ts and by `deno task demo`) (`deno task recipe`, `step`, `runs`) on the shipped
 * demo data: what a user does, in separate processes, against a temp runs root.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { readManifest } from "../../foundation/manifest.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

async function lathe(
  program: string,
  args: string[],
  env: Record<string, string>,
): Promise<{ code: number; out: string; err: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, program), ...args],
    cwd: ROOT,
    env: { LATHE_QUIET: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, out: dec.decode(out.stdout), err: dec.decode(out.stderr) };
}

async function sql(env: Record<string, string>, query: string): Promise<Record<string, unknown>[]> {
  const r = await lathe("tracker/cli.ts", ["sql", query, "--json"], env);
  assert.equal(r.code, 0, r.err);
  return JSON.parse(r.out);
}

Deno.test("two recipes started at the same moment both land in the index, and reindex restores every row", async () => {
  const runs = await Deno.makeTempDir({ prefix: "lathe-e2e-" });
  const env = { LATHE_RUNS: runs };
  try {
    const [a, b] = await Promise.all([
      lathe("cli/recipe.ts", ["tiny-demo", "--only", "tokenize"], env),
      lathe("cli/recipe.ts", ["tiny-demo", "--only", "tokenize", "--set", "tokenize.max_seq_len=128"], env),
    ]);
    assert.equal(a.code, 0, a.err);
    assert.equal(b.code, 0, b.err);
    const ls = await lathe("tracker/cli.ts", ["ls"], env);
    assert.equal(ls.code, 0, ls.err);
    const ids = [a.out, b.out].map((o) => o.match(/^run\s+(\S+)$/m)?.[1]);
    for (const id of ids) {
      assert.ok(id, "the recipe printed its run id");
      assert.ok(ls.out.includes(id), `runs ls lists ${id}:\n${ls.out}`);
    }
    const dump = "select run_id, step, status, key, config_hash from steps order by run_id, step";
    const before = await sql(env, dump);
    assert.equal(before.length, 4);
    const metricsBefore = await sql(env, "select count(*) as n from metrics");

    await Deno.remove(join(runs, "lathe.duckdb"));
    const re = await lathe("tracker/cli.ts", ["reindex"], env);
    assert.equal(re.code, 0, re.err);
    assert.deepEqual(await sql(env, dump), before);
    assert.deepEqual(await sql(env, "select count(*) as n from metrics"), metricsBefore);
  } finally {
    await Deno.remove(runs, { recursive: true });
  }
});

Deno.test("rerunning tokenize from its manifest rewrites byte-identical outputs", async () => {
  const runs = await Deno.makeTempDir({ prefix: "lathe-e2e-" });
  const env = { LATHE_RUNS: runs, LATHE_NO_TRACKER: "1" };
  try {
    const r = await lathe("cli/recipe.ts", ["tiny-demo", "--only", "tokenize"], env);
    assert.equal(r.code, 0, r.err);
    const id = r.out.match(/^run\s+(\S+)$/m)![1];
    const path = join(runs, id, "tokenize", "manifest.json");
    const first = await readManifest(path);
    const again = await lathe("cli/step.ts", ["tokenize", "--manifest", path], env);
    assert.equal(again.code, 0, again.err);
    assert.match(again.out, /tokenize\s+ran in/);
    const second = await readManifest(path);
    assert.notEqual(second.startedAt, first.startedAt, "the step really ran again");
    assert.deepEqual(second.outputs, first.outputs);
    assert.equal(second.key, first.key);
  } finally {
    await Deno.remove(runs, { recursive: true });
  }
});

Deno.test("a malformed JSONL line makes the recipe exit 1 naming file and line, without a stack trace", async () => {
  const runs = await Deno.makeTempDir({ prefix: "lathe-e2e-" });
  const data = await Deno.makeTempDir({ prefix: "lathe-e2e-data-" });
  const env = { LATHE_RUNS: runs, LATHE_NO_TRACKER: "1" };
  try {
    const good = (await Deno.readTextFile(join(ROOT, "data/demo/sft.jsonl"))).split("\n").slice(0, 20);
    good.splice(6, 0, '{"messages": [{"role": "user", "content": "unterminated"}');
    const file = join(data, "broken.jsonl");
    await Deno.writeTextFile(file, good.join("\n") + "\n");
    const r = await lathe("cli/recipe.ts", [
      "tiny-demo",
      "--only",
      "prepare",
      "--set",
      `prepare.sources=[${file}]`,
    ], env);
    assert.equal(r.code, 1, r.out + r.err);
    assert.match(r.err, new RegExp(`error: Cannot prepare "${file.replaceAll("/", "\\/")}:7"`));
    assert.doesNotMatch(r.err, /\n\s+at /, "no stack trace");
    const id = r.out.match(/run\s+(\d{8}-\d{6}-tiny-demo-[0-9a-f]{4})/)?.[1] ??
      [...Deno.readDirSync(runs)].find((e) => e.isDirectory)!.name;
    const stepDir = join(runs, id, "prepare");
    const names = [...Deno.readDirSync(stepDir)].map((e) => e.name);
    assert.deepEqual(names, ["failure.json"], "no manifest claims success");
  } finally {
    await Deno.remove(runs, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
});
