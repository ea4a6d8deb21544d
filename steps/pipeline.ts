/**
 * Runs a recipe: the steps in recipe order, each through the runner (which reuses an
 * identical earlier result), into one run directory `runs/<run-id>/`. `--only` and
 * `--from` select steps (their upstream steps are resolved too: reused when an earlier
 * run has them with the same key, computed otherwise); `--dry-run` prints the plan with
 * each step's key and what would happen, writing nothing. docs/recipes.md describes it.
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { exists } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import { FAILURE_FILE, type Manifest, MANIFEST_FILE } from "../foundation/manifest.ts";
import { parseOverride } from "./overrides.ts";
import { displayPath, runsRoot as defaultRunsRoot } from "../foundation/paths.ts";
import { loadRecipe, type Recipe, type RecipeStep, type StepLoader } from "./recipe.ts";
import { findCacheHit, planStep, resolveConfig, type RunOutcome, runStep } from "./runner.ts";
import { HubCacheMiss, HubMissingFiles } from "../hub/snapshot.ts";
import { newRunId } from "./run_id.ts";

/** Why a step is part of a pipeline run: selected, or needed by a selected step. */
export type StepRole = "selected" | "upstream";

/** One step of a pipeline run, with its role and whether it is forced. */
export interface Selected {
  step: RecipeStep;
  role: StepRole;
  force: boolean;
}

/** Which steps to run. */
export interface Selection {
  /** Run only this step (and resolve its upstream steps). */
  only?: string;
  /** Run this step and every step after it (and resolve their upstream steps). */
  from?: string;
  /** Rerun the selected steps even when a cached result exists (upstream steps are never forced). */
  force?: boolean;
}

/** Options for {@link runPipeline}. */
export interface PipelineOptions extends Selection {
  /** Absolute path of the runs root. */
  runsRoot: string;
  /** Absolute path of the project root (config paths resolve against it). */
  projectRoot: string;
  /** The run directory name: a new {@link newRunId}, or an existing run to continue. */
  runId: string;
  /** Called with every manifest or failure record written (the tracker indexes it). */
  onFinish?: (path: string, manifest: Manifest) => Promise<void>;
  /** Called after each step (the CLI prints one line with steps/cli.ts `printOutcome`). */
  onStep?: (outcome: RunOutcome, role: StepRole) => void;
  /** Prints a line of the pipeline's own output (default: stdout). */
  print?: (line: string) => void;
  /** Prints a line about a failure (default: stderr). */
  printError?: (line: string) => void;
  /** No progress lines from the steps. */
  quiet?: boolean;
}

/** One step's result in a pipeline run. */
export interface StepResultLine {
  step: string;
  role: StepRole;
  outcome: RunOutcome;
}

/** What {@link runPipeline} did. */
export interface PipelineResult {
  runId: string;
  /** Absolute path of the run directory. */
  runDir: string;
  steps: StepResultLine[];
}

/** What a dry run found for one step. */
export interface PlannedStep {
  step: string;
  role: StepRole;
  key: string;
  /** "cached": done in this run; "linked": would be reused from `from`; "run": would be computed. */
  status: "cached" | "linked" | "run";
  /** For "linked": the run that computed the result. */
  from: string | null;
  /**
   * For "run": "forced", "upstream" (an upstream step would run), "download" (its files are not
   * in the Hugging Face cache and the Hub is not reachable or not asked: the key is unknown until
   * they are) or null (nothing reusable).
   */
  reason: "forced" | "upstream" | "download" | null;
  /** What the step's `describe` says (e.g. train-sft's memory plan), or why it cannot. */
  notes: string[];
}

/** The key of a step that cannot be computed in a dry run (its files are not available offline). */
export const UNKNOWN_KEY = "?";

const RUN_ID = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** The step named `name` in `recipe`; an error lists the recipe's steps otherwise. */
function stepNamed(recipe: Recipe, name: string, flag: string): RecipeStep {
  const found = recipe.steps.find((s) => s.name === name);
  if (!found) {
    throw new LatheError(`Cannot use ${flag} "${name}": recipe "${recipe.name}" has no step "${name}"`, {
      hint: `its steps are ${recipe.steps.map((s) => `"${s.name}"`).join(", ")}`,
    });
  }
  return found;
}

/**
 * The steps a run executes, in recipe order: all of them, or the `--only`/`--from`
 * selection plus the upstream steps it reads (transitively), which are never forced.
 */
export function selectSteps(recipe: Recipe, sel: Selection): Selected[] {
  if (sel.only !== undefined && sel.from !== undefined) {
    throw new LatheError(`Cannot use --only "${sel.only}" with --from "${sel.from}": choose one`);
  }
  const force = sel.force ?? false;
  if (sel.only === undefined && sel.from === undefined) {
    return recipe.steps.map((step) => ({ step, role: "selected", force }));
  }
  const chosen = new Set<string>();
  if (sel.only !== undefined) chosen.add(stepNamed(recipe, sel.only, "--only").name);
  else {
    const start = recipe.steps.indexOf(stepNamed(recipe, sel.from!, "--from"));
    for (const s of recipe.steps.slice(start)) chosen.add(s.name);
  }
  const needed = new Set<string>();
  const visit = (name: string): void => {
    const step = recipe.steps.find((s) => s.name === name);
    for (const upstream of Object.values(step?.inputs ?? {})) {
      if (!needed.has(upstream)) {
        needed.add(upstream);
        visit(upstream);
      }
    }
  };
  for (const name of chosen) visit(name);
  return recipe.steps.flatMap((step): Selected[] =>
    chosen.has(step.name)
      ? [{ step, role: "selected", force }]
      : needed.has(step.name)
      ? [{ step, role: "upstream", force: false }]
      : []
  );
}

/** Rejects a run id that is not a plain directory name, or a run that holds another recipe's steps. */
async function checkRunId(runsRoot: string, runId: string, recipe: string): Promise<void> {
  if (!RUN_ID.test(runId)) {
    throw new LatheError(`Cannot use run id "${runId}": expected letters, digits, ".", "_" or "-"`, {
      hint: "leave out --run to start a new run; `deno task runs ls` lists the runs",
    });
  }
  const runDir = join(runsRoot, runId);
  if (!(await exists(runDir))) return;
  for await (const entry of Deno.readDir(runDir)) {
    if (!entry.isDirectory || entry.name.startsWith(".")) continue;
    for (const file of [MANIFEST_FILE, FAILURE_FILE]) {
      let other: unknown;
      try {
        other = JSON.parse(await Deno.readTextFile(join(runDir, entry.name, file))).recipe;
      } catch {
        continue;
      }
      if (other !== recipe) {
        throw new LatheError(
          `Cannot continue run "${runId}" with recipe "${recipe}": its step "${entry.name}" belongs to ${
            typeof other === "string" ? `recipe "${other}"` : "no recipe"
          }`,
          { hint: "leave out --run to start a new run" },
        );
      }
    }
  }
}

/**
 * Runs the selected steps of `recipe` in order into run `opts.runId`. A failing step stops
 * the pipeline: its error propagates after a line naming its failure record and how to resume.
 */
export async function runPipeline(recipe: Recipe, opts: PipelineOptions): Promise<PipelineResult> {
  const print = opts.print ?? console.log;
  const printError = opts.printError ?? console.error;
  const selected = selectSteps(recipe, opts);
  await checkRunId(opts.runsRoot, opts.runId, recipe.name);
  const runDir = join(opts.runsRoot, opts.runId);
  const upstream = selected.filter((s) => s.role === "upstream").map((s) => s.step.name);
  if (upstream.length > 0) {
    print(
      `upstream steps ${
        upstream.map((n) => `"${n}"`).join(", ")
      }: reused when an earlier run has them with the same key, computed otherwise`,
    );
  }
  const steps: StepResultLine[] = [];
  for (const { step, role, force } of selected) {
    let outcome: RunOutcome;
    try {
      outcome = await runStep(step.def, {
        instance: step.name,
        inputSteps: step.inputs,
        runsRoot: opts.runsRoot,
        runId: opts.runId,
        recipe: recipe.name,
        config: step.raw,
        seed: recipe.seed,
        projectRoot: opts.projectRoot,
        force,
        onFinish: opts.onFinish,
        quiet: opts.quiet,
      });
    } catch (error) {
      const failure = join(runDir, step.name, FAILURE_FILE);
      printError(`${step.name.padEnd(10)} failed`);
      if (await exists(failure)) printError(`failure record: ${displayPath(failure, opts.projectRoot)}`);
      printError(
        `the run stopped at step "${step.name}"; continue it with --run ${opts.runId} ` +
          `(finished steps are reused)`,
      );
      throw error;
    }
    opts.onStep?.(outcome, role);
    steps.push({ step: step.name, role, outcome });
  }
  return { runId: opts.runId, runDir, steps };
}

/** Options for {@link planPipeline}. */
export interface PlanPipelineOptions extends Selection {
  runsRoot: string;
  projectRoot: string;
  /** An existing run to continue (its finished steps count as cached); null for a new run. */
  runId: string | null;
}

/**
 * What {@link runPipeline} would do, without running a step or writing a file: each
 * selected step's key (from its config, seed, sources and upstream keys) and whether a
 * result with that key exists in this run ("cached"), in an earlier run ("linked"), or not ("run").
 */
export async function planPipeline(recipe: Recipe, opts: PlanPipelineOptions): Promise<PlannedStep[]> {
  const selected = selectSteps(recipe, opts);
  if (opts.runId !== null) await checkRunId(opts.runsRoot, opts.runId, recipe.name);
  const keys: Record<string, string> = {};
  const byName: Record<string, PlannedStep> = {};
  const plan: PlannedStep[] = [];
  for (const { step, role, force } of selected) {
    const bound = step.inputs;
    const upstreamUnknown = Object.values(bound).some((u) => keys[u] === UNKNOWN_KEY);
    let key = UNKNOWN_KEY;
    let missing: string | null = null;
    if (!upstreamUnknown) {
      try {
        ({ key } = await planStep(step.def, {
          runsRoot: opts.runsRoot,
          runId: opts.runId ?? "",
          config: step.raw,
          seed: recipe.seed,
          projectRoot: opts.projectRoot,
          inputKeys: keys,
          inputSteps: bound,
        }));
      } catch (error) {
        // A dry run plans without downloading: files the cache lacks leave the key unknown.
        if (!(error instanceof HubCacheMiss || error instanceof HubMissingFiles || isHubCacheError(error))) {
          throw error;
        }
        missing = error.message.split("\n")[0];
      }
    }
    keys[step.name] = key;
    const hit = force || key === UNKNOWN_KEY
      ? null
      : await findCacheHit(opts.runsRoot, opts.runId, step.name, key);
    const upstreamRuns = Object.values(bound).some((u) => byName[u]?.status === "run");
    const planned: PlannedStep = {
      step: step.name,
      role,
      key,
      status: hit?.status ?? "run",
      from: hit?.status === "linked" ? hit.manifest.cachedFrom ?? hit.manifest.runId : null,
      reason: hit
        ? null
        : force
        ? "forced"
        : missing !== null
        ? "download"
        : upstreamRuns
        ? "upstream"
        : null,
      notes: missing !== null ? [missing] : await describeStep(step, bound, recipe, opts.projectRoot),
    };
    byName[step.name] = planned;
    plan.push(planned);
  }
  return plan;
}

/** The step's `describe` lines, with its upstream steps' validated configs; an error becomes its note. */
async function describeStep(
  step: RecipeStep,
  bound: Record<string, string>,
  recipe: Recipe,
  projectRoot: string,
): Promise<string[]> {
  if (!step.def.describe) return [];
  const inputs: Record<string, Record<string, unknown>> = {};
  for (const [input, name] of Object.entries(bound)) {
    const upstream = recipe.steps.find((s) => s.name === name);
    if (upstream) inputs[input] = resolveConfig(upstream.def, upstream.raw) as Record<string, unknown>;
  }
  try {
    return await step.def.describe(resolveConfig(step.def, step.raw), { projectRoot, inputs });
  } catch (error) {
    if (!(error instanceof LatheError)) throw error;
    return [`cannot plan: ${error.message.split("\n")[0]}`];
  }
}

/** True for the Hub errors that mean "not in the cache" (offline or unreachable), whatever wraps them. */
function isHubCacheError(error: unknown): error is Error {
  return error instanceof LatheError && error.cause instanceof HubCacheMiss;
}

/**
 * The dry-run listing: one line per step, `name  key[0:12]  what would happen`, each followed by
 * its notes (indented).
 */
export function formatPlan(plan: PlannedStep[]): string[] {
  return plan.flatMap((p) => {
    const what = p.status === "cached"
      ? "cached (done in this run)"
      : p.status === "linked"
      ? `would reuse run ${p.from}`
      : p.reason === "forced"
      ? "would run (forced)"
      : p.reason === "upstream"
      ? "would run (upstream changes)"
      : p.reason === "download"
      ? "would run after downloading (key known once the files are in the cache)"
      : "would run";
    const key = p.key === UNKNOWN_KEY ? "?".padEnd(12) : p.key.slice(0, 12);
    return [
      `${p.step.padEnd(10)} ${key}  ${what}${p.role === "upstream" ? " (upstream)" : ""}`,
      ...p.notes.map((n) => `           ${n}`),
    ];
  });
}

/**
 * The closing lines of a run: counts, run id, run directory and how to query it
 * (`runsFlag`: the `--runs` given, repeated in the query command).
 */
export function summaryLines(result: PipelineResult, projectRoot: string, runsFlag?: string): string[] {
  const count = (s: RunOutcome["status"]) => result.steps.filter((r) => r.outcome.status === s).length;
  const n = result.steps.length;
  return [
    `${n} step${n === 1 ? "" : "s"}: ${count("ran")} ran, ${count("linked")} reused from earlier runs, ${
      count("cached")
    } already done in this run`,
    `run    ${result.runId}`,
    `dir    ${displayPath(result.runDir, projectRoot)}`,
    `query  deno task runs show ${result.runId}${runsFlag === undefined ? "" : ` --runs ${runsFlag}`}`,
  ];
}

/** Usage of `deno task recipe`. */
export const RECIPE_USAGE = `usage: deno task recipe <name|path> [options]
  runs a recipe (recipes/<name>.yaml, or a path to a .yaml file) into a new run directory
options:
  --set key=value   override a config value: <step>.<key>=<value>, or seed=<n> (repeatable)
  --only <step>     run only this step (its upstream steps are reused, or computed if missing)
  --from <step>     run this step and every step after it
  --force           rerun the selected steps even when a cached result exists
  --dry-run         print each step's key and whether it would be reused or run; run nothing
  --run <id>        continue an existing run (its finished steps are reused in place)
  --resume          continue a killed training step from its checkpoints (same as LATHE_RESUME=1)
  --restart         delete a killed training step's checkpoints and start over (LATHE_RESUME=0)
  --runs <dir>      runs root (default ./runs, or $LATHE_RUNS)
  --quiet           no progress lines`;

/**
 * `--resume` / `--restart`: what a training step does with the checkpoints of an interrupted run with the
 * same key. They set `LATHE_RESUME` for this process, which is how steps read the choice (it is not config:
 * resuming must not change the step's key).
 */
export function applyResumeFlags(resume: boolean, restart: boolean): void {
  if (resume && restart) throw new LatheError("Cannot use --resume and --restart together");
  if (resume) Deno.env.set("LATHE_RESUME", "1");
  if (restart) Deno.env.set("LATHE_RESUME", "0");
}

/** Parsed `deno task recipe` arguments. */
export interface RecipeArgs {
  recipe: string;
  set: string[];
  only?: string;
  from?: string;
  force: boolean;
  dryRun: boolean;
  run?: string;
  runs?: string;
  quiet: boolean;
  help: boolean;
}

/** Parses `deno task recipe` arguments; a mistake is a LatheError carrying the usage. */
export function parseRecipeArgs(argv: string[]): RecipeArgs {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        set: { type: "string", multiple: true, default: [] },
        only: { type: "string" },
        from: { type: "string" },
        force: { type: "boolean", default: false },
        resume: { type: "boolean", default: false },
        restart: { type: "boolean", default: false },
        "dry-run": { type: "boolean", default: false },
        run: { type: "string" },
        runs: { type: "string" },
        quiet: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new LatheError(`Cannot parse arguments: ${(error as Error).message}`, { hint: RECIPE_USAGE });
  }
  const { values, positionals } = parsed;
  applyResumeFlags(values.resume, values.restart);
  if (!values.help && positionals.length !== 1) {
    throw new LatheError(
      positionals.length === 0
        ? "Cannot run a recipe: no recipe named"
        : `Cannot run a recipe: expected one recipe, got ${positionals.map((p) => `"${p}"`).join(", ")}`,
      { hint: RECIPE_USAGE },
    );
  }
  return {
    recipe: positionals[0] ?? "",
    set: values.set,
    only: values.only,
    from: values.from,
    force: values.force,
    dryRun: values["dry-run"],
    run: values.run,
    runs: values.runs,
    quiet: values.quiet,
    help: values.help,
  };
}

/** What {@link recipeCommand} needs from its program. */
export interface RecipeCommandEnv {
  /** Absolute path of the project root. */
  projectRoot: string;
  /** Makes the onFinish hook for a runs root (the tracker); none in tests. */
  onFinish?: (runsRoot: string) => (path: string, manifest: Manifest) => Promise<void>;
  /** Prints one step's outcome (steps/cli.ts `printOutcome`). */
  onStep?: (outcome: RunOutcome, role: StepRole) => void;
  print?: (line: string) => void;
  printError?: (line: string) => void;
  /** Finds a step by name: steps/registry.ts `loadStep`, or toy steps in tests. */
  loadStep: StepLoader;
}

/**
 * `deno task recipe <name|path> ...`: loads and validates the recipe, then prints the plan
 * (`--dry-run`, returns null) or runs it and prints the summary.
 */
export async function recipeCommand(argv: string[], env: RecipeCommandEnv): Promise<PipelineResult | null> {
  const print = env.print ?? console.log;
  const args = parseRecipeArgs(argv);
  if (args.help) {
    print(RECIPE_USAGE);
    return null;
  }
  const runs = defaultRunsRoot(args.runs, env.projectRoot);
  const recipe = await loadRecipe(args.recipe, {
    projectRoot: env.projectRoot,
    overrides: args.set.map(parseOverride),
    loadStep: env.loadStep,
  });
  const selection = { only: args.only, from: args.from, force: args.force };
  if (args.dryRun) {
    const plan = await planPipeline(recipe, {
      ...selection,
      runsRoot: runs,
      projectRoot: env.projectRoot,
      runId: args.run ?? null,
    });
    print(
      `plan for recipe "${recipe.name}", seed ${recipe.seed} (dry run: nothing runs, nothing is written)`,
    );
    for (const line of formatPlan(plan)) print(line);
    return null;
  }
  const result = await runPipeline(recipe, {
    ...selection,
    runsRoot: runs,
    projectRoot: env.projectRoot,
    runId: args.run ?? newRunId(recipe.name),
    onFinish: env.onFinish?.(runs),
    onStep: env.onStep,
    print,
    printError: env.printError,
    quiet: args.quiet,
  });
  for (const line of summaryLines(result, env.projectRoot, args.runs)) print(line);
  return result;
}
