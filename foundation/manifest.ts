/**
 * The step manifest: the typed record each step writes last into its directory
 * (`runs/<run-id>/<step>/manifest.json`), validated on every read. It is the source of
 * truth for caching, reruns and the tracker. `docs/manifest.md` describes every field.
 * @module
 */
import { isAbsolute, normalize } from "node:path";
import * as z from "zod";
import { formatZodIssues, LatheError } from "./errors.ts";

/** Version of the manifest layout itself (bump on incompatible change). */
export const MANIFEST_SCHEMA = "lathe.manifest/1";

const sha256 = z.string().regex(/^[0-9a-f]{64}$/, "expected a lowercase hex sha256");

/** A path relative to the step directory that stays inside it. */
const insidePath = z.string().min(1).refine(
  (p) => !isAbsolute(p) && !normalize(p).startsWith(".."),
  "must be a relative path inside the step directory",
);

/** An upstream manifest in the same run: `../<step>/manifest.json` (or `../<step>@<label>/…`, an instance). */
const upstreamPath = z.string().regex(
  /^\.\.\/[a-z0-9][a-z0-9-]*(@[a-z0-9][a-z0-9-]*)?\/manifest\.json$/,
  "must be ../<step>/manifest.json (inside the same run directory)",
);

/** One file a step wrote, relative to its step directory. */
export const OutputEntry = z.strictObject({
  path: insidePath,
  sha256,
  bytes: z.number().int().nonnegative(),
});
export type OutputEntry = z.infer<typeof OutputEntry>;

/** One upstream step a step read. */
export const InputEntry = z.strictObject({
  step: z.string(),
  manifest: upstreamPath,
  key: sha256,
});
export type InputEntry = z.infer<typeof InputEntry>;

/**
 * One external file a step read (a dataset, a tokenizer, model weights): its path as the
 * config names it (relative to the project root, or inside a declared root such as the
 * Hugging Face cache) and its content hash, which is part of the step's key.
 */
export const SourceEntry = z.strictObject({
  path: z.string().min(1),
  sha256,
  bytes: z.number().int().nonnegative(),
});
export type SourceEntry = z.infer<typeof SourceEntry>;

export const GitInfo = z.strictObject({
  commit: z.string().nullable(),
  branch: z.string().nullable(),
  dirty: z.boolean(),
  diffHash: z.string().nullable(),
});
export type GitInfo = z.infer<typeof GitInfo>;

export const GpuInfo = z.strictObject({
  description: z.string(),
  vendor: z.string(),
  architecture: z.string(),
  backend: z.string(),
  features: z.array(z.string()),
  fallback: z.boolean(),
});
export type GpuInfo = z.infer<typeof GpuInfo>;

export const EnvInfo = z.strictObject({
  deno: z.string(),
  lathe: z.string(),
  os: z.string(),
  arch: z.string(),
  lockfileHash: z.string().nullable(),
  gpu: GpuInfo.nullable(),
});
export type EnvInfo = z.infer<typeof EnvInfo>;

const metricValue = z.union([z.number(), z.string(), z.boolean(), z.null()]);

/** The manifest as written to disk. */
export const Manifest = z.strictObject({
  schema: z.literal(MANIFEST_SCHEMA),
  step: z.string(),
  stepVersion: z.string(),
  runId: z.string(),
  recipe: z.string().nullable(),
  config: z.record(z.string(), z.unknown()),
  configHash: sha256,
  seed: z.number().int(),
  inputs: z.record(z.string(), InputEntry),
  sources: z.record(z.string(), SourceEntry),
  outputs: z.record(z.string(), OutputEntry),
  key: sha256,
  git: GitInfo,
  env: EnvInfo,
  startedAt: z.string(),
  finishedAt: z.string(),
  status: z.enum(["success", "failed"]),
  /** Set when this step was not computed but reused from an earlier run with the same key. */
  cachedFrom: z.string().nullable(),
  metrics: z.record(z.string(), metricValue),
  error: z.string().nullable(),
});
export type Manifest = z.infer<typeof Manifest>;

/** File name of a successful step's manifest inside its step directory. */
export const MANIFEST_FILE = "manifest.json";
/** File name of a failed attempt's record; never claims success, never replaces outputs. */
export const FAILURE_FILE = "failure.json";

/** Parses and validates manifest JSON text; errors name the file and the field. */
export function parseManifest(text: string, path: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new LatheError(`Cannot read manifest "${path}": not valid JSON (${(error as Error).message})`);
  }
  const parsed = Manifest.safeParse(raw);
  if (!parsed.success) {
    throw new LatheError(
      `Cannot read manifest "${path}":\n${formatZodIssues(parsed.error)}`,
      { hint: "the file was edited or written by another version; rerun the step to rewrite it" },
    );
  }
  return parsed.data;
}

/** Reads and validates a manifest file. */
export async function readManifest(path: string): Promise<Manifest> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new LatheError(`Cannot read manifest "${path}": no such file`, {
        hint: "check the path; `deno task runs ls` lists the runs",
      });
    }
    throw error;
  }
  return parseManifest(text, path);
}
