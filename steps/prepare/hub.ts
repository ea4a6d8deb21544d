/**
 * Hugging Face Hub dataset repositories, read through the Hugging Face cache so that
 * Python tools and lathe share downloads:
 *
 * ```
 * $HF_HUB_CACHE (default $HF_HOME/hub, HF_HOME default ~/.cache/huggingface)
 *   datasets--<org>--<name>/
 *     refs/<revision>                 the commit hash the revision pointed to
 *     blobs/<etag>                    file contents
 *     snapshots/<commit>/<path>       links to the blobs
 * ```
 *
 * Online, the revision is resolved to a commit, the repository's file list chooses the
 * files, and `@huggingface/hub` downloads each into the cache. With `HF_HUB_OFFLINE=1`
 * (or when asked for the cache only) the revision is resolved through `refs/` and the files
 * are listed from the snapshot directory. `HF_ENDPOINT` and `HF_TOKEN` (or the token file
 * that `huggingface-cli login` writes) are respected.
 * @module
 */
import { join } from "node:path";
import { datasetInfo, downloadFileToCacheDir, listFiles } from "@huggingface/hub";
import { exists, writeFileAtomic } from "../atomic.ts";
import { LatheError } from "../errors.ts";
import { walkFiles } from "./files.ts";

/** Where and how to reach the Hub. */
export interface HubSettings {
  /** The hub cache directory (`$HF_HUB_CACHE`, else `$HF_HOME/hub`). */
  cacheDir: string;
  /** Base URL of the Hub (`$HF_ENDPOINT`, default https://huggingface.co). */
  endpoint: string;
  /** Access token for private and gated repositories. */
  token?: string;
  /** True when `HF_HUB_OFFLINE` is set: use the cache only. */
  offline: boolean;
}

/** Reads the Hub settings from environment variables (`env` defaults to `Deno.env.get`). */
export function hubSettings(env: (name: string) => string | undefined = (n) => Deno.env.get(n)): HubSettings {
  const home = env("HOME") ?? env("USERPROFILE") ?? ".";
  const hfHome = env("HF_HOME") ?? join(env("XDG_CACHE_HOME") ?? join(home, ".cache"), "huggingface");
  let token = env("HF_TOKEN") ?? env("HUGGING_FACE_HUB_TOKEN");
  if (!token) {
    try {
      token = Deno.readTextFileSync(env("HF_TOKEN_PATH") ?? join(hfHome, "token")).trim() || undefined;
    } catch {
      token = undefined;
    }
  }
  return {
    cacheDir: env("HF_HUB_CACHE") ?? join(hfHome, "hub"),
    endpoint: (env("HF_ENDPOINT") ?? "https://huggingface.co").replace(/\/+$/, ""),
    token,
    offline: /^(1|on|yes|true)$/i.test(env("HF_HUB_OFFLINE") ?? ""),
  };
}

/** The cache folder of a dataset repository: `datasets--org--name`. */
export function repoCacheDir(cacheDir: string, repo: string): string {
  return join(cacheDir, `datasets--${repo.split("/").join("--")}`);
}

const COMMIT = /^[0-9a-f]{40}$/;

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

/** Resolves `revision` through the cache and chooses files among those in the snapshot. */
export async function resolveFromCache(
  settings: HubSettings,
  repo: string,
  revision: string,
  choose: FileChooser,
): Promise<HubSnapshot> {
  const storage = repoCacheDir(settings.cacheDir, repo);
  const hint = "run once with network access (without HF_HUB_OFFLINE=1) to download it, " +
    "or point HF_HOME / HF_HUB_CACHE at the cache that holds it";
  let commit = revision;
  if (!COMMIT.test(revision)) {
    try {
      commit = (await Deno.readTextFile(join(storage, "refs", revision))).trim();
    } catch {
      throw new LatheError(
        `Cannot find dataset "${repo}" (revision "${revision}") in the Hugging Face cache: "${
          join(storage, "refs", revision)
        }" does not exist`,
        { hint },
      );
    }
  }
  const dir = join(storage, "snapshots", commit);
  if (!(await exists(dir))) {
    throw new LatheError(
      `Cannot find dataset "${repo}" (revision "${revision}") in the Hugging Face cache: ` +
        `no snapshot "${dir}"`,
      { hint },
    );
  }
  const files = choose(await walkFiles(dir));
  if (files.length === 0) {
    throw new LatheError(
      `Cannot find data files of dataset "${repo}" (revision "${revision}") ` +
        `in the Hugging Face cache "${dir}"`,
      { hint: `${hint}; check "split" and "files" of the source` },
    );
  }
  return { commit, dir, files };
}

/** True for errors that mean the Hub could not be reached (not an answer from it). */
function isConnectionError(error: unknown): boolean {
  return error instanceof TypeError && !("statusCode" in error);
}

/** Downloads the chosen files of `repo` at `revision` into the cache (existing files are reused). */
export async function downloadSnapshot(
  settings: HubSettings,
  repo: string,
  revision: string,
  choose: FileChooser,
): Promise<HubSnapshot> {
  if (settings.token && !settings.token.startsWith("hf_")) {
    throw new LatheError('Cannot use the Hugging Face token: it does not start with "hf_"', {
      hint: "set HF_TOKEN to an access token from https://huggingface.co/settings/tokens",
    });
  }
  const auth = settings.token ? { accessToken: settings.token } : {};
  const hubUrl = settings.endpoint;
  const info = await datasetInfo({ name: repo, revision, additionalFields: ["sha"], hubUrl, ...auth });
  const commit = info.sha;
  if (typeof commit !== "string" || !COMMIT.test(commit)) {
    throw new LatheError(
      `Cannot resolve revision "${revision}" of dataset "${repo}": the Hub sent no commit hash`,
    );
  }
  const storage = repoCacheDir(settings.cacheDir, repo);
  if (revision !== commit) await writeFileAtomic(join(storage, "refs", revision), commit);
  const listed: string[] = [];
  for await (
    const entry of listFiles({
      repo: { type: "dataset", name: repo },
      recursive: true,
      revision: commit,
      hubUrl,
      ...auth,
    })
  ) {
    if (entry.type === "file") listed.push(entry.path);
  }
  const files = choose(listed.sort());
  if (files.length === 0) {
    const some = listed.slice(0, 8).map((p) => `"${p}"`).join(", ") || "none";
    throw new LatheError(
      `Cannot find data files of dataset "${repo}" (revision "${revision}"): none matches (files: ${some}${
        listed.length > 8 ? ", ..." : ""
      })`,
      { hint: 'set "split" or "files" (glob patterns) on the source' },
    );
  }
  for (const path of files) {
    await downloadFileToCacheDir({
      repo: { type: "dataset", name: repo },
      path,
      revision: commit,
      hubUrl,
      cacheDir: settings.cacheDir,
      ...auth,
    });
  }
  return { commit, dir: join(storage, "snapshots", commit), files };
}

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
  if (settings.offline || cacheOnly) return await resolveFromCache(settings, repo, revision, choose);
  try {
    return await downloadSnapshot(settings, repo, revision, choose);
  } catch (error) {
    if (error instanceof LatheError) throw error;
    const reason = (error as Error).message;
    const unreachable = isConnectionError(error);
    if (unreachable) {
      try {
        const cached = await resolveFromCache(settings, repo, revision, choose);
        console.error(
          `warning: cannot reach ${settings.endpoint} (${reason}); ` +
            `using the cached snapshot ${cached.commit}`,
        );
        return cached;
      } catch {
        // Not cached either: report the connection problem below.
      }
    }
    throw new LatheError(
      `Cannot download dataset "${repo}" (revision "${revision}") from ${settings.endpoint}: ${
        unreachable ? `the Hub cannot be reached (${reason}) and the dataset is not cached` : reason
      }`,
      {
        hint: unreachable
          ? "check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 reads the local cache only"
          : "check the name and revision; private or gated datasets need HF_TOKEN",
        cause: error,
      },
    );
  }
}
