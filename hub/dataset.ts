/**
 * Hugging Face Hub dataset repositories, read through the Hugging Face cache (hub/cache.ts)
 * by the one download path and offline rule of hub/snapshot.ts: online, the revision
 * resolves to a commit on the Hub and the chosen files download into the cache; offline
 * (`HF_HUB_OFFLINE=1`, or when asked for the cache only) they come from the cached snapshot;
 * a Hub that cannot be reached falls back to the cache with a warning.
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import { repoCacheDir as cacheDirOf } from "./cache.ts";
import { snapshot } from "./snapshot.ts";
import type { HubSettings } from "./settings.ts";

export { type HubSettings, hubSettings } from "./settings.ts";

/** The cache folder of a dataset repository: `datasets--org--name`. */
export function repoCacheDir(cacheDir: string, repo: string): string {
  return cacheDirOf(cacheDir, { type: "dataset", name: repo });
}

/** Files of one snapshot of a dataset repository. */
export interface HubSnapshot {
  commit: string;
  /** Absolute path of `snapshots/<commit>`. */
  dir: string;
  /** Chosen files, "/"-separated paths relative to `dir`. */
  files: string[];
}

/** How files are chosen from a repository's file list. */
export type FileChooser = (paths: string[]) => string[];

/**
 * The chosen files of a Hub dataset at `revision`: from the cache when offline or
 * `cacheOnly`, else downloaded (a failed connection falls back to the cache, with a warning).
 */
export async function hubSnapshot(
  settings: HubSettings,
  repo: string,
  revision: string,
  choose: FileChooser,
  cacheOnly = false,
): Promise<HubSnapshot> {
  const got = await snapshot(settings, {
    repo: { type: "dataset", name: repo },
    revision,
    choose: (paths) => Promise.resolve(choose(paths)),
    cacheOnly,
  });
  if (got.files.length > 0) return { commit: got.commit, dir: got.dir, files: got.files };
  if (got.source === "cache") {
    throw new LatheError(
      `Cannot find data files of dataset "${repo}" (revision "${revision}") in the Hugging Face cache "${got.dir}"`,
      {
        hint: "run once with network access (without HF_HUB_OFFLINE=1) to download it, or point HF_HOME / " +
          'HF_HUB_CACHE at the cache that holds it; check "split" and "files" of the source',
      },
    );
  }
  const some = got.listed.slice(0, 8).map((p) => `"${p}"`).join(", ") || "none";
  throw new LatheError(
    `Cannot find data files of dataset "${repo}" (revision "${revision}"): none matches (files: ${some}${
      got.listed.length > 8 ? ", ..." : ""
    })`,
    { hint: 'set "split" or "files" (glob patterns) on the source' },
  );
}
