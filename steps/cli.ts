/**
 * The command line of a single step, shared by every step module (`if (import.meta.main)
 * await runFromCli(step)`) and by `deno task step <name>`:
 *
 * ```
 * deno task step <name> --manifest runs/<id>/<step>/manifest.json [--set k=v ...] [--seed N]
 * deno task step <name> [--run <id>] [--config file.yaml] [--set k=v ...] [--seed N] [--force]
 * ```
 * @module
 */
import { parseArgs } from "node:util";
import { parse as parseYaml } from "yaml";
import type { StepDef } from "./define.ts";
import { LatheError, runMain } from "../foundation/errors.ts";
import { applyOverrides, parseOverride } from "./overrides.ts";
import { displayPath, projectRoot, runsRoot } from "../foundation/paths.ts";
import { rerunFromManifest } from "./rerun.ts";
import { type RunOutcome, runStep } from "./runner.ts";
import { newRunId } from "./run_id.ts";
import { applyResumeFlags } from "./pipeline.ts";
import { trackerHook } from "../tracker/hook.ts";

const USAGE = `usage:
  deno task step <name> --manifest runs/<id>/<step>/manifest.json [--set key=value ...] [--seed N]
      rerun a step exactly as its manifest records (inputs verified by hash);
      --set or --seed branch a variant into a new run directory
  deno task step <name> [--run <id>] [--config file.yaml] [--set key=value ...] [--seed N] [--force]
      run a step with a config (its upstream steps must be in the same run)
options: --runs <dir> (runs root, default ./runs or $LATHE_RUNS), --quiet,
  --resume / --restart (a killed training step: continue from its checkpoints, or delete them)`;

/** Prints a one-line summary of a step outcome. */
export function printOutcome(outcome: RunOutcome, root: string): void {
  const m = outcome.manifest;
  const took = (Date.parse(m.finishedAt) - Date.parse(m.startedAt)) / 1000;
  const how = outcome.status === "ran"
    ? `ran in ${took.toFixed(1)}s`
    : outcome.status === "cached"
    ? "cached (unchanged)"
    : `reused from run ${m.cachedFrom}`;
  console.log(`${m.step.padEnd(10)} ${how.padEnd(34)} ${displayPath(outcome.manifestPath, root)}`);
}

/** Parses `argv` and runs `step` (or, with --manifest, reruns it). */
export async function stepCli(step: StepDef | null, argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      manifest: { type: "string" },
      run: { type: "string" },
      config: { type: "string" },
      set: { type: "string", multiple: true, default: [] },
      seed: { type: "string" },
      force: { type: "boolean", default: false },
      resume: { type: "boolean", default: false },
      restart: { type: "boolean", default: false },
      runs: { type: "string" },
      quiet: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  applyResumeFlags(values.resume, values.restart);
  const root = projectRoot();
  const runs = runsRoot(values.runs, root);
  const overrides = values.set.map(parseOverride);
  const seed = values.seed === undefined ? undefined : Number(values.seed);
  if (seed !== undefined && !Number.isInteger(seed)) {
    throw new LatheError(`Cannot use --seed "${values.seed}": not an integer`);
  }
  const name = step?.name ?? positionals[0];
  const onFinish = trackerHook(runs);

  if (values.manifest) {
    const manifestPath = values.manifest;
    // The one step this program runs: a manifest of another step is refused before anything runs.
    const loadStep = (found: string): Promise<StepDef> => {
      if (step && (!name || found === name)) return Promise.resolve(step);
      throw new LatheError(
        name
          ? `Cannot rerun "${manifestPath}" as step "${name}": it is a "${found}" manifest`
          : `Cannot rerun "${manifestPath}": no step named`,
        { hint: USAGE },
      );
    };
    const outcome = await rerunFromManifest(manifestPath, {
      overrides,
      seed,
      projectRoot: root,
      onFinish,
      quiet: values.quiet,
      loadStep,
    });
    printOutcome(outcome, root);
    return;
  }
  if (!step) throw new LatheError(`Cannot run: no step named`, { hint: USAGE });
  let config: Record<string, unknown> = {};
  if (values.config) {
    try {
      config = (parseYaml(await Deno.readTextFile(values.config)) ?? {}) as Record<string, unknown>;
    } catch (error) {
      throw new LatheError(`Cannot read config "${values.config}": ${(error as Error).message}`);
    }
  }
  config = applyOverrides(config, overrides);
  const outcome = await runStep(step, {
    runsRoot: runs,
    runId: values.run ?? newRunId(step.name),
    recipe: null,
    config,
    seed: seed ?? 42,
    projectRoot: root,
    force: values.force,
    onFinish,
    quiet: values.quiet,
  });
  printOutcome(outcome, root);
}

/** Makes a step module a program: `if (import.meta.main) await runFromCli(step);`. */
export async function runFromCli(step: StepDef): Promise<void> {
  await runMain(() => stepCli(step, Deno.args));
}
