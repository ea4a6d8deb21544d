/**
 * The `tokenize` step: prepared JSONL rows -> token shards for training.
 *
 * Chats are rendered with the model's own chat template and tokenized as transformers'
 * `apply_chat_template(messages, tokenize=True)` does; loss masks cover the assistant turns
 * chosen by `train_on`; documents are packed into rows of `max_seq_len` tokens and written as
 * binary shards with an index (docs/shards.md). Tokenization runs on all cores; the output is
 * byte-for-byte the same for any number of workers. `add_special_tokens` adds special tokens to
 * the tokenizer as transformers does; the step then writes the run's tokenizer (`tokenizer/`) and
 * the new ids (`new_tokens.json`) beside the shards.
 *
 * ```
 * deno task step tokenize --run <id> --set tokenizer=data/demo/tokenizer
 * ```
 * @module
 */
import { basename, dirname, join } from "node:path";
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
import { addSpecialTokens, specialTokenListProblem } from "./tokenize/special_tokens.ts";
import {
  loadTokenizer,
  readTokenizerFiles,
  tokenizerDir,
  tokenizerSources,
  writeTokenizerFiles,
} from "./tokenize/tokenizer.ts";

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
  /**
   * New special tokens (default none), as transformers'
   * `tokenizer.add_special_tokens({"additional_special_tokens": [...]})`: each string the
   * tokenizer lacks gets the next id after its largest, in the order given; one it has is marked
   * special and keeps its id. The step then writes the modified tokenizer to `tokenizer/` and the
   * new ids to `new_tokens.json` (training grows the embeddings to `vocab_size`), and encodes each
   * of them in the data as one token.
   */
  add_special_tokens: z.array(z.string()).default([]).superRefine((tokens, ctx) => {
    const problem = specialTokenListProblem(tokens);
    if (problem) ctx.addIssue({ code: "custom", message: problem.message, path: [problem.index] });
  }),
});
export type TokenizeConfig = z.infer<typeof TokenizeConfig>;

/** The splits `prepare` writes, by output name. */
const SPLITS = ["train", "eval"] as const;
/** Where the tokenizer with `add_special_tokens` goes, and the record of the ids it added. */
const TOKENIZER_OUT = "tokenizer";
const NEW_TOKENS_FILE = "new_tokens.json";

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

/**
 * The directory of the tokenizer the step encodes with, and its files by source name: the
 * configured directory, or with `add_special_tokens` the modified copy the step writes to
 * `tokenizer/` (outputs named by their paths) with `new_tokens.json`. The step loads the
 * tokenizer from that directory, so the ids in the shards are those of the files it wrote.
 */
async function stepTokenizer(ctx: StepContext, config: TokenizeConfig) {
  const source = dirname(ctx.sources.tokenizer_json);
  if (config.add_special_tokens.length === 0) {
    return { dir: source, paths: ctx.sources, outputs: {}, added: null };
  }
  const added = addSpecialTokens(await readTokenizerFiles(source), config.add_special_tokens);
  const dir = dirname(await ctx.out(join(TOKENIZER_OUT, "tokenizer.json")));
  const paths = await writeTokenizerFiles(dir, added.files);
  const outputs: Record<string, string> = {};
  for (const path of Object.values(paths)) {
    const rel = join(TOKENIZER_OUT, basename(path));
    outputs[rel] = rel;
  }
  await Deno.writeTextFile(
    await ctx.out(NEW_TOKENS_FILE),
    JSON.stringify(
      {
        vocab_size: added.vocabSize,
        base_vocab_size: added.baseVocabSize,
        new_tokens: added.newTokens,
        present_tokens: added.presentTokens,
      },
      null,
      2,
    ) + "\n",
  );
  outputs.new_tokens = NEW_TOKENS_FILE;
  return { dir, paths, outputs, added };
}

async function run(ctx: StepContext, config: TokenizeConfig, inputs: Record<string, Upstream>) {
  const data = inputs.data;
  const kind = kindOf(data);
  const tok = await stepTokenizer(ctx, config);
  const dir = tok.dir;
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
    tokenizer_sha256: await tokenizerHash(tok.paths, template),
  };

  const splits = SPLITS.filter((s) => s in data.manifest.outputs);
  let totalBytes = 0;
  for (const s of splits) totalBytes += (await Deno.stat(data.path(s))).size;
  const workers = config.workers || navigator.hardwareConcurrency || 1;
  const pool = await WorkerPool.start(workers, {
    tokenizerDir: dir,
    loaded,
    chatTemplate: config.chat_template,
    doc: { kind, trainOn: config.train_on, maxSeqLen: config.max_seq_len, overlong: config.overlong },
  });
  const progress = ctx.progress(totalBytes, "bytes");
  const started = performance.now();
  let tokens = 0;
  const outputs: Record<string, string> = { ...tok.outputs };
  const metrics: Record<string, number | string | boolean> = {
    kind,
    workers,
    fast_path: pool.fast,
    vocab_size: loaded.vocabSize,
    new_token_count: tok.added?.newTokens.length ?? 0,
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
  version: "3",
  description: "renders chats with the model's template, tokenizes, masks, packs and writes token shards",
  config: TokenizeConfig,
  inputs: { data: "prepare" },
  sources: async (config, projectRoot) =>
    tokenizerSources(await tokenizerDir(config.tokenizer, projectRoot, config.revision)),
  run,
});

if (import.meta.main) await runFromCli(step);
