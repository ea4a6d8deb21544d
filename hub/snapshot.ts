/**
 * One way to get files of a Hub repository, for models and datasets alike, and one offline
 * rule:
 *
 * - offline (`HF_HUB_OFFLINE`, or a caller that asks for the cache only): the revision
 *   resolves through the cache's `refs/` and the files come from its snapshot;
 * - online: the Hub resolves the revision to a commit, the repository's file list chooses
 *   the files, and `@huggingface/hub` downloads each into the cache (files already there are
 *   not fetched again) and `refs/<revision>` is recorded;
 * - a Hub that cannot be reached falls back to the cached snapshot, with a warning; an
 *   answer from the Hub (401, 404, 5xx) is reported, never masked by the cache.
 *
 * Failures are typed ({@link HubCacheMiss}, {@link HubRequestError}) so that the model and
 * dataset callers can say what they were looking for.
 * @module
 */
import { join } from "node:path";
import { datasetInfo, downloadFileToCacheDir, HubApiError, listFiles, modelInfo } from "@huggingface/hub";
import { LatheError } from "../foundation/errors.ts";
import { Progress } from "../foundation/progress.ts";
import {
  COMMIT,
  findSnapshot,
  type HubRepo,
  isCached,
  repoCacheDir,
  snapshotFiles,
  writeRef,
} from "./cache.ts";
import { hubCredentials, type HubSettings } from "./settings.ts";

/**
 * Chooses the files to get from a repository's file list (sorted, "/"-separated). `read`
 * gives the text of a listed file (from the cache, or downloaded first) for choices that
 * depend on a file, such as a weights index naming its shards. A chosen file that is not
 * listed is missing: the snapshot is incomplete.
 */
export type FileChooser = (paths: string[], read: (path: string) => Promise<string>) => Promise<string[]>;

/** What to get. */
export interface SnapshotRequest {
  readonly repo: HubRepo;
  /** Branch, tag or 40-hex commit. */
  readonly revision: string;
  readonly choose: FileChooser;
  /** Read the cache only, even online. */
  readonly cacheOnly?: boolean;
  /** fetch for Hub requests (a proxy, or tests); default the global fetch. */
  readonly fetch?: typeof fetch;
  /** Show download progress (files); default true. */
  readonly progress?: boolean;
}

/** The chosen files of one commit, in the cache. */
export interface Snapshot {
  readonly commit: string;
  /** Absolute path of `snapshots/<commit>`. */
  readonly dir: string;
  /** The chosen files, relative to `dir`. */
  readonly files: string[];
  /** Every file of the commit (the Hub's listing, or the cached snapshot's). */
  readonly listed: string[];
  readonly source: "cache" | "hub";
}

/** The cache cannot serve a request: which path or chosen files are missing. */
export class HubCacheMiss extends LatheError {
  constructor(
    readonly repo: HubRepo,
    readonly revision: string,
    /** The commit the revision resolved to, when it did. */
    readonly commit: string | undefined,
    /** The layout path that is missing, or null when the snapshot lacks chosen files. */
    readonly missingPath: string | null,
    /** Chosen files the snapshot does not have. */
    readonly missingFiles: string[],
    /** In words: "it is not", `no ref "dev" is recorded for it`, `snapshot 0123456789ab lacks "x"`. */
    readonly why: string,
  ) {
    super(
      `Cannot find ${repo.type} "${repo.name}" (revision "${revision}") in the Hugging Face cache: ${
        missingPath === null ? why : `"${missingPath}" does not exist`
      }`,
      {
        hint: "run once with network access (without HF_HUB_OFFLINE=1) to download it, " +
          "or point HF_HOME / HF_HUB_CACHE at the cache that holds it",
      },
    );
  }
}

/** How a Hub request failed: an answer with an HTTP status, or no answer at all. */
export interface HubFailure {
  /** The HTTP status of the Hub's answer, when it sent one. */
  readonly status?: number;
  /** True when the Hub could not be reached (refused, DNS, TLS): no answer from it. */
  readonly unreachable: boolean;
  /** The underlying message. */
  readonly reason: string;
}

/** A Hub request failed. */
export class HubRequestError extends LatheError {
  constructor(
    readonly repo: HubRepo,
    readonly revision: string,
    readonly endpoint: string,
    readonly failure: HubFailure,
    /** Online, the Hub unreachable, and this is why the cache could not serve instead. */
    readonly cacheMiss: HubCacheMiss | null,
    cause: unknown,
  ) {
    super(
      `Cannot download ${repo.type} "${repo.name}" (revision "${revision}") from ${endpoint}: ${
        failure.unreachable
          ? `the Hub cannot be reached (${failure.reason})${
            cacheMiss ? ` and the ${repo.type} is not cached` : ""
          }`
          : failure.reason
      }`,
      {
        hint: failure.unreachable
          ? "check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 reads the local cache only"
          : `check the name and revision; private or gated ${repo.type}s need HF_TOKEN`,
        cause,
      },
    );
  }
}

/** The commit lacks chosen files (a missing config.json, or a shard the weights index names). */
export class HubMissingFiles extends LatheError {
  constructor(
    readonly repo: HubRepo,
    readonly revision: string,
    readonly missingFiles: string[],
    /** Every file of the commit. */
    readonly listed: string[],
  ) {
    super(
      `Cannot download ${repo.type} "${repo.name}" (revision "${revision}"): the repo has no ${
        missingFiles.map((m) => `"${m}"`).join(", ")
      }`,
    );
  }
}

/** Gets the chosen files of `request.repo` at `request.revision` by the offline rule above. */
export async function snapshot(settings: HubSettings, request: SnapshotRequest): Promise<Snapshot> {
  if (settings.offline || request.cacheOnly) return await fromCache(settings, request);
  try {
    return await download(settings, request);
  } catch (error) {
    if (!(error instanceof HubRequestError) || !error.failure.unreachable) throw error;
    let cached: Snapshot;
    try {
      cached = await fromCache(settings, request);
    } catch (miss) {
      if (!(miss instanceof HubCacheMiss)) throw miss;
      const { repo, revision, endpoint, failure } = error;
      throw new HubRequestError(repo, revision, endpoint, failure, miss, error.cause);
    }
    console.error(
      `warning: cannot reach ${settings.endpoint} (${error.failure.reason}); using the cached snapshot ${cached.commit}`,
    );
    return cached;
  }
}

/** Resolves the revision through `refs/` and chooses among the snapshot's files. */
export async function fromCache(settings: HubSettings, request: SnapshotRequest): Promise<Snapshot> {
  const { repo, revision } = request;
  const found = await findSnapshot(settings.cacheDir, repo, revision);
  if (!isCached(found)) {
    throw new HubCacheMiss(repo, revision, found.commit, found.missing, [], found.why);
  }
  const listed = await snapshotFiles(found.dir);
  const read = (path: string) => Deno.readTextFile(join(found.dir, path));
  const files = await request.choose(listed, read);
  const present = new Set(listed);
  const missing = files.filter((f) => !present.has(f));
  if (missing.length > 0) {
    const why = `snapshot ${found.commit.slice(0, 12)} lacks ${missing.map((m) => `"${m}"`).join(", ")}`;
    throw new HubCacheMiss(repo, revision, found.commit, null, missing, why);
  }
  return { commit: found.commit, dir: found.dir, files, listed, source: "cache" };
}

/** Asks the Hub for the commit and the file list, then downloads the chosen files into the cache. */
async function download(settings: HubSettings, request: SnapshotRequest): Promise<Snapshot> {
  const { repo, revision } = request;
  const credentials = hubCredentials(settings, request.fetch);
  const failed = (error: unknown) => requestError(repo, revision, settings.endpoint, error);
  const designation = { type: repo.type, name: repo.name };
  let commit: string;
  const listed: string[] = [];
  try {
    const query = { ...credentials, name: repo.name, revision, additionalFields: ["sha"] as ["sha"] };
    const info = repo.type === "model" ? await modelInfo(query) : await datasetInfo(query);
    if (typeof info.sha !== "string" || !COMMIT.test(info.sha)) {
      throw new LatheError(
        `Cannot resolve revision "${revision}" of ${repo.type} "${repo.name}": the Hub sent no commit hash`,
      );
    }
    commit = info.sha;
    for await (
      const entry of listFiles({ ...credentials, repo: designation, revision: commit, recursive: true })
    ) {
      if (entry.type === "file") listed.push(entry.path);
    }
  } catch (error) {
    throw failed(error);
  }
  listed.sort();
  const fetchFile = async (path: string): Promise<string> => {
    try {
      return await downloadFileToCacheDir({
        ...credentials,
        repo: designation,
        path,
        revision: commit,
        cacheDir: settings.cacheDir,
      });
    } catch (error) {
      throw failed(error);
    }
  };
  const files = await request.choose(listed, async (path) => await Deno.readTextFile(await fetchFile(path)));
  const present = new Set(listed);
  const missing = files.filter((f) => !present.has(f));
  if (missing.length > 0) throw new HubMissingFiles(repo, revision, missing, listed);
  const progress = request.progress === false || files.length === 0
    ? null
    : new Progress(`download ${repo.name}`, files.length, "files");
  for (const path of files) {
    await fetchFile(path);
    progress?.tick();
  }
  progress?.done();
  await writeRef(settings.cacheDir, repo, revision, commit);
  return {
    commit,
    dir: join(repoCacheDir(settings.cacheDir, repo), "snapshots", commit),
    files,
    listed,
    source: "hub",
  };
}

/** A failed `@huggingface/hub` call as a {@link HubRequestError}; lathe's own errors pass through. */
function requestError(repo: HubRepo, revision: string, endpoint: string, error: unknown): Error {
  if (error instanceof LatheError) return error;
  const reason = (error as Error).message;
  if (error instanceof HubApiError) {
    return new HubRequestError(
      repo,
      revision,
      endpoint,
      { status: error.statusCode, unreachable: false, reason },
      null,
      error,
    );
  }
  // fetch rejects with a TypeError when no answer came (refused, DNS, TLS).
  const unreachable = error instanceof TypeError && !("statusCode" in error);
  return new HubRequestError(repo, revision, endpoint, { unreachable, reason }, null, error);
}
