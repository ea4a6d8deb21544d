/**
 * Small steps for testing the step contract, the recipe loader and the pipeline:
 *
 * ```
 * emit ──► upper ──► flaky        read (sources: one file)        tag (a union in its config)
 * ```
 *
 * Each counts its calls in {@link calls} so a test can tell a computed result from a reused one.
 * @module
 */
import * as z from "zod";
import { defineStep, type StepDef } from "../../steps/define.ts";
import { LatheError } from "../../foundation/errors.ts";

/** Number of times each toy step's `run` was called. */
export const calls: Record<string, number> = {};

/** Steps listed here throw from `run` (after writing a partial output) until removed. */
export const failing: Set<string> = new Set();

function count(name: string): void {
  calls[name] = (calls[name] ?? 0) + 1;
}

/** Resets {@link calls} and {@link failing}. */
export function resetToys(): void {
  for (const k of Object.keys(calls)) delete calls[k];
  failing.clear();
}

/** Writes `text` repeated `repeat` times, one per line. */
export const emit = defineStep({
  name: "emit",
  version: "1",
  description: "writes a text file",
  config: z.strictObject({
    text: z.string().default("hello"),
    repeat: z.number().int().positive().default(2),
  }),
  inputs: {},
  run: async (ctx, config) => {
    count("emit");
    const lines = Array.from({ length: config.repeat }, () => config.text).join("\n") + "\n";
    await Deno.writeTextFile(await ctx.out("out.txt"), lines);
    ctx.log("chars", 0, lines.length);
    return { outputs: { text: "out.txt" }, metrics: { chars: lines.length } };
  },
});

/** Upper-cases the text of `emit`, then appends `suffix` and the seed padded to `nested.width`. */
export const upper = defineStep({
  name: "upper",
  version: "1",
  description: "upper-cases its input",
  config: z.strictObject({
    suffix: z.string().default("!"),
    nested: z.strictObject({ width: z.number().int().default(4) }).default({ width: 4 }),
  }),
  inputs: { text: "emit" },
  run: async (ctx, config, inputs) => {
    count("upper");
    const text = await Deno.readTextFile(inputs.text.path("text"));
    const body = text.toUpperCase() + config.suffix + String(ctx.seed).padStart(config.nested.width, "0") +
      "\n";
    await Deno.writeTextFile(await ctx.out("sub/upper.txt"), body);
    return { outputs: { upper: "sub/upper.txt" } };
  },
});

/** Copies the output of `upper`; throws after writing part of it while listed in {@link failing}. */
export const flaky = defineStep({
  name: "flaky",
  version: "1",
  description: "fails on demand",
  config: z.strictObject({ label: z.string().default("copy") }),
  inputs: { upper: "upper" },
  run: async (ctx, config, inputs) => {
    count("flaky");
    const out = await ctx.out("copy.txt");
    await Deno.writeTextFile(out, `${config.label}: `);
    if (failing.has("flaky")) throw new Error("flaky failed on purpose");
    await Deno.writeTextFile(out, await Deno.readTextFile(inputs.upper.path("upper")), { append: true });
    return { outputs: { copy: "copy.txt" } };
  },
});

/** Reads an external file (its `sources` entry) and writes its line count. */
export const read = defineStep({
  name: "read",
  version: "1",
  description: "counts the lines of a source file",
  config: z.strictObject({ file: z.string() }),
  inputs: {},
  sources: (config) => Promise.resolve({ data: config.file }),
  run: async (ctx) => {
    count("read");
    const lines = (await Deno.readTextFile(ctx.sources.data)).split("\n").filter((l) => l !== "").length;
    await Deno.writeTextFile(await ctx.out("count.txt"), `${lines}\n`);
    return { outputs: { count: "count.txt" }, metrics: { lines } };
  },
});

/** Writes one line per tag; a tag is a name or `{ name, weight }` (a union, for config errors). */
export const tag = defineStep({
  name: "tag",
  version: "1",
  description: "writes weighted tags",
  config: z.strictObject({
    tags: z.array(z.union([z.string(), z.strictObject({ name: z.string(), weight: z.number().default(1) })])),
  }),
  inputs: {},
  run: async (ctx, config) => {
    count("tag");
    const lines = config.tags.map((t) => typeof t === "string" ? `${t} 1` : `${t.name} ${t.weight}`);
    await Deno.writeTextFile(await ctx.out("tags.txt"), lines.join("\n") + "\n");
    return { outputs: { tags: "tags.txt" } };
  },
});

/** The toy steps by name. */
export const TOY_STEPS: Record<string, StepDef> = { emit, upper, flaky, read, tag } as Record<
  string,
  StepDef
>;

/** A step loader over the toy steps, shaped like steps/registry.ts `loadStep`. */
export function loadToyStep(name: string): Promise<StepDef> {
  const def = TOY_STEPS[name];
  if (!def) {
    return Promise.reject(
      new LatheError(
        `Cannot find step "${name}": known steps are ${
          Object.keys(TOY_STEPS).map((s) => `"${s}"`).join(", ")
        }`,
      ),
    );
  }
  return Promise.resolve(def);
}

/** A temporary project root with a runs root inside it; removed on dispose. */
export interface Sandbox extends AsyncDisposable {
  /** Absolute path of the project root. */
  root: string;
  /** Absolute path of the runs root (`<root>/runs`). */
  runs: string;
}

/** Makes a {@link Sandbox} and resets the toy steps' counters: `await using box = await sandbox();`. */
export async function sandbox(): Promise<Sandbox> {
  resetToys();
  const root = await Deno.makeTempDir({ prefix: "lathe-test-" });
  return {
    root,
    runs: `${root}/runs`,
    async [Symbol.asyncDispose]() {
      await Deno.remove(root, { recursive: true });
    },
  };
}

/** Every file under `dir` (relative path -> bytes), for byte-identity checks. */
export async function snapshot(dir: string, prefix = ""): Promise<Map<string, Uint8Array>> {
  const out = new Map<string, Uint8Array>();
  for await (const entry of Deno.readDir(dir)) {
    const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
    if (entry.isDirectory) {
      for (const [k, v] of await snapshot(`${dir}/${entry.name}`, rel)) out.set(k, v);
    } else out.set(rel, await Deno.readFile(`${dir}/${entry.name}`));
  }
  return out;
}
