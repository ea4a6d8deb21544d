/**
 * The house rules of DESIGN §1, read from the import graph of the source tree: a module imports
 * only from its own layer or the layers below it, no two modules import each other (directly or
 * round a cycle), one module reads the `HF_*` environment, and the CPU reference is the tests'
 * oracle and the `cpu-reference` backend, not a library for the GPU path.
 *
 * The layer order is written here and nowhere else in code; DESIGN §1, docs/architecture.md and
 * README.md's layout table describe the same order.
 * @module
 */
import assert from "node:assert/strict";
import { dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** DESIGN §1's layers, bottom up, with the paths each holds (a folder ends in "/"). */
export const LAYERS: readonly { name: string; paths: readonly string[] }[] = [
  { name: "foundation", paths: ["foundation/"] },
  { name: "formats and hub", paths: ["formats/", "hub/"] },
  { name: "kernels", paths: ["kernels/"] },
  { name: "tracker", paths: ["tracker/"] },
  { name: "steps", paths: ["steps/"] },
  { name: "cli and bench", paths: ["cli/", "bench/", "scripts/", "mod.ts"] },
];

/** Source files the rules do not cover: the suite itself, and what is not lathe's source. */
const UNLAYERED = ["tests/", "node_modules/", "runs/"];

/** file -> the files it imports (project-relative, "/"-separated). */
export type ImportGraph = Map<string, string[]>;

/** The layer index of a project-relative path, or -1 when no layer holds it. */
export function layerOf(path: string): number {
  return LAYERS.findIndex((l) => l.paths.some((p) => p.endsWith("/") ? path.startsWith(p) : path === p));
}

// Static imports and re-exports (`import ... from`, `export ... from`, `import "x"`), dynamic
// `import("x")`, and `new URL("x", import.meta.url)` (workers, WGSL sources).
const SPECIFIER = new RegExp(
  [
    /(?:^|\n)[ \t]*(?:import|export)\b[^;'"`]*?\bfrom\s*["']([^"']+)["']/.source,
    /(?:^|\n)[ \t]*import\s*["']([^"']+)["']/.source,
    /\bimport\(\s*["']([^"']+)["']\s*\)/.source,
    /\bnew URL\(\s*["']([^"']+)["']\s*,\s*import\.meta\.url/.source,
  ].join("|"),
  "g",
);

/** The relative specifiers a TypeScript source imports; comment lines (JSDoc examples) are skipped. */
export function importSpecifiers(source: string): string[] {
  const code = source.split("\n").filter((line) => !/^\s*(\/\/|\*|\/\*)/.test(line)).join("\n");
  const out: string[] = [];
  for (const m of code.matchAll(SPECIFIER)) {
    const spec = m[1] ?? m[2] ?? m[3] ?? m[4];
    if (spec.startsWith("./") || spec.startsWith("../")) out.push(spec);
  }
  return out;
}

/** Reads the import graph of every `.ts` file under `root` (less the unlayered folders). */
export async function readImportGraph(root: string): Promise<ImportGraph> {
  const graph: ImportGraph = new Map();
  async function walk(dir: string): Promise<void> {
    for await (const entry of Deno.readDir(join(root, dir))) {
      const path = dir === "" ? entry.name : `${dir}/${entry.name}`;
      if (entry.name.startsWith(".") || UNLAYERED.some((u) => `${path}/`.startsWith(u))) continue;
      if (entry.isDirectory) await walk(path);
      else if (entry.isFile && path.endsWith(".ts")) {
        const text = await Deno.readTextFile(join(root, path));
        const targets = importSpecifiers(text).map((s) =>
          normalize(join(dirname(path), s)).replaceAll("\\", "/")
        );
        graph.set(path, targets);
      }
    }
  }
  await walk("");
  return graph;
}

/** Every import that points into a higher layer, and every source file no layer holds. */
export function layerViolations(graph: ImportGraph): string[] {
  const order = LAYERS.map((l) => l.name).join(" < ");
  const out: string[] = [];
  for (const [file, targets] of graph) {
    const from = layerOf(file);
    if (from < 0) {
      out.push(`${file} is in no layer: add its folder to LAYERS in tests/layers_test.ts (${order})`);
      continue;
    }
    for (const target of targets) {
      const to = layerOf(target);
      if (to > from) {
        out.push(
          `${file} (${LAYERS[from].name}) imports ${target} (${LAYERS[to].name}), a higher layer (${order})`,
        );
      }
    }
  }
  return out;
}

/** The import cycles of `graph`, each as its files in import order, back to the first. */
export function importCycles(graph: ImportGraph): string[][] {
  // Tarjan's strongly connected components; a component of two or more files holds a cycle.
  let counter = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const components: string[][] = [];
  const visit = (v: string): void => {
    index.set(v, counter);
    low.set(v, counter++);
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      if (component.length > 1 || (graph.get(v) ?? []).includes(v)) components.push(component);
    }
  };
  for (const v of [...graph.keys()].sort()) if (!index.has(v)) visit(v);
  // Name one concrete cycle per component: a shortest path from its first file back to it.
  return components.map((component) => {
    const members = new Set(component);
    const start = [...members].sort()[0];
    const previous = new Map<string, string>();
    const queue = [start];
    while (queue.length > 0) {
      const v = queue.shift()!;
      for (const w of graph.get(v) ?? []) {
        if (!members.has(w)) continue;
        if (w === start) {
          const path = [v];
          while (path[0] !== start) path.unshift(previous.get(path[0])!);
          return [...path, start];
        }
        if (!previous.has(w)) {
          previous.set(w, v);
          queue.push(w);
        }
      }
    }
    return [start, start];
  });
}

/** Source files other than hub/settings.ts that read an `HF_*` (or legacy Hugging Face) variable. */
export function hfEnvironmentReaders(sources: Map<string, string>): string[] {
  const read =
    /\b(?:env|get)\(\s*["'](HF_[A-Z_]+|HUGGING_FACE_HUB_TOKEN|HUGGINGFACE_HUB_CACHE|TRANSFORMERS_OFFLINE)["']/;
  return [...sources].filter(([file, text]) => file !== "hub/settings.ts" && read.test(text))
    .map(([file, text]) =>
      `${file} reads ${text.match(read)![1]}: read it through hub/settings.ts hubSettings()`
    );
}

/**
 * Imports of the CPU reference (kernels/reference/) from production code: it is the tests'
 * oracle and the engine of the `cpu-reference` backend (kernels/models/reference_backend.ts),
 * so nothing else below the programs calls it.
 */
export function referenceImports(graph: ImportGraph): string[] {
  const programs = LAYERS.length - 1;
  const out: string[] = [];
  for (const [file, targets] of graph) {
    if (file.startsWith("kernels/reference/") || file === "kernels/models/reference_backend.ts") continue;
    if (layerOf(file) === programs) continue;
    for (const t of targets) {
      if (t.startsWith("kernels/reference/")) out.push(`${file} imports the CPU reference ${t}`);
    }
  }
  return out;
}

const graph = await readImportGraph(ROOT);

Deno.test("the import graph holds every source file of every layer", () => {
  for (const layer of LAYERS) {
    for (const path of layer.paths) {
      assert.ok(
        [...graph.keys()].some((f) => path.endsWith("/") ? f.startsWith(path) : f === path),
        `no source file read under ${path}`,
      );
    }
  }
  // Imports are read: a step module imports the step contract, the registry every step.
  assert.ok(graph.get("steps/tokenize.ts")?.includes("steps/define.ts"));
  assert.ok(graph.get("steps/registry.ts")?.includes("steps/train_sft.ts"), "dynamic import() is read");
  assert.ok(graph.get("steps/tokenize/pool.ts")?.includes("steps/tokenize/worker.ts"), "new URL() is read");
});

Deno.test("no module imports from a layer above its own (DESIGN §1)", () => {
  assert.deepEqual(layerViolations(graph), []);
});

Deno.test("no two modules import each other, directly or round a cycle", () => {
  assert.deepEqual(importCycles(graph).map((c) => c.join(" -> ")), []);
});

Deno.test("only hub/settings.ts reads the HF_* environment", async () => {
  const sources = new Map<string, string>();
  for (const file of graph.keys()) sources.set(file, await Deno.readTextFile(join(ROOT, file)));
  assert.deepEqual(hfEnvironmentReaders(sources), []);
  assert.ok((await Deno.readTextFile(join(ROOT, "hub/settings.ts"))).includes('env("HF_TOKEN_PATH")'));
});

Deno.test("only the cpu-reference backend calls the CPU reference outside the tests and programs", () => {
  assert.deepEqual(referenceImports(graph), []);
});

Deno.test("the rules catch a planted upward import, a planted cycle, an unlayered file and an HF_ read", () => {
  const planted: ImportGraph = new Map(graph);
  // An engine file that reaches up into the steps, and two steps files that import each other.
  planted.set("kernels/device.ts", [...graph.get("kernels/device.ts")!, "steps/runner.ts"]);
  planted.set("steps/run_id.ts", [...graph.get("steps/run_id.ts")!, "steps/runner.ts"]);
  planted.set("steps/runner.ts", [...graph.get("steps/runner.ts")!, "steps/run_id.ts"]);
  planted.set("misc/helper.ts", ["foundation/errors.ts"]);
  planted.set("kernels/ops/rope.ts", [...graph.get("kernels/ops/rope.ts")!, "kernels/reference/rope.ts"]);
  assert.deepEqual(layerViolations(planted), [
    "kernels/device.ts (kernels) imports steps/runner.ts (steps), a higher layer " +
    "(foundation < formats and hub < kernels < tracker < steps < cli and bench)",
    "misc/helper.ts is in no layer: add its folder to LAYERS in tests/layers_test.ts " +
    "(foundation < formats and hub < kernels < tracker < steps < cli and bench)",
  ]);
  assert.deepEqual(importCycles(planted), [["steps/run_id.ts", "steps/runner.ts", "steps/run_id.ts"]]);
  assert.deepEqual(referenceImports(planted), [
    "kernels/ops/rope.ts imports the CPU reference kernels/reference/rope.ts",
  ]);
  // A longer cycle is named file by file, in import order.
  const ring: ImportGraph = new Map([["a.ts", ["b.ts"]], ["b.ts", ["c.ts"]], ["c.ts", ["a.ts"]], ["d.ts", [
    "a.ts",
  ]]]);
  assert.deepEqual(importCycles(ring), [["a.ts", "b.ts", "c.ts", "a.ts"]]);
  assert.deepEqual(
    hfEnvironmentReaders(new Map([["kernels/x.ts", 'const home = Deno.env.get("HF_HOME");']])),
    ["kernels/x.ts reads HF_HOME: read it through hub/settings.ts hubSettings()"],
  );
});

Deno.test("importSpecifiers() reads static, type, re-export, dynamic and URL imports, not comments", () => {
  const source = [
    'import { a } from "./a.ts";',
    "import type {",
    "  B,",
    '} from "../b.ts";',
    'export { c } from "./c.ts";',
    'import "./side.ts";',
    'const d = await import("./d.ts");',
    'new Worker(new URL("./w.ts", import.meta.url).href);',
    ' * import { e } from "../steps/e.ts";',
    '// import { f } from "./f.ts";',
    'import { z } from "zod";',
    'const s = Array.from("./not-an-import.ts");',
  ].join("\n");
  assert.deepEqual(importSpecifiers(source), [
    "./a.ts",
    "../b.ts",
    "./c.ts",
    "./side.ts",
    "./d.ts",
    "./w.ts",
  ]);
});
