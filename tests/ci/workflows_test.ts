import { fileURLToPath } from "node:url";
import { existsSync } from "node:fs";
import assert from "node:assert/strict";
import { join, resolve } from "node:path";
import { parse } from "yaml";
import { validateWorkflow } from "./_workflow_parser.ts";

const ROOT = resolve(import.meta.dirname!, "../..");
const CI = ".github/workflows/ci.yml";
const GPU = ".github/workflows/gpu-matrix.yml";

// The shape of a workflow as the tests read it (after the validator has checked the schema).
interface Step {
  name?: string;
  uses?: string;
  run?: string;
  if?: string;
  with?: Record<string, string | number | boolean>;
  env?: Record<string, string>;
}
interface Job {
  "runs-on": string | string[];
  needs?: string | string[];
  if?: string;
  strategy?: { "fail-fast"?: boolean; matrix?: Record<string, unknown> };
  env?: Record<string, string>;
  steps: Step[];
}
interface Workflow {
  on: Record<string, unknown>;
  env?: Record<string, string>;
  jobs: Record<string, Job>;
}

async function readWorkflow(rel: string): Promise<Workflow> {
  return parse(await Deno.readTextFile(join(ROOT, rel))) as Workflow;
}

function stepUsing(job: Job, action: string): Step {
  const step = job.steps.find((s) => s.uses?.split("@")[0] === action);
  assert.ok(step, `a step uses ${action}`);
  return step;
}

function stepIndex(job: Job, pattern: RegExp): number {
  const i = job.steps.findIndex((s) => s.run !== undefined && pattern.test(s.run));
  assert.ok(i >= 0, `a step runs ${pattern}`);
  return i;
}

const needsOf = (job: Job) => (job.needs === undefined ? [] : [job.needs].flat());

Deno.test("ci.yml and gpu-matrix.yml pass GitHub's workflow validator with no errors", async () => {
  for (const file of [CI, GPU]) {
    const { errors, template } = await validateWorkflow(file, await Deno.readTextFile(join(ROOT, file)));
    assert.deepEqual(errors, [], `${file} has errors:\n${errors.join("\n")}`);
    assert.ok(template && template.jobs.length > 0, `${file} has jobs`);
  }
});

Deno.test("workflow validation reports broken workflows: bad keys, expressions, cron, job graph, YAML", async () => {
  const job = "    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n";
  const broken: [string, string, RegExp][] = [
    ["unknown key", `on: push\njobs:\n  a:\n${job}    timeout: 3\n`, /Unexpected value 'timeout'/],
    [
      "step with run and uses",
      `on: push\njobs:\n  a:\n${job}        uses: actions/checkout@v4\n`,
      /Unexpected value 'uses'/,
    ],
    [
      "unknown context",
      "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: echo ${{ matrixx.r }}\n",
      /Unrecognized named-value: 'matrixx'/,
    ],
    ["bad cron", `on:\n  schedule:\n    - cron: weekly\njobs:\n  a:\n${job}`, /Invalid cron expression/],
    [
      "fail-fast not a boolean",
      `on: push\njobs:\n  a:\n    strategy:\n      fail-fast: maybe\n${job}`,
      /Unexpected value 'maybe'/,
    ],
    [
      "needs an unknown job",
      `on: push\njobs:\n  a:\n${job}  b:\n    needs: [a, nope]\n${job}`,
      /Job 'b' depends on unknown job 'nope'/,
    ],
    [
      "missing runs-on",
      "on: push\njobs:\n  a:\n    steps:\n      - run: echo\n",
      /Required property is missing: runs-on/,
    ],
    ["not YAML", "on: [push\njobs: {}\n", /Flow sequence/],
  ];
  for (const [what, text, expected] of broken) {
    const { errors } = await validateWorkflow(`${what}.yml`, text);
    assert.ok(
      errors.some((e) => expected.test(e)),
      `${what}: expected ${expected}, got ${JSON.stringify(errors)}`,
    );
  }
  const { errors } = await validateWorkflow("fine.yml", `on: push\njobs:\n  a:\n${job}`);
  assert.deepEqual(errors, []);
});

Deno.test("ci.yml caches Deno by deno.lock, installs lavapipe, checks, then runs .ci/run on push and PR", async () => {
  const wf = await readWorkflow(CI);
  assert.ok("push" in wf.on && "pull_request" in wf.on);
  const jobs = Object.values(wf.jobs);
  assert.equal(jobs.length, 1);
  const [job] = jobs;
  assert.equal(job["runs-on"], "ubuntu-latest");

  const cache = stepUsing(job, "actions/cache");
  assert.match(String(cache.with?.key), /hashFiles\('deno\.lock'\)/);
  assert.match(String(cache.with?.path), /\.cache\/deno/);

  const lavapipe = stepIndex(job, /apt-get install .*mesa-vulkan-drivers/);
  const check = stepIndex(job, /deno@2\.9\.6 task check$/m);
  const test = stepIndex(job, /^bash \.ci\/run$/m);
  assert.ok(lavapipe < test && check < test, "lavapipe and the static checks come before the tests");
  const mode = (await Deno.stat(join(ROOT, ".ci/run"))).mode;
  assert.ok(mode !== null && (mode & 0o111) !== 0, ".ci/run is executable");
});

Deno.test("gpu-matrix.yml runs every recipe on every self-hosted GPU runner, fail-fast off", async () => {
  const wf = await readWorkflow(GPU);
  const dispatch = wf.on.workflow_dispatch as { inputs: Record<string, unknown> };
  assert.deepEqual(Object.keys(dispatch.inputs).sort(), ["recipes", "runners"]);
  assert.ok(Array.isArray(wf.on.schedule) && wf.on.schedule.length > 0, "a schedule");

  const runners = JSON.parse(wf.env!.DEFAULT_RUNNERS) as string[][];
  assert.ok(runners.length >= 3);
  for (const labels of runners) {
    assert.ok(labels.includes("self-hosted"), `${labels} is a self-hosted runner`);
  }
  const recipes = JSON.parse(wf.env!.DEFAULT_RECIPES) as string[];
  assert.ok(recipes.length > 0);
  for (const name of recipes) {
    assert.ok(
      existsSync(fileURLToPath(new URL(`../../recipes/${name}.yaml`, import.meta.url))),
      `the matrix's default recipe "${name}" exists in recipes/`,
    );
  }

  const plan = wf.jobs.plan;
  assert.match(plan.steps[0].run!, /\$\{RECIPES:-\$DEFAULT_RECIPES\}/);
  assert.match(plan.steps[0].run!, /\$\{RUNNERS:-\$DEFAULT_RUNNERS\}/);

  const leg = wf.jobs.recipe;
  assert.deepEqual(needsOf(leg), ["plan"]);
  assert.equal(leg["runs-on"], "${{ matrix.runner }}");
  assert.equal(leg.strategy?.["fail-fast"], false);
  assert.deepEqual(leg.strategy?.matrix, {
    recipe: "${{ fromJSON(needs.plan.outputs.recipes) }}",
    runner: "${{ fromJSON(needs.plan.outputs.runners) }}",
  });
  assert.equal(stepUsing(leg, "denoland/setup-deno").with?.["deno-version"], "v2.9.6");
});

Deno.test("gpu-matrix.yml legs record the adapter, run the recipe into their own runs root and export it", async () => {
  const leg = (await readWorkflow(GPU)).jobs.recipe;
  const prepare = stepIndex(leg, /LATHE_RUNS=\$leg\/runs/);
  const adapter = stepIndex(leg, /navigator\.gpu\?\.requestAdapter[\s\S]*adapter\.json/);
  const recipe = stepIndex(leg, /deno task recipe "\$RECIPE"/);
  const describe = stepIndex(leg, /leg\.json/);
  const exported = stepIndex(leg, /^deno task runs export --out "\$LEG_DIR"$/m);
  const upload = leg.steps.indexOf(stepUsing(leg, "actions/upload-artifact"));
  assert.deepEqual(
    [prepare, adapter, recipe, describe, exported, upload].toSorted((a, b) => a - b),
    [prepare, adapter, recipe, describe, exported, upload],
    "steps in order",
  );
  assert.equal(leg.env?.RECIPE, "${{ matrix.recipe }}");
  for (const i of [describe, exported, upload]) {
    assert.match(String(leg.steps[i].if), /^always\(\)/, `step ${i} runs after a failed recipe too`);
  }
  assert.equal(stepUsing(leg, "actions/upload-artifact").uses, "actions/upload-artifact@v4");
});

Deno.test("gpu-matrix.yml names each leg's artifact uniquely by recipe, runner labels and attempt", async () => {
  const wf = await readWorkflow(GPU);
  const name = String(stepUsing(wf.jobs.recipe, "actions/upload-artifact").with?.name);
  assert.match(name, /\$\{\{ matrix\.recipe \}\}/);
  assert.match(name, /\$\{\{ join\(matrix\.runner, '-'\) \}\}/);
  assert.match(name, /\$\{\{ github\.run_attempt \}\}/);
  // Every leg of the default matrix, in two attempts, gets its own artifact name.
  const names = new Set<string>();
  const recipes = JSON.parse(wf.env!.DEFAULT_RECIPES) as string[];
  const runners = JSON.parse(wf.env!.DEFAULT_RUNNERS) as string[][];
  for (const attempt of [1, 2]) {
    for (const recipe of recipes) {
      for (const labels of runners) {
        const value = name
          .replaceAll("${{ matrix.recipe }}", recipe)
          .replaceAll("${{ join(matrix.runner, '-') }}", labels.join("-"))
          .replaceAll("${{ github.run_attempt }}", String(attempt));
        assert.doesNotMatch(value, /\$\{\{|[":<>|*?\\/\r\n]/, `${value} is a valid artifact name`);
        names.add(value);
      }
    }
  }
  assert.equal(names.size, 2 * recipes.length * runners.length);
});

Deno.test("gpu-matrix.yml merges every leg after the matrix, even when legs failed", async () => {
  const wf = await readWorkflow(GPU);
  const compare = wf.jobs.compare;
  assert.ok(needsOf(compare).includes("recipe"), "the merge needs the matrix job");
  assert.match(String(compare.if), /^always\(\)/);

  const download = stepUsing(compare, "actions/download-artifact");
  assert.equal(download.uses, "actions/download-artifact@v4");
  assert.equal(download.with?.["merge-multiple"], false);
  const pattern = String(download.with?.pattern);
  const uploadName = String(stepUsing(wf.jobs.recipe, "actions/upload-artifact").with?.name);
  assert.ok(
    pattern.endsWith("*") && uploadName.startsWith(pattern.slice(0, -1)),
    "the pattern matches the legs",
  );

  const merge = compare.steps[stepIndex(compare, /scripts\/merge_exports\.ts/)].run!;
  assert.match(merge, new RegExp(`--in ${download.with?.path} `));
  assert.match(merge, /--summary "\$GITHUB_STEP_SUMMARY"/);
  await Deno.stat(join(ROOT, "scripts/merge_exports.ts"));
});
