/**
 * Where things live: the project root (config paths resolve against it), the runs root
 * (`runs/`, or `$LATHE_RUNS`), the tracker database (`runs/lathe.duckdb`, or `$LATHE_DB`) and
 * lathe's cache (`~/.cache/lathe`, or `$LATHE_CACHE_DIR`).
 * @module
 */
import { homedir } from "node:os";
import { isAbsolute, join, relative, resolve } from "node:path";

/** Reads an environment variable, or undefined (also without env permission); tests pass their own. */
export type Env = (name: string) => string | undefined;

/** {@link Env} over the process environment; an empty value counts as unset. */
export const processEnv: Env = (name) => {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined;
  }
};

/** The cache directory: `$LATHE_CACHE_DIR`, else `$XDG_CACHE_HOME/lathe`, else `~/.cache/lathe`. */
export function latheCacheDir(env: Env = processEnv): string {
  return env("LATHE_CACHE_DIR") ?? join(env("XDG_CACHE_HOME") ?? join(homedir(), ".cache"), "lathe");
}

/** The project root: `$LATHE_PROJECT` or the working directory. */
export function projectRoot(): string {
  return resolve(Deno.env.get("LATHE_PROJECT") ?? Deno.cwd());
}

/** The runs root: `--runs`, else `$LATHE_RUNS`, else `<project>/runs`. */
export function runsRoot(flag?: string, root: string = projectRoot()): string {
  return resolve(root, flag ?? Deno.env.get("LATHE_RUNS") ?? "runs");
}

/** The tracker database: `$LATHE_DB`, else `<runs root>/lathe.duckdb`. */
export function trackerDbPath(runs: string): string {
  return resolve(Deno.env.get("LATHE_DB") ?? join(runs, "lathe.duckdb"));
}

/** A path for messages: relative to the project root when inside it, else absolute. */
export function displayPath(abs: string, root: string = projectRoot()): string {
  const rel = relative(root, abs);
  return rel === "" ? "." : rel.startsWith("..") || isAbsolute(rel) ? abs : rel;
}
