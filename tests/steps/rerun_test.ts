import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { readManifest } from "../../foundation/manifest.ts";
import { parseOverride } from "../../steps/overrides.ts";
import { rerunFromManifest } from "../../steps/rerun.ts";
import { runStep } from "../../steps/runner.ts";
import type { StepDef } from "../../steps/define.ts";
import { calls, emit, failing, flaky, loadToyStep, read, sandbox, snapshot, upper } from "./_toy_steps.ts";

async function run(def: unknown, root: string, runs: string, runId: string, config: unknown = {}) {
  return await runStep(def as StepDef, {
    runsRoot: runs,
    runId,
    recipe: "toy",
    config,
    seed: 42,
    projectRoot: root,
    quiet: true,
  });
}

const rerunOpts = (root: string, overrides: string[] = [], seed?: number) => ({
  overrides: overrides.map(parseOverride),
  seed,
  projectRoot: root,
  quiet: true,
  loadStep: loadToyStep,
});

async function runDirs(runs: string): Promise<string[]> {
  const names = [];
  for await (const e of Deno.readDir(runs)) names.push(e.name);
  return names.sort();
}

Deno.test("rerunFromManifest() recomputes the step in place with byte-identical outputs", async () => {
  await using box = await sandbox();
  await run(emit, box.root, box.runs, "r1", { text: "x" });
  const first = await run(upper, box.root, box.runs, "r1", { suffix: "?" });
  const before = await Deno.readFile(join(box.runs, "r1", "upper", "sub", "upper.txt"));
  const again = await rerunFromManifest(first.manifestPath, rerunOpts(box.root));
  assert.equal(again.status, "ran");
  assert.equal(calls.upper, 2);
  assert.equal(again.manifestPath, first.manifestPath);
  assert.deepEqual(again.manifest.config, first.manifest.config);
  assert.equal(again.manifest.key, first.manifest.key);
  assert.deepEqual(again.manifest.outputs, first.manifest.outputs);
  assert.deepEqual(await Deno.readFile(join(box.runs, "r1", "upper", "sub", "upper.txt")), before);
  assert.deepEqual(await runDirs(box.runs), ["r1"]);
});

Deno.test("rerunFromManifest() names the source file that changed since the manifest", async () => {
  await using box = await sandbox();
  const data = join(box.root, "data.txt");
  await Deno.writeTextFile(data, "a\n");
  const first = await run(read, box.root, box.runs, "r1", { file: "data.txt" });
  await Deno.writeTextFile(data, "a\nb\n");
  const error = await rerunFromManifest(first.manifestPath, rerunOpts(box.root)).catch((e) => e);
  assert.ok(error instanceof LatheError, String(error));
  assert.match(error.message, /Cannot rerun step "read": source "data"/);
  assert.ok(error.message.includes(data), error.message);
  assert.equal(calls.read, 1);
  assert.equal((await readManifest(first.manifestPath)).sources.data.bytes, 2, "the manifest is untouched");
});

Deno.test("rerunFromManifest() names the upstream output that changed since the manifest", async () => {
  await using box = await sandbox();
  await run(emit, box.root, box.runs, "r1");
  const first = await run(upper, box.root, box.runs, "r1");
  const out = join(box.runs, "r1", "emit", "out.txt");
  await Deno.writeTextFile(out, "edited\n");
  const error = await rerunFromManifest(first.manifestPath, rerunOpts(box.root)).catch((e) => e);
  assert.ok(error instanceof LatheError, String(error));
  assert.match(error.message, /input "text" from step "emit" changed/);
  assert.ok(error.message.includes(out), error.message);
  assert.equal(calls.upper, 1);
});

Deno.test("rerunFromManifest() refuses an upstream that was recomputed with another key", async () => {
  await using box = await sandbox();
  await run(emit, box.root, box.runs, "r1");
  const first = await run(upper, box.root, box.runs, "r1");
  await run(emit, box.root, box.runs, "r1", { text: "other" });
  await assert.rejects(
    rerunFromManifest(first.manifestPath, rerunOpts(box.root)),
    (e: Error) => e instanceof LatheError && /input "text" .* is not the one it was run with/.test(e.message),
  );
});

Deno.test("rerunFromManifest() with --set branches a variant run, links the upstream and leaves the original untouched", async () => {
  await using box = await sandbox();
  await run(emit, box.root, box.runs, "r1");
  await run(upper, box.root, box.runs, "r1");
  const first = await run(flaky, box.root, box.runs, "r1");
  const before = await snapshot(join(box.runs, "r1"));

  const variant = await rerunFromManifest(first.manifestPath, rerunOpts(box.root, ["label=variant"]));
  assert.equal(variant.status, "ran");
  const id = variant.manifest.runId;
  assert.notEqual(id, "r1");
  assert.equal(variant.manifestPath, join(box.runs, id, "flaky", "manifest.json"));
  assert.deepEqual(variant.manifest.config, { label: "variant" });
  assert.equal(variant.manifest.recipe, "toy");
  assert.match(await Deno.readTextFile(join(box.runs, id, "flaky", "copy.txt")), /^variant: HELLO/);
  assert.deepEqual(calls, { emit: 1, upper: 1, flaky: 2 });

  for (const [step, file] of [["emit", "out.txt"], ["upper", "sub/upper.txt"]]) {
    const a = await Deno.stat(join(box.runs, "r1", step, file));
    const b = await Deno.stat(join(box.runs, id, step, file));
    assert.equal(a.ino, b.ino, `${step} is linked, not copied`);
    const linked = await readManifest(join(box.runs, id, step, "manifest.json"));
    assert.equal(linked.runId, id, `${step}'s manifest names the run it lies in`);
    assert.equal(linked.cachedFrom, "r1");
  }
  const after = await snapshot(join(box.runs, "r1"));
  assert.deepEqual([...after.keys()].sort(), [...before.keys()].sort());
  for (const [name, bytes] of before) assert.deepEqual(after.get(name), bytes, name);

  // A linked upstream step of the variant can itself be rerun from its manifest.
  const upstream = await rerunFromManifest(join(box.runs, id, "upper", "manifest.json"), rerunOpts(box.root));
  assert.equal(upstream.status, "ran");
  assert.equal(upstream.manifest.key, variant.manifest.inputs.upper.key);
});

Deno.test("rerunFromManifest() with another seed branches a variant run", async () => {
  await using box = await sandbox();
  await run(emit, box.root, box.runs, "r1");
  const first = await run(upper, box.root, box.runs, "r1");
  const variant = await rerunFromManifest(first.manifestPath, rerunOpts(box.root, [], 7));
  assert.notEqual(variant.manifest.runId, "r1");
  assert.equal(variant.manifest.seed, 7);
  assert.notEqual(variant.manifest.key, first.manifest.key);
  assert.match(
    await Deno.readTextFile(join(box.runs, variant.manifest.runId, "upper", "sub", "upper.txt")),
    /!0007/,
  );
  assert.equal((await readManifest(first.manifestPath)).seed, 42);
});

Deno.test("rerunFromManifest() retries a failed step from its failure.json", async () => {
  await using box = await sandbox();
  await run(emit, box.root, box.runs, "r1");
  await run(upper, box.root, box.runs, "r1");
  failing.add("flaky");
  await assert.rejects(run(flaky, box.root, box.runs, "r1"), /on purpose/);
  failing.clear();
  const retried = await rerunFromManifest(join(box.runs, "r1", "flaky", "failure.json"), rerunOpts(box.root));
  assert.equal(retried.status, "ran");
  assert.deepEqual([...(await snapshot(join(box.runs, "r1", "flaky"))).keys()].sort(), [
    "copy.txt",
    "manifest.json",
    "metrics.jsonl",
  ]);
});
