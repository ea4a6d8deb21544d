/**
 * Uploads files to a Hugging Face Hub model repository in one commit, creating the repo
 * first when it does not exist: the `hub` target of the export step.
 *
 * The order of requests (all through `@huggingface/hub`, against `HF_ENDPOINT`):
 *
 * 1. `repoExists`: `GET /api/models/{repo}`;
 * 2. `createRepo` when it does not: `POST /api/repos/create` with the visibility;
 * 3. `commit`: `POST /api/models/{repo}/preupload/{branch}` sorts the files into "regular"
 *    (sent base64 inside the commit) and "lfs"; the LFS files are hashed, announced to
 *    `POST /{repo}.git/info/lfs/objects/batch` and PUT to the URLs it returns (one PUT, or
 *    one per part for a multipart upload); then `POST /api/models/{repo}/commit/{branch}`
 *    with the NDJSON commit.
 *
 * Large files are never read whole into memory: each file is given to the library as a
 * `file:` URL, which it opens as a lazy `FileBlob` (a stat for the size, a read stream for
 * the sha256 and for each PUT, a file slice per multipart part; an 800 MB file uploads in
 * about 140 MB of RSS). Only small files are read whole: an LFS file under 10 MB for its
 * hash, and the "regular" files (which the Hub keeps to small text) for the commit body. LFS uploads use the plain LFS transfers
 * (basic and multipart, `useXet: false`), not Xet: the Hub still accepts them, Xet-backed
 * repos included, and they are the path the fake Hub of the tests exercises.
 *
 * The token is a secret: it goes into the library's `Authorization` headers and nowhere
 * else; every message taken from a failure is scrubbed of it before it is reported.
 * @module
 */
import { isAbsolute } from "node:path";
import { pathToFileURL } from "node:url";
import { commit, type CommitOperation, createRepo, HubApiError, repoExists } from "@huggingface/hub";
import { LatheError } from "../foundation/errors.ts";
import { hubCredentials, type HubSettings } from "./settings.ts";
import type { HubFailure } from "./snapshot.ts";

/** What to upload, and where. */
export interface UploadRequest {
  /** "owner/name": a user or organization namespace, then the repo name. */
  repo: string;
  /** Models only for now. */
  repoType?: "model";
  /** The visibility given to the repo when this upload creates it; an existing repo keeps its own. */
  private: boolean;
  /** `path`: where the file goes in the repo ("/"-separated, relative); `local`: its absolute path here. */
  files: { path: string; local: string }[];
  /** The commit's title. */
  commitMessage: string;
  /** The commit's description (its body). */
  commitDescription?: string;
  /** The branch to commit to; default "main". It must exist. */
  revision?: string;
}

/** The commit an upload made. */
export interface UploadResult {
  /** "owner/name". */
  repo: string;
  /** The commit's oid (40 hex). */
  commit: string;
  /** The commit's page on the Hub. */
  url: string;
  /** True when this upload created the repo. */
  created: boolean;
  /** How many files the commit added or replaced. */
  files: number;
  /** Their total size in bytes. */
  bytes: number;
}

/** Options for {@link uploadToHub}. */
export interface UploadOptions {
  /** fetch for Hub requests (a proxy, or tests); default the global fetch. */
  fetch?: typeof fetch;
  /**
   * Called as bytes reach the Hub: after each LFS upload (or multipart part) and, for the
   * files sent inside the commit (and LFS files the Hub already held), once the commit is
   * made. `done` and `total` are bytes; `file` is the repo path the bytes belong to.
   */
  progress?: (done: number, total: number, file: string) => void;
}

/** The step of an upload that failed. */
export type UploadStage = "check" | "create" | "upload";

/** A Hub request of an upload failed: which repo, at which step, and how. */
export class HubUploadError extends LatheError {
  constructor(
    readonly repo: string,
    readonly endpoint: string,
    readonly stage: UploadStage,
    readonly failure: HubFailure,
    what: string,
    hint: string,
    cause: unknown,
  ) {
    super(`Cannot ${what} on ${endpoint}: ${describe(failure)}`, { hint, cause });
  }
}

/** The failure in words: "the Hub rejected the token (HTTP 401: ...)". */
function describe(failure: HubFailure): string {
  if (failure.unreachable) return `no answer from the Hub (${failure.reason})`;
  const answer = `HTTP ${failure.status}: ${failure.reason}`;
  switch (failure.status) {
    case 401:
      return `the Hub rejected the token (${answer})`;
    case 403:
      return `the token may not write there (${answer})`;
    case 404:
      return `not found (${answer})`;
    case undefined:
      return failure.reason;
    default:
      return `the Hub answered ${answer}`;
  }
}

const TOKEN_PAGE = "https://huggingface.co/settings/tokens";

/**
 * Uploads `request.files` to `request.repo` in one commit on `request.revision`, creating
 * the repo (with `request.private`) when it does not exist.
 *
 * @example
 * ```ts
 * const result = await uploadToHub(hubSettings(), {
 *   repo: "me/tiny-sft",
 *   private: true,
 *   files: [{ path: "model.gguf", local: "/runs/r1/export/model.gguf" }],
 *   commitMessage: "Upload tiny-sft from lathe",
 * });
 * console.log(`${result.url} (${result.bytes} bytes)`);
 * ```
 */
export async function uploadToHub(
  settings: HubSettings,
  request: UploadRequest,
  options: UploadOptions = {},
): Promise<UploadResult> {
  const { repo } = request;
  const branch = request.revision ?? "main";
  const namespace = checkRequest(request);
  const where = `model "${repo}"`;
  if (settings.offline) {
    throw new LatheError(`Cannot upload to ${where}: the Hub is offline (HF_HUB_OFFLINE is set)`, {
      hint: "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to upload",
    });
  }
  if (!settings.token) {
    throw new LatheError(`Cannot upload to ${where}: no Hugging Face token is set`, {
      hint: `set HF_TOKEN to a token with the write role (${TOKEN_PAGE}), or run \`huggingface-cli login\``,
    });
  }
  const sizes = await localSizes(request, where);
  const total = sizes.reduce((a, b) => a + b, 0);
  const credentials = hubCredentials(settings, options.fetch);
  const designation = { type: "model" as const, name: repo };
  const failed = (stage: UploadStage, what: string, error: unknown) =>
    uploadError(settings, request, namespace, stage, what, error);

  let exists: boolean;
  try {
    exists = await repoExists({ ...credentials, repo: designation });
  } catch (error) {
    throw failed("check", `check whether ${where} exists`, error);
  }
  let created = false;
  if (!exists) {
    try {
      await createRepo({
        ...credentials,
        accessToken: settings.token,
        repo: designation,
        visibility: request.private ? "private" : "public",
      });
      created = true;
    } catch (error) {
      // 409: it exists after all (created meanwhile); commit to it.
      if (!(error instanceof HubApiError && error.statusCode === 409)) {
        throw failed("create", `create ${where}`, error);
      }
    }
  }

  let done = 0;
  const report = (path: string, bytes: number) => {
    done += bytes;
    options.progress?.(done, total, path);
  };
  const lfsPaths = new Set<string>();
  const base = options.fetch ?? fetch;
  // Counts the bytes of each LFS PUT (whole file or one part) the Hub accepted.
  const counting: typeof fetch = async (input, init) => {
    const response = await base(input, init);
    const hint = (init as { progressHint?: { path?: unknown } } | undefined)?.progressHint;
    if (
      init?.method === "PUT" && response.ok && typeof hint?.path === "string" && init.body instanceof Blob
    ) {
      lfsPaths.add(hint.path);
      report(hint.path, init.body.size);
    }
    return response;
  };
  const operations: CommitOperation[] = request.files.map((file) => ({
    operation: "addOrUpdate",
    path: file.path,
    content: pathToFileURL(file.local),
  }));
  let output;
  try {
    output = await commit({
      ...credentials,
      fetch: counting,
      repo: designation,
      operations,
      title: request.commitMessage,
      ...(request.commitDescription ? { description: request.commitDescription } : {}),
      branch,
      useXet: false,
    });
  } catch (error) {
    const count = request.files.length;
    throw failed(
      "upload",
      `upload ${count} file${count === 1 ? "" : "s"} to ${where} (branch "${branch}")`,
      error,
    );
  }
  if (!output?.commit?.oid) {
    throw new LatheError(`Cannot upload to ${where}: the Hub's commit answer has no commit oid`);
  }
  request.files.forEach((file, i) => {
    if (!lfsPaths.has(file.path)) report(file.path, sizes[i]);
  });
  return {
    repo,
    commit: output.commit.oid,
    url: output.commit.url || `${settings.endpoint}/${repo}/commit/${output.commit.oid}`,
    created,
    files: request.files.length,
    bytes: total,
  };
}

/** Checks the repo name and file list before any request; returns the namespace. */
function checkRequest(request: UploadRequest): string {
  const { repo } = request;
  const parts = repo.split("/");
  if (parts.length !== 2 || parts.some((p) => !/^[A-Za-z0-9][\w.-]*$/.test(p))) {
    throw new LatheError(`Cannot upload to model "${repo}": a repo name must be "owner/name"`, {
      hint: 'name it "<your user or organization>/<model name>", e.g. "me/tiny-sft"',
    });
  }
  if ((request.repoType ?? "model") !== "model") {
    throw new LatheError(`Cannot upload to ${request.repoType} "${repo}": only model repos are supported`);
  }
  if (request.files.length === 0) {
    throw new LatheError(`Cannot upload to model "${repo}": no files were given`);
  }
  const seen = new Set<string>();
  for (const { path, local } of request.files) {
    const segments = path.split("/");
    if (path.includes("\\") || segments.some((s) => s === "" || s === "." || s === "..")) {
      throw new LatheError(
        `Cannot upload "${local}" to model "${repo}": repo path "${path}" is not a relative "/"-separated path`,
      );
    }
    if (seen.has(path)) {
      throw new LatheError(`Cannot upload to model "${repo}": repo path "${path}" is given twice`);
    }
    seen.add(path);
    if (!isAbsolute(local)) {
      throw new LatheError(`Cannot upload "${local}" to model "${repo}": the local path is not absolute`);
    }
  }
  return parts[0];
}

/** The size of each local file; names one that is missing or not a file. */
async function localSizes(request: UploadRequest, where: string): Promise<number[]> {
  return await Promise.all(request.files.map(async ({ local }) => {
    let info: Deno.FileInfo;
    try {
      info = await Deno.stat(local);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
      throw new LatheError(`Cannot upload "${local}" to ${where}: no such file`);
    }
    if (!info.isFile) throw new LatheError(`Cannot upload "${local}" to ${where}: it is not a file`);
    return info.size;
  }));
}

/** A failed `@huggingface/hub` call as a {@link HubUploadError}; lathe's own errors pass through. */
function uploadError(
  settings: HubSettings,
  request: UploadRequest,
  namespace: string,
  stage: UploadStage,
  what: string,
  error: unknown,
): Error {
  if (error instanceof LatheError) return error;
  const scrub = (text: string) => settings.token ? text.replaceAll(settings.token, "hf_***") : text;
  let message = error instanceof Error ? error.message : String(error);
  // Deno's fetch says "fetch failed"; its cause says why, after the URL: "... client error (Connect): <why>".
  const detail = error instanceof TypeError && error.cause instanceof Error
    ? /client error \(\w+\): (.*)$/s.exec(error.cause.message)?.[1]
    : undefined;
  if (detail) message = `${message}: ${detail}`;
  // Drop the library's ". URL: ... Request ID: ..." trailer: the message already names the repo.
  const reason = scrub(message.replace(/\. URL: .*$/s, "")) || "no message";
  let failure: HubFailure;
  if (error instanceof HubApiError) {
    failure = { status: error.statusCode, unreachable: false, reason };
  } else {
    // fetch rejects with a TypeError when no answer came (refused, DNS, TLS, a dropped connection).
    failure = { unreachable: error instanceof TypeError, reason };
  }
  const { repo } = request;
  const branch = request.revision ?? "main";
  let hint: string;
  if (failure.unreachable) {
    hint = `check the network, or HF_ENDPOINT (now ${settings.endpoint})`;
  } else if (failure.status === 401) {
    hint =
      `HF_TOKEN is invalid or expired: create a token with the write role at ${TOKEN_PAGE} and set HF_TOKEN`;
  } else if (failure.status === 403) {
    hint =
      `the token needs the write role (fine-grained: write access to "${namespace}"), and "${namespace}" ` +
      `must be your user name or an organization you belong to; check HF_TOKEN at ${TOKEN_PAGE}`;
  } else if (failure.status === 404) {
    hint = stage === "upload"
      ? `check that branch "${branch}" exists in "${repo}" (create it on the Hub, or upload to "main")`
      : `check the namespace "${namespace}": it must be your user name or an organization you belong to`;
  } else if (failure.status !== undefined && failure.status >= 500) {
    hint = "the Hub had a problem; try again later" +
      (stage === "upload" ? " (LFS files it already holds are not sent again)" : "");
  } else {
    hint = `check the repo name "${repo}" and the files`;
  }
  // The cause is kept for debugging unless some part of it (a message, a server's answer) holds the token.
  const cause = settings.token && Deno.inspect(error, { depth: 8 }).includes(settings.token)
    ? undefined
    : error;
  return new HubUploadError(repo, settings.endpoint, stage, failure, what, hint, cause);
}
