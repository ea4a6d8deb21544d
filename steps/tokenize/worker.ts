/**
 * The tokenize worker (a Deno Web Worker, started by pool.ts): sets up its encoder once, from
 * the tables the main thread prepared (the byte-level fast path: nothing to load or parse) or
 * else by loading the tokenizer itself, then answers each chunk of JSONL lines with its
 * documents (chunk.ts).
 * @module
 */
/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />
import { LatheError } from "../../foundation/errors.ts";
import { ChatRenderer } from "./chat.ts";
import { type Chunk, tokenizeChunk } from "./chunk.ts";
import { type DocOptions, DocumentBuilder } from "./documents.ts";
import { ByteLevelEncoder, type ByteLevelModel, makeEncoder } from "./encoder.ts";
import { loadTokenizer, type TokenizerFacts } from "./tokenizer.ts";

/** First message to a worker. */
export interface WorkerInit {
  type: "init";
  tokenizerDir: string;
  /** chat_template override, or null for the tokenizer's own. */
  chatTemplate: string | null;
  doc: DocOptions;
  /** The fast path's tables and the tokenizer's facts, or null: the worker loads `tokenizerDir`. */
  prepared: { model: ByteLevelModel; facts: TokenizerFacts } | null;
}

/** Messages a worker receives. */
export type WorkerRequest = WorkerInit | ({ type: "job" } & Chunk);

/** Messages a worker sends. */
export type WorkerReply =
  | { type: "ready"; fast: boolean }
  | ({ type: "result" } & import("./chunk.ts").ChunkResult)
  | { type: "error"; id: number | null; message: string; hint?: string; user: boolean; stack?: string };

let builder: DocumentBuilder | null = null;

function reply(message: WorkerReply, transfer: Transferable[] = []): void {
  self.postMessage(message, transfer);
}

function replyError(id: number | null, error: unknown): void {
  if (error instanceof LatheError) {
    reply({ type: "error", id, message: error.message, hint: error.hint, user: true });
  } else {
    const e = error instanceof Error ? error : new Error(String(error));
    reply({ type: "error", id, message: e.message, user: false, stack: e.stack });
  }
}

self.onmessage = async (event: MessageEvent<WorkerRequest>) => {
  const msg = event.data;
  if (msg.type === "init") {
    try {
      if (msg.prepared) {
        const { model, facts } = msg.prepared;
        const chat = new ChatRenderer(facts, msg.chatTemplate);
        builder = new DocumentBuilder(facts, new ByteLevelEncoder(model), chat, msg.doc);
        reply({ type: "ready", fast: true });
      } else {
        const loaded = await loadTokenizer(msg.tokenizerDir);
        const encoder = makeEncoder(loaded);
        builder = new DocumentBuilder(loaded, encoder, new ChatRenderer(loaded, msg.chatTemplate), msg.doc);
        reply({ type: "ready", fast: encoder.fast });
      }
    } catch (error) {
      replyError(null, error);
    }
    return;
  }
  try {
    const result = tokenizeChunk(builder!, msg);
    reply(
      { type: "result", ...result },
      [result.ids.buffer, result.mask.buffer, result.lens.buffer] as ArrayBuffer[],
    );
  } catch (error) {
    replyError(msg.id, error);
  }
};
