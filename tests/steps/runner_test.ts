import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { Manifest, readManifest } from "../../foundation/manifest.ts";
import { findCacheHit, planStep, type RunOptions, runStep } from "../../steps/runner.ts";
import type { StepDef } from "../../steps/define.ts";
import { calls, emit, failing, flaky, read, sandbox, snapshot, upper } from "./_toy_steps.ts";

const sha = (data: string | Uint8Array) => createHash("sha256").update(data).digest("hex");

function opts(
  root: string,
  runs: string,
  runId: string,
  config: unknown = {},
  extra: Partial<RunOptions> = {},
) {
  return { runsRoot: runs, runId, recipe: null, config, seed: 42, projectRoot: root, quiet: true, ...extra };
}

async function git(cwd: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command("git", { args, cwd, stdout: "piped", stderr: "piped" }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return new TextDecoder().decode(out.stdout).trim();
}

async function runChain(root: string, runs: string, runId: string, extra: Partial<RunOptions> = {}) {
  const a = await runStep(emit as StepDef, opts(root, runs, runId, {}, extra));
  const b = await runStep(upper as StepDef, opts(root, runs, runId, {}, extra));
  const c = await runStep(flaky as StepDef, opts(root, runs, runId, {}, extra));
  return [a.status, b.status, c.status];
}

Deno.test("runStep() writes a manifest with defaults, hashes, key, outputs, git and env that the schema accepts", async () => {
  await using box = await sandbox();
  await Deno.writeTextFile(join(box.root, "deno.lock"), '{"version":"5"}\n');
  await Deno.writeTextFile(join(box.root, ".gitignore"), "runs/\n");
  await git(box.root, "init", "-q");
  await git(box.root, "add", ".");
  await git(box.root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "init");
  const head = await git(box.root, "rev-parse", "HEAD");

  const outcome = await runStep(emit as StepDef, opts(box.root, box.runs, "r1", { text: "hi" }));
  assert.equal(outcome.status, "ran");
  assert.equal(outcome.manifestPath, join(box.runs, "r1", "emit", "manifest.json"));
  const onDisk = JSON.parse(await Deno.readTextFile(outcome.manifestPath));
  const m = Manifest.parse(onDisk);
  assert.deepEqual(m, outcome.manifest);

  assert.deepEqual(m.config, { text: "hi", repeat: 2 });
  assert.equal(m.configHash, sha('{"repeat":2,"text":"hi"}'));
  assert.equal(
    m.key,
    sha(`{"configHash":"${m.configHash}","inputs":{},"seed":42,"sources":{},"step":"emit","version":"1"}`),
  );
  assert.equal(m.step, "emit");
  assert.equal(m.stepVersion, "1");
  assert.equal(m.runId, "r1");
  assert.equal(m.recipe, null);
  assert.equal(m.seed, 42);
  assert.equal(m.status, "success");
  assert.equal(m.error, null);
  assert.equal(m.cachedFrom, null);
  assert.deepEqual(m.metrics, { chars: 6 });
  assert.deepEqual(m.outputs.text, { path: "out.txt", sha256: sha("hi\nhi\n"), bytes: 6 });
  const log = await Deno.readFile(join(box.runs, "r1", "emit", "metrics.jsonl"));
  assert.deepEqual(m.outputs.metrics_log, { path: "metrics.jsonl", sha256: sha(log), bytes: log.length });
  assert.deepEqual(m.git, {
    commit: head,
    branch: await git(box.root, "rev-parse", "--abbrev-ref", "HEAD"),
    dirty: false,
    diffHash: null,
  });
  assert.equal(m.env.deno, Deno.version.deno);
  assert.equal(m.env.os, Deno.build.os);
  assert.equal(m.env.lockfileHash, sha('{"version":"5"}\n'));
  assert.equal(m.env.gpu, null);
  assert.ok(Date.parse(m.startedAt) <= Date.parse(m.finishedAt));

  const down = await runStep(upper as StepDef, opts(box.root, box.runs, "r1"));
  assert.deepEqual(down.manifest.inputs, {
    text: { step: "emit", manifest: "../emit/manifest.json", key: m.key },
  });
  assert.deepEqual(down.manifest.config, { suffix: "!", nested: { width: 4 } });
  assert.equal(down.manifest.outputs.upper.path, "sub/upper.txt");
  assert.equal(
    await Deno.readTextFile(join(box.runs, "r1", "upper", "sub", "upper.txt")),
    "HI\nHI\n!0042\n",
  );
});

Deno.test("runStep() records a source by project-relative path and hash", async () => {
  await using box = await sandbox();
  await Deno.writeTextFile(join(box.root, "data.txt"), "a\nb\nc\n");
  const { manifest } = await runStep(read as StepDef, opts(box.root, box.runs, "r1", { file: "data.txt" }));
  assert.deepEqual(manifest.sources, { data: { path: "data.txt", sha256: sha("a\nb\nc\n"), bytes: 6 } });
  assert.deepEqual(manifest.metrics, { lines: 3 });
});

Deno.test("a failing step leaves failure.json, no manifest.json and no staging directory", async () => {
  await using box = await sandbox();
  const seen: string[] = [];
  const onFinish = (path: string, m: Manifest) => Promise.resolve(void seen.push(`${m.status} ${path}`));
  await runStep(emit as StepDef, opts(box.root, box.runs, "r1"));
  await runStep(upper as StepDef, opts(box.root, box.runs, "r1"));
  failing.add("flaky");
  await assert.rejects(
    runStep(flaky as StepDef, opts(box.root, box.runs, "r1", {}, { onFinish })),
    /on purpose/,
  );
  const dir = join(box.runs, "r1", "flaky");
  assert.deepEqual([...(await snapshot(dir)).keys()], ["failure.json"]);
  const failure = Manifest.parse(JSON.parse(await Deno.readTextFile(join(dir, "failure.json"))));
  assert.equal(failure.status, "failed");
  assert.equal(failure.error, "flaky failed on purpose");
  assert.deepEqual(failure.outputs, {});
  assert.deepEqual(seen, [`failed ${join(dir, "failure.json")}`]);
  const left = [];
  for await (const e of Deno.readDir(join(box.runs, "r1"))) left.push(e.name);
  assert.deepEqual(left.sort(), ["emit", "flaky", "upper"]);
  assert.equal(await findCacheHit(box.runs, null, "flaky", failure.key), null);
});

Deno.test("a failed rerun in place leaves the earlier successful step byte-identical", async () => {
  await using box = await sandbox();
  await runChain(box.root, box.runs, "r1");
  const dir = join(box.runs, "r1", "flaky");
  const before = await snapshot(dir);
  failing.add("flaky");
  await assert.rejects(
    runStep(flaky as StepDef, opts(box.root, box.runs, "r1", {}, { force: true })),
    /on purpose/,
  );
  const after = await snapshot(dir);
  assert.deepEqual([...after.keys()].sort(), [...before.keys(), "failure.json"].sort());
  for (const [name, bytes] of before) assert.deepEqual(after.get(name), bytes, name);
  assert.equal((await readManifest(join(dir, "manifest.json"))).status, "success");

  failing.clear();
  assert.equal(
    (await runStep(flaky as StepDef, opts(box.root, box.runs, "r1", {}, { force: true }))).status,
    "ran",
  );
  assert.ok(!(await snapshot(dir)).has("failure.json"), "a later success replaces the failure record");
});

Deno.test("a killed step's staging directory claims nothing and the next run removes it", async () => {
  await using box = await sandbox();
  const done = await runStep(emit as StepDef, opts(box.root, box.runs, "donor"));
  // A run killed after writing its manifest into staging but before the swap: r1 has only leftovers.
  const r1 = join(box.runs, "r1");
  await Deno.mkdir(join(r1, ".emit.staging-deadbeef"), { recursive: true });
  await Deno.mkdir(join(r1, ".emit.old-cafebabe"), { recursive: true });
  await Deno.copyFile(
    join(box.runs, "donor", "emit", "out.txt"),
    join(r1, ".emit.staging-deadbeef", "out.txt"),
  );
  const claimed = { ...done.manifest, runId: "r1" };
  await Deno.writeTextFile(join(r1, ".emit.staging-deadbeef", "manifest.json"), JSON.stringify(claimed));
  await Deno.remove(join(box.runs, "donor"), { recursive: true });

  assert.equal(await findCacheHit(box.runs, "r1", "emit", done.manifest.key), null);
  assert.equal(await findCacheHit(box.runs, null, "emit", done.manifest.key), null);
  const outcome = await runStep(emit as StepDef, opts(box.root, box.runs, "r1"));
  assert.equal(outcome.status, "ran");
  assert.equal(calls.emit, 2);
  const left = [];
  for await (const e of Deno.readDir(r1)) left.push(e.name);
  assert.deepEqual(left, ["emit"]);
});

Deno.test("runStep() reuses an unchanged step: cached in the same run, linked into a new run", async () => {
  await using box = await sandbox();
  assert.deepEqual(await runChain(box.root, box.runs, "r1"), ["ran", "ran", "ran"]);
  assert.deepEqual(await runChain(box.root, box.runs, "r1"), ["cached", "cached", "cached"]);
  assert.deepEqual(await runChain(box.root, box.runs, "r2"), ["linked", "linked", "linked"]);
  assert.deepEqual(calls, { emit: 1, upper: 1, flaky: 1 });

  const m = await readManifest(join(box.runs, "r2", "upper", "manifest.json"));
  assert.equal(m.runId, "r2");
  assert.equal(m.cachedFrom, "r1");
  const a = await Deno.stat(join(box.runs, "r1", "upper", "sub", "upper.txt"));
  const b = await Deno.stat(join(box.runs, "r2", "upper", "sub", "upper.txt"));
  assert.equal(a.ino, b.ino, "linked outputs are hard links");
  assert.ok((b.nlink ?? 0) >= 2);
  // Linking from a linked run still names the run that computed the result.
  assert.deepEqual(await runChain(box.root, box.runs, "r3"), ["linked", "linked", "linked"]);
  assert.equal((await readManifest(join(box.runs, "r3", "upper", "manifest.json"))).cachedFrom, "r1");
  // The original manifest is not rewritten through the hard links.
  assert.equal((await readManifest(join(box.runs, "r1", "upper", "manifest.json"))).runId, "r1");
});

Deno.test("runStep() reruns a step whose config, seed, source or upstream changed, and when forced", async () => {
  await using box = await sandbox();
  await Deno.writeTextFile(join(box.root, "data.txt"), "a\n");
  await runChain(box.root, box.runs, "r1");
  const r = (def: unknown, runId: string, config: unknown = {}, extra: Partial<RunOptions> = {}) =>
    runStep(def as StepDef, opts(box.root, box.runs, runId, config, extra)).then((o) => o.status);

  assert.equal(await r(emit, "r2"), "linked");
  assert.equal(await r(upper, "r2", { suffix: "?" }), "ran", "config");
  assert.equal(await r(emit, "r3", {}, { seed: 7 }), "ran", "seed");
  assert.equal(await r(emit, "r4", { text: "other" }), "ran", "upstream config");
  assert.equal(await r(upper, "r4"), "ran", "upstream key");
  assert.equal(await r(emit, "r1", {}, { force: true }), "ran", "forced");
  assert.equal(await r(read, "r5", { file: "data.txt" }), "ran");
  assert.equal(await r(read, "r6", { file: "data.txt" }), "linked");
  await Deno.writeTextFile(join(box.root, "data.txt"), "a\nb\n");
  assert.equal(await r(read, "r5", { file: "data.txt" }), "ran", "source");
  assert.equal(await r(read, "r7", { file: "data.txt" }), "linked");
  assert.deepEqual(calls, { emit: 4, upper: 3, flaky: 1, read: 2 });
});

Deno.test("runStep() does not reuse a tampered output, in the same run or another", async () => {
  await using box = await sandbox();
  await runStep(emit as StepDef, opts(box.root, box.runs, "r1"));
  const out = join(box.runs, "r1", "emit", "out.txt");
  await Deno.writeTextFile(out, "tampered\n");
  assert.equal(
    await findCacheHit(
      box.runs,
      null,
      "emit",
      (await readManifest(join(box.runs, "r1", "emit", "manifest.json"))).key,
    ),
    null,
  );
  assert.equal((await runStep(emit as StepDef, opts(box.root, box.runs, "r2"))).status, "ran");
  // In r1 itself the tampered result is replaced by the intact one r2 computed.
  const again = await runStep(emit as StepDef, opts(box.root, box.runs, "r1"));
  assert.equal(again.status, "linked");
  assert.equal(again.manifest.cachedFrom, "r2");
  assert.equal(await Deno.readTextFile(out), "hello\nhello\n");
  assert.equal(calls.emit, 2);
});

Deno.test("planStep() computes runStep's key without running or writing anything", async () => {
  await using box = await sandbox();
  const planA = await planStep(emit as StepDef, { ...opts(box.root, box.runs, "r1"), inputKeys: {} });
  const planB = await planStep(upper as StepDef, {
    ...opts(box.root, box.runs, "r1"),
    inputKeys: { emit: planA.key },
  });
  await assert.rejects(Deno.stat(box.runs), Deno.errors.NotFound);
  assert.equal(calls.emit, undefined);
  await assert.rejects(
    planStep(upper as StepDef, { ...opts(box.root, box.runs, "r1"), inputKeys: {} }),
    /input "text" needs step "emit", which is not planned before it/,
  );
  const a = await runStep(emit as StepDef, opts(box.root, box.runs, "r1"));
  const b = await runStep(upper as StepDef, opts(box.root, box.runs, "r1"));
  assert.equal(a.manifest.key, planA.key);
  assert.equal(b.manifest.key, planB.key);
  assert.deepEqual(planB.config, b.manifest.config);
});
