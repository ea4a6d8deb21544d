/**
 * Where things live: the project root (config paths resolve against it), the runs root
 * (`runs/`, or `$LATHE_RUNS`) and the tracker database (`runs/lathe.duckdb`, or `$LATHE_DB`).
 * @module
 */
import { isAbsolute, join, relative, resolve } from "node:path";

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
