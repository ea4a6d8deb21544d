/**
 * The canonical examples `prepare` writes, one JSON object per line, keys in a fixed order:
 *
 * ```
 * sft:        {"id", "messages": [{"role", "content"}, ...], "source"}
 * preference: {"id", "prompt": [messages], "chosen": [messages], "rejected": [messages], "source"}
 * text:       {"id", "text", "source"}
 * ```
 *
 * `id` is the first 16 hex digits of sha256 over the canonical JSON of the content (the
 * example without `id` and `source`), so equal content has equal ids wherever it came from.
 * @module
 */
import { canonicalJson, sha256Hex } from "../../foundation/hash.ts";
import type { Message } from "./messages.ts";

/** What a dataset trains: chat SFT, preference pairs (DPO), or raw text. */
export type Kind = "sft" | "preference" | "text";

/** One normalised example, before it gets its id and source. */
export type Example =
  | { kind: "sft"; messages: Message[] }
  | { kind: "preference"; prompt: Message[]; chosen: Message[]; rejected: Message[] }
  | { kind: "text"; text: string };

/** The content that identifies an example (hashed for its id). */
function content(example: Example): Record<string, unknown> {
  switch (example.kind) {
    case "sft":
      return { messages: example.messages };
    case "preference":
      return { prompt: example.prompt, chosen: example.chosen, rejected: example.rejected };
    case "text":
      return { text: example.text };
  }
}

/** The example's id: sha256 of its canonical content JSON, first 16 hex digits. */
export function exampleId(example: Example): string {
  return sha256Hex(canonicalJson(content(example))).slice(0, 16);
}

/** One canonical JSONL line (without the newline), keys in the documented order. */
export function exampleLine(example: Example, id: string, source: string): string {
  switch (example.kind) {
    case "sft":
      return JSON.stringify({ id, messages: example.messages, source });
    case "preference":
      return JSON.stringify({
        id,
        prompt: example.prompt,
        chosen: example.chosen,
        rejected: example.rejected,
        source,
      });
    case "text":
      return JSON.stringify({ id, text: example.text, source });
  }
}
