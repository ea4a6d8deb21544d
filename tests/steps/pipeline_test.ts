import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LatheError } from "../../foundation/errors.ts";
import type { Manifest } from "../../foundation/manifest.ts";
import {
  applyResumeFlags,
  parseRecipeArgs,
  type PipelineResult,
  recipeCommand,
} from "../../steps/pipeline.ts";
import { calls, failing, loadToyStep, sandbox } from "./_toy_steps.ts";

const TOY = `name: toy
steps:
  emit:
    text: hi
  upper:
    suffix: "!"
  flaky:
  read:
    file: data.txt
`;

async function project(root: string): Promise<void> {
  await Deno.mkdir(join(root, "recipes"));
  await Deno.writeTextFile(join(root, "recipes", "toy.yaml"), TOY);
  await Deno.writeTextFile(join(root, "data.txt"), "one\ntwo\n");
}

/** Runs `deno task recipe` in-process over the toy steps; returns the result and the printed lines. */
async function recipe(root: string, runs: string, ...argv: string[]) {
  const lines: string[] = [];
  const errors: string[] = [];
  const finished: string[] = [];
  const result = await recipeCommand([...argv, "--runs", runs, "--quiet"], {
    projectRoot: root,
    loadStep: loadToyStep,
    onFinish: (r) => (path: string, m: Manifest) =>
      Promise.resolve(void finished.push(`${r} ${m.step} ${path}`)),
    onStep: (o, role) => lines.push(`${o.manifest.step} ${o.status} ${role}`),
    print: (line) => lines.push(line),
    printError: (line) => errors.push(line),
  });
  return { result, lines, errors, finished };
}

const statuses = (r: PipelineResult | null) => r!.steps.map((s) => `${s.step}:${s.outcome.status}`);

async function runIds(runs: string): Promise<string[]> {
  const ids: string[] = [];
  try {
    for await (const e of Deno.readDir(runs)) ids.push(e.name);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return ids.sort();
}

async function stepDirs(runDir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(runDir)) names.push(e.name);
  return names.sort();
}

Deno.test("a recipe runs every step into one run directory and prints a summary", async () => {
  await using box = await sandbox();
  await project(box.root);
  const { result, lines, finished } = await recipe(box.root, box.runs, "toy");
  assert.deepEqual(statuses(result), ["emit:ran", "upper:ran", "flaky:ran", "read:ran"]);
  assert.match(result!.runId, /^\d{8}-\d{6}-toy-[0-9a-f]{4}$/);
  assert.equal(result!.runDir, join(box.runs, result!.runId));
  assert.deepEqual(await stepDirs(result!.runDir), ["emit", "flaky", "read", "upper"]);
  for (const s of result!.steps) {
    assert.equal(s.outcome.manifest.recipe, "toy");
    assert.equal(s.outcome.manifest.runId, result!.runId);
  }
  assert.deepEqual(lines.slice(0, 4), [
    "emit ran selected",
    "upper ran selected",
    "flaky ran selected",
    "read ran selected",
  ]);
  assert.deepEqual(lines.slice(4), [
    "4 steps: 4 ran, 0 reused from earlier runs, 0 already done in this run",
    `run    ${result!.runId}`,
    `dir    runs/${result!.runId}`,
    `query  deno task runs show ${result!.runId} --runs ${box.runs}`,
  ]);
  assert.equal(finished.length, 4);
  assert.ok(finished.every((f) => f.startsWith(`${box.runs} `)), "the tracker hook gets the runs root");
});

Deno.test("rerunning a recipe reuses every unchanged step and recomputes only what --set changed", async () => {
  await using box = await sandbox();
  await project(box.root);
  const first = (await recipe(box.root, box.runs, "toy")).result!;
  const second = (await recipe(box.root, box.runs, "toy")).result!;
  assert.notEqual(second.runId, first.runId);
  assert.deepEqual(statuses(second), ["emit:linked", "upper:linked", "flaky:linked", "read:linked"]);
  assert.ok(second.steps.every((s) => s.outcome.manifest.cachedFrom === first.runId));

  const third = (await recipe(box.root, box.runs, "toy", "--set", "upper.suffix=x")).result!;
  assert.deepEqual(statuses(third), ["emit:linked", "upper:ran", "flaky:ran", "read:linked"]);
  assert.match(await Deno.readTextFile(join(third.runDir, "flaky", "copy.txt")), /^copy: HI\nHI\nx0042/);

  const fourth = (await recipe(box.root, box.runs, "toy", "--set", "seed=1")).result!;
  assert.deepEqual(statuses(fourth), ["emit:ran", "upper:ran", "flaky:ran", "read:ran"]);
  assert.deepEqual(calls, { emit: 2, upper: 3, flaky: 3, read: 2 });
});

Deno.test("--run continues a run: its finished steps are cached in place", async () => {
  await using box = await sandbox();
  await project(box.root);
  const first = (await recipe(box.root, box.runs, "toy")).result!;
  const again = (await recipe(box.root, box.runs, "toy", "--run", first.runId)).result!;
  assert.equal(again.runId, first.runId);
  assert.deepEqual(statuses(again), ["emit:cached", "upper:cached", "flaky:cached", "read:cached"]);
  assert.deepEqual(await runIds(box.runs), [first.runId]);
  await assert.rejects(recipe(box.root, box.runs, "toy", "--run", "../x"), /Cannot use run id "\.\.\/x"/);
});

Deno.test("--run refuses a run directory that holds another recipe's steps", async () => {
  await using box = await sandbox();
  await project(box.root);
  await Deno.writeTextFile(join(box.root, "recipes", "other.yaml"), TOY.replace("name: toy", "name: other"));
  const first = (await recipe(box.root, box.runs, "toy")).result!;
  await assert.rejects(
    recipe(box.root, box.runs, "other", "--run", first.runId),
    (e: Error) => e instanceof LatheError && /belongs to recipe "toy"/.test(e.message),
  );
});

Deno.test("a failing step stops the pipeline and says where its failure record is", async () => {
  await using box = await sandbox();
  await project(box.root);
  failing.add("flaky");
  const lines: string[] = [];
  const errors: string[] = [];
  await assert.rejects(
    recipeCommand(["toy", "--runs", box.runs, "--quiet"], {
      projectRoot: box.root,
      loadStep: loadToyStep,
      print: (l) => lines.push(l),
      printError: (l) => errors.push(l),
    }),
    /flaky failed on purpose/,
  );
  const [id] = await runIds(box.runs);
  assert.deepEqual(await stepDirs(join(box.runs, id)), ["emit", "flaky", "upper"]);
  assert.equal(calls.read, undefined, "no step after the failure runs");
  assert.deepEqual(errors, [
    "flaky      failed",
    `failure record: runs/${id}/flaky/failure.json`,
    `the run stopped at step "flaky"; continue it with --run ${id} (finished steps are reused)`,
  ]);
  failing.clear();
  const resumed = (await recipe(box.root, box.runs, "toy", "--run", id)).result!;
  assert.deepEqual(statuses(resumed), ["emit:cached", "upper:cached", "flaky:ran", "read:ran"]);
});

Deno.test("--only runs one step and resolves its upstream steps: reused when present, computed when not", async () => {
  await using box = await sandbox();
  await project(box.root);
  const fresh = await recipe(box.root, box.runs, "toy", "--only", "upper");
  assert.deepEqual(statuses(fresh.result), ["emit:ran", "upper:ran"]);
  assert.deepEqual(fresh.result!.steps.map((s) => s.role), ["upstream", "selected"]);
  assert.deepEqual(await stepDirs(fresh.result!.runDir), ["emit", "upper"]);
  assert.match(
    fresh.lines[0],
    /^upstream steps "emit": reused when an earlier run has them with the same key/,
  );

  const full = (await recipe(box.root, box.runs, "toy")).result!;
  assert.deepEqual(statuses(full), ["emit:linked", "upper:linked", "flaky:ran", "read:ran"]);

  const only = (await recipe(box.root, box.runs, "toy", "--only", "flaky", "--force")).result!;
  assert.deepEqual(statuses(only), ["emit:linked", "upper:linked", "flaky:ran"]);
  assert.equal(only.steps[0].outcome.manifest.cachedFrom, fresh.result!.runId);
  assert.deepEqual(calls, { emit: 1, upper: 1, flaky: 2, read: 1 });
});

Deno.test("--from runs a step and every step after it; --force forces only those", async () => {
  await using box = await sandbox();
  await project(box.root);
  await recipe(box.root, box.runs, "toy");
  const from = (await recipe(box.root, box.runs, "toy", "--from", "flaky", "--force")).result!;
  assert.deepEqual(statuses(from), ["emit:linked", "upper:linked", "flaky:ran", "read:ran"]);
  assert.deepEqual(from.steps.map((s) => s.role), ["upstream", "upstream", "selected", "selected"]);
  const late = await recipe(box.root, box.runs, "toy", "--from", "read");
  assert.deepEqual(statuses(late.result), ["read:linked"]);
  assert.ok(late.lines.includes("1 step: 0 ran, 1 reused from earlier runs, 0 already done in this run"));
});

Deno.test("--only and --from must name a step of the recipe, and not both", async () => {
  await using box = await sandbox();
  await project(box.root);
  await assert.rejects(
    recipe(box.root, box.runs, "toy", "--only", "shout"),
    (e: Error) =>
      e instanceof LatheError &&
      e.message === 'Cannot use --only "shout": recipe "toy" has no step "shout"' &&
      e.hint === 'its steps are "emit", "upper", "flaky", "read"',
  );
  await assert.rejects(recipe(box.root, box.runs, "toy", "--from", "x"), /Cannot use --from "x"/);
  await assert.rejects(recipe(box.root, box.runs, "toy", "--only", "emit", "--from", "upper"), /choose one/);
  assert.deepEqual(await runIds(box.runs), []);
});

Deno.test("--dry-run prints each step's key and what would happen, and writes nothing", async () => {
  await using box = await sandbox();
  await project(box.root);
  const before = await recipe(box.root, box.runs, "toy", "--dry-run");
  assert.equal(before.result, null);
  assert.deepEqual(await runIds(box.runs), [], "no run directory");
  assert.deepEqual(calls, {});
  assert.equal(before.lines[0], 'plan for recipe "toy", seed 42 (dry run: nothing runs, nothing is written)');
  assert.deepEqual(before.lines.slice(1).map((l) => l.replace(/ [0-9a-f]{12} /, " KEY ")), [
    "emit       KEY  would run",
    "upper      KEY  would run (upstream changes)",
    "flaky      KEY  would run (upstream changes)",
    "read       KEY  would run",
  ]);

  const run = (await recipe(box.root, box.runs, "toy")).result!;
  const keys = run.steps.map((s) => s.outcome.manifest.key.slice(0, 12));
  const after = await recipe(box.root, box.runs, "toy", "--dry-run");
  assert.deepEqual(after.lines.slice(1), [
    `emit       ${keys[0]}  would reuse run ${run.runId}`,
    `upper      ${keys[1]}  would reuse run ${run.runId}`,
    `flaky      ${keys[2]}  would reuse run ${run.runId}`,
    `read       ${keys[3]}  would reuse run ${run.runId}`,
  ]);
  const changed = await recipe(box.root, box.runs, "toy", "--dry-run", "--set", "upper.suffix=x");
  assert.deepEqual(changed.lines.slice(1).map((l) => l.slice(11 + 14)), [
    `would reuse run ${run.runId}`,
    "would run",
    "would run (upstream changes)",
    `would reuse run ${run.runId}`,
  ]);
  const inPlace = await recipe(
    box.root,
    box.runs,
    "toy",
    "--dry-run",
    "--run",
    run.runId,
    "--only",
    "flaky",
    "--force",
  );
  assert.deepEqual(inPlace.lines.slice(1), [
    `emit       ${keys[0]}  cached (done in this run) (upstream)`,
    `upper      ${keys[1]}  cached (done in this run) (upstream)`,
    `flaky      ${keys[2]}  would run (forced)`,
  ]);
  assert.deepEqual(await runIds(box.runs), [run.runId]);
  assert.deepEqual(calls, { emit: 1, upper: 1, flaky: 1, read: 1 });
});

Deno.test("--dry-run validates the whole recipe and its sources before anything runs", async () => {
  await using box = await sandbox();
  await project(box.root);
  await Deno.remove(join(box.root, "data.txt"));
  await assert.rejects(recipe(box.root, box.runs, "toy", "--dry-run"), /source "data" .* cannot be read/);
  await assert.rejects(
    recipe(box.root, box.runs, "toy", "--set", "emit.repeat=zero"),
    /--set emit\.repeat=zero: steps\.emit\.repeat: expected number, received string/,
  );
  assert.deepEqual(await runIds(box.runs), []);
});

Deno.test("parseRecipeArgs() reads every flag and rejects unknown ones with the usage", () => {
  assert.deepEqual(
    parseRecipeArgs([
      "tiny-demo",
      "--set",
      "a.b=1",
      "--set",
      "seed=2",
      "--only",
      "x",
      "--force",
      "--dry-run",
    ]),
    {
      recipe: "tiny-demo",
      set: ["a.b=1", "seed=2"],
      only: "x",
      from: undefined,
      force: true,
      dryRun: true,
      run: undefined,
      runs: undefined,
      quiet: false,
      help: false,
    },
  );
  assert.throws(
    () => parseRecipeArgs(["toy", "--fast"]),
    (e: Error) =>
      e instanceof LatheError && /Cannot parse arguments/.test(e.message) && /--only/.test(e.hint ?? ""),
  );
  assert.throws(() => parseRecipeArgs([]), /Cannot run a recipe: no recipe named/);
  assert.throws(() => parseRecipeArgs(["a", "b"]), /expected one recipe, got "a", "b"/);
  assert.equal(parseRecipeArgs(["--help"]).help, true);
});

Deno.test("deno task recipe exits 1 with a clean message for an unknown recipe", async () => {
  await using box = await sandbox();
  await project(box.root);
  const cli = fileURLToPath(new URL("../../cli/recipe.ts", import.meta.url));
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", cli, "tiny", "--runs", box.runs],
    cwd: box.root,
    env: { LATHE_PROJECT: box.root, LATHE_NO_TRACKER: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stderr);
  assert.equal(
    stderr,
    `error: Cannot find recipe "tiny": there is no "${join(box.root, "recipes", "tiny.yaml")}"\n` +
      "hint: available recipes: toy (or give a path to a .yaml file)\n",
  );
});

Deno.test("--resume and --restart set LATHE_RESUME for the process; both together is an error", () => {
  const before = Deno.env.get("LATHE_RESUME");
  try {
    applyResumeFlags(true, false);
    assert.equal(Deno.env.get("LATHE_RESUME"), "1");
    applyResumeFlags(false, true);
    assert.equal(Deno.env.get("LATHE_RESUME"), "0");
    assert.throws(() => applyResumeFlags(true, true), /Cannot use --resume and --restart together/);
  } finally {
    if (before === undefined) Deno.env.delete("LATHE_RESUME");
    else Deno.env.set("LATHE_RESUME", before);
  }
});

Deno.test("step instances: `<step>@<label>` runs a step again, reading the nearest earlier instance of each input", async () => {
  await using box = await sandbox();
  await project(box.root);
  await Deno.writeTextFile(
    join(box.root, "recipes", "twice.yaml"),
    `name: twice
steps:
  emit:
    text: first
  upper:
  emit@second:
    text: second
  upper@second:
    suffix: "?"
  flaky:
`,
  );
  const dry = await recipe(box.root, box.runs, "twice", "--dry-run");
  assert.deepEqual(dry.lines.slice(1).map((l) => l.replace(/ [0-9a-f]{12} /, " KEY ")), [
    "emit       KEY  would run",
    "upper      KEY  would run (upstream changes)",
    "emit@second KEY  would run",
    "upper@second KEY  would run (upstream changes)",
    "flaky      KEY  would run (upstream changes)",
  ]);
  const { result } = await recipe(box.root, box.runs, "twice");
  assert.deepEqual(statuses(result), [
    "emit:ran",
    "upper:ran",
    "emit@second:ran",
    "upper@second:ran",
    "flaky:ran",
  ]);
  const dir = result!.runDir;
  assert.deepEqual(await stepDirs(dir), ["emit", "emit@second", "flaky", "upper", "upper@second"]);
  assert.equal(await Deno.readTextFile(join(dir, "upper", "sub/upper.txt")), "FIRST\nFIRST\n!0042\n");
  assert.equal(
    await Deno.readTextFile(join(dir, "upper@second", "sub/upper.txt")),
    "SECOND\nSECOND\n?0042\n",
  );
  // flaky reads the nearest upper before it: upper@second.
  assert.equal(await Deno.readTextFile(join(dir, "flaky", "copy.txt")), "copy: SECOND\nSECOND\n?0042\n");
  const m = result!.steps[3].outcome.manifest;
  assert.equal(m.step, "upper@second");
  assert.deepEqual(m.inputs.text.step, "emit@second");
  assert.equal(m.inputs.text.manifest, "../emit@second/manifest.json");

  // Rerun one instance from its manifest: the same instance, reading the same inputs, same bytes.
  const { rerunFromManifest } = await import("../../steps/rerun.ts");
  const before = await Deno.readTextFile(join(dir, "upper@second", "sub/upper.txt"));
  const again = await rerunFromManifest(join(dir, "upper@second", "manifest.json"), {
    overrides: [],
    projectRoot: box.root,
    quiet: true,
    loadStep: loadToyStep,
  });
  assert.equal(again.manifest.step, "upper@second");
  assert.equal(again.manifest.key, m.key);
  assert.equal(await Deno.readTextFile(join(dir, "upper@second", "sub/upper.txt")), before);
  const changed = await recipe(box.root, box.runs, "twice", "--dry-run", "--set", "upper@second.suffix=x");
  assert.deepEqual(
    changed.lines.slice(1).map((l) => l.replace(/ [0-9a-f]{12} /, " KEY ").split("KEY  ")[1]),
    [
      `would reuse run ${result!.runId}`,
      `would reuse run ${result!.runId}`,
      `would reuse run ${result!.runId}`,
      "would run",
      "would run (upstream changes)",
    ],
  );
  // --only an instance resolves its own upstream instance.
  const only = await recipe(box.root, box.runs, "twice", "--only", "upper@second", "--dry-run");
  assert.deepEqual(only.lines.slice(1).map((l) => l.split(/ +/)[0]), ["emit@second", "upper@second"]);
});

Deno.test("step instances: a bad instance name, or an input with no instance before it, is a recipe error", async () => {
  await using box = await sandbox();
  await project(box.root);
  await Deno.writeTextFile(
    join(box.root, "recipes", "bad.yaml"),
    `name: bad
steps:
  emit@Second:
  upper@late:
  emit@later:
`,
  );
  const error = await recipe(box.root, box.runs, "bad").then(() => null, (e) => e);
  assert.ok(error instanceof LatheError);
  assert.match(error.message, /bad\.yaml:3:3: steps\.emit@Second: "emit@Second" is not a step name/);
  assert.match(
    error.message,
    /bad\.yaml:4:3: steps\.upper@late: step "upper@late" reads input "text" from step "emit", which comes after it/,
  );
});

Deno.test("step instances: `inputs:` picks an earlier instance other than the nearest; a wrong one is a recipe error", async () => {
  await using box = await sandbox();
  await project(box.root);
  await Deno.writeTextFile(
    join(box.root, "recipes", "pick.yaml"),
    `name: pick
steps:
  emit:
    text: first
  emit@second:
    text: second
  upper:
    inputs: { text: emit }
`,
  );
  const { result } = await recipe(box.root, box.runs, "pick");
  const upper = result!.steps.find((s) => s.step === "upper")!.outcome.manifest;
  assert.equal(upper.inputs.text.step, "emit");
  assert.equal(
    await Deno.readTextFile(join(result!.runDir, "upper", "sub/upper.txt")),
    "FIRST\nFIRST\n!0042\n",
  );
  assert.ok(!Object.hasOwn(upper.config as object, "inputs"), "inputs: is not part of the step's config");
  await Deno.writeTextFile(
    join(box.root, "recipes", "wrong.yaml"),
    `name: wrong
steps:
  emit:
  upper:
    inputs: { text: upper, words: emit }
`,
  );
  const error = await recipe(box.root, box.runs, "wrong").then(() => null, (e) => e);
  assert.ok(error instanceof LatheError);
  assert.match(
    error.message,
    /steps\.upper\.inputs\.text: input "text" reads a "emit" step: "upper" is not one before "upper" \(instances of "emit" before it: "emit"\)/,
  );
  assert.match(
    error.message,
    /steps\.upper\.inputs\.words: step "upper" has no input "words" \(its inputs: "text"\)/,
  );
});
