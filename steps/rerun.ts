/**
 * Rerunning one step from its manifest: the same config, seed and inputs, verified by
 * hash, into the same run directory; or, with overrides, a variant in a new run directory
 * that links the upstream steps it needs.
 * @module
 */
import { basename, dirname, join } from "node:path";
import { exists, writeJsonAtomic } from "../foundation/atomic.ts";
import { type StepLoader, stepOfInstance } from "./define.ts";
import { LatheError } from "../foundation/errors.ts";
import { FAILURE_FILE, Manifest, MANIFEST_FILE, readManifest } from "../foundation/manifest.ts";
import { applyOverrides, type Override } from "./overrides.ts";
import { linkTree, type RunOutcome, runStep } from "./runner.ts";
import { newRunId } from "./run_id.ts";

/** Options for {@link rerunFromManifest}. */
export interface RerunOptions {
  overrides: Override[];
  seed?: number;
  projectRoot: string;
  onFinish?: (path: string, manifest: Manifest) => Promise<void>;
  quiet?: boolean;
  /** Finds the manifest's step by name (steps/registry.ts `loadStep`, or the one step a step program is). */
  loadStep: StepLoader;
}

/**
 * Links the upstream step directories `manifest` needs (transitively) from `fromRun` into
 * `toRun`, each with its manifest rewritten for the new run (`runId`, `cachedFrom`) as the
 * runner does for a cache hit; the rewrite replaces the link, so `fromRun` is untouched.
 */
async function linkUpstream(
  manifest: Manifest,
  fromRun: string,
  toRun: string,
  onFinish?: (path: string, manifest: Manifest) => Promise<void>,
): Promise<void> {
  for (const input of Object.values(manifest.inputs)) {
    const src = join(fromRun, input.step);
    const dst = join(toRun, input.step);
    if (await exists(dst)) continue;
    const upstream = await readManifest(join(src, MANIFEST_FILE));
    await linkUpstream(upstream, fromRun, toRun, onFinish);
    const staging = join(toRun, `.${input.step}.staging-${crypto.randomUUID().slice(0, 8)}`);
    await linkTree(src, staging);
    await Deno.remove(join(staging, FAILURE_FILE)).catch(() => {});
    const now = new Date().toISOString();
    const linked = Manifest.parse({
      ...upstream,
      runId: basename(toRun),
      startedAt: now,
      finishedAt: now,
      cachedFrom: upstream.cachedFrom ?? upstream.runId,
    });
    await writeJsonAtomic(join(staging, MANIFEST_FILE), linked);
    await Deno.rename(staging, dst);
    await onFinish?.(join(dst, MANIFEST_FILE), linked);
  }
}

/**
 * Reruns the step that wrote `manifestPath` (a `manifest.json` or `failure.json`).
 * Without overrides it reruns in place (forced) and fails if an input or source changed;
 * with overrides or another seed it branches a variant run.
 */
export async function rerunFromManifest(manifestPath: string, opts: RerunOptions): Promise<RunOutcome> {
  const manifest = await readManifest(manifestPath);
  const def = await opts.loadStep(stepOfInstance(manifest.step));
  const stepDir = dirname(manifestPath);
  const runDir = dirname(stepDir);
  if (basename(stepDir) !== manifest.step || basename(runDir) !== manifest.runId) {
    throw new LatheError(
      `Cannot rerun from "${manifestPath}": it belongs to step "${manifest.step}" of run "${manifest.runId}" but lies in "${runDir}"`,
      { hint: "rerun from the manifest inside its own run directory (runs/<run-id>/<step>/manifest.json)" },
    );
  }
  const runsRoot = dirname(runDir);
  const config = applyOverrides(manifest.config, opts.overrides);
  const seed = opts.seed ?? manifest.seed;
  const expectInputKeys = Object.fromEntries(Object.entries(manifest.inputs).map(([k, v]) => [k, v.key]));
  // The same instance, reading the instances it read.
  const instance = {
    instance: manifest.step,
    inputSteps: Object.fromEntries(Object.entries(manifest.inputs).map(([k, v]) => [k, v.step])),
  };
  const variant = opts.overrides.length > 0 || seed !== manifest.seed;
  if (!variant) {
    return await runStep(def, {
      ...instance,
      runsRoot,
      runId: manifest.runId,
      recipe: manifest.recipe,
      config,
      seed,
      projectRoot: opts.projectRoot,
      force: true,
      expectInputKeys,
      expectSources: manifest.sources,
      onFinish: opts.onFinish,
      quiet: opts.quiet,
    });
  }
  const runId = newRunId(`${manifest.step}-variant`);
  await linkUpstream(manifest, runDir, join(runsRoot, runId), opts.onFinish);
  return await runStep(def, {
    ...instance,
    runsRoot,
    runId,
    recipe: manifest.recipe,
    config,
    seed,
    projectRoot: opts.projectRoot,
    expectInputKeys,
    onFinish: opts.onFinish,
    quiet: opts.quiet,
  });
}
