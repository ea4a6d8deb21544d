/**
 * `deno task recipe <name|path> [--set k=v ...] [--only step] [--from step] [--force]
 * [--dry-run] [--run <id>] [--runs <dir>] [--quiet]`: runs a recipe, every finished step
 * indexed by the tracker. See steps/pipeline.ts and docs/recipes.md.
 * @module
 */
import { printOutcome } from "../steps/cli.ts";
import { runMain } from "../foundation/errors.ts";
import { projectRoot } from "../foundation/paths.ts";
import { recipeCommand } from "../steps/pipeline.ts";
import { loadStep } from "../steps/registry.ts";
import { trackerHook } from "../tracker/hook.ts";

if (import.meta.main) {
  const root = projectRoot();
  await runMain(async () => {
    await recipeCommand(Deno.args, {
      projectRoot: root,
      onFinish: trackerHook,
      onStep: (outcome) => printOutcome(outcome, root),
      loadStep,
    });
  });
}
