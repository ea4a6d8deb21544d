/**
 * The `prepare` step's config: where the data comes from, how rows are read, and how they
 * are split. Every field is documented where it is declared; defaults are filled in by the
 * schema, so the manifest records the config exactly as it was used.
 * @module
 */
import * as z from "zod";

/** Row formats `prepare` reads. `auto` detects the format from a source's first valid row. */
export const DataFormat = z.enum(["auto", "messages", "alpaca", "prompt_response", "text", "preference"]);
export type DataFormat = z.infer<typeof DataFormat>;

/** `org/name` (or a legacy unprefixed `name`) of a Hugging Face dataset repository. */
const HubRepo = z.string().regex(
  /^(?:[A-Za-z0-9][\w.-]*\/)?[A-Za-z0-9][\w.-]*$/,
  'expected a Hub dataset id such as "org/name"',
);

/** A git revision: branch, tag or commit hash; never a path that climbs out of the cache. */
const Revision = z.string().min(1).refine(
  (r) => !r.split("/").some((part) => part === "" || part === "." || part === ".."),
  'expected a branch, tag or commit hash (no empty, "." or ".." path parts)',
);

/** A dataset source given as an object. Exactly one of `path` and `hub` is set. */
export const SourceObject = z.strictObject({
  /**
   * A local file, directory or glob, relative to the project root (or absolute). A directory
   * or glob reads every matching `.jsonl`, `.json`, `.csv`, `.parquet` file in path order.
   */
  path: z.string().min(1).optional(),
  /** A Hugging Face dataset repository, `org/name`. */
  hub: HubRepo.optional(),
  /** Hub revision: branch, tag or commit (default `main`). */
  revision: Revision.default("main"),
  /**
   * Split whose files are read from a Hub repository or a directory when `files` is not
   * given (default `train`): files whose path has the split name as a word, e.g.
   * `data/train-00000-of-00001.parquet` or `train.jsonl`.
   */
  split: z.string().min(1).default("train"),
  /** Glob patterns (relative to the repository or directory) choosing the files to read. */
  files: z.array(z.string().min(1)).min(1).optional(),
  /** Row format of this source; overrides the top-level `format`. */
  format: DataFormat.optional(),
  /**
   * Mixing weight (default 1). Below 1 keeps that fraction of the source's rows (chosen by a
   * seeded hash of the row id); above 1 writes each training row `floor(weight)` times, plus
   * once more for a hashed `weight - floor(weight)` fraction. Evaluation rows are written once.
   */
  weight: z.number().positive().default(1),
}).refine((s) => (s.path === undefined) !== (s.hub === undefined), {
  message: 'a source needs exactly one of "path" and "hub"',
});
export type SourceObject = z.infer<typeof SourceObject>;

/** A source: a path string (relative to the project root) or a {@link SourceObject}. */
export const Source = z.union([z.string().min(1), SourceObject]);
export type Source = z.infer<typeof Source>;

/** Config of the `prepare` step. */
export const PrepareConfig = z.strictObject({
  /** Dataset sources, read in order; their rows keep that order in the output. */
  sources: z.array(Source).min(1),
  /** Row format of every source that does not name its own (default `auto`). */
  format: DataFormat.default("auto"),
  /** Prepended as a system message to every conversation that has none. */
  system_prompt: z.string().min(1).optional(),
  /** `error` (default) stops at the first bad row; `skip` counts and skips bad rows. */
  on_bad_rows: z.enum(["error", "skip"]).default("error"),
  /** Drop exact duplicates after normalisation, keeping the first (default true). */
  dedupe: z.boolean().default(true),
  /** Fraction of rows assigned to `eval.jsonl` by a seeded hash of the row id (default 0.1). */
  eval_fraction: z.number().gte(0).lt(1).default(0.1),
  /** Upper bound on evaluation rows; once reached, later rows go to training. */
  eval_max: z.number().int().nonnegative().optional(),
  /** Stop after this many unique valid rows. */
  max_rows: z.number().int().positive().optional(),
  /** Seed of the split and weight hashes (default: the run's seed). */
  split_seed: z.number().int().optional(),
});
export type PrepareConfig = z.infer<typeof PrepareConfig>;

/** A source with the string shorthand expanded and defaults filled in. */
export function sourceObject(source: Source): SourceObject {
  return typeof source === "string" ? SourceObject.parse({ path: source }) : source;
}
