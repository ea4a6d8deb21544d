/**
 * `deno task step <name> ...`: run or rerun one step. See steps/cli.ts for the options.
 * @module
 */
import { parseArgs } from "node:util";
import { runMain } from "../foundation/errors.ts";
import { stepCli } from "../steps/cli.ts";
import { loadStep } from "../steps/registry.ts";
import { readManifest } from "../foundation/manifest.ts";

await runMain(async () => {
  const args = Deno.args;
  const name = args[0] && !args[0].startsWith("-") ? args[0] : null;
  const rest = name ? args.slice(1) : args;
  let stepName = name;
  if (!stepName) {
    const { values } = parseArgs({ args: rest, strict: false, options: { manifest: { type: "string" } } });
    if (typeof values.manifest === "string") stepName = (await readManifest(values.manifest)).step;
  }
  await stepCli(stepName ? await loadStep(stepName) : null, rest);
});
