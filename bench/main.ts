/**
 * `deno task bench [name...] [-- options]`: runs the named benchmarks (all when none is named).
 * Each benchmark prints its own ratios against the reference named in its module. Without `--`,
 * the names end at the first argument that starts with `-` (`bench train --steps 2`).
 * `deno task bench tune [options]` runs the matmul tile tuner (only when named: it writes the
 * adapter's tuning table).
 * @module
 */
import { LatheError, runMain } from "../foundation/errors.ts";

/** A benchmark module: its entry point is `run` (or `main`), taking the option arguments. */
type BenchmarkModule = {
  run?: (args: string[]) => Promise<unknown>;
  main?: (args: string[]) => Promise<unknown>;
};

/** Benchmarks by name; each takes the arguments after the names. */
export const BENCHMARKS: Record<string, () => Promise<BenchmarkModule>> = {
  attention: () => import("./attention.ts"),
  export: () => import("./export.ts"),
  generate: () => import("./generate.ts"),
  lora: () => import("./lora.ts"),
  matmul: () => import("./matmul.ts"),
  nf4: () => import("./nf4.ts"),
  tokenize: () => import("./tokenize.ts"),
  train: () => import("./train.ts"),
};

/** Commands run only when named (not by a bare `deno task bench`). */
export const COMMANDS: Record<string, () => Promise<BenchmarkModule>> = {
  tune: async () => ({ run: (await import("./matmul.ts")).tune }),
};

if (import.meta.main) {
  await runMain(async () => {
    // Names run up to the first option or `--` (which starts with "-" too, and is dropped).
    const first = Deno.args.findIndex((a) => a.startsWith("-"));
    const end = first >= 0 ? first : Deno.args.length;
    const names = Deno.args.slice(0, end);
    const rest = Deno.args.slice(Deno.args[end] === "--" ? end + 1 : end);
    for (const name of names) {
      if (!(name in BENCHMARKS) && !(name in COMMANDS)) {
        throw new LatheError(`Cannot run benchmark "${name}": unknown`, {
          hint: `known benchmarks: ${Object.keys(BENCHMARKS).join(", ")}; commands: ${
            Object.keys(COMMANDS).join(", ")
          }`,
        });
      }
    }
    for (const name of names.length > 0 ? names : Object.keys(BENCHMARKS)) {
      const mod = await (BENCHMARKS[name] ?? COMMANDS[name])();
      await (mod.run ?? mod.main)!(rest);
    }
  });
}
