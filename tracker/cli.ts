/**
 * `deno task runs <command>`: the tracker from the command line.
 *
 * ```
 * deno task runs ls [--recipe r] [--limit n]
 * deno task runs show <id>
 * deno task runs compare <a> <b>
 * deno task runs sql "<query>" [--json | --csv]
 * deno task runs plot <id> [--metric loss ...] [--out file.svg]
 * deno task runs reindex
 * deno task runs export [--out dir]
 * deno task runs import <dir>
 * ```
 * Run ids may be shortened to any unique prefix.
 * @module
 */
import { parseArgs } from "node:util";
import { isAbsolute, join, relative, resolve } from "node:path";
import type { Json } from "@duckdb/node-api";
import { exists, writeFileAtomic } from "../foundation/atomic.ts";
import { LatheError, runMain } from "../foundation/errors.ts";
import { projectRoot, runsRoot, trackerDbPath } from "../foundation/paths.ts";
import { humanDuration } from "../foundation/progress.ts";
import { queryTable } from "./db.ts";
import { exportIndex, importExport } from "./export.ts";
import { readIndex, reindex, writeIndex } from "./index.ts";
import { renderSvg } from "./plot.ts";
import { compareRuns, listRuns, metricSeries, resolveRunId, runDetail, type RunListRow } from "./queries.ts";
import { type Cell, formatCsv, formatNumber, formatTable } from "./table.ts";

const USAGE = `usage: deno task runs <command> [options]
  ls [--recipe r] [--limit n]        runs, newest first (default limit 20)
  show <id>                          one run: steps, final metrics, artifacts
  compare <a> <b>                    config keys that differ per step; final metrics with deltas
  sql "<query>" [--json | --csv]     any SQL over the index (tables runs, steps, metrics, artifacts)
  plot <id> [--metric m ...] [--out file.svg]
                                     SVG line plot of streamed metrics (default "loss"),
                                     written to runs/<id>/<metric>.svg unless --out is given
  reindex                            rebuild the index from the manifests under the runs root
  export [--out dir]                 write every table as <dir>/<table>.parquet (default exports/<host>)
  import <dir>                       merge a directory written by export (another machine's runs)
options: --runs <dir> (runs root, default ./runs or $LATHE_RUNS; the index is <runs>/lathe.duckdb or $LATHE_DB)
run ids may be shortened to any unique prefix`;

/** Where the CLI writes its output (tests capture it). */
export type Print = (text: string) => void;

const timestamp = (v: string | null | undefined) => v ? v.slice(0, 19) : null;
const shortCommit = (commit: string | null, dirty: boolean | null) =>
  commit ? `${commit.slice(0, 8)}${dirty ? " dirty" : ""}` : dirty ? "dirty" : null;

function humanBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

/** A path as the user would type it: relative to the working directory when inside it. */
function displayPath(path: string): string {
  const rel = relative(Deno.cwd(), path);
  return rel === "" ? "." : rel.startsWith("..") || isAbsolute(rel) ? path : rel;
}

function jsonCell(v: Json): Cell {
  if (v === null || typeof v !== "object") return v;
  return JSON.stringify(v);
}

function needArgs(command: string, positionals: string[], names: string[]): string[] {
  if (positionals.length !== names.length) {
    throw new LatheError(
      `Cannot run "runs ${command}": it takes ${
        names.map((n) => `<${n}>`).join(" ") || "no arguments"
      }, got ${positionals.length === 0 ? "none" : positionals.map((p) => `"${p}"`).join(" ")}`,
      { hint: `deno task runs --help` },
    );
  }
  return positionals;
}

interface Context {
  runs: string;
  db: string;
  print: Print;
}

function stepsCell(r: RunListRow): string {
  const notes = [r.nFailed > 0 ? `${r.nFailed} failed` : "", r.nCached > 0 ? `${r.nCached} cached` : ""]
    .filter((n) => n !== "");
  return notes.length > 0 ? `${r.nSteps} (${notes.join(", ")})` : String(r.nSteps);
}

async function cmdLs(ctx: Context, recipe: string | undefined, limitText: string | undefined): Promise<void> {
  let limit = 20;
  if (limitText !== undefined) {
    limit = Number(limitText);
    if (!Number.isInteger(limit) || limit < 1) {
      throw new LatheError(`Cannot use --limit "${limitText}": expected a positive integer`);
    }
  }
  const { rows, total } = await readIndex(ctx.db, ctx.runs, (conn) => listRuns(conn, { recipe, limit }));
  if (total === 0) {
    ctx.print(
      recipe ? `no runs of recipe "${recipe}" in the index` : `no runs in the index (runs root: ${ctx.runs})`,
    );
    return;
  }
  const imported = rows.some((r) => r.origin !== "local");
  const headers = ["run id", "recipe", "status", "steps", "started", "duration", "commit"];
  if (imported) headers.push("origin");
  ctx.print(formatTable(
    headers,
    rows.map((r) => {
      const row: Cell[] = [
        r.runId,
        r.recipe,
        r.status,
        stepsCell(r),
        timestamp(r.startedAt),
        r.wallSeconds === null ? null : humanDuration(r.wallSeconds),
        shortCommit(r.gitCommit, r.gitDirty),
      ];
      if (imported) row.push(r.origin === "local" ? "local" : displayPath(r.origin));
      return row;
    }),
    { rightAlign: [] },
  ));
  if (total > rows.length) ctx.print(`(${rows.length} of ${total} runs; --limit shows more)`);
}

async function cmdShow(ctx: Context, id: string): Promise<void> {
  const d = await readIndex(ctx.db, ctx.runs, async (conn) => runDetail(conn, await resolveRunId(conn, id)));
  const r = d.run;
  const wall = r.wall_seconds === null ? null : Number(r.wall_seconds);
  const stepSeconds = r.step_seconds === null ? null : Number(r.step_seconds);
  const git = r.git_commit
    ? `${r.git_commit}${r.git_branch ? ` on ${r.git_branch}` : ""}${r.git_dirty ? " (dirty)" : ""}`
    : "not recorded";
  const head: [string, string][] = [
    ["run", String(r.run_id)],
    ["recipe", r.recipe === null ? "-" : String(r.recipe)],
    ["status", `${r.status} (${r.n_steps} steps${Number(r.n_cached) > 0 ? `, ${r.n_cached} cached` : ""})`],
    ["started", `${timestamp(r.started_at as string | null) ?? "-"} UTC`],
    ["finished", `${timestamp(r.finished_at as string | null) ?? "-"} UTC`],
    [
      "duration",
      `${wall === null ? "-" : humanDuration(wall)}${
        stepSeconds === null ? "" : ` (steps ${humanDuration(stepSeconds)})`
      }`,
    ],
    ["git", git],
  ];
  if (r.origin !== "local") head.push(["imported", String(r.origin)]);
  ctx.print(head.map(([k, v]) => `${k.padEnd(9)} ${v}`).join("\n"));
  ctx.print("\nsteps");
  ctx.print(formatTable(
    ["step", "status", "cached from", "seconds", "key", "gpu"],
    d.steps.map((s) => [
      s.step,
      s.status,
      s.cachedFrom,
      s.seconds === null ? null : s.seconds.toFixed(1),
      s.key?.slice(0, 12) ?? null,
      s.gpu,
    ]),
  ));
  for (const s of d.steps.filter((s) => s.error)) ctx.print(`\nerror in ${s.step}: ${s.error}`);
  if (d.metrics.length > 0) {
    ctx.print("\nfinal metrics");
    ctx.print(formatTable(
      ["step", "metric", "value"],
      d.metrics.map((m) => [m.step, m.name, m.text ?? (m.value === null ? null : formatNumber(m.value))]),
      { rightAlign: [2] },
    ));
  }
  if (d.artifacts.length > 0) {
    ctx.print("\nartifacts");
    ctx.print(formatTable(
      ["step", "name", "path", "size", "sha256"],
      d.artifacts.map((a) => [a.step, a.name, a.path, humanBytes(a.bytes), a.sha256.slice(0, 12)]),
      { rightAlign: [3] },
    ));
  }
}

async function cmdCompare(ctx: Context, idA: string, idB: string): Promise<void> {
  const c = await readIndex(ctx.db, ctx.runs, async (conn) => {
    return await compareRuns(conn, await resolveRunId(conn, idA), await resolveRunId(conn, idB));
  });
  ctx.print(`a  ${c.a}\nb  ${c.b}`);
  if (c.runDiffs.length > 0) {
    ctx.print("\nrun");
    ctx.print(formatTable(["field", "a", "b"], c.runDiffs.map((d) => [d.field, d.a, d.b])));
  }
  for (const side of ["a", "b"] as const) {
    const steps = c.onlyIn.filter((o) => o.run === side).map((o) => o.step);
    if (steps.length > 0) ctx.print(`\nsteps only in ${side}: ${steps.join(", ")}`);
  }
  if (c.sameKey.length > 0) ctx.print(`\nidentical steps (same key): ${c.sameKey.join(", ")}`);
  ctx.print("\nconfig differences");
  if (c.configDiffs.length === 0) ctx.print("none");
  else {
    ctx.print(formatTable(
      ["step", "key", "a", "b"],
      c.configDiffs.map((d) => [d.step, d.key, d.a ?? "(absent)", d.b ?? "(absent)"]),
      { rightAlign: [] },
    ));
  }
  ctx.print("\nfinal metrics");
  if (c.metrics.length === 0) ctx.print("none");
  else {
    const show = (v: number | string | null) => typeof v === "number" ? formatNumber(v) : v;
    ctx.print(formatTable(
      ["step", "metric", "a", "b", "delta"],
      c.metrics.map((m) => [
        m.step,
        m.name,
        show(m.a),
        show(m.b),
        m.delta === null ? null : `${m.delta > 0 ? "+" : ""}${formatNumber(m.delta)}`,
      ]),
      { rightAlign: [2, 3, 4] },
    ));
  }
}

async function cmdSql(ctx: Context, query: string, as: "table" | "json" | "csv"): Promise<void> {
  const result = await readIndex(ctx.db, ctx.runs, async (conn) => {
    try {
      return await queryTable(conn, query);
    } catch (error) {
      const message = (error as Error).message;
      throw new LatheError(`Cannot run query: ${message}`, {
        hint: /read-only/i.test(message)
          ? "the index is opened read-only here: it is rebuilt from the manifests, so changes would not last"
          : "tables: runs, steps, metrics, artifacts; views: final_metrics, latest_steps, run_summary",
      });
    }
  });
  if (as === "json") {
    const objects = result.rows.map((row) => Object.fromEntries(result.columns.map((c, i) => [c, row[i]])));
    ctx.print(JSON.stringify(objects, null, 2));
  } else if (as === "csv") {
    ctx.print(formatCsv(result.columns, result.rows.map((r) => r.map(jsonCell))).trimEnd());
  } else {
    ctx.print(formatTable(result.columns, result.rows.map((r) => r.map(jsonCell)), { nullText: "NULL" }));
    ctx.print(`(${result.rows.length} row${result.rows.length === 1 ? "" : "s"})`);
  }
}

async function cmdPlot(
  ctx: Context,
  id: string,
  metricArgs: string[],
  out: string | undefined,
): Promise<void> {
  const metrics = (metricArgs.length > 0 ? metricArgs : ["loss"]).flatMap((m) => m.split(",")).map((m) =>
    m.trim()
  )
    .filter((m) => m !== "");
  const { runId, series } = await readIndex(ctx.db, ctx.runs, async (conn) => {
    const runId = await resolveRunId(conn, id);
    return { runId, series: await metricSeries(conn, runId, metrics) };
  });
  const steps = new Set(series.map((s) => s.step));
  const svg = renderSvg(
    series.map((s) => ({ label: steps.size > 1 ? `${s.step}/${s.name}` : s.name, points: s.points })),
    { title: `${runId} · ${metrics.join(", ")}`, xLabel: "step", yLabel: metrics.join(", ") },
  );
  let target: string;
  if (out !== undefined) target = resolve(out);
  else {
    const runDir = join(ctx.runs, runId);
    if (!(await exists(runDir))) {
      throw new LatheError(
        `Cannot write the plot into "${runDir}": the run directory is not on this machine`,
        {
          hint: "pass --out file.svg",
        },
      );
    }
    target = join(runDir, `${metrics.join("+").replace(/[^A-Za-z0-9_.+-]/g, "_")}.svg`);
  }
  await writeFileAtomic(target, svg);
  const n = series.reduce((a, s) => a + s.points.length, 0);
  ctx.print(`${displayPath(target)} (${series.length} series, ${n} points)`);
}

async function cmdReindex(ctx: Context): Promise<void> {
  const r = await reindex(ctx.db, ctx.runs);
  for (const w of r.warnings) console.error(`warning: ${w}`);
  ctx.print(
    `indexed ${r.runs} run${
      r.runs === 1 ? "" : "s"
    }, ${r.steps} steps, ${r.metrics} metric rows from ${ctx.runs} into ${ctx.db}`,
  );
  for (const dir of r.imports) ctx.print(`merged again: ${dir}`);
}

async function cmdExport(ctx: Context, out: string | undefined): Promise<void> {
  let host = "local";
  try {
    host = Deno.hostname();
  } catch { /* no sys permission: keep "local" */ }
  const dir = resolve(out ?? join(projectRoot(), "exports", host));
  const info = await readIndex(ctx.db, ctx.runs, (conn) => exportIndex(conn, dir));
  ctx.print(formatTable(
    ["file", "rows"],
    Object.entries(info.rows).map(([t, n]) => [displayPath(join(dir, `${t}.parquet`)), n]),
  ));
  ctx.print(
    `merge exports from many machines with: deno task runs sql "SELECT * FROM read_parquet('exports/*/runs.parquet')"`,
  );
}

async function cmdImport(ctx: Context, dir: string): Promise<void> {
  const r = await writeIndex(ctx.db, ctx.runs, (conn) => importExport(conn, dir));
  ctx.print(`imported ${r.imported.length} run${r.imported.length === 1 ? "" : "s"} from ${r.source}`);
  if (r.skipped.length > 0) {
    ctx.print(`kept ${r.skipped.length} run(s) whose manifests are on this machine: ${r.skipped.join(", ")}`);
  }
}

/** Parses `argv` and runs one `runs` command, writing its output through `print`. */
export async function runsCli(argv: string[], print: Print = console.log): Promise<void> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        runs: { type: "string" },
        recipe: { type: "string" },
        limit: { type: "string" },
        json: { type: "boolean", default: false },
        csv: { type: "boolean", default: false },
        out: { type: "string" },
        metric: { type: "string", multiple: true, default: [] },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new LatheError(`Cannot parse the arguments: ${(error as Error).message}`, {
      hint: "deno task runs --help",
    });
  }
  const { values, positionals } = parsed;
  const [command, ...args] = positionals;
  if (values.help || command === undefined || command === "help") {
    print(USAGE);
    return;
  }
  const runs = runsRoot(values.runs);
  const ctx: Context = { runs, db: trackerDbPath(runs), print };
  switch (command) {
    case "ls":
      needArgs(command, args, []);
      return await cmdLs(ctx, values.recipe, values.limit);
    case "show":
      return await cmdShow(ctx, needArgs(command, args, ["id"])[0]);
    case "compare": {
      const [a, b] = needArgs(command, args, ["a", "b"]);
      return await cmdCompare(ctx, a, b);
    }
    case "sql": {
      if (values.json && values.csv) throw new LatheError("Cannot use --json and --csv together: choose one");
      const [query] = needArgs(command, args, ["query"]);
      return await cmdSql(ctx, query, values.json ? "json" : values.csv ? "csv" : "table");
    }
    case "plot":
      return await cmdPlot(ctx, needArgs(command, args, ["id"])[0], values.metric, values.out);
    case "reindex":
      needArgs(command, args, []);
      return await cmdReindex(ctx);
    case "export":
      needArgs(command, args, []);
      return await cmdExport(ctx, values.out);
    case "import":
      return await cmdImport(ctx, needArgs(command, args, ["dir"])[0]);
    default:
      throw new LatheError(
        `Cannot run "runs ${command}": unknown command; known: ls, show, compare, sql, plot, reindex, export, import`,
        { hint: "deno task runs --help" },
      );
  }
}

if (import.meta.main) await runMain(() => runsCli(Deno.args));
