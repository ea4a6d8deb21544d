/**
 * The step contract. A step is a module in `steps/` that exports `step = defineStep({...})`:
 * a name and version, a config schema (validates, fills defaults, types), the upstream
 * steps it reads, the external files it reads (`sources`, hashed into its key), and a
 * `run` function that writes outputs into its step directory and returns their names.
 * @module
 */
import type * as z from "zod";
import type { GpuInfo, Manifest } from "../foundation/manifest.ts";
import type { Progress } from "../foundation/progress.ts";

/** An upstream step's finished manifest, with helpers to reach its outputs. */
export interface Upstream {
  /** The validated manifest. */
  manifest: Manifest;
  /** Absolute path of the upstream step directory. */
  dir: string;
  /** Absolute path of the upstream output named `name`; throws if it has none. */
  path(name: string): string;
}

/** What a running step can use: where to write, how to log, its seed. */
export interface StepContext {
  runId: string;
  /** Absolute path of `runs/<run-id>`. */
  runDir: string;
  /** Absolute path of the (staging) directory this step writes into. */
  stepDir: string;
  /** Absolute path of the project root; config paths are relative to it. */
  projectRoot: string;
  seed: number;
  /** The step's cache key (see the manifest's `key`): names state kept across runs of the same step, e.g. resumable checkpoints. */
  key: string;
  /** Absolute paths of the declared sources, by name. */
  sources: Record<string, string>;
  /** The sha256 of each declared source, by name (as the manifest records them). */
  sourceHashes: Record<string, string>;
  /** Absolute path for an output file `rel` inside the step directory (parents created). */
  out(rel: string): Promise<string>;
  /** Appends one metric point to `metrics.jsonl` (streamed to the tracker). */
  log(name: string, index: number, value: number): void;
  /** A progress reporter labelled with this step's name. */
  progress(total: number, unit?: string): Progress;
  /** Records the GPU adapter this step ran on (written to `env.gpu`). */
  setGpu(info: GpuInfo): void;
}

/** What `run` returns: output files by name (paths relative to the step dir) and final scalars. */
export interface StepResult {
  outputs: Record<string, string>;
  metrics?: Record<string, number | string | boolean | null>;
}

/** A step definition; see {@link defineStep}. */
export interface StepDef<S extends z.ZodType = z.ZodType> {
  name: string;
  version: string;
  description: string;
  config: S;
  /** Input name -> upstream step name, e.g. `{ data: "prepare" }`. */
  inputs: Record<string, string>;
  /**
   * Inputs bound only when their step is part of the run: in the recipe (which then orders it
   * first), or, for a step run alone, with a manifest in the run directory. E.g. train-sft's
   * `{ base: "quantize" }`: a recipe with a quantize step trains on its 4-bit model.
   */
  optionalInputs?: Record<string, string>;
  /**
   * External files this config reads, by name -> path (relative to the project root or
   * absolute). Resolved before the cache check; their hashes are part of the key. `inputs` holds
   * the names of the inputs bound in this run (optional ones included when bound).
   */
  sources?: (
    config: z.output<S>,
    projectRoot: string,
    inputs: ReadonlySet<string>,
  ) => Promise<Record<string, string>>;
  run: (ctx: StepContext, config: z.output<S>, inputs: Record<string, Upstream>) => Promise<StepResult>;
  /**
   * What a dry run says of the step beyond its key (e.g. train-sft's memory plan): lines built
   * from its config and its upstream steps' configs, reading at most small files (a model's
   * config.json); never weights, never a run.
   */
  describe?: (config: z.output<S>, ctx: DescribeContext) => Promise<string[]>;
}

/** What {@link StepDef.describe} gets. */
export interface DescribeContext {
  projectRoot: string;
  /** The validated configs of the steps bound to its inputs, by input name. */
  inputs: Record<string, Record<string, unknown>>;
}

/**
 * Declares a step. Identity function that fixes the types.
 *
 * @example
 * ```ts
 * import * as z from "zod";
 * import { defineStep } from "./define.ts";
 * export const step = defineStep({
 *   name: "hello", version: "1", description: "writes a greeting",
 *   config: z.strictObject({ who: z.string().default("world") }),
 *   inputs: {},
 *   run: async (ctx, config) => {
 *     await Deno.writeTextFile(await ctx.out("hello.txt"), `hello ${config.who}\n`);
 *     return { outputs: { greeting: "hello.txt" } };
 *   },
 * });
 * ```
 */
export function defineStep<S extends z.ZodType>(def: StepDef<S>): StepDef<S> {
  if (!/^[a-z][a-z0-9-]*$/.test(def.name)) {
    throw new TypeError(`Cannot define step "${def.name}": names are lowercase words joined by "-"`);
  }
  return def;
}

/**
 * The inputs a step reads in a run: its required inputs, and each optional input whose step
 * `present` says is part of the run (input name -> upstream step name).
 */
export function boundInputs(def: StepDef, present: (step: string) => boolean): Record<string, string> {
  const out = { ...def.inputs };
  for (const [name, step] of Object.entries(def.optionalInputs ?? {})) if (present(step)) out[name] = step;
  return out;
}

/**
 * A recipe runs a step more than once under instance names `<step>@<label>` (`tokenize@preference`
 * beside `tokenize`): each instance has its own config, directory and manifest (`step` names the
 * instance), and reads its inputs from the nearest instance of each upstream step before it in
 * the recipe. A plain step name is the step's only (default) instance.
 */
export const INSTANCE_NAME = /^[a-z][a-z0-9-]*(@[a-z0-9][a-z0-9-]*)?$/;

/** The step an instance name runs: `tokenize@preference` -> `tokenize`. */
export function stepOfInstance(instance: string): string {
  const at = instance.indexOf("@");
  return at === -1 ? instance : instance.slice(0, at);
}

/**
 * The instances a step instance reads, by input name: for each required input, and each
 * optional input whose step has an instance in `earlier`, the last instance of that step in
 * `earlier` (the instances before it, in recipe order). A required input without one is left
 * out (the recipe reports it).
 */
export function bindInstances(def: StepDef, earlier: readonly string[]): Record<string, string> {
  const nearest = (step: string) => earlier.findLast((name) => stepOfInstance(name) === step);
  const out: Record<string, string> = {};
  for (const [input, step] of Object.entries(boundInputs(def, (s) => nearest(s) !== undefined))) {
    const found = nearest(step);
    if (found !== undefined) out[input] = found;
  }
  return out;
}

/**
 * Finds a step definition by name. The programs pass steps/registry.ts `loadStep`; the step
 * contract never imports the registry itself, so a step module can be a program without a cycle.
 */
export type StepLoader = (name: string) => Promise<StepDef>;
