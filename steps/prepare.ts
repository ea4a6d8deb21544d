/**
 * The `prepare` step: reads datasets (local JSONL, JSON, CSV and Parquet files, or Hub
 * dataset repositories), detects and normalises each row's format, validates every row,
 * drops exact duplicates, and splits the rows into `train.jsonl` and `eval.jsonl` in the
 * canonical format (docs/datasets.md), with `stats.json` beside them.
 *
 * ```
 * deno run -A steps/prepare.ts --set "sources=[data/demo/sft.jsonl]"
 * ```
 * @module
 */
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type StepResult } from "./define.ts";
import { LatheError } from "../foundation/errors.ts";
import { PrepareConfig } from "./prepare/config.ts";
import { type Example, exampleId, exampleLine, type Kind } from "./prepare/example.ts";
import { detectFormat, normaliseRow, type RowFormat, undetectable } from "./prepare/formats.ts";
import { LineWriter } from "./prepare/line_writer.ts";
import { readRows } from "./prepare/readers.ts";
import { RowError } from "./prepare/row_error.ts";
import { resolveSources } from "./prepare/sources.ts";
import { isEvalRow, weightCopies } from "./prepare/split.ts";
import { DatasetStats } from "./prepare/stats.ts";

export { PrepareConfig } from "./prepare/config.ts";

/** How many bad rows `stats.json` lists when they are skipped. */
const BAD_ROW_EXAMPLES = 20;

/** Counts for one input file, reported in `stats.json`. */
interface FileCounts {
  file: string;
  format: RowFormat | null;
  rows_in: number;
  rows_out: number;
  bad_rows: number;
  duplicates: number;
  dropped_by_weight: number;
}

/** Prepares the configured sources; see the module doc. */
async function prepare(ctx: StepContext, config: PrepareConfig): Promise<StepResult> {
  const seed = config.split_seed ?? ctx.seed;
  // Hub sources were downloaded (or found in the cache) and hashed before the run; read
  // exactly those files, from the cache, without asking the network again.
  const resolved = await resolveSources(config, ctx.projectRoot, { cacheOnly: true });
  let totalBytes = 0;
  for (const { files } of resolved) {
    for (const file of files) {
      const path = ctx.sources[file.label];
      if (path === undefined) throw new Error(`source "${file.label}" was not resolved before the run`);
      file.path = path;
      totalBytes += (await Deno.stat(path)).size;
    }
  }

  const train = await LineWriter.create(await ctx.out("train.jsonl"));
  const evalRows = await LineWriter.create(await ctx.out("eval.jsonl"));
  const progress = ctx.progress(totalBytes, "bytes");
  const stats = new DatasetStats();
  const seen = new Set<string>();
  const badExamples: { where: string; error: string }[] = [];
  const perSource: { source: string; weight: number; files: FileCounts[] }[] = [];
  let kind: Kind | null = null;
  let kindWhere = "";
  let rowsIn = 0;
  let unique = 0;
  let duplicates = 0;
  let badRows = 0;
  let droppedByWeight = 0;
  let truncated = false;

  try {
    sources: for (const { source, files } of resolved) {
      const label = source.hub !== undefined
        ? `hf://datasets/${source.hub}@${source.revision}`
        : source.path!;
      const entry = { source: label, weight: source.weight, files: [] as FileCounts[] };
      perSource.push(entry);
      const wanted = source.format ?? config.format;
      for (const file of files) {
        const counts: FileCounts = {
          file: file.label,
          format: wanted === "auto" ? null : wanted,
          rows_in: 0,
          rows_out: 0,
          bad_rows: 0,
          duplicates: 0,
          dropped_by_weight: 0,
        };
        entry.files.push(counts);
        const rows = readRows(file.path, file.format, {
          label: file.label,
          onBytes: (n) => progress.tick(n),
        });
        for await (const raw of rows) {
          rowsIn++;
          counts.rows_in++;
          let example: Example;
          // The format of a file with format auto is that of its first valid row.
          const detecting = counts.format === null;
          try {
            if (raw.error) throw raw.error;
            counts.format ??= detectFormat(raw.value);
            if (counts.format === null) throw undetectable(raw.value);
            example = normaliseRow(counts.format, raw.value, { systemPrompt: config.system_prompt });
          } catch (error) {
            if (!(error instanceof RowError)) throw error;
            if (detecting) counts.format = null;
            if (config.on_bad_rows === "error") {
              throw new LatheError(`Cannot prepare "${raw.where}": ${error.describe()}`, {
                hint: "fix the row, or set prepare.on_bad_rows=skip to count and skip bad rows",
              });
            }
            badRows++;
            counts.bad_rows++;
            if (badExamples.length < BAD_ROW_EXAMPLES) {
              badExamples.push({ where: raw.where, error: error.describe() });
            }
            continue;
          }
          if (kind === null) {
            kind = example.kind;
            kindWhere = raw.where;
          } else if (example.kind !== kind) {
            throw new LatheError(
              `Cannot prepare "${raw.where}": it is a ${example.kind} row (format "${counts.format}"), ` +
                `but "${kindWhere}" is a ${kind} row; one dataset holds one kind`,
              { hint: "prepare SFT, preference and text data in separate prepare steps" },
            );
          }
          const id = exampleId(example);
          if (config.dedupe) {
            if (seen.has(id)) {
              duplicates++;
              counts.duplicates++;
              continue;
            }
            seen.add(id);
          }
          unique++;
          const copies = weightCopies(seed, id, source.weight);
          if (copies === 0) {
            droppedByWeight++;
            counts.dropped_by_weight++;
          } else {
            const line = exampleLine(example, id, raw.where);
            const toEval = isEvalRow(seed, id, config.eval_fraction) &&
              (config.eval_max === undefined || evalRows.lines < config.eval_max);
            if (toEval) await evalRows.write(line);
            else for (let c = 0; c < copies; c++) await train.write(line);
            counts.rows_out++;
            stats.add(example);
          }
          if (config.max_rows !== undefined && unique >= config.max_rows) {
            truncated = true;
            break sources;
          }
        }
      }
    }
  } finally {
    await train.close();
    await evalRows.close();
  }

  const rowsOut = train.lines + evalRows.lines;
  progress.done(`${rowsOut} rows`);
  const summary =
    `${rowsIn} read, ${badRows} bad, ${duplicates} duplicates, ${droppedByWeight} dropped by weight`;
  if (kind === null || rowsOut === 0) {
    const first = badExamples[0] ? `; first bad row "${badExamples[0].where}": ${badExamples[0].error}` : "";
    throw new LatheError(`Cannot prepare: no rows left (${summary})${first}`, {
      hint: "check the sources and their format",
    });
  }
  if (train.lines === 0) {
    throw new LatheError(`Cannot prepare: every row went to eval (${evalRows.lines} rows, ${summary})`, {
      hint: "lower eval_fraction or set eval_max, or add rows",
    });
  }
  const counts = {
    kind,
    rows_in: rowsIn,
    rows_out: rowsOut,
    train_rows: train.lines,
    eval_rows: evalRows.lines,
    duplicates,
    bad_rows: badRows,
    dropped_by_weight: droppedByWeight,
  };
  const report = {
    ...counts,
    truncated_at_max_rows: truncated,
    split: { seed, eval_fraction: config.eval_fraction, eval_max: config.eval_max ?? null },
    lengths: stats.lengths(),
    turns_mean: stats.turnsMean(),
    sources: perSource,
    bad_row_examples: badExamples,
  };
  await Deno.writeTextFile(await ctx.out("stats.json"), JSON.stringify(report, null, 2) + "\n");
  return {
    outputs: { train: "train.jsonl", eval: "eval.jsonl", stats: "stats.json" },
    metrics: { ...counts, ...stats.metrics() },
  };
}

/** The `prepare` step: datasets in, canonical `train.jsonl` / `eval.jsonl` / `stats.json` out. */
export const step = defineStep({
  name: "prepare",
  version: "1",
  description: "reads, validates, deduplicates and splits datasets into canonical JSONL",
  config: PrepareConfig,
  inputs: {},
  sources: async (config, projectRoot) => {
    const resolved = await resolveSources(config, projectRoot);
    return Object.fromEntries(resolved.flatMap((s) => s.files.map((f) => [f.label, f.path])));
  },
  run: prepare,
});

if (import.meta.main) await runFromCli(step);
