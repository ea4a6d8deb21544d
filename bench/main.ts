/**
 * `deno task bench [name...] [-- options]`: runs the named benchmarks (all when none is named).
 * Each benchmark prints its own ratios against the reference named in its module.
 * @module
 */
import { LatheError, runMain } from "../steps/errors.ts";

/** Benchmarks by name; each takes the arguments after `--`. */
export const BENCHMARKS: Record<string, () => Promise<{ main: (args: string[]) => Promise<void> }>> = {
  tokenize: () => import("./tokenize.ts"),
};

if (import.meta.main) {
  await runMain(async () => {
    const dash = Deno.args.indexOf("--");
    const names = dash >= 0 ? Deno.args.slice(0, dash) : Deno.args;
    const rest = dash >= 0 ? Deno.args.slice(dash + 1) : [];
    for (const name of names) {
      if (!(name in BENCHMARKS)) {
        throw new LatheError(`Cannot run benchmark "${name}": unknown`, {
          hint: `known benchmarks: ${Object.keys(BENCHMARKS).join(", ")}`,
        });
      }
    }
    for (const name of names.length > 0 ? names : Object.keys(BENCHMARKS)) {
      await (await BENCHMARKS[name]()).main(rest);
    }
  });
}
