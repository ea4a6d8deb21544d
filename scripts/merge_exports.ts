/**
 * Merges the legs of the GPU matrix (`.github/workflows/gpu-matrix.yml`) into one comparison.
 * Each leg, one recipe on one runner, uploads a directory holding:
 *
 * - `leg.json`: recipe, runner labels, run attempt, the recipe's exit code and wall seconds;
 * - `adapter.json`: the WebGPU adapter it ran on;
 * - the tracker export of its runs (`deno task runs export`): `runs.parquet`,
 *   `steps.parquet`, `metrics.parquet`, `artifacts.parquet`, `export.json`.
 *
 * DuckDB reads every leg's files of a table in one `read_parquet([...], union_by_name = true)`,
 * so legs exported by different lathe versions still line up (a column one leg lacks reads
 * as NULL), and the result is a Markdown table, recipe × runner, for the step summary.
 *
 * ```sh
 * deno run -A scripts/merge_exports.ts --in legs --summary "$GITHUB_STEP_SUMMARY" \
 *   --recipes '["tiny-demo"]' --runners '[["self-hosted", "linux", "nvidia"]]'
 * ```
 * @module
 */
import { basename, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { DuckDBInstance } from "@duckdb/node-api";
import type { DuckDBConnection } from "@duckdb/node-api";
import * as z from "zod";
import { exists } from "../foundation/atomic.ts";
import { LatheError, runMain } from "../foundation/errors.ts";
import { queryRows, sqlString } from "../tracker/db.ts";
import { parquetPath } from "../tracker/export.ts";
import { formatNumber } from "../tracker/table.ts";

/** Name of the leg description file in a leg directory. */
export const LEG_FILE = "leg.json";
/** Name of the adapter description file in a leg directory. */
export const ADAPTER_FILE = "adapter.json";

/** `leg.json`: what one matrix leg ran and how it ended. */
export const LegInfo = z.object({
  recipe: z.string().min(1),
  /** The runner's labels (`runs-on`), or a single label. */
  runner: z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]),
  /** `github.run_attempt`: a re-run leg uploads again under a higher attempt. */
  attempt: z.number().int().positive(),
  /** Exit code of `deno task recipe`; null when the recipe never finished. */
  exitCode: z.number().int().nullable(),
  /** Wall seconds of `deno task recipe`. */
  seconds: z.number().nonnegative().nullable(),
});
export type LegInfo = z.infer<typeof LegInfo>;

/** Matrix values: recipe names and runner label sets, as the workflow's plan job emits them. */
export interface Expected {
  recipes: string[];
  runners: (string | string[])[];
}

/**
 * The table's metric columns and the metric names each one reads (first found wins). Names
 * follow the tracker's `run_summary` view for the losses.
 */
export const METRIC_COLUMNS = [
  { key: "tokensPerS", header: "tokens/s", names: ["tokens_per_s", "tokens_per_sec", "tokens_per_second"] },
  { key: "loss", header: "final loss", names: ["loss", "train_loss"] },
  { key: "evalLoss", header: "eval loss", names: ["eval_loss", "val_loss"] },
] as const;
type MetricKey = typeof METRIC_COLUMNS[number]["key"];

/** One row of the comparison: one recipe on one runner. */
export interface LegRow extends Record<MetricKey, number | null> {
  recipe: string;
  runner: string;
  adapter: string | null;
  /** `success`, `failed (exit N)`, the run's own status, or `no result`. */
  status: string;
  seconds: number | null;
  /** The newest run the leg exported, if any. */
  runId: string | null;
  attempt: number | null;
  /** What was wrong with the leg's files, if anything. */
  notes: string[];
}

/** A runner's label set as one name: the labels joined by ", ". */
export function runnerName(runner: string | string[]): string {
  return typeof runner === "string" ? runner : runner.join(", ");
}

interface LegDir {
  dir: string;
  info: LegInfo | null;
  adapter: string | null;
  notes: string[];
}

/** A one-line adapter description from `adapter.json` (the fields of `GPUAdapterInfo`). */
export function describeAdapter(json: unknown): string | null {
  if (typeof json !== "object" || json === null) return null;
  const a = json as Record<string, unknown>;
  const text = (v: unknown) => (typeof v === "string" && v.trim() !== "" ? v.trim() : null);
  const name = text(a.description) ??
    ([text(a.vendor), text(a.architecture), text(a.device)].filter((s) => s !== null).join(" ") || null);
  if (name === null) return null;
  return a.isFallbackAdapter === true ? `${name} (software)` : name;
}

async function readJson(path: string): Promise<{ value?: unknown; problem?: string }> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    return { problem: error instanceof Deno.errors.NotFound ? "missing" : (error as Error).message };
  }
  try {
    return { value: JSON.parse(text) };
  } catch (error) {
    return { problem: `not valid JSON (${(error as Error).message})` };
  }
}

async function readLegDir(dir: string): Promise<LegDir> {
  const notes: string[] = [];
  let info: LegInfo | null = null;
  const leg = await readJson(join(dir, LEG_FILE));
  if (leg.problem) {
    notes.push(`${basename(dir)}/${LEG_FILE} is ${leg.problem}`);
  } else {
    const parsed = LegInfo.safeParse(leg.value);
    if (parsed.success) info = parsed.data;
    else {
      const issues = parsed.error.issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`);
      notes.push(`${basename(dir)}/${LEG_FILE} is not a leg description (${issues.join("; ")})`);
    }
  }
  const adapter = await readJson(join(dir, ADAPTER_FILE));
  return { dir, info, adapter: adapter.problem ? null : describeAdapter(adapter.value), notes };
}

/**
 * The leg directories under `inDir` (one per downloaded artifact). Of legs that name the
 * same recipe and runner, only the highest attempt is kept: a re-run replaces its leg.
 */
async function readLegs(inDir: string): Promise<LegDir[]> {
  const root = resolve(inDir);
  const dirs: string[] = [];
  try {
    for await (const entry of Deno.readDir(root)) if (entry.isDirectory) dirs.push(join(root, entry.name));
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  dirs.sort();
  const legs = await Promise.all(dirs.map(readLegDir));
  const newest = new Map<string, LegDir>();
  const unnamed: LegDir[] = [];
  for (const leg of legs) {
    if (!leg.info) {
      unnamed.push(leg);
      continue;
    }
    const key = `${leg.info.recipe}\0${runnerName(leg.info.runner)}`;
    const seen = newest.get(key);
    if (!seen || (seen.info?.attempt ?? 0) < leg.info.attempt) newest.set(key, leg);
  }
  return [...newest.values(), ...unnamed];
}

/** Columns each table must offer to the comparison query when no leg exported it. */
const EMPTY_TABLES: Record<string, string> = {
  runs: "run_id VARCHAR, recipe VARCHAR, status VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP",
  steps: "run_id VARCHAR, step VARCHAR, finished_at TIMESTAMP",
  metrics: "run_id VARCHAR, step VARCHAR, name VARCHAR, step_index BIGINT, value DOUBLE",
};

/**
 * Creates table `<name>` holding every leg's rows of that export table plus a `leg` column
 * (the leg's index), read in one `read_parquet` with `union_by_name`.
 */
async function loadTable(conn: DuckDBConnection, name: string, legs: LegDir[]): Promise<void> {
  const files: { leg: number; file: string }[] = [];
  for (const [leg, { dir }] of legs.entries()) {
    const file = parquetPath(dir, name);
    if (await exists(file)) files.push({ leg, file });
  }
  if (files.length === 0) {
    await conn.run(`CREATE TABLE ${name} (${EMPTY_TABLES[name]}, leg INTEGER)`);
    return;
  }
  await conn.run(`CREATE TEMP TABLE ${name}_files (file VARCHAR, leg INTEGER)`);
  await conn.run(
    `INSERT INTO ${name}_files VALUES ${files.map(() => "(?, ?)").join(", ")}`,
    files.flatMap((f) => [f.file, f.leg]),
  );
  const list = `[${files.map((f) => sqlString(f.file)).join(", ")}]`;
  try {
    await conn.run(
      `CREATE TABLE ${name} AS
        SELECT r.* EXCLUDE (filename), f.leg
        FROM read_parquet(${list}, union_by_name = true, filename = true) r
        JOIN ${name}_files f ON r.filename = f.file`,
    );
  } catch (error) {
    throw new LatheError(`Cannot read the "${name}" exports of the legs: ${(error as Error).message}`, {
      hint: `each leg directory should hold the files of \`deno task runs export\` (${name}.parquet, ...)`,
    });
  }
}

const inList = (names: readonly string[]) => names.map(sqlString).join(", ");
/** Maps a metric name to its column key in {@link METRIC_COLUMNS}, NULL for other metrics. */
const COLUMN_OF_NAME = `CASE ${
  METRIC_COLUMNS.map((c) => `WHEN m.name IN (${inList(c.names)}) THEN '${c.key}'`).join(" ")
} END`;
const METRIC_SELECTS = METRIC_COLUMNS.map((c) =>
  `max(p.value) FILTER (WHERE p.col = '${c.key}') AS "${c.key}"`
);

/**
 * Per leg, from its newest run: status, wall seconds, and each of {@link METRIC_COLUMNS}.
 * A metric's value is the final scalar (step_index NULL) of the last step that reports it,
 * else its last streamed point.
 */
const COMPARE_SQL = `
  WITH latest AS (
    SELECT leg, run_id, recipe, status, started_at, finished_at FROM runs
    QUALIFY row_number() OVER (PARTITION BY leg ORDER BY started_at DESC NULLS LAST, run_id DESC) = 1
  ), points AS (
    SELECT m.leg, m.step_index, m.value, s.finished_at AS step_finished, ${COLUMN_OF_NAME} AS col
    FROM metrics m
    JOIN latest l ON m.leg = l.leg AND m.run_id = l.run_id
    LEFT JOIN steps s ON s.leg = m.leg AND s.run_id = m.run_id AND s.step = m.step
    WHERE m.value IS NOT NULL AND isfinite(m.value)
  ), picked AS (
    SELECT leg, col, value FROM points WHERE col IS NOT NULL
    QUALIFY row_number() OVER (
      PARTITION BY leg, col
      ORDER BY (step_index IS NULL) DESC, step_finished DESC NULLS LAST, step_index DESC NULLS LAST
    ) = 1
  )
  SELECT l.leg, l.run_id, l.recipe, l.status,
    epoch(l.finished_at - l.started_at)::DOUBLE AS wall_seconds,
    ${METRIC_SELECTS.join(",\n    ")}
  FROM latest l LEFT JOIN picked p USING (leg)
  GROUP BY l.leg, l.run_id, l.recipe, l.status, l.started_at, l.finished_at`;

const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);

function legStatus(info: LegInfo | null, runStatus: string | null): string {
  if (info?.exitCode === 0) return "success";
  if (info && info.exitCode !== null) return `failed (exit ${info.exitCode})`;
  return runStatus ?? "no result";
}

/**
 * Reads every leg under `inDir` and returns one row per recipe × runner. With `expected`,
 * a leg of the matrix that uploaded nothing still gets a row (`no result`), and rows follow
 * the matrix order; otherwise they are sorted by recipe, then runner.
 */
export async function mergeExports(inDir: string, expected?: Expected): Promise<LegRow[]> {
  const legs = await readLegs(inDir);
  const instance = await DuckDBInstance.create(":memory:");
  const found = new Map<number, Record<string, unknown>>();
  try {
    const conn = await instance.connect();
    try {
      for (const table of Object.keys(EMPTY_TABLES)) await loadTable(conn, table, legs);
      for (const row of await queryRows(conn, COMPARE_SQL)) found.set(Number(row.leg), row);
    } finally {
      conn.closeSync();
    }
  } finally {
    instance.closeSync();
  }

  const rows: LegRow[] = legs.map((leg, i) => {
    const run = found.get(i);
    const runRecipe = (run?.recipe as string | undefined) ?? null;
    const notes = [...leg.notes];
    if (!run) notes.push(`${basename(leg.dir)} exported no runs`);
    const seconds = leg.info?.seconds ?? num(run?.wall_seconds);
    return {
      recipe: leg.info?.recipe ?? runRecipe ?? basename(leg.dir),
      runner: leg.info ? runnerName(leg.info.runner) : basename(leg.dir),
      adapter: leg.adapter,
      status: legStatus(leg.info, (run?.status as string | undefined) ?? null),
      tokensPerS: num(run?.tokensPerS),
      loss: num(run?.loss),
      evalLoss: num(run?.evalLoss),
      seconds,
      runId: (run?.run_id as string | undefined) ?? null,
      attempt: leg.info?.attempt ?? null,
      notes,
    };
  });

  if (!expected) {
    return rows.sort((a, b) => a.recipe.localeCompare(b.recipe) || a.runner.localeCompare(b.runner));
  }
  const runners = expected.runners.map(runnerName);
  for (const recipe of expected.recipes) {
    for (const runner of runners) {
      if (rows.some((r) => r.recipe === recipe && r.runner === runner)) continue;
      rows.push({
        recipe,
        runner,
        adapter: null,
        status: "no result",
        tokensPerS: null,
        loss: null,
        evalLoss: null,
        seconds: null,
        runId: null,
        attempt: null,
        notes: [
          `${recipe} on ${runner} uploaded nothing (no runner with these labels, or the job was cancelled)`,
        ],
      });
    }
  }
  const rank = (list: string[], v: string) => (list.includes(v) ? list.indexOf(v) : list.length);
  return rows.sort((a, b) =>
    rank(expected.recipes, a.recipe) - rank(expected.recipes, b.recipe) || a.recipe.localeCompare(b.recipe) ||
    rank(runners, a.runner) - rank(runners, b.runner) || a.runner.localeCompare(b.runner)
  );
}

/** A Markdown table cell: pipes escaped, line breaks folded, empty as "–". */
function cell(value: string | number | null): string {
  if (value === null) return "–";
  const text = typeof value === "number" ? formatNumber(value) : value;
  return text.replaceAll("\\", "\\\\").replaceAll("|", "\\|").replace(/\r?\n/g, " ");
}

function markdownTable(
  headers: string[],
  rightAligned: Set<number>,
  rows: (string | number | null)[][],
): string {
  const rule = headers.map((_, i) => (rightAligned.has(i) ? "---:" : "---"));
  return [headers.map(cell), rule, ...rows.map((r) => r.map(cell))].map((r) => `| ${r.join(" | ")} |`).join(
    "\n",
  );
}

/**
 * Renders the comparison as Markdown: one row per recipe × runner, then (with more than one
 * runner) tokens/s pivoted to recipes × runners, then notes on legs with missing files.
 */
export function renderSummary(rows: LegRow[], title = "GPU matrix"): string {
  const lines = [`## ${title}`, ""];
  if (rows.length === 0) {
    lines.push("No leg uploaded any result.", "");
    return lines.join("\n");
  }
  const headers = [
    "recipe",
    "runner",
    "adapter",
    "status",
    ...METRIC_COLUMNS.map((c) => c.header),
    "seconds",
    "run",
  ];
  const right = new Set(headers.map((_, i) => i).filter((i) => i >= 4 && i < headers.length - 1));
  lines.push(
    markdownTable(
      headers,
      right,
      rows.map((r) => [
        r.recipe,
        r.runner,
        r.adapter,
        r.status,
        ...METRIC_COLUMNS.map((c) => r[c.key]),
        r.seconds === null ? null : Math.round(r.seconds * 10) / 10,
        r.runId === null ? null : `\`${r.runId}\``,
      ]),
    ),
    "",
  );

  const runners = [...new Set(rows.map((r) => r.runner))];
  const recipes = [...new Set(rows.map((r) => r.recipe))];
  if (runners.length > 1 && rows.some((r) => r.tokensPerS !== null)) {
    const pivot = recipes.map((recipe) => [
      recipe,
      ...runners.map((runner) =>
        rows.find((r) => r.recipe === recipe && r.runner === runner)?.tokensPerS ?? null
      ),
    ]);
    lines.push(
      "### tokens/s by runner",
      "",
      markdownTable(["recipe", ...runners], new Set(runners.map((_, i) => i + 1)), pivot),
      "",
    );
  }

  const notes = rows.flatMap((r) => r.notes);
  if (notes.length > 0) lines.push("### Notes", "", ...notes.map((n) => `- ${cell(n)}`), "");
  return lines.join("\n");
}

const USAGE =
  `usage: deno run -A scripts/merge_exports.ts --in <dir> [--summary <file>] [--recipes <json>] [--runners <json>]

  --in <dir>        one subdirectory per leg (leg.json, adapter.json, the runs export)
  --summary <file>  append the Markdown table to this file (e.g. $GITHUB_STEP_SUMMARY); it is printed too
  --recipes <json>  the matrix's recipes, e.g. '["tiny-demo"]': legs that uploaded nothing get a row
  --runners <json>  the matrix's runner label sets, e.g. '[["self-hosted", "linux", "nvidia"]]'`;

function parseJsonOption<T>(flag: string, text: string, schema: z.ZodType<T>): T {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new LatheError(
      `Cannot read ${flag}: ${JSON.stringify(text)} is not JSON (${(error as Error).message})`,
      {
        hint: `pass a JSON list, e.g. ${flag} '["a", "b"]'`,
      },
    );
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    throw new LatheError(`Cannot read ${flag}: ${JSON.stringify(text)} is not a list of the expected shape`, {
      hint: flag === "--runners"
        ? `pass a JSON list of label lists, e.g. --runners '[["self-hosted", "linux", "nvidia"]]'`
        : `pass a JSON list of recipe names, e.g. --recipes '["tiny-demo"]'`,
    });
  }
  return parsed.data;
}

/** The program: parses the flags, merges, prints and appends the summary. */
export async function main(args: string[]): Promise<void> {
  let values: { in?: string; summary?: string; recipes?: string; runners?: string; help?: boolean };
  try {
    ({ values } = parseArgs({
      args,
      options: {
        in: { type: "string" },
        summary: { type: "string" },
        recipes: { type: "string" },
        runners: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    throw new LatheError(`Cannot parse the arguments: ${(error as Error).message}`, { hint: USAGE });
  }
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (!values.in) throw new LatheError("Cannot merge exports: --in is missing", { hint: USAGE });
  if (!(await exists(values.in))) {
    throw new LatheError(`Cannot merge exports: "${values.in}" does not exist`, {
      hint: "pass the directory actions/download-artifact wrote, one subdirectory per leg",
    });
  }
  let expected: Expected | undefined;
  if (values.recipes || values.runners) {
    expected = {
      recipes: values.recipes ? parseJsonOption("--recipes", values.recipes, z.array(z.string().min(1))) : [],
      runners: values.runners
        ? parseJsonOption(
          "--runners",
          values.runners,
          z.array(z.union([z.string().min(1), z.array(z.string().min(1)).min(1)])),
        )
        : [],
    };
  }
  const markdown = renderSummary(await mergeExports(values.in, expected));
  console.log(markdown);
  if (values.summary) await Deno.writeTextFile(values.summary, markdown + "\n", { append: true });
}

if (import.meta.main) await runMain(() => main(Deno.args));
