/**
 * Resolves a model reference to a local Hugging Face model directory, in this order:
 * 1. a path to an existing directory;
 * 2. a Hub repo id ("org/name"): a snapshot of it in the Hugging Face cache, through the
 *    Hub when online (hub/snapshot.ts: one download path and one offline rule for models and
 *    datasets; hub/settings.ts: the `HF_*` environment).
 *
 * Only the files a causal LM needs are fetched: config, generation config, tokenizer files,
 * and the safetensors weights (the shards named by `model.safetensors.index.json`, so
 * duplicates such as `consolidated.safetensors` are skipped). A cached snapshot serves only
 * when it has all of them.
 * @module
 */
import { homedir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";
import { exists } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import type { HubRepo } from "./cache.ts";
import { type Env, hubSettings } from "./settings.ts";
import { type FileChooser, HubCacheMiss, HubMissingFiles, HubRequestError, snapshot } from "./snapshot.ts";

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
  /**
   * Only config.json is needed (a plan or a memory estimate): a Hub repo resolves to a snapshot
   * that holds at least config.json, downloading nothing else; default false.
   */
  configOnly?: boolean;
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
// Hub repo ids: "name" or "org/name"; letters, digits, '-', '_', '.'.
const REPO_ID = /^[A-Za-z0-9][\w.-]*(\/[A-Za-z0-9][\w.-]*)?$/;

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
  const settings = hubSettings(options.env);
  const repo: HubRepo = { type: "model", name: ref };
  try {
    const got = await snapshot(settings, {
      repo,
      revision,
      choose: options.configOnly ? chooseConfig : chooseModelFiles,
      fetch: options.fetch,
      progress: options.progress,
    });
    return { dir: got.dir, source: got.source, repo: ref, commit: got.commit };
  } catch (error) {
    throw modelError(ref, revision, settings.cacheDir, error);
  }
}

/** config.json alone (missing: the snapshot is incomplete, and the error names it). */
const chooseConfig: FileChooser = () => Promise.resolve(["config.json"]);

/**
 * The files of a causal LM among a repo's `paths`: config.json, the tokenizer and generation
 * files present, and the weights: the index and every shard it names, else model.safetensors.
 * A required file that is absent stays in the list, so the snapshot reports it missing.
 */
export const chooseModelFiles: FileChooser = async (paths, read) => {
  const present = new Set(paths);
  const wanted: string[] = MODEL_FILES.filter((f) => f === "config.json" || present.has(f));
  if (present.has(INDEX)) {
    wanted.push(INDEX);
    let shards: string[];
    try {
      shards = [...new Set(Object.values(JSON.parse(await read(INDEX)).weight_map ?? {}) as string[])];
    } catch {
      return [...wanted, `a readable ${INDEX}`];
    }
    wanted.push(...shards);
  } else wanted.push(SINGLE);
  return wanted;
};

/** Says what a failed model lookup was looking for, and what to do. */
function modelError(repo: string, revision: string, cacheDir: string, error: unknown): unknown {
  if (error instanceof HubCacheMiss) {
    return new LatheError(
      `Cannot resolve model "${repo}" (revision "${revision}"): ${error.why} in the Hugging Face cache ` +
        `"${cacheDir}", and HF_HUB_OFFLINE is set`,
      {
        hint: "Download it while online (or with huggingface-cli download), point HF_HOME/HF_HUB_CACHE " +
          "at the cache that has it, or give a local directory (one that exists; ./ marks a relative path).",
        cause: error,
      },
    );
  }
  if (error instanceof HubMissingFiles) {
    const weights = error.missingFiles.some((f) => f.endsWith(".safetensors"));
    if (error.missingFiles.includes("config.json")) {
      return new LatheError(`Cannot download model "${repo}": the repo has no config.json`, {
        hint: "lathe loads Hugging Face transformers model repos.",
      });
    }
    if (weights && !error.listed.includes(INDEX)) {
      const bin = error.listed.some((f) => f.endsWith(".bin"));
      return new LatheError(`Cannot download model "${repo}": the repo has no safetensors weights`, {
        hint: bin
          ? "It only has PyTorch pickle weights (*.bin); lathe reads safetensors. Convert them first."
          : "lathe needs model.safetensors or model.safetensors.index.json with its shards.",
      });
    }
    return error;
  }
  if (error instanceof HubRequestError) return hubError(repo, revision, error);
  return error;
}
function hubError(repo: string, revision: string, error: HubRequestError): LatheError {
  const { status, unreachable, reason } = error.failure;
  const endpoint = error.endpoint;
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
  if (status !== undefined) {
    return new LatheError(`Cannot download model "${repo}": the Hub answered HTTP ${status}`, {
      hint: "Retry later, or set HF_ENDPOINT to a mirror.",
      cause: error,
    });
  }
  return new LatheError(
    `Cannot download model "${repo}" from ${endpoint}: ${reason} ` +
      `(no local directory "${repo}" exists, so it was taken for a Hub repo id)`,
    {
      hint: unreachable
        ? "For a local model, check the path (relative paths are relative to the project root). Without " +
          "network access, set HF_HUB_OFFLINE=1 and use a cached model; HF_ENDPOINT selects a mirror."
        : "For a local model, check the path (relative paths are relative to the project root).",
      cause: error,
    },
  );
}
