/**
 * The Hugging Face cache, laid out as huggingface_hub writes it, so Python tools and lathe
 * share downloads:
 *
 * ```
 * <cache dir>/                                  $HF_HUB_CACHE (hub/settings.ts)
 *   models--<org>--<name>/                      datasets--<org>--<name>/ for datasets
 *     refs/<revision>                           the commit hash a branch or tag pointed to
 *     blobs/<etag>                              file contents (LFS files: the sha256 of the content)
 *     snapshots/<commit>/<path>                 links to the blobs
 * ```
 * @module
 */
import { join } from "node:path";
import { exists, writeFileAtomic } from "../foundation/atomic.ts";
import { sha256File } from "../foundation/hash.ts";
import { walkFiles } from "../foundation/walk.ts";

/** A Hub repository: `@huggingface/hub`'s RepoDesignation for models and datasets. */
export interface HubRepo {
  readonly type: "model" | "dataset";
  /** "org/name" (or "name"). */
  readonly name: string;
}

/** A 40-hex commit hash. */
export const COMMIT = /^[0-9a-f]{40}$/;

/** The cache folder name of a repo: `org/name` -> `models--org--name` (or `datasets--org--name`). */
export function repoFolderName(repo: HubRepo): string {
  return [`${repo.type}s`, ...repo.name.split("/")].join("--");
}

/** The cache folder of a repo. */
export function repoCacheDir(cacheDir: string, repo: HubRepo): string {
  return join(cacheDir, repoFolderName(repo));
}

/** A snapshot directory of the cache: `snapshots/<commit>`. */
export interface CachedSnapshot {
  readonly commit: string;
  /** Absolute path of `snapshots/<commit>`. */
  readonly dir: string;
}

/** Where a cache lookup stopped: the path that is missing and why, in words. */
export interface CacheMiss {
  /** The commit, when the revision resolved to one. */
  readonly commit?: string;
  /** The path that does not exist. */
  readonly missing: string;
  /** "it is not", `no ref "dev" is recorded for it`, `no snapshot ...`. */
  readonly why: string;
}

/**
 * Resolves `revision` (a branch, tag or commit) of `repo` to its snapshot directory through
 * `refs/`, or says which part of the layout is missing.
 */
export async function findSnapshot(
  cacheDir: string,
  repo: HubRepo,
  revision: string,
): Promise<CachedSnapshot | CacheMiss> {
  const storage = repoCacheDir(cacheDir, repo);
  const ref = join(storage, "refs", revision);
  if (!(await exists(storage))) {
    // The first path of the layout a lookup needs: the ref, or the snapshot of a commit.
    return { missing: COMMIT.test(revision) ? join(storage, "snapshots", revision) : ref, why: "it is not" };
  }
  let commit = revision;
  if (!COMMIT.test(revision)) {
    try {
      commit = (await Deno.readTextFile(ref)).trim();
    } catch {
      return { missing: ref, why: `no ref "${revision}" is recorded for it` };
    }
  }
  const dir = join(storage, "snapshots", commit);
  if (!(await exists(dir))) return { commit, missing: dir, why: `no snapshot "${dir}"` };
  return { commit, dir };
}

/** True when a lookup found its snapshot. */
export function isCached(lookup: CachedSnapshot | CacheMiss): lookup is CachedSnapshot {
  return "dir" in lookup;
}

/** The files of a snapshot directory, "/"-separated and sorted (links to blobs count as files). */
export function snapshotFiles(dir: string): Promise<string[]> {
  return walkFiles(dir);
}

/** Records `refs/<revision>` -> `commit` as huggingface_hub does, so offline runs find it. */
export async function writeRef(
  cacheDir: string,
  repo: HubRepo,
  revision: string,
  commit: string,
): Promise<void> {
  if (revision === commit) return;
  await writeFileAtomic(join(repoCacheDir(cacheDir, repo), "refs", revision), commit);
}

/**
 * sha256 and size of a file a step reads. Files in the Hugging Face cache that resolve to
 * `blobs/<64 hex>` are LFS objects stored under the sha256 of their content (the Hub's
 * content addressing), so that name is the hash and multi-GB weights are not read again each
 * time a step is planned; every other file (git blobs are named by a 40-hex oid) is hashed.
 */
export async function sourceHash(path: string): Promise<{ sha256: string; bytes: number }> {
  const real = await Deno.realPath(path);
  const parts = real.split(/[\\/]/);
  const name = parts[parts.length - 1];
  if (parts[parts.length - 2] === "blobs" && /^[0-9a-f]{64}$/.test(name)) {
    return { sha256: name, bytes: (await Deno.stat(real)).size };
  }
  return await sha256File(path);
}
