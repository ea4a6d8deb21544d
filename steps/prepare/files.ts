/**
 * Data files: which file formats `prepare` reads (by extension), listing a directory tree,
 * and choosing the files of a split from a directory or a Hub repository.
 * @module
 */
import { extname, matchesGlob } from "node:path";

/** How a file is read. */
export type FileFormat = "jsonl" | "json" | "csv" | "parquet";

const EXTENSIONS: ReadonlyMap<string, FileFormat> = new Map([
  [".jsonl", "jsonl"],
  [".ndjson", "jsonl"],
  [".json", "json"],
  [".csv", "csv"],
  [".tsv", "csv"],
  [".parquet", "parquet"],
]);

/** The extensions `prepare` reads, for messages. */
export const SUPPORTED_EXTENSIONS: readonly string[] = [...EXTENSIONS.keys()];

/** The reader for `path` by its extension (case-insensitive), or null if it is not a data file. */
export function fileFormatOf(path: string): FileFormat | null {
  return EXTENSIONS.get(extname(path).toLowerCase()) ?? null;
}

/** Metadata files that `datasets` writes beside the data; never read as rows by default. */
const METADATA_FILES: ReadonlySet<string> = new Set([
  "dataset_info.json",
  "dataset_infos.json",
  "dataset_dict.json",
  "state.json",
]);

/** True when `glob` contains glob syntax. */
export function isGlob(glob: string): boolean {
  return /[*?[\]{}]/.test(glob);
}

/** True when `rel` (a "/"-separated path) matches any of `globs`. */
export function matchesAny(rel: string, globs: readonly string[]): boolean {
  return globs.some((g) => matchesGlob(rel, g));
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/**
 * The data files of a repository or directory, from "/"-separated relative paths:
 * with `globs`, the files matching any of them; otherwise the data files (by extension,
 * metadata files excluded) whose path holds `split` as a word, as the `datasets` library
 * names splits (`train.jsonl`, `data/train-00000-of-00001.parquet`, `train/0.json`). When no
 * file names any split (train, test, validation, valid, dev, eval) and `split` is "train",
 * every data file is training data.
 */
export function selectDataFiles(
  paths: readonly string[],
  split: string,
  globs?: readonly string[],
): string[] {
  if (globs) return paths.filter((p) => matchesAny(p, globs)).sort();
  const data = paths.filter((p) => fileFormatOf(p) !== null && !METADATA_FILES.has(p.split("/").pop() ?? ""))
    .sort();
  const word = new RegExp(`(^|[/._ 0-9-])${escapeRegExp(split)}([/._ 0-9-]|$)`);
  const named = data.filter((p) => word.test(p));
  if (named.length > 0) return named;
  const anySplit = /(^|[/._ 0-9-])(train|test|validation|valid|dev|eval)([/._ 0-9-]|$)/;
  return split === "train" && !data.some((p) => anySplit.test(p)) ? data : [];
}
