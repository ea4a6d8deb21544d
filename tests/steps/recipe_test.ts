import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { parseOverride } from "../../steps/overrides.ts";
import { listRecipes, loadRecipe, type LoadRecipeOptions } from "../../steps/recipe.ts";
import { loadToyStep, sandbox } from "./_toy_steps.ts";

const TOY = `name: toy
description: three toy steps
seed: 7
steps:
  emit:
    text: hi
  upper:
    suffix: "?"
    nested:
      width: 6
  flaky:
`;

async function write(root: string, name: string, text: string): Promise<string> {
  await Deno.mkdir(join(root, "recipes"), { recursive: true });
  const path = join(root, "recipes", `${name}.yaml`);
  await Deno.writeTextFile(path, text);
  return path;
}

function opts(root: string, overrides: string[] = []): LoadRecipeOptions {
  return { projectRoot: root, overrides: overrides.map(parseOverride), loadStep: loadToyStep };
}

/** Loads `text` as a recipe and returns the error message (the load must fail with a LatheError). */
async function problems(text: string, overrides: string[] = []): Promise<{ path: string; message: string }> {
  await using box = await sandbox();
  const path = await write(box.root, "bad", text);
  const error = await loadRecipe("bad", opts(box.root, overrides)).catch((e) => e);
  assert.ok(error instanceof LatheError, `expected a LatheError, got ${error}`);
  return { path, message: error.message };
}

Deno.test("loadRecipe() returns the steps in recipe order with their configs validated and defaulted", async () => {
  await using box = await sandbox();
  const path = await write(box.root, "toy", TOY);
  const recipe = await loadRecipe("toy", opts(box.root));
  assert.equal(recipe.name, "toy");
  assert.equal(recipe.description, "three toy steps");
  assert.equal(recipe.seed, 7);
  assert.equal(recipe.path, path);
  assert.deepEqual(recipe.steps.map((s) => s.name), ["emit", "upper", "flaky"]);
  assert.deepEqual(recipe.steps.map((s) => s.def.name), ["emit", "upper", "flaky"]);
  assert.deepEqual(recipe.steps[0].raw, { text: "hi" });
  assert.deepEqual(recipe.steps[0].config, { text: "hi", repeat: 2 });
  assert.deepEqual(recipe.steps[1].config, { suffix: "?", nested: { width: 6 } });
  assert.deepEqual(recipe.steps[2].raw, {}, "a step with no config gets all defaults");
  assert.deepEqual(recipe.steps[2].config, { label: "copy" });
  assert.deepEqual(await listRecipes(box.root), ["toy"]);
});

Deno.test("loadRecipe() defaults the seed to 42 and loads a recipe by path", async () => {
  await using box = await sandbox();
  const path = join(box.root, "elsewhere.yml");
  await Deno.writeTextFile(path, "name: by-path\nsteps:\n  emit: {}\n");
  const recipe = await loadRecipe(path, opts(box.root));
  assert.equal(recipe.seed, 42);
  assert.equal(recipe.description, null);
  assert.equal(recipe.path, path);
});

Deno.test("a wrong type names file:line:col and the key path", async () => {
  const { path, message } = await problems(TOY.replace("width: 6", "width: wide"));
  assert.match(message, /^Cannot load recipe ".*bad\.yaml":\n/);
  assert.ok(
    message.includes(`\n${path}:10:7: steps.upper.nested.width: expected number, received string`),
    message,
  );
});

Deno.test("an unknown key in a step config names its line and suggests the known key", async () => {
  const { path, message } = await problems(TOY.replace('suffix: "?"', 'sufix: "?"'));
  assert.ok(
    message.includes(
      `${path}:8:5: steps.upper.sufix: unknown key (did you mean "suffix"? known keys: "suffix", "nested")`,
    ),
    message,
  );
});

Deno.test("an unknown top-level key is an error", async () => {
  const { path, message } = await problems(TOY.replace("seed: 7", "seed: 7\nsed: 8"));
  assert.ok(message.includes(`${path}:4:1: sed: unknown key (did you mean "seed"?`), message);
});

Deno.test("a missing required value points at its step", async () => {
  const { path, message } = await problems("name: x\nsteps:\n  emit:\n  read:\n    files: a.txt\n");
  assert.ok(
    message.includes(`${path}:4:3: steps.read.file: missing required value (expected string)`),
    message,
  );
  assert.ok(message.includes(`${path}:5:5: steps.read.files: unknown key (did you mean "file"?`), message);
});

Deno.test("a recipe without a name or steps, or with a bad name or seed, is an error", async () => {
  let { path, message } = await problems("description: nothing\n");
  assert.ok(message.includes(`${path}:1:1: name: missing required value (expected string)`), message);
  assert.ok(message.includes(`${path}:1:1: steps: missing required value`), message);
  ({ path, message } = await problems("name: Toy Recipe\nseed: 1.5\nsteps: {}\n"));
  assert.ok(message.includes(`${path}:1:1: name: expected lowercase letters, digits and "-"`), message);
  assert.ok(message.includes(`${path}:2:1: seed: expected int, received number`), message);
  assert.ok(message.includes(`${path}:3:1: steps: a recipe needs at least one step`), message);
  ({ path, message } = await problems("name: x\nsteps:\n  emit: [1, 2]\n"));
  assert.ok(message.includes(`${path}:3:3: steps.emit: expected a mapping of config keys`), message);
});

Deno.test("a value of a union reports the option that fits its type, else the types expected", async () => {
  const { path, message } = await problems(
    "name: x\nsteps:\n  tag:\n    tags:\n      - a\n      - nme: b\n        weight: heavy\n      - 3\n",
  );
  assert.deepEqual(message.split("\n").slice(1), [
    `${path}:6:9: steps.tag.tags.1.name: missing required value (expected string)`,
    `${path}:6:9: steps.tag.tags.1.nme: unknown key (did you mean "name"? known keys: "name", "weight")`,
    `${path}:7:9: steps.tag.tags.1.weight: expected number, received string`,
    `${path}:8:9: steps.tag.tags.2: expected string or object, received number`,
  ]);
});

Deno.test("an unknown step names its line and the known steps", async () => {
  const { path, message } = await problems("name: x\nsteps:\n  emit:\n  shout:\n");
  assert.ok(
    message.includes(
      `${path}:4:3: steps.shout: Cannot find step "shout": known steps are "emit", "upper", "flaky", "read", "tag"`,
    ),
    message,
  );
});

Deno.test("a step listed before the step it reads is an error naming both and the line", async () => {
  let { path, message } = await problems("name: x\nsteps:\n  upper:\n  emit:\n");
  assert.ok(
    message.includes(
      `${path}:3:3: steps.upper: step "upper" reads input "text" from step "emit", which comes after it; ` +
        `move "emit" before "upper"`,
    ),
    message,
  );
  ({ path, message } = await problems("name: x\nsteps:\n  emit:\n  flaky:\n"));
  assert.ok(
    message.includes(
      `${path}:4:3: steps.flaky: step "flaky" reads input "upper" from step "upper", which is not in`,
    ),
    message,
  );
});

Deno.test("every problem is reported at once, one line each", async () => {
  const { message } = await problems(
    "name: x\nsteps:\n  emit:\n    repeat: -1\n  upper:\n    suffix: 3\n  read:\n    file: [a]\n",
  );
  const lines = message.split("\n").slice(1);
  assert.equal(lines.length, 3, message);
  assert.match(lines[0], /:4:5: steps\.emit\.repeat: Too small: expected number to be >0$/);
  assert.match(lines[1], /:6:5: steps\.upper\.suffix: expected string, received number$/);
  assert.match(lines[2], /:8:5: steps\.read\.file: expected string, received array$/);
});

Deno.test("a YAML syntax error names file:line:col", async () => {
  const { path, message } = await problems("name: x\nsteps:\n  emit:\n    text: [unclosed\n  upper:\n");
  assert.match(message, new RegExp(`${path.replaceAll(".", "\\.")}:\\d+:\\d+: invalid YAML: `));
  const dup = await problems("name: x\nsteps:\n  emit:\n  emit:\n");
  assert.ok(
    dup.message.includes(`${dup.path}:4:3: invalid YAML: key "emit" appears twice in one mapping`),
    dup.message,
  );
});

Deno.test("--set overrides a step's config and the top-level seed", async () => {
  await using box = await sandbox();
  await write(box.root, "toy", TOY);
  const recipe = await loadRecipe("toy", opts(box.root, ["upper.nested.width=2", "seed=9", "flaky.label=x"]));
  assert.equal(recipe.seed, 9);
  assert.deepEqual(recipe.steps[1].raw, { suffix: "?", nested: { width: 2 } });
  assert.deepEqual(recipe.steps[2].config, { label: "x" });
  const same = await loadRecipe("toy", opts(box.root, ["steps.emit.repeat=3"]));
  assert.deepEqual(same.steps[0].config, { text: "hi", repeat: 3 });
});

Deno.test("a problem caused by --set names the override instead of a line", async () => {
  let { message } = await problems(TOY, ["upper.nested.width=wide"]);
  assert.ok(
    message.includes(
      "\n--set upper.nested.width=wide: steps.upper.nested.width: expected number, received string",
    ),
    message,
  );
  ({ message } = await problems(TOY, ["upper.colour=red"]));
  assert.ok(message.includes("\n--set upper.colour=red: steps.upper.colour: unknown key"), message);
  ({ message } = await problems(TOY, ["seed=-1"]));
  assert.ok(message.includes("\n--set seed=-1: seed: Too small"), message);
});

Deno.test("--set of a step that is not in the recipe is an error", async () => {
  await using box = await sandbox();
  await write(box.root, "toy", TOY);
  await assert.rejects(
    loadRecipe("toy", opts(box.root, ["read.file=a.txt"])),
    (e: Error) =>
      e instanceof LatheError &&
      e.message === 'Cannot apply --set "read.file=a.txt": recipe "' + join(box.root, "recipes", "toy.yaml") +
          '" has no step "read"' &&
      (e.hint ?? "").includes('its steps are "emit", "upper", "flaky"'),
  );
  await assert.rejects(
    loadRecipe("toy", opts(box.root, ["emit.text.deep=1"])),
    /Cannot apply --set "emit\.text\.deep=1": "text" is a string, not a section/,
  );
});

Deno.test("an unknown recipe name lists the available recipes", async () => {
  await using box = await sandbox();
  await write(box.root, "toy", TOY);
  await write(box.root, "other", TOY);
  const error = await loadRecipe("tiny", opts(box.root)).catch((e) => e);
  assert.ok(error instanceof LatheError);
  assert.match(error.message, /^Cannot find recipe "tiny"/);
  assert.match(error.hint ?? "", /available recipes: other, toy/);
  await assert.rejects(
    loadRecipe(join(box.root, "nope.yaml"), opts(box.root)),
    /Cannot read recipe ".*nope\.yaml": no such file/,
  );
});
