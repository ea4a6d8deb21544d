/**
 * Runs one step under the contract of DESIGN §2: validate the config, verify the
 * upstream manifests and their outputs by hash, hash the sources, compute the key,
 * reuse an earlier identical result (cache hit) or run the step in a staging directory,
 * hash its outputs, write the manifest last and swap the directory into place.
 * A failed step leaves `failure.json` and no manifest claiming success.
 * @module
 */
import { basename, dirname, isAbsolute, join, relative, resolve } from "node:path";
import type * as z from "zod";
import { exists, writeJsonAtomic } from "../foundation/atomic.ts";
import { boundInputs, type StepContext, type StepDef, type Upstream } from "./define.ts";
import { formatZodIssues, LatheError } from "../foundation/errors.ts";
import { canonicalJson, sha256File, sha256Hex } from "../foundation/hash.ts";
import { sourceHash } from "../hub/cache.ts";
import {
  FAILURE_FILE,
  type GpuInfo,
  type InputEntry,
  Manifest,
  MANIFEST_FILE,
  MANIFEST_SCHEMA,
  readManifest,
  type SourceEntry,
} from "../foundation/manifest.ts";
import { Progress } from "../foundation/progress.ts";
import { envInfo, gitInfo } from "./provenance.ts";

/** How to run a step. */
export interface RunOptions {
  /** Absolute path of the runs root (default layout: `<project>/runs`). */
  runsRoot: string;
  runId: string;
  /** Recipe name, or null for a step run alone. */
  recipe: string | null;
  /** The config as given (validated and defaulted here). */
  config: unknown;
  seed: number;
  /** Absolute path of the project root (config paths resolve against it). */
  projectRoot: string;
  /** Run even if a cached result exists. */
  force?: boolean;
  /** Input name -> the key it must have (reruns from a manifest verify this). */
  expectInputKeys?: Record<string, string>;
  /** Source name -> the sha256 it must have (reruns from a manifest verify this). */
  expectSources?: Record<string, SourceEntry>;
  /**
   * The instance this run of the step is (steps/define.ts `INSTANCE_NAME`): its directory and the
   * manifest's `step`. Default: the step's name.
   */
  instance?: string;
  /**
   * Input name -> the instance it reads (a recipe binds each to the nearest earlier instance);
   * an input bound here is read, an optional one left out is not. Default: each input reads
   * the step's default instance, an optional one when that has a manifest in the run.
   */
  inputSteps?: Record<string, string>;
  /** Called with every manifest or failure record written (the tracker indexes it). */
  onFinish?: (path: string, manifest: Manifest) => Promise<void>;
  quiet?: boolean;
}

/** The outcome of {@link runStep}. */
export interface RunOutcome {
  manifest: Manifest;
  manifestPath: string;
  /** "ran", "cached" (same run dir, untouched) or "linked" (reused from another run). */
  status: "ran" | "cached" | "linked";
}

/** Checks that every output file of `manifest` exists in `dir` with its recorded hash. */
export async function verifyOutputs(manifest: Manifest, dir: string): Promise<string[]> {
  const problems: string[] = [];
  for (const [name, entry] of Object.entries(manifest.outputs)) {
    const path = join(dir, entry.path);
    try {
      const { sha256 } = await sha256File(path);
      if (sha256 !== entry.sha256) problems.push(`output "${name}" (${path}) changed since it was written`);
    } catch {
      problems.push(`output "${name}" (${path}) is missing`);
    }
  }
  return problems;
}

/** Makes the {@link Upstream} view of a manifest in `dir`. */
export function upstreamOf(manifest: Manifest, dir: string): Upstream {
  return {
    manifest,
    dir,
    path(name: string): string {
      const entry = manifest.outputs[name];
      if (!entry) {
        throw new LatheError(
          `Cannot use output "${name}" of step "${manifest.step}": it has only ${
            Object.keys(manifest.outputs).map((k) => `"${k}"`).join(", ") || "no outputs"
          }`,
        );
      }
      return join(dir, entry.path);
    },
  };
}

/** Validates a raw config against a step's schema; errors name `<step>.<key>`. */
export function resolveConfig<S extends z.ZodType>(def: StepDef<S>, raw: unknown): z.output<S> {
  const parsed = def.config.safeParse(raw ?? {});
  if (!parsed.success) {
    throw new LatheError(
      `Invalid config for step "${def.name}":\n${formatZodIssues(parsed.error, def.name)}`,
    );
  }
  return parsed.data;
}

/** Path recorded for a source: relative to the project root when inside it. */
function sourceRecordPath(abs: string, projectRoot: string): string {
  const rel = relative(projectRoot, abs);
  return rel.startsWith("..") || isAbsolute(rel) ? abs : rel;
}

/** The cache identity of a step: everything that determines its outputs. */
export function stepKey(
  def: { name: string; version: string },
  configHash: string,
  seed: number,
  inputs: Record<string, InputEntry>,
  sources: Record<string, SourceEntry>,
): string {
  return sha256Hex(canonicalJson({
    step: def.name,
    version: def.version,
    configHash,
    seed,
    inputs: Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, v.key])),
    sources: Object.fromEntries(Object.entries(sources).map(([k, v]) => [k, v.sha256])),
  }));
}

async function readIfSuccess(path: string): Promise<Manifest | null> {
  try {
    const m = await readManifest(path);
    return m.status === "success" ? m : null;
  } catch {
    return null;
  }
}

/** Earlier successful manifests of `step` with `key` anywhere under the runs root, newest first. */
async function findCached(runsRoot: string, step: string, key: string, skipRun: string): Promise<string[]> {
  const found: string[] = [];
  if (!(await exists(runsRoot))) return found;
  for await (const entry of Deno.readDir(runsRoot)) {
    if (!entry.isDirectory || entry.name === skipRun || entry.name.startsWith(".")) continue;
    const path = join(runsRoot, entry.name, step, MANIFEST_FILE);
    const m = await readIfSuccess(path);
    if (m && m.key === key) found.push(path);
  }
  return found.sort().reverse();
}

/** Copies a directory tree, hard-linking files where the filesystem allows. */
export async function linkTree(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  for await (const entry of Deno.readDir(from)) {
    const src = join(from, entry.name);
    const dst = join(to, entry.name);
    if (entry.isDirectory) await linkTree(src, dst);
    else if (entry.isFile) {
      try {
        await Deno.link(src, dst);
      } catch {
        await Deno.copyFile(src, dst);
      }
    }
  }
}

/** Replaces `finalDir` by `stagingDir` (two renames; the old tree is removed after). */
async function swapInto(stagingDir: string, finalDir: string): Promise<void> {
  let old: string | null = null;
  if (await exists(finalDir)) {
    old = join(dirname(finalDir), `.${basename(finalDir)}.old-${crypto.randomUUID().slice(0, 8)}`);
    await Deno.rename(finalDir, old);
  }
  await Deno.rename(stagingDir, finalDir);
  if (old) await Deno.remove(old, { recursive: true });
}

/** Removes staging and old trees left by a killed run of this step. */
async function removeLeftovers(runDir: string, step: string): Promise<void> {
  if (!(await exists(runDir))) return;
  for await (const entry of Deno.readDir(runDir)) {
    if (entry.name.startsWith(`.${step}.staging-`) || entry.name.startsWith(`.${step}.old-`)) {
      await Deno.remove(join(runDir, entry.name), { recursive: true }).catch(() => {});
    }
  }
}

/**
 * The inputs of a step run without bindings: each from its step's default instance; an optional
 * one when that has a manifest in the run, or when a rerun recorded it.
 */
async function defaultInputs(
  def: StepDef,
  runDir: string,
  expect: Record<string, string> | undefined,
): Promise<Record<string, string>> {
  const present = new Set<string>();
  for (const [name, stepName] of Object.entries(def.optionalInputs ?? {})) {
    if (expect?.[name] !== undefined || await exists(join(runDir, stepName, MANIFEST_FILE))) {
      present.add(stepName);
    }
  }
  return boundInputs(def, (s) => present.has(s));
}

/** Resolves a step's declared inputs from the same run directory and verifies them. */
async function resolveInputs(
  def: StepDef,
  runDir: string,
  expect: Record<string, string> | undefined,
  inputSteps: Record<string, string> | undefined,
): Promise<{ entries: Record<string, InputEntry>; upstream: Record<string, Upstream> }> {
  const entries: Record<string, InputEntry> = {};
  const upstream: Record<string, Upstream> = {};
  for (const [name, stepName] of Object.entries(inputSteps ?? await defaultInputs(def, runDir, expect))) {
    const dir = join(runDir, stepName);
    const path = join(dir, MANIFEST_FILE);
    if (!(await exists(path))) {
      throw new LatheError(
        `Cannot run step "${def.name}": its input "${name}" needs step "${stepName}", which has no successful manifest at "${path}"`,
        { hint: `run "${stepName}" first (a recipe orders the steps for you)` },
      );
    }
    const manifest = await readManifest(path);
    const problems = await verifyOutputs(manifest, dir);
    if (problems.length > 0) {
      throw new LatheError(
        `Cannot run step "${def.name}": input "${name}" from step "${stepName}" changed:\n${
          problems.join("\n")
        }`,
        { hint: `rerun "${stepName}" (or the recipe) to rebuild it` },
      );
    }
    if (expect?.[name] !== undefined && expect[name] !== manifest.key) {
      throw new LatheError(
        `Cannot rerun step "${def.name}": input "${name}" (${path}) is not the one it was run with (key ${
          manifest.key.slice(0, 12)
        } != ${expect[name].slice(0, 12)})`,
        {
          hint:
            `use --set to branch a variant on purpose, or rerun "${stepName}" from its own manifest first`,
        },
      );
    }
    entries[name] = { step: stepName, manifest: `../${stepName}/${MANIFEST_FILE}`, key: manifest.key };
    upstream[name] = upstreamOf(manifest, dir);
  }
  return { entries, upstream };
}

/** Hashes the step's declared sources; a rerun verifies them against the recorded hashes. */
async function resolveSources(
  def: StepDef,
  config: unknown,
  projectRoot: string,
  expect: Record<string, SourceEntry> | undefined,
  bound: ReadonlySet<string>,
): Promise<{ entries: Record<string, SourceEntry>; paths: Record<string, string> }> {
  const named = def.sources ? await def.sources(config, projectRoot, bound) : {};
  const entries: Record<string, SourceEntry> = {};
  const paths: Record<string, string> = {};
  for (const [name, p] of Object.entries(named)) {
    const abs = resolve(projectRoot, p);
    let hashed: { sha256: string; bytes: number };
    try {
      hashed = await sourceHash(abs);
    } catch {
      throw new LatheError(`Cannot run step "${def.name}": source "${name}" (${abs}) cannot be read`, {
        hint: "check the path in the config; relative paths are relative to the project root",
      });
    }
    const was = expect?.[name];
    if (was && was.sha256 !== hashed.sha256) {
      throw new LatheError(
        `Cannot rerun step "${def.name}": source "${name}" (${abs}) changed since the manifest was written (sha256 ${
          hashed.sha256.slice(0, 12)
        } != ${was.sha256.slice(0, 12)})`,
        { hint: "restore the file, or use --set to branch a variant on the new data" },
      );
    }
    entries[name] = { path: sourceRecordPath(abs, projectRoot), ...hashed };
    paths[name] = abs;
  }
  return { entries, paths };
}

/** What {@link planStep} needs: {@link RunOptions} less what only running uses. */
export interface PlanOptions {
  runsRoot: string;
  runId: string;
  config: unknown;
  seed: number;
  projectRoot: string;
  /** Input name -> the key it must have (reruns from a manifest verify this). */
  expectInputKeys?: Record<string, string>;
  /** Source name -> the sha256 it must have (reruns from a manifest verify this). */
  expectSources?: Record<string, SourceEntry>;
  /**
   * Upstream instance name -> its key, when the upstream manifests are not (yet) in the run
   * directory (a dry run). Without it the inputs are read and verified from the run directory.
   */
  inputKeys?: Record<string, string>;
  /** Input name -> the instance it reads (see {@link RunOptions.inputSteps}). */
  inputSteps?: Record<string, string>;
}

/** A step resolved up to its key: everything the cache check and the run need. */
export interface StepPlan {
  /** The validated config, defaults filled in. */
  config: Record<string, unknown>;
  configHash: string;
  inputs: Record<string, InputEntry>;
  /** The upstream views (empty when planned from `inputKeys`). */
  upstream: Record<string, Upstream>;
  sources: Record<string, SourceEntry>;
  /** Absolute paths of the sources, by name. */
  sourcePaths: Record<string, string>;
  key: string;
}

/**
 * Resolves a step without running it: validates the config, resolves and verifies its
 * inputs (or takes their keys from `inputKeys`), hashes its sources and computes its key.
 */
export async function planStep<S extends z.ZodType>(def: StepDef<S>, opts: PlanOptions): Promise<StepPlan> {
  const config = resolveConfig(def, opts.config) as Record<string, unknown>;
  const configHash = sha256Hex(canonicalJson(config));
  let inputs: Record<string, InputEntry>;
  let upstream: Record<string, Upstream> = {};
  if (opts.inputKeys) {
    inputs = {};
    const planned = opts.inputKeys;
    const bound = opts.inputSteps ?? boundInputs(def as StepDef, (s) => s in planned);
    for (const [name, stepName] of Object.entries(bound)) {
      const key = opts.inputKeys[stepName];
      if (key === undefined) {
        throw new LatheError(
          `Cannot plan step "${def.name}": its input "${name}" needs step "${stepName}", which is not planned before it`,
        );
      }
      inputs[name] = { step: stepName, manifest: `../${stepName}/${MANIFEST_FILE}`, key };
    }
  } else {
    ({ entries: inputs, upstream } = await resolveInputs(
      def as StepDef,
      join(opts.runsRoot, opts.runId),
      opts.expectInputKeys,
      opts.inputSteps,
    ));
  }
  const { entries: sources, paths: sourcePaths } = await resolveSources(
    def as StepDef,
    config,
    opts.projectRoot,
    opts.expectSources,
    new Set(Object.keys(inputs)),
  );
  const key = stepKey(def, configHash, opts.seed, inputs, sources);
  return { config, configHash, inputs, upstream, sources, sourcePaths, key };
}

/** An earlier successful result with the same key and intact outputs. */
export interface CacheHit {
  /** "cached": in the same run directory; "linked": in another run (to be linked in). */
  status: "cached" | "linked";
  manifest: Manifest;
  manifestPath: string;
}

/**
 * Finds a reusable result for `step` with `key`: first in run `runId` itself, then the
 * newest other run under `runsRoot` whose outputs are intact. `runId` null searches other runs only.
 */
export async function findCacheHit(
  runsRoot: string,
  runId: string | null,
  step: string,
  key: string,
): Promise<CacheHit | null> {
  if (runId !== null) {
    const manifestPath = join(runsRoot, runId, step, MANIFEST_FILE);
    const here = await readIfSuccess(manifestPath);
    if (here && here.key === key && (await verifyOutputs(here, dirname(manifestPath))).length === 0) {
      return { status: "cached", manifest: here, manifestPath };
    }
  }
  for (const path of await findCached(runsRoot, step, key, runId ?? "")) {
    const origin = await readManifest(path);
    if ((await verifyOutputs(origin, dirname(path))).length > 0) continue;
    return { status: "linked", manifest: origin, manifestPath: path };
  }
  return null;
}

/** Runs (or reuses) one step; see the module doc for the contract. */
export async function runStep<S extends z.ZodType>(def: StepDef<S>, opts: RunOptions): Promise<RunOutcome> {
  const runDir = join(opts.runsRoot, opts.runId);
  const instance = opts.instance ?? def.name;
  const finalDir = join(runDir, instance);
  const manifestPath = join(finalDir, MANIFEST_FILE);
  const startedAt = new Date().toISOString();
  const { config, configHash, inputs, upstream, sources, sourcePaths, key } = await planStep(def, {
    runsRoot: opts.runsRoot,
    runId: opts.runId,
    config: opts.config,
    seed: opts.seed,
    projectRoot: opts.projectRoot,
    expectInputKeys: opts.expectInputKeys,
    expectSources: opts.expectSources,
    inputSteps: opts.inputSteps,
  });
  await removeLeftovers(runDir, instance);

  if (!opts.force) {
    const hit = await findCacheHit(opts.runsRoot, opts.runId, instance, key);
    if (hit?.status === "cached") return { manifest: hit.manifest, manifestPath, status: "cached" };
    if (hit?.status === "linked") {
      const origin = hit.manifest;
      const staging = join(runDir, `.${instance}.staging-${crypto.randomUUID().slice(0, 8)}`);
      await linkTree(dirname(hit.manifestPath), staging);
      await Deno.remove(join(staging, FAILURE_FILE)).catch(() => {});
      const now = new Date().toISOString();
      const manifest: Manifest = {
        ...origin,
        runId: opts.runId,
        recipe: opts.recipe,
        inputs,
        startedAt: now,
        finishedAt: now,
        cachedFrom: origin.cachedFrom ?? origin.runId,
      };
      await writeJsonAtomic(join(staging, MANIFEST_FILE), Manifest.parse(manifest));
      await swapInto(staging, finalDir);
      await opts.onFinish?.(manifestPath, manifest);
      return { manifest, manifestPath, status: "linked" };
    }
  }

  const staging = join(runDir, `.${instance}.staging-${crypto.randomUUID().slice(0, 8)}`);
  await Deno.mkdir(staging, { recursive: true });
  const metricsFile = await Deno.open(join(staging, "metrics.jsonl"), { create: true, append: true });
  const enc = new TextEncoder();
  let gpu: GpuInfo | null = null;
  const ctx: StepContext = {
    runId: opts.runId,
    runDir,
    stepDir: staging,
    projectRoot: opts.projectRoot,
    seed: opts.seed,
    key,
    sources: sourcePaths,
    sourceHashes: Object.fromEntries(Object.entries(sources).map(([k, v]) => [k, v.sha256])),
    async out(rel: string): Promise<string> {
      const abs = resolve(staging, rel);
      if (relative(staging, abs).startsWith("..")) {
        throw new Error(`step "${def.name}" asked to write "${rel}" outside its directory`);
      }
      await Deno.mkdir(dirname(abs), { recursive: true });
      return abs;
    },
    log(name: string, index: number, value: number): void {
      const line = JSON.stringify({ name, step: index, value, time: new Date().toISOString() });
      metricsFile.writeSync(enc.encode(line + "\n"));
    },
    progress(total: number, unit?: string): Progress {
      return new Progress(instance, total, unit, opts.quiet);
    },
    setGpu(info: GpuInfo): void {
      gpu = info;
    },
  };

  const base = {
    schema: MANIFEST_SCHEMA,
    step: instance,
    stepVersion: def.version,
    runId: opts.runId,
    recipe: opts.recipe,
    config,
    configHash,
    seed: opts.seed,
    inputs,
    sources,
    key,
    startedAt,
    cachedFrom: null,
  } as const;

  try {
    const result = await def.run(ctx, config as z.output<S>, upstream);
    metricsFile.close();
    const outputs: Manifest["outputs"] = {};
    const listed = Object.entries(result.outputs);
    if (
      !listed.some(([, p]) => p === "metrics.jsonl") &&
      (await Deno.stat(join(staging, "metrics.jsonl"))).size > 0
    ) {
      listed.push(["metrics_log", "metrics.jsonl"]);
    }
    for (const [name, rel] of listed) {
      const abs = resolve(staging, rel);
      if (!(await exists(abs))) {
        throw new Error(`step "${def.name}" returned output "${name}" (${rel}) but did not write it`);
      }
      outputs[name] = { path: relative(staging, abs), ...(await sha256File(abs)) };
    }
    const manifest: Manifest = Manifest.parse({
      ...base,
      outputs,
      git: await gitInfo(opts.projectRoot),
      env: await envInfo(opts.projectRoot, gpu),
      finishedAt: new Date().toISOString(),
      status: "success",
      metrics: result.metrics ?? {},
      error: null,
    });
    await writeJsonAtomic(join(staging, MANIFEST_FILE), manifest);
    await swapInto(staging, finalDir);
    await opts.onFinish?.(manifestPath, manifest);
    return { manifest, manifestPath, status: "ran" };
  } catch (error) {
    try {
      metricsFile.close();
    } catch { /* already closed */ }
    await Deno.remove(staging, { recursive: true }).catch(() => {});
    const failure: Manifest = {
      ...base,
      outputs: {},
      git: await gitInfo(opts.projectRoot),
      env: await envInfo(opts.projectRoot, gpu),
      finishedAt: new Date().toISOString(),
      status: "failed",
      metrics: {},
      error: error instanceof Error ? error.message : String(error),
    };
    const failurePath = join(finalDir, FAILURE_FILE);
    await writeJsonAtomic(failurePath, failure).catch(() => {});
    await opts.onFinish?.(failurePath, failure).catch(() => {});
    throw error;
  }
}
