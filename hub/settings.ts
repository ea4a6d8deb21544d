/**
 * The Hugging Face environment, read in one place with huggingface_hub's rules and
 * precedence (`huggingface_hub/constants.py`, `utils/_auth.py`). No other module reads an
 * `HF_*` variable; the layer test checks it.
 *
 * | variable | meaning | default |
 * | --- | --- | --- |
 * | `HF_HOME` | the Hugging Face home | `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` |
 * | `HF_HUB_CACHE` (else `HUGGINGFACE_HUB_CACHE`) | the hub cache | `$HF_HOME/hub` |
 * | `HF_ENDPOINT` | the Hub's base URL (a mirror) | `https://huggingface.co` |
 * | `HF_TOKEN` (else `HUGGING_FACE_HUB_TOKEN`) | access token | the token file |
 * | `HF_TOKEN_PATH` | the token file `huggingface-cli login` writes | `$HF_HOME/token` |
 * | `HF_HUB_OFFLINE` (else `TRANSFORMERS_OFFLINE`) | 1/ON/YES/TRUE: the cache only | off |
 *
 * The token is a secret: it is passed to `@huggingface/hub` calls and never written to a file,
 * a log or a manifest.
 * @module
 */
import { homedir } from "node:os";
import { join } from "node:path";
import { LatheError } from "../foundation/errors.ts";

/** Reads an environment variable; tests pass their own. */
export type Env = (name: string) => string | undefined;

const processEnv: Env = (name) => Deno.env.get(name);

/** Where and how to reach the Hub. */
export interface HubSettings {
  /** The hub cache directory (`$HF_HUB_CACHE`, else `$HF_HOME/hub`). */
  cacheDir: string;
  /** Base URL of the Hub (`$HF_ENDPOINT`, default https://huggingface.co), without a trailing "/". */
  endpoint: string;
  /** Access token for private and gated repositories. */
  token?: string;
  /** True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: use the cache only. */
  offline: boolean;
}

// huggingface_hub's ENV_VARS_TRUE_VALUES, compared upper-cased.
const TRUE_VALUES = new Set(["1", "ON", "YES", "TRUE"]);

/** Python's `os.environ.get(a) or os.environ.get(b)`: the first set, non-empty value. */
function first(env: Env, ...names: string[]): string | undefined {
  for (const name of names) {
    const value = env(name);
    if (value) return value;
  }
  return undefined;
}

/** `os.path.expanduser` for a leading "~". */
function expandHome(path: string, home: string): string {
  return path === "~" || path.startsWith("~/") ? join(home, path.slice(1)) : path;
}

/**
 * Reads the Hub settings from the environment (`env` defaults to `Deno.env.get`).
 *
 * @example
 * ```ts
 * const { cacheDir, offline } = hubSettings();
 * ```
 */
export function hubSettings(env: Env = processEnv): HubSettings {
  const home = env("HOME") ?? env("USERPROFILE") ?? homedir();
  const hfHome = expandHome(
    env("HF_HOME") ?? join(env("XDG_CACHE_HOME") ?? join(home, ".cache"), "huggingface"),
    home,
  );
  const cacheDir = expandHome(
    env("HF_HUB_CACHE") ?? env("HUGGINGFACE_HUB_CACHE") ?? join(hfHome, "hub"),
    home,
  );
  return {
    cacheDir,
    endpoint: (env("HF_ENDPOINT") ?? "https://huggingface.co").replace(/\/+$/, ""),
    token: hubToken(env, hfHome),
    offline: TRUE_VALUES.has((first(env, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") ?? "").toUpperCase()),
  };
}

/** The token: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, else the token file; blank counts as none. */
function hubToken(env: Env, hfHome: string): string | undefined {
  const direct = first(env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")?.trim();
  if (direct) return direct;
  try {
    return Deno.readTextFileSync(env("HF_TOKEN_PATH") ?? join(hfHome, "token")).trim() || undefined;
  } catch {
    return undefined;
  }
}

/** The parameters every `@huggingface/hub` call takes: endpoint, token, fetch. */
export interface HubCredentials {
  hubUrl: string;
  accessToken?: string;
  fetch?: typeof fetch;
}

/**
 * The `@huggingface/hub` parameters for `settings` (downloads, listings and uploads alike).
 * A token that is not an access token (`hf_...`) is refused before any request carries it.
 */
export function hubCredentials(settings: HubSettings, fetchImpl?: typeof fetch): HubCredentials {
  if (settings.token && !settings.token.startsWith("hf_")) {
    throw new LatheError('Cannot use the Hugging Face token: it does not start with "hf_"', {
      hint: "set HF_TOKEN to an access token from https://huggingface.co/settings/tokens",
    });
  }
  return {
    hubUrl: settings.endpoint,
    ...(settings.token ? { accessToken: settings.token } : {}),
    ...(fetchImpl ? { fetch: fetchImpl } : {}),
  };
}
