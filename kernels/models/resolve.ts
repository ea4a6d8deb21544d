/**
 * Resolves a model reference to a local Hugging Face model directory, in this order:
 * 1. a path to an existing directory;
 * 2. a snapshot in the Hugging Face cache, laid out as huggingface_hub writes it:
 *    `<cache>/models--<org>--<name>/refs/<branch>` holds a commit hash,
 *    `<cache>/models--<org>--<name>/snapshots/<commit>/` holds the files;
 * 3. the Hub, through `@huggingface/hub` (`modelInfo` for the commit, `listFiles`, then
 *    `downloadFileToCacheDir` per file into the same cache), unless offline.
 *
 * Environment, as huggingface_hub reads it: `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`),
 * else `$HF_HOME/hub` with `HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface` or
 * `~/.cache/huggingface`; `HF_TOKEN` (else the token file `HF_TOKEN_PATH` or
 * `$HF_HOME/token` that `huggingface-cli login` writes); `HF_ENDPOINT` (a mirror);
 * `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`): cache only.
 *
 * Only the files a causal LM needs are downloaded: config, generation config, tokenizer
 * files, and the safetensors weights (the shards named by `model.safetensors.index.json`,
 * so duplicates such as `consolidated.safetensors` are skipped).
 * @module
 */
import { homedir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";
import { downloadFileToCacheDir, HubApiError, listFiles, modelInfo } from "@huggingface/hub";
import { LatheError } from "../../steps/errors.ts";
import { exists, writeFileAtomic } from "../../steps/atomic.ts";
import { Progress } from "../../steps/progress.ts";

/** Reads an environment variable; tests pass their own. */
export type Env = (name: string) => string | undefined;

const processEnv: Env = (name) => Deno.env.get(name);

/** Options for {@link resolveModel}. */
export interface ResolveOptions {
  /** Branch, tag or 40-hex commit; default "main". */
  revision?: string;
  /** Environment lookup; default `Deno.env`. */
  env?: Env;
  /** fetch used for Hub requests (a proxy, or tests); default global fetch. */
  fetch?: typeof fetch;
  /** Show download progress; default true. */
  progress?: boolean;
}

/** Where a model reference led. */
export interface ResolvedModel {
  /** Absolute path of the model directory. */
  readonly dir: string;
  readonly source: "path" | "cache" | "hub";
  /** Hub repo id, for cache and hub sources. */
  readonly repo?: string;
  /** The commit hash of the snapshot, for cache and hub sources. */
  readonly commit?: string;
}

/** Files fetched from the Hub besides the weights (those present are fetched). */
export const MODEL_FILES = [
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "chat_template.jinja",
  "chat_template.json",
] as const;

const INDEX = "model.safetensors.index.json";
const SINGLE = "model.safetensors";
const COMMIT = /^[0-9a-f]{40}$/;
// Hub repo ids: "name" or "org/name"; letters, digits, '-', '_', '.'.
const REPO_ID = /^[A-Za-z0-9][\w.-]*(\/[A-Za-z0-9][\w.-]*)?$/;

function isTrue(value: string | undefined): boolean {
  return value !== undefined && ["1", "ON", "YES", "TRUE"].includes(value.toUpperCase());
}

/** The Hugging Face home: `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`. */
export function hfHome(env: Env = processEnv): string {
  return env("HF_HOME") ?? join(env("XDG_CACHE_HOME") ?? join(homedir(), ".cache"), "huggingface");
}

/** The hub cache directory: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, else `<HF home>/hub`. */
export function hubCacheDir(env: Env = processEnv): string {
  return env("HF_HUB_CACHE") ?? env("HUGGINGFACE_HUB_CACHE") ?? join(hfHome(env), "hub");
}

/** The cache folder name of a model repo: `org/name` -> `models--org--name`. */
export function repoFolderName(repo: string): string {
  return ["models", ...repo.split("/")].join("--");
}

/** True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set to a true value. */
export function isOffline(env: Env = processEnv): boolean {
  return isTrue(env("HF_HUB_OFFLINE")) || isTrue(env("TRANSFORMERS_OFFLINE"));
}

/** The Hub token: `HF_TOKEN`, else the token file (`HF_TOKEN_PATH` or `<HF home>/token`). */
export async function hubToken(env: Env = processEnv): Promise<string | undefined> {
  const direct = env("HF_TOKEN") ?? env("HUGGING_FACE_HUB_TOKEN");
  if (direct) return direct.trim();
  try {
    const text = (await Deno.readTextFile(env("HF_TOKEN_PATH") ?? join(hfHome(env), "token"))).trim();
    return text || undefined;
  } catch {
    return undefined;
  }
}

/** True when `ref` can only be a Hub repo id ("org/name" or "name"), not a path. */
export function isHubRepoId(ref: string): boolean {
  return !looksLikePath(ref);
}

function looksLikePath(ref: string): boolean {
  return isAbsolute(ref) || ref.startsWith(".") || ref.startsWith("~") || ref.includes("\\") ||
    !REPO_ID.test(ref);
}

/**
 * Resolves `ref` (a directory, or a Hub repo id such as "Qwen/Qwen2.5-0.5B") to a local
 * model directory that holds `config.json`.
 *
 * @example
 * ```ts
 * const { dir } = await resolveModel("Qwen/Qwen2.5-0.5B", { revision: "main" });
 * ```
 */
export async function resolveModel(ref: string, options: ResolveOptions = {}): Promise<ResolvedModel> {
  const env = options.env ?? processEnv;
  const expanded = ref.startsWith("~/") ? join(homedir(), ref.slice(2)) : ref;
  const stat = await Deno.stat(expanded).catch(() => null);
  if (stat?.isDirectory) {
    const dir = resolve(expanded);
    if (!(await exists(join(dir, "config.json")))) {
      throw new LatheError(`Cannot use model directory "${ref}": it has no config.json`, {
        hint: "Point to a Hugging Face model directory (config.json, tokenizer files, *.safetensors).",
      });
    }
    return { dir, source: "path" };
  }
  if (stat) {
    throw new LatheError(`Cannot use model "${ref}": it is a file, not a directory`, {
      hint: "Point to the directory that holds config.json.",
    });
  }
  if (looksLikePath(ref)) {
    throw new LatheError(`Cannot use model "${ref}": no such directory`, {
      hint: `Check the path, or give a Hub repo id such as "Qwen/Qwen2.5-0.5B".`,
    });
  }
  const revision = options.revision ?? "main";
  const cacheDir = hubCacheDir(env);
  const cached = await findInCache(cacheDir, ref, revision);
  if (cached.dir) return { dir: cached.dir, source: "cache", repo: ref, commit: cached.commit };
  if (isOffline(env)) {
    throw new LatheError(
      `Cannot resolve model "${ref}" (revision "${revision}"): ${cached.why} in the Hugging Face cache ` +
        `"${cacheDir}", and HF_HUB_OFFLINE is set`,
      {
        hint: "Download it while online (or with huggingface-cli download), point HF_HOME/HF_HUB_CACHE " +
          "at the cache that has it, or give a local directory (one that exists; ./ marks a relative path).",
      },
    );
  }
  return await downloadModel(ref, revision, cacheDir, env, options);
}

interface CacheLookup {
  dir?: string;
  commit?: string;
  /** Why the cache does not serve the request. */
  why: string;
}

/**
 * Looks `repo` at `revision` up in the hub cache: a complete snapshot has config.json and
 * all its safetensors weights.
 */
export async function findInCache(cacheDir: string, repo: string, revision: string): Promise<CacheLookup> {
  const repoDir = join(cacheDir, repoFolderName(repo));
  if (!(await exists(repoDir))) return { why: "it is not" };
  let commit = revision;
  if (!COMMIT.test(revision)) {
    try {
      commit = (await Deno.readTextFile(join(repoDir, "refs", revision))).trim();
    } catch {
      return { why: `no ref "${revision}" is recorded for it` };
    }
  }
  const dir = join(repoDir, "snapshots", commit);
  const missing = await missingFiles(dir);
  if (missing.length > 0) {
    return {
      commit,
      why: `snapshot ${commit.slice(0, 12)} lacks ${missing.map((m) => `"${m}"`).join(", ")}`,
    };
  }
  return { dir, commit, why: "" };
}

async function missingFiles(dir: string): Promise<string[]> {
  if (!(await exists(dir))) return ["the snapshot directory"];
  const missing: string[] = [];
  if (!(await exists(join(dir, "config.json")))) missing.push("config.json");
  if (await exists(join(dir, INDEX))) {
    try {
      const index = JSON.parse(await Deno.readTextFile(join(dir, INDEX)));
      const shards = new Set(Object.values(index.weight_map ?? {}) as string[]);
      for (const shard of shards) if (!(await exists(join(dir, shard)))) missing.push(shard);
    } catch {
      missing.push(`a readable ${INDEX}`);
    }
  } else if (!(await exists(join(dir, SINGLE)))) missing.push(SINGLE);
  return missing;
}

function hubError(repo: string, revision: string, error: unknown, endpoint: string): LatheError {
  if (error instanceof HubApiError) {
    const status = error.statusCode;
    if (status === 401 || status === 403) {
      return new LatheError(`Cannot download model "${repo}": the Hub refused access (HTTP ${status})`, {
        hint: "The repo is gated or private: accept its license on the model page and set HF_TOKEN " +
          "to a token with read access.",
        cause: error,
      });
    }
    if (status === 404) {
      return new LatheError(
        `Cannot download model "${repo}" (revision "${revision}"): not found on ${endpoint}`,
        {
          hint: "Check the repo id and revision (private repos also answer 404 without HF_TOKEN); " +
            "a local directory must exist, and ./ marks a relative path.",
          cause: error,
        },
      );
    }
    return new LatheError(`Cannot download model "${repo}": the Hub answered HTTP ${status}`, {
      hint: "Retry later, or set HF_ENDPOINT to a mirror.",
      cause: error,
    });
  }
  if (error instanceof LatheError) return error;
  return new LatheError(
    `Cannot download model "${repo}" from ${endpoint}: ${(error as Error).message} ` +
      `(no local directory "${repo}" exists, so it was taken for a Hub repo id)`,
    {
      hint: "For a local model, check the path (relative paths are relative to the project root). Without " +
        "network access, set HF_HUB_OFFLINE=1 and use a cached model; HF_ENDPOINT selects a mirror.",
      cause: error,
    },
  );
}

async function downloadModel(
  repo: string,
  revision: string,
  cacheDir: string,
  env: Env,
  options: ResolveOptions,
): Promise<ResolvedModel> {
  const hubUrl = (env("HF_ENDPOINT") ?? "https://huggingface.co").replace(/\/+$/, "");
  const accessToken = await hubToken(env);
  const common = { hubUrl, accessToken, fetch: options.fetch };
  let commit: string;
  const files = new Set<string>();
  try {
    const info = await modelInfo({ ...common, name: repo, revision, additionalFields: ["sha"] });
    if (typeof info.sha !== "string" || !COMMIT.test(info.sha)) {
      throw new LatheError(
        `Cannot download model "${repo}": the Hub gave no commit for revision "${revision}"`,
      );
    }
    commit = info.sha;
    for await (const entry of listFiles({ ...common, repo, revision: commit })) {
      if (entry.type === "file") files.add(entry.path);
    }
  } catch (error) {
    throw hubError(repo, revision, error, hubUrl);
  }
  if (!files.has("config.json")) {
    throw new LatheError(`Cannot download model "${repo}": the repo has no config.json`, {
      hint: "lathe loads Hugging Face transformers model repos.",
    });
  }
  const fetchFile = async (path: string): Promise<string> => {
    try {
      return await downloadFileToCacheDir({ ...common, repo, path, revision: commit, cacheDir });
    } catch (error) {
      throw hubError(repo, revision, error, hubUrl);
    }
  };
  const wanted = MODEL_FILES.filter((f) => files.has(f)) as string[];
  if (files.has(INDEX)) {
    const indexPath = await fetchFile(INDEX);
    const index = JSON.parse(await Deno.readTextFile(indexPath));
    for (const shard of new Set(Object.values(index.weight_map ?? {}) as string[])) wanted.push(shard);
  } else if (files.has(SINGLE)) {
    wanted.push(SINGLE);
  } else {
    const bin = [...files].some((f) => f.endsWith(".bin"));
    throw new LatheError(`Cannot download model "${repo}": the repo has no safetensors weights`, {
      hint: bin
        ? "It only has PyTorch pickle weights (*.bin); lathe reads safetensors. Convert them first."
        : "lathe needs model.safetensors or model.safetensors.index.json with its shards.",
    });
  }
  const progress = options.progress === false
    ? null
    : new Progress(`download ${repo}`, wanted.length, "files");
  for (const path of wanted) {
    await fetchFile(path);
    progress?.tick();
  }
  progress?.done();
  // Record the branch -> commit ref as huggingface_hub does, so offline runs find it.
  if (revision !== commit) {
    const refPath = join(cacheDir, repoFolderName(repo), "refs", revision);
    await writeFileAtomic(refPath, commit);
  }
  const dir = join(cacheDir, repoFolderName(repo), "snapshots", commit);
  return { dir, source: "hub", repo, commit };
}
