/**
 * Resolving the configured sources into the data files they name: a local file, a
 * directory or glob (relative to the project root), or a Hub dataset repository (through
 * the Hugging Face cache). Each file gets a label, the name it has in row locations and
 * in the manifest's `sources`: the project-relative path for local files,
 * `hf://datasets/<org>/<name>@<revision>/<path>` for Hub files.
 * @module
 */
import { isAbsolute, join, relative, resolve, sep } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { type PrepareConfig, type SourceObject, sourceObject } from "./config.ts";
import {
  type FileFormat,
  fileFormatOf,
  isGlob,
  matchesAny,
  selectDataFiles,
  SUPPORTED_EXTENSIONS,
} from "./files.ts";
import { walkFiles } from "../../foundation/walk.ts";
import { type HubSettings, hubSettings, hubSnapshot } from "../../hub/dataset.ts";

/** One data file to read. */
export interface SourceFile {
  /** Name in row locations and in the manifest. */
  label: string;
  /** Absolute path. */
  path: string;
  format: FileFormat;
}

/** A configured source and the files it resolved to, in reading order. */
export interface ResolvedSource {
  /** Position in `sources`, for messages. */
  index: number;
  source: SourceObject;
  files: SourceFile[];
}

/** Options of {@link resolveSources}. */
export interface ResolveOptions {
  /** Resolve Hub sources from the cache only (no network). */
  cacheOnly?: boolean;
  /** Hub settings (default: from the environment). */
  hub?: HubSettings;
}

function toPosix(path: string): string {
  return sep === "/" ? path : path.split(sep).join("/");
}

/** The label of a local file: relative to the project root when inside it, else absolute. */
function localLabel(abs: string, projectRoot: string): string {
  const rel = relative(projectRoot, abs);
  return rel.startsWith("..") || isAbsolute(rel) ? toPosix(abs) : toPosix(rel);
}

function dataFile(abs: string, label: string, at: string): SourceFile {
  const format = fileFormatOf(abs);
  if (format === null) {
    throw new LatheError(
      `Cannot read ${at}: "${label}" is not a data file (readable: ${SUPPORTED_EXTENSIONS.join(", ")})`,
    );
  }
  return { label, path: abs, format };
}

/** The longest leading part of a glob without glob syntax: the directory to walk. */
function globBase(glob: string): string {
  const parts = toPosix(glob).split("/");
  const fixed: string[] = [];
  for (const part of parts.slice(0, -1)) {
    if (isGlob(part)) break;
    fixed.push(part);
  }
  return fixed.join("/") || ".";
}

async function resolveLocal(source: SourceObject, at: string, projectRoot: string): Promise<SourceFile[]> {
  const given = source.path!;
  const abs = resolve(projectRoot, given);
  let info: Deno.FileInfo | null = null;
  try {
    info = await Deno.stat(abs);
  } catch {
    info = null;
  }
  if (info?.isFile) {
    if (source.files) {
      throw new LatheError(
        `Cannot read ${at}: "files" chooses files in a directory, but "${given}" is a file`,
      );
    }
    return [dataFile(abs, localLabel(abs, projectRoot), at)];
  }
  let found: SourceFile[];
  if (info?.isDirectory) {
    found = selectDataFiles(await walkFiles(abs), source.split, source.files).map((rel) => {
      const file = join(abs, rel);
      return dataFile(file, localLabel(file, projectRoot), at);
    });
  } else if (isGlob(given)) {
    const pattern = toPosix(isAbsolute(given) ? given : resolve(projectRoot, given));
    const base = globBase(pattern);
    const all = await walkFiles(base).catch(() => [] as string[]);
    found = all.map((rel) => `${base === "/" ? "" : base}/${rel}`)
      .filter((p) => matchesAny(p, [pattern]))
      .filter((p) => fileFormatOf(p) !== null)
      .map((p) => dataFile(p, localLabel(p, projectRoot), at));
  } else {
    throw new LatheError(`Cannot read ${at}: "${given}" does not exist (looked for "${abs}")`, {
      hint: "paths are relative to the project root; check the spelling",
    });
  }
  if (found.length === 0) {
    throw new LatheError(`Cannot read ${at}: "${given}" holds no data files to read`, {
      hint: `readable: ${SUPPORTED_EXTENSIONS.join(", ")}; a directory reads the "${source.split}" split ` +
        `or the files matching "files"`,
    });
  }
  return found;
}

async function resolveHub(source: SourceObject, at: string, opts: ResolveOptions): Promise<SourceFile[]> {
  const repo = source.hub!;
  const settings = opts.hub ?? hubSettings();
  const snapshot = await hubSnapshot(
    settings,
    repo,
    source.revision,
    (paths) => selectDataFiles(paths, source.split, source.files),
    opts.cacheOnly,
  );
  return snapshot.files.map((rel) =>
    dataFile(join(snapshot.dir, rel), `hf://datasets/${repo}@${source.revision}/${rel}`, at)
  );
}

/** Resolves every configured source into its data files; see the module doc. */
export async function resolveSources(
  config: Pick<PrepareConfig, "sources">,
  projectRoot: string,
  opts: ResolveOptions = {},
): Promise<ResolvedSource[]> {
  const out: ResolvedSource[] = [];
  for (const [index, raw] of config.sources.entries()) {
    const source = sourceObject(raw);
    const at = `prepare.sources[${index}]`;
    const files = source.hub !== undefined
      ? await resolveHub(source, at, opts)
      : await resolveLocal(source, at, projectRoot);
    out.push({ index, source, files });
  }
  return out;
}
