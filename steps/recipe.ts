/**
 * Recipes: `recipes/<name>.yaml` names a seed and an ordered mapping of steps to their
 * configs. Loading one validates everything before anything runs — the YAML syntax, the
 * top-level shape, every step's config against that step's schema, and the order of the
 * steps against their declared inputs — and every problem names `file:line:col` and the
 * key path (or the `--set` it came from). docs/recipes.md describes the format.
 * @module
 */
import { isAbsolute, join, relative, resolve, sep } from "node:path";
import { isMap, isScalar, isSeq, LineCounter, type Node, parseDocument, visit } from "yaml";
import * as z from "zod";
import { exists } from "../foundation/atomic.ts";
import {
  bindInstances,
  boundInputs,
  INSTANCE_NAME,
  type StepDef,
  type StepLoader,
  stepOfInstance,
} from "./define.ts";
import { LatheError } from "../foundation/errors.ts";
import { type Override, setPath } from "./overrides.ts";

export type { StepLoader } from "./define.ts";

/** One step of a loaded recipe. */
export interface RecipeStep {
  /** The instance name: the step's name, or `<step>@<label>` for another instance (steps/define.ts). */
  name: string;
  def: StepDef;
  /** Input name -> the instance before it that the input reads (the nearest of its step). */
  inputs: Record<string, string>;
  /** The config as written, overrides applied (what the runner validates again and records). */
  raw: Record<string, unknown>;
  /** The validated config, defaults filled in. */
  config: Record<string, unknown>;
}

/** A validated recipe. */
export interface Recipe {
  name: string;
  description: string | null;
  seed: number;
  /** Absolute path of the recipe file. */
  path: string;
  /** The steps in recipe order. */
  steps: RecipeStep[];
}

/** Options for {@link loadRecipe}. */
export interface LoadRecipeOptions {
  /** Absolute path of the project root; recipe names resolve to `<root>/recipes/<name>.yaml`. */
  projectRoot: string;
  /** `--set` overrides: `step.key=value` into the steps, `seed=N` (or `name`, `description`) at the top. */
  overrides?: Override[];
  /** Finds a step by name: steps/registry.ts `loadStep` (the programs pass it), or toy steps in tests. */
  loadStep: StepLoader;
}

/** Top-level keys an override addresses directly; any other first key names a step. */
const TOP_LEVEL_KEYS = ["name", "description", "seed", "steps"] as const;

const stepConfig = z.custom<Record<string, unknown> | null>(
  (v) => v === null || (typeof v === "object" && !Array.isArray(v)),
  { message: "expected a mapping of config keys (or nothing, for all defaults)" },
);

/** The top level of a recipe file. */
export const RecipeFile = z.strictObject({
  /** The recipe's name, recorded in every manifest: lowercase words joined by "-". */
  name: z.string().regex(/^[a-z0-9][a-z0-9-]*$/, 'expected lowercase letters, digits and "-"'),
  /** One line on what the recipe makes. */
  description: z.string().optional(),
  /** Seed passed to every step (part of every step's key). */
  seed: z.number().int().nonnegative().default(42),
  /** Step name -> that step's config, in the order they run. */
  steps: z.record(z.string(), stepConfig).refine(
    (s) => Object.keys(s).length > 0,
    "a recipe needs at least one step",
  ),
});
export type RecipeFile = z.output<typeof RecipeFile>;

type Path = readonly PropertyKey[];

/** A validation problem at a key path of the (overridden) recipe. */
interface Problem {
  path: Path;
  message: string;
}

const RECIPE_NAME = /^[a-z0-9][a-z0-9-]*$/;

/** Names of the recipes in `<projectRoot>/recipes`, sorted. */
export async function listRecipes(projectRoot: string): Promise<string[]> {
  const dir = join(projectRoot, "recipes");
  const names: string[] = [];
  if (!(await exists(dir))) return names;
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && entry.name.endsWith(".yaml")) names.push(entry.name.slice(0, -".yaml".length));
  }
  return names.sort();
}

/**
 * Resolves a recipe reference: a name (`tiny-demo` -> `<projectRoot>/recipes/tiny-demo.yaml`)
 * or a path (anything with a "/" or a `.yaml`/`.yml` ending, relative to the working directory).
 */
export async function resolveRecipePath(ref: string, projectRoot: string): Promise<string> {
  if (ref.includes("/") || ref.includes(sep) || /\.ya?ml$/.test(ref)) {
    const abs = resolve(ref);
    if (!(await exists(abs))) {
      throw new LatheError(`Cannot read recipe "${ref}": no such file (${abs})`, {
        hint: "a recipe is a name (recipes/<name>.yaml under the project root) or a path to a .yaml file",
      });
    }
    return abs;
  }
  const abs = join(projectRoot, "recipes", `${ref}.yaml`);
  if (RECIPE_NAME.test(ref) && (await exists(abs))) return abs;
  const known = await listRecipes(projectRoot);
  throw new LatheError(`Cannot find recipe "${ref}": there is no "${abs}"`, {
    hint: known.length > 0
      ? `available recipes: ${known.join(", ")} (or give a path to a .yaml file)`
      : `"${join(projectRoot, "recipes")}" holds no recipes; give a path to a .yaml file`,
  });
}

/** How a path is shown in messages: relative to the working directory when inside it. */
function displayPath(abs: string): string {
  const rel = relative(Deno.cwd(), abs);
  return rel === "" || rel.startsWith("..") || isAbsolute(rel) ? abs : rel;
}

/** Loads, overrides and validates the recipe `ref` (a name or a path); see the module doc. */
export async function loadRecipe(ref: string, opts: LoadRecipeOptions): Promise<Recipe> {
  const path = await resolveRecipePath(ref, opts.projectRoot);
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    throw new LatheError(`Cannot read recipe "${displayPath(path)}": ${(error as Error).message}`);
  }
  return await parseRecipe(text, path, opts);
}

/** Text of a YAML map key, for matching against a zod path segment. */
function keyText(key: unknown): string {
  return isScalar(key) ? String(key.value) : String(key);
}

/**
 * The offset of the YAML node at `path`: the key of the deepest mapping entry on the path
 * that exists (so a missing key points at its parent's key), or a sequence item.
 */
function locate(contents: unknown, path: Path): number {
  let node = contents;
  let at = (contents as Node | null)?.range?.[0] ?? 0;
  for (const seg of path) {
    if (isMap(node)) {
      const pair = node.items.find((p) => keyText(p.key) === String(seg));
      if (!pair) break;
      at = (pair.key as Node | null)?.range?.[0] ?? at;
      node = pair.value;
    } else if (isSeq(node) && typeof seg === "number" && node.items[seg]) {
      node = node.items[seg];
      at = (node as Node).range?.[0] ?? at;
    } else break;
  }
  return at;
}

/** Every repeated key of every mapping, at the repeat (the parser's own position can trail the entry). */
function duplicateKeys(contents: unknown, lc: LineCounter, shown: string): { at: number; text: string }[] {
  const found: { at: number; text: string }[] = [];
  visit(contents as Node, {
    Map(_, map) {
      const seen = new Set<string>();
      for (const pair of map.items) {
        const key = keyText(pair.key);
        const at = (pair.key as Node | null)?.range?.[0] ?? 0;
        if (seen.has(key)) {
          const { line, col } = lc.linePos(at);
          found.push({
            at,
            text: `${shown}:${line}:${col}: invalid YAML: key "${key}" appears twice in one mapping`,
          });
        }
        seen.add(key);
      }
    },
  });
  return found;
}

function isPrefix(a: Path, b: Path): boolean {
  return a.length <= b.length && a.every((seg, i) => String(seg) === String(b[i]));
}

/** The value at `path` in `data`, and whether its last key exists. */
function lookup(data: unknown, path: Path): { found: boolean; value: unknown } {
  let node = data;
  for (const seg of path) {
    if (node === null || typeof node !== "object" || !Object.hasOwn(node, seg)) {
      return { found: false, value: undefined };
    }
    node = (node as Record<PropertyKey, unknown>)[seg];
  }
  return { found: true, value: node };
}

type Wrapped = { _zod?: { def?: { innerType?: unknown } } };

/**
 * The keys of the object schema at `path` inside `schema`, looking through defaults,
 * optionals, array elements and the object option of a union; null where that is no object.
 */
function knownKeysAt(schema: z.ZodType, path: Path): string[] | null {
  let s: unknown = schema;
  for (let i = 0; i <= path.length; i++) {
    while ((s as Wrapped)?._zod?.def?.innerType) s = (s as Wrapped)._zod!.def!.innerType;
    if (s instanceof z.ZodUnion) {
      const objects = s.options.filter((o) => o instanceof z.ZodObject);
      if (objects.length === 1) s = objects[0];
    }
    if (i === path.length) return s instanceof z.ZodObject ? Object.keys(s.shape) : null;
    if (s instanceof z.ZodArray && typeof path[i] === "number") s = s.element;
    else if (s instanceof z.ZodObject) s = s.shape[String(path[i])];
    else return null;
  }
  return null;
}

/** Edit distance, for "did you mean" on unknown keys. */
function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = row;
  }
  return prev[b.length];
}

function unknownKeyMessage(key: string, known: string[] | null): string {
  if (!known || known.length === 0) return "unknown key";
  const close = known.filter((k) => editDistance(k, key) <= Math.max(1, Math.floor(key.length / 4)));
  const list = known.map((k) => `"${k}"`).join(", ");
  return close.length > 0
    ? `unknown key (did you mean "${close[0]}"? known keys: ${list})`
    : `unknown key (known keys: ${list})`;
}

/** True for a union option that failed only because the value has another type. */
function isTypeMismatch(issues: readonly z.core.$ZodIssue[]): boolean {
  return issues.length === 1 && issues[0].code === "invalid_type" && issues[0].path.length === 0;
}

/**
 * Turns zod issues about `data` (validated by `schema`) into problems whose paths start
 * with `prefix`; `base` is where the issues' own paths start inside `data`.
 */
function zodProblems(
  issues: readonly z.core.$ZodIssue[],
  prefix: Path,
  data: unknown,
  schema: z.ZodType,
  base: Path = [],
): Problem[] {
  const problems: Problem[] = [];
  for (const issue of issues) {
    const rel = [...base, ...issue.path];
    const path = [...prefix, ...rel];
    if (issue.code === "unrecognized_keys") {
      const known = knownKeysAt(schema, rel);
      for (const key of issue.keys) {
        problems.push({ path: [...path, key], message: unknownKeyMessage(key, known) });
      }
    } else if (issue.code === "invalid_type" && !lookup(data, rel).found) {
      problems.push({ path, message: `missing required value (expected ${issue.expected})` });
    } else if (issue.code === "invalid_union" && issue.errors.length > 0) {
      // Report the one option that fits the value's type; else name the types expected.
      const fitting = issue.errors.filter((branch) => !isTypeMismatch(branch));
      if (fitting.length === 1) problems.push(...zodProblems(fitting[0], prefix, data, schema, rel));
      else if (fitting.length === 0) {
        const expected = issue.errors.map((b) => (b[0] as z.core.$ZodIssueInvalidType).expected);
        const received = issue.errors[0][0].message.match(/received (\w+)/)?.[1];
        problems.push({
          path,
          message: `expected ${[...new Set(expected)].join(" or ")}${
            received ? `, received ${received}` : ""
          }`,
        });
      } else problems.push({ path, message: issue.message.replace(/^Invalid input: /, "") });
    } else {
      problems.push({ path, message: issue.message.replace(/^Invalid input: /, "") });
    }
  }
  return problems;
}

/** Where an override lands in the recipe: its path from the top level. */
function overridePath(o: Override): string[] {
  return (TOP_LEVEL_KEYS as readonly string[]).includes(o.path[0]) ? o.path : ["steps", ...o.path];
}

/** Applies the overrides to the parsed recipe; a step that is not in the recipe is an error. */
function applyRecipeOverrides(
  root: Record<string, unknown>,
  overrides: Override[],
  shown: string,
): Record<string, unknown> {
  let out = root;
  for (const o of overrides) {
    const full = overridePath(o);
    if (full[0] === "steps" && full.length > 1) {
      const steps = out.steps;
      const names = steps !== null && typeof steps === "object" && !Array.isArray(steps)
        ? Object.keys(steps)
        : [];
      if (!names.includes(full[1])) {
        throw new LatheError(`Cannot apply --set "${o.text}": recipe "${shown}" has no step "${full[1]}"`, {
          hint: `its steps are ${names.map((n) => `"${n}"`).join(", ") || "none"}; ` +
            `--set takes <step>.<key>=<value>, or seed=<n>`,
        });
      }
    }
    try {
      out = setPath(out, full, o.value);
    } catch (error) {
      if (!(error instanceof LatheError)) throw error;
      throw new LatheError(
        `Cannot apply --set "${o.text}": ${error.message.replace(/^Cannot set [^:]*: /, "")}`,
      );
    }
  }
  return out;
}

/**
 * Parses and validates recipe `text` read from `path` (see {@link loadRecipe}). Throws one
 * LatheError listing every problem as `file:line:col: key.path: message`, or
 * `--set k=v: key.path: message` for a problem an override caused.
 */
export async function parseRecipe(text: string, path: string, opts: LoadRecipeOptions): Promise<Recipe> {
  const shown = displayPath(path);
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false });
  const fail = (lines: string[]): never => {
    throw new LatheError(`Cannot load recipe "${shown}":\n${lines.join("\n")}`, {
      hint: "fix the lines above; `deno task recipe <name> --dry-run` checks a recipe without running it",
    });
  };
  if (doc.errors.length > 0) {
    const syntax = doc.errors.filter((e) => e.code !== "DUPLICATE_KEY").map((e) => {
      const { line, col } = lc.linePos(e.pos[0]);
      return { at: e.pos[0], text: `${shown}:${line}:${col}: invalid YAML: ${e.message}` };
    });
    return fail(
      [...syntax, ...duplicateKeys(doc.contents, lc, shown)].sort((a, b) => a.at - b.at).map((p) => p.text),
    );
  }
  const parsed: unknown = doc.toJS();
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    return fail([`${shown}:1:1: (root): expected a mapping with "name" and "steps"`]);
  }
  const overrides = opts.overrides ?? [];
  const raw = applyRecipeOverrides(parsed as Record<string, unknown>, overrides, shown);

  // One line per problem, in file order; problems caused by an override come last.
  const report = (problems: Problem[]): string[] =>
    problems.map((p) => {
      const o = p.path.length > 0
        ? overrides.find((o) => isPrefix(overridePath(o), p.path) || isPrefix(p.path, overridePath(o)))
        : undefined;
      const what = `${p.path.map(String).join(".") || "(root)"}: ${p.message}`;
      if (o) return { offset: Infinity, text: `--set ${o.text}: ${what}` };
      const offset = locate(doc.contents, p.path);
      const { line, col } = lc.linePos(offset);
      return { offset, text: `${shown}:${line}:${col}: ${what}` };
    }).sort((a, b) => a.offset - b.offset).map((p) => p.text);

  const top = RecipeFile.safeParse(raw);
  if (!top.success) return fail(report(zodProblems(top.error.issues, [], raw, RecipeFile)));
  const file = top.data;

  const load = opts.loadStep;
  const names = Object.keys(file.steps);
  const problems: Problem[] = [];
  const steps: RecipeStep[] = [];
  for (const [index, name] of names.entries()) {
    if (!INSTANCE_NAME.test(name)) {
      problems.push({
        path: ["steps", name],
        message: `"${name}" is not a step name: expected a step ("tokenize") or an instance of one ` +
          `("tokenize@preference": lowercase letters, digits and "-" after the "@")`,
      });
      continue;
    }
    let def: StepDef;
    try {
      def = await load(stepOfInstance(name));
    } catch (error) {
      if (!(error instanceof LatheError)) throw error;
      problems.push({ path: ["steps", name], message: error.message });
      continue;
    }
    const earlier = names.slice(0, index).filter((n) => INSTANCE_NAME.test(n));
    const inputs = bindInstances(def, earlier);
    const later = names.slice(index + 1).map(stepOfInstance);
    for (const [input, upstream] of Object.entries(boundInputs(def, (s) => later.includes(s)))) {
      if (inputs[input] !== undefined) continue;
      problems.push({
        path: ["steps", name],
        message: later.includes(upstream)
          ? `step "${name}" reads input "${input}" from step "${upstream}", which comes after it; ` +
            `move "${upstream}" before "${name}"`
          : `step "${name}" reads input "${input}" from step "${upstream}", which is not in the recipe; ` +
            `add "${upstream}" before "${name}"`,
      });
    }
    // `inputs:` names the instance an input reads, where the nearest earlier one is not it.
    const { inputs: chosen, ...given } = (file.steps[name] ?? {}) as Record<string, unknown>;
    if (chosen !== undefined) {
      const declared = { ...def.inputs, ...def.optionalInputs };
      if (chosen === null || typeof chosen !== "object" || Array.isArray(chosen)) {
        problems.push({
          path: ["steps", name, "inputs"],
          message: "expected a mapping of input name -> step instance",
        });
      } else {
        for (const [input, instance] of Object.entries(chosen)) {
          const want = declared[input];
          if (want === undefined) {
            problems.push({
              path: ["steps", name, "inputs", input],
              message: `step "${stepOfInstance(name)}" has no input "${input}" (its inputs: ${
                Object.keys(declared).map((k) => `"${k}"`).join(", ") || "none"
              })`,
            });
          } else if (
            typeof instance !== "string" || !earlier.includes(instance) || stepOfInstance(instance) !== want
          ) {
            problems.push({
              path: ["steps", name, "inputs", input],
              message:
                `input "${input}" reads a "${want}" step: "${
                  String(instance)
                }" is not one before "${name}" ` +
                `(instances of "${want}" before it: ${
                  earlier.filter((n) => stepOfInstance(n) === want).map((n) => `"${n}"`).join(", ") || "none"
                })`,
            });
          } else inputs[input] = instance;
        }
      }
    }
    const checked = def.config.safeParse(given);
    if (!checked.success) {
      problems.push(...zodProblems(checked.error.issues, ["steps", name], given, def.config));
      continue;
    }
    steps.push({ name, def, inputs, raw: given, config: checked.data as Record<string, unknown> });
  }
  if (problems.length > 0) return fail(report(problems));
  return {
    name: file.name,
    description: file.description ?? null,
    seed: file.seed,
    path,
    steps,
  };
}
