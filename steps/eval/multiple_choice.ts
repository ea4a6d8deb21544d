/**
 * Multiple-choice log-likelihood benchmarks, scored as lm-evaluation-harness scores its
 * `multiple_choice` tasks (MMLU, HellaSwag, ARC): for each question and choice, the log-probability
 * of the continuation " <choice>" after the context "<question>\nAnswer:" (the whole string
 * tokenized once without special tokens; the continuation's tokens are those after the context's),
 * summed over its tokens;
 *   acc      = [argmax_i ll_i = answer]
 *   acc_norm = [argmax_i ll_i / len(choice_i) = answer]   (len in characters, as the harness)
 * averaged over the questions. Rows are {"question", "choices": [...], "answer": index} ("label" or
 * "gold" may stand for "answer"), from any source the prepare step reads (files of JSONL, JSON,
 * CSV or Parquet, or a Hub dataset; steps/eval.ts).
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { TrainableModel } from "../../kernels/models/trainable.ts";
import type { ShardRow } from "../tokenize/shards.ts";
import { buildBatch } from "../train/batches.ts";

/** One question. */
export interface McItem {
  question: string;
  choices: string[];
  answer: number;
  /** file:line, for messages. */
  where: string;
}

/** A benchmark's scores. */
export interface McScore {
  acc: number;
  acc_norm: number;
  questions: number;
  /** ll_i of every choice of every question (for tests and reports). */
  loglikelihoods: number[][];
}

/** One question from a parsed row; a malformed row is an error naming `where`. */
export function mcItem(value: unknown, where: string): McItem {
  const row = (value !== null && typeof value === "object" ? value : {}) as Record<string, unknown>;
  const answer = row.answer ?? row.label ?? row.gold;
  const choices = row.choices;
  if (typeof row.question !== "string") {
    throw new LatheError(`Cannot read benchmark ${where}: "question" is not a string`);
  }
  if (!Array.isArray(choices) || choices.length < 2 || !choices.every((c) => typeof c === "string")) {
    throw new LatheError(`Cannot read benchmark ${where}: "choices" is not a list of at least two strings`);
  }
  if (!Number.isInteger(answer) || (answer as number) < 0 || (answer as number) >= choices.length) {
    throw new LatheError(
      `Cannot read benchmark ${where}: "answer" ${
        JSON.stringify(answer)
      } is not the index of one of its ${choices.length} choices`,
    );
  }
  return { question: row.question, choices: choices as string[], answer: answer as number, where };
}

/** Reads a JSONL text of questions (at most `max`); a malformed row is an error naming its line. */
export function parseMcFile(text: string, path: string, max?: number): McItem[] {
  const out: McItem[] = [];
  const lines = text.split("\n");
  for (const [i, line] of lines.entries()) {
    if (max !== undefined && out.length >= max) break;
    if (line.trim() === "") continue;
    const where = `${path}:${i + 1}`;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (error) {
      throw new LatheError(`Cannot read benchmark ${where}: ${(error as Error).message}`);
    }
    out.push(mcItem(row, where));
  }
  return out;
}

/** The context of a question, as the harness's MMLU-style prompt. */
export function mcContext(question: string): string {
  return `${question}\nAnswer:`;
}

/**
 * Scores `items` on `model` (no dropout); `encode` tokenizes without special tokens. Choices run
 * `rowsPerBatch` at a time.
 */
export async function scoreMultipleChoice(
  model: TrainableModel,
  encode: (text: string) => number[],
  items: readonly McItem[],
  rowsPerBatch = 8,
  onItem?: () => void,
): Promise<McScore> {
  const rows: { tokens: number[]; from: number; item: number }[] = [];
  for (const [k, item] of items.entries()) {
    const context = mcContext(item.question);
    const ctxIds = encode(context);
    for (const choice of item.choices) {
      const whole = encode(`${context} ${choice}`);
      // The continuation's tokens are those after the context's (a merge across the boundary
      // moves it back to where the two encodings first differ).
      let from = 0;
      while (from < ctxIds.length && from < whole.length && ctxIds[from] === whole[from]) from++;
      if (from === whole.length) {
        throw new LatheError(`Cannot score ${item.where}: choice "${choice}" adds no token`);
      }
      rows.push({ tokens: whole, from: Math.max(1, from), item: k });
    }
  }
  const ll = new Float64Array(rows.length);
  for (let r0 = 0; r0 < rows.length; r0 += rowsPerBatch) {
    const group = rows.slice(r0, r0 + rowsPerBatch);
    const shardRows: ShardRow[] = group.map((r, i) => ({
      index: i,
      tokens: Uint32Array.from(r.tokens),
      mask: Uint8Array.from(r.tokens, (_, t) => (t >= r.from ? 1 : 0)),
      bounds: Uint32Array.from([0, r.tokens.length]),
    }));
    const batch = buildBatch(shardRows, 0);
    const scores = await model.scoreTokens(batch);
    group.forEach((_, i) => {
      let s = 0;
      for (let t = i * batch.seqLen; t < (i + 1) * batch.seqLen; t++) s += scores.logp[t];
      ll[r0 + i] = s;
    });
  }
  let acc = 0;
  let accNorm = 0;
  const loglikelihoods: number[][] = items.map(() => []);
  rows.forEach((r, i) => loglikelihoods[r.item].push(ll[i]));
  items.forEach((item, k) => {
    const lls = loglikelihoods[k];
    const norm = lls.map((x, i) => x / [...item.choices[i]].length);
    if (argmax(lls) === item.answer) acc++;
    if (argmax(norm) === item.answer) accNorm++;
    onItem?.();
  });
  const n = Math.max(1, items.length);
  return { acc: acc / n, acc_norm: accNorm / n, questions: items.length, loglikelihoods };
}

function argmax(x: readonly number[]): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}
