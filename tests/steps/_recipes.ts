/**
 * Runs a recipe the tests write: `text` saved as `<dir>/<name>.yaml`, runs under `<dir>/runs`, quiet,
 * from the project root with every registered step; extra argv (--only, --run, --set …) appended.
 * @module
 */
import { join } from "node:path";
import { type PipelineResult, recipeCommand } from "../../steps/pipeline.ts";
import { loadStep } from "../../steps/registry.ts";
import { ROOT } from "./train/_fixtures.ts";

export async function runRecipe(
  dir: string,
  name: string,
  text: string,
  ...argv: string[]
): Promise<PipelineResult> {
  const path = join(dir, `${name}.yaml`);
  await Deno.writeTextFile(path, text);
  const result = await recipeCommand([path, "--runs", join(dir, "runs"), "--quiet", ...argv], {
    projectRoot: ROOT,
    loadStep,
    print: () => {},
    printError: () => {},
  });
  return result!;
}
