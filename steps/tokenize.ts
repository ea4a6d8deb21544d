/**
 * The `tokenize` step: prepared JSONL rows -> token shards for training.
 *
 * Chats are rendered with the model's own chat template and tokenized as transformers'
 * `apply_chat_template(messages, tokenize=True)` does; loss masks cover the assistant turns
 * chosen by `train_on`; documents are packed into rows of `max_seq_len` tokens and written as
 * binary shards with an index (docs/shards.md). Tokenization runs on all cores; the output is
 * byte-for-byte the same for any number of workers.
 *
 * ```
 * deno task step tokenize --run <id> --set tokenizer=data/demo/tokenizer
 * ```
 * @module
 */
import { dirname, join } from "node:path";
import * as z from "zod";
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type Upstream } from "./define.ts";
import { LatheError } from "../foundation/errors.ts";
import { canonicalJson, sha256File, sha256Hex } from "../foundation/hash.ts";
import { humanCount } from "../foundation/progress.ts";
import { ChatRenderer } from "./tokenize/chat.ts";
import type { DataKind } from "./tokenize/documents.ts";
import { percentile, type SplitStats, tokenizeSplit } from "./tokenize/pipeline.ts";
import { WorkerPool } from "./tokenize/pool.ts";
import { loadTokenizer, tokenizerDir, tokenizerSources } from "./tokenize/tokenizer.ts";

/** The step's config; every default is written into the manifest. */
export const TokenizeConfig = z.strictObject({
  /**
   * A model directory holding `tokenizer.json` and `tokenizer_config.json` (and optionally
   * `chat_template.jinja`), relative to the project root or absolute; or a Hub repo id, resolved
   * through the Hugging Face cache or the Hub. Its files are part of the step's key.
   */
  tokenizer: z.string().min(1),
  /** Hub revision (branch, tag or commit) when `tokenizer` is a repo id (default "main"). */
  revision: z.string().min(1).default("main"),
  /** Length of a packed row, and the longest document kept (default 2048). */
  max_seq_len: z.number().int().min(2).default(2048),
  /**
   * Which chat tokens are trained (default "completions"): "all" every token, "completions"
   * every assistant turn, "last_turn" only the final assistant turn. Text rows train on every
   * token; preference rows always on their completion.
   */
  train_on: z.enum(["all", "completions", "last_turn"]).default("completions"),
  /** A document longer than max_seq_len is dropped (default) or truncated to its first max_seq_len tokens; counted either way. */
  overlong: z.enum(["truncate", "drop"]).default("drop"),
  /**
   * Pack several documents into each row of exactly max_seq_len tokens (default true), or
   * store one document per row (variable length). Preference pairs are never packed.
   */
  packing: z.boolean().default(true),
  /** A Jinja chat template used instead of the tokenizer's own (default: the tokenizer's, else ChatML). */
  chat_template: z.string().min(1).nullable().default(null),
  /** Worker threads; 0 (default) = one per core (navigator.hardwareConcurrency). Never changes the output. */
  workers: z.number().int().min(0).default(0),
  /** Token slots per shard file before a new shard starts (default 2^26); rows never straddle shards. */
  shard_tokens: z.number().int().positive().default(1 << 26),
});
export type TokenizeConfig = z.infer<typeof TokenizeConfig>;

/** The splits `prepare` writes, by output name. */
const SPLITS = ["train", "eval"] as const;

function kindOf(data: Upstream): DataKind {
  const kind = data.manifest.metrics.kind;
  if (kind === "sft" || kind === "text" || kind === "preference") return kind;
  throw new LatheError(
    `Cannot tokenize the output of step "${data.manifest.step}": its metrics.kind is ${
      JSON.stringify(kind ?? null)
    }, expected "sft", "text" or "preference"`,
    { hint: `rerun "${data.manifest.step}"` },
  );
}

/** sha256 identifying the tokenizer as used: its files and the chat template in effect. */
async function tokenizerHash(sources: Record<string, string>, template: string): Promise<string> {
  const files: Record<string, string> = {};
  for (const [name, path] of Object.entries(sources)) files[name] = (await sha256File(path)).sha256;
  return sha256Hex(canonicalJson({ files, chat_template: sha256Hex(template) }));
}

/** Metrics of one split, names prefixed for eval. */
function splitMetrics(prefix: string, s: SplitStats): Record<string, number> {
  const i = s.index;
  const d = s.docLengths;
  return {
    [`${prefix}input_rows`]: s.inputRows,
    [`${prefix}rows`]: i.rows,
    [`${prefix}documents`]: i.documents,
    [`${prefix}tokens`]: i.tokens,
    [`${prefix}content_tokens`]: i.content_tokens,
    [`${prefix}trained_tokens`]: i.trained_tokens,
    [`${prefix}masked_fraction`]: i.content_tokens > 0 ? 1 - i.trained_tokens / i.content_tokens : 0,
    [`${prefix}packing_efficiency`]: i.tokens > 0 ? i.content_tokens / i.tokens : 0,
    [`${prefix}doc_len_p50`]: percentile(d, 50),
    [`${prefix}doc_len_p90`]: percentile(d, 90),
    [`${prefix}doc_len_p99`]: percentile(d, 99),
    [`${prefix}doc_len_max`]: d.length > 0 ? d[d.length - 1] : 0,
    [`${prefix}overlong_rows`]: s.overlongRows,
    [`${prefix}empty_rows`]: s.emptyRows,
  };
}

async function run(ctx: StepContext, config: TokenizeConfig, inputs: Record<string, Upstream>) {
  const data = inputs.data;
  const kind = kindOf(data);
  const dir = dirname(ctx.sources.tokenizer_json);
  const loaded = await loadTokenizer(dir);
  const template = new ChatRenderer(loaded, config.chat_template).source;
  const specialIds: Record<string, number> = {};
  for (const [name, value] of Object.entries(loaded.specialTokens)) {
    for (const s of Array.isArray(value) ? value : [value]) {
      const id = loaded.tokenizer.token_to_id(s);
      if (id !== undefined) specialIds[Array.isArray(value) ? s : name] = id;
    }
  }
  const meta = {
    vocab_size: loaded.vocabSize,
    pad_id: loaded.padId,
    bos_id: loaded.bosId,
    eos_id: loaded.eosId,
    special_ids: specialIds,
    tokenizer_sha256: await tokenizerHash(ctx.sources, template),
  };

  const splits = SPLITS.filter((s) => s in data.manifest.outputs);
  let totalBytes = 0;
  for (const s of splits) totalBytes += (await Deno.stat(data.path(s))).size;
  const workers = config.workers || navigator.hardwareConcurrency || 1;
  const pool = await WorkerPool.start(workers, {
    tokenizerDir: dir,
    chatTemplate: config.chat_template,
    doc: { kind, trainOn: config.train_on, maxSeqLen: config.max_seq_len, overlong: config.overlong },
  });
  const progress = ctx.progress(totalBytes, "bytes");
  const started = performance.now();
  let tokens = 0;
  const outputs: Record<string, string> = {};
  const metrics: Record<string, number | string | boolean> = {
    kind,
    workers,
    fast_path: pool.fast,
  };
  try {
    for (const split of splits) {
      const indexPath = await ctx.out(join(split, "index.json"));
      const stats = await tokenizeSplit(pool, data.path(split), dirname(indexPath), {
        split,
        kind,
        maxSeqLen: config.max_seq_len,
        packing: config.packing,
        shardTokens: config.shard_tokens,
        meta,
      }, (bytes, made) => {
        tokens += made;
        const rate = tokens / Math.max(1e-3, (performance.now() - started) / 1000);
        progress.tick(bytes, `${humanCount(rate)} tok/s`);
      });
      outputs[split] = join(split, "index.json");
      for (const shard of stats.index.shards) {
        for (const file of [shard.tokens, shard.mask, shard.docs]) {
          outputs[`${split}/${file}`] = join(split, file);
        }
      }
      Object.assign(metrics, splitMetrics(split === "train" ? "" : `${split}_`, stats));
    }
  } finally {
    pool.close();
  }
  const seconds = (performance.now() - started) / 1000;
  metrics.tokens_per_s = Math.round(tokens / Math.max(1e-3, seconds));
  progress.done(`${humanCount(tokens)} tokens`);
  return { outputs, metrics };
}

/** The tokenize step. */
export const step = defineStep({
  name: "tokenize",
  version: "2",
  description: "renders chats with the model's template, tokenizes, masks, packs and writes token shards",
  config: TokenizeConfig,
  inputs: { data: "prepare" },
  sources: async (config, projectRoot) =>
    tokenizerSources(await tokenizerDir(config.tokenizer, projectRoot, config.revision)),
  run,
});

if (import.meta.main) await runFromCli(step);
