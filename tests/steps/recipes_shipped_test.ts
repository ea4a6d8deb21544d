import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { listRecipes, loadRecipe } from "../../steps/recipe.ts";
import { loadStep } from "../../steps/registry.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

Deno.test("every shipped recipe validates against its steps' schemas, in an order their inputs allow", async () => {
  const names = await listRecipes(ROOT);
  assert.ok(
    names.includes("tiny-demo") && names.includes("qwen2-lora"),
    `recipes found: ${names.join(", ")}`,
  );
  for (const name of names) {
    const recipe = await loadRecipe(name, { projectRoot: ROOT, loadStep });
    assert.equal(recipe.name, name, `recipes/${name}.yaml names itself "${name}"`);
    assert.ok(recipe.steps.length > 0);
  }
});
