/**
 * Row formats and their normalisation into canonical examples.
 *
 * | format | keys | becomes |
 * | --- | --- | --- |
 * | `messages` | `messages` ({role, content}) or `conversations` (ShareGPT {from, value}) | sft |
 * | `alpaca` | `instruction`, optional `input`, `output` | sft: user = instruction + "\n\n" + input |
 * | `prompt_response` | `prompt` and `response` or `completion` (strings or message lists) | sft |
 * | `text` | `text` | text |
 * | `preference` | `chosen`, `rejected`, optional `prompt` (strings or message lists) | preference |
 *
 * An alpaca `input` that is empty leaves the user message as the instruction alone; the
 * assistant message is `output`. Other keys of a row are ignored. Content is kept exactly
 * as given (no trimming).
 * @module
 */
import type { Example, Kind } from "./example.ts";
import {
  checkTurns,
  fromString,
  type Located,
  plain,
  readMessages,
  sameMessage,
  withSystem,
} from "./messages.ts";
import { describeType, isRecord, requireText, RowError } from "./row_error.ts";

/** A concrete row format (`auto` resolved). */
export type RowFormat = "messages" | "alpaca" | "prompt_response" | "text" | "preference";

/** The kind of example each format produces. */
export function formatKind(format: RowFormat): Kind {
  return format === "preference" ? "preference" : format === "text" ? "text" : "sft";
}

/** Options that apply to every row. */
export interface NormaliseOptions {
  /** Prepended as a system message when a conversation has none. */
  systemPrompt?: string;
}

function has(row: Record<string, unknown>, key: string): boolean {
  return row[key] !== undefined && row[key] !== null;
}

/**
 * Detects a row's format from its keys, most specific first: preference (`chosen` and
 * `rejected`), messages (`messages` or `conversations`), alpaca (`instruction` and `output`),
 * prompt/response (`prompt` and `response` or `completion`), text (`text`). Null when none fits.
 */
export function detectFormat(row: unknown): RowFormat | null {
  if (!isRecord(row)) return null;
  if (has(row, "chosen") && has(row, "rejected")) return "preference";
  if (has(row, "messages") || has(row, "conversations")) return "messages";
  if (has(row, "instruction") && has(row, "output")) return "alpaca";
  if (has(row, "prompt") && (has(row, "response") || has(row, "completion"))) return "prompt_response";
  if (has(row, "text")) return "text";
  return null;
}

/** The error for a row whose format cannot be told from its keys. */
export function undetectable(row: unknown): RowError {
  if (!isRecord(row)) return new RowError("", `expected a JSON object, got ${describeType(row)}`);
  const keys = Object.keys(row).filter((k) => has(row, k)).map((k) => `"${k}"`).join(", ") || "none";
  return new RowError(
    "",
    `cannot tell the row format from its keys (${keys}); expected "messages" or "conversations", ` +
      `"instruction" + "output", "prompt" + "response" (or "completion"), "text", or "chosen" + "rejected"`,
  );
}

/** A prompt or reply that may be a string (one message of `role`) or a message list. */
function stringOrMessages(value: unknown, field: string, role: "user" | "assistant"): Located[] {
  if (typeof value === "string") return [fromString(role, value, field)];
  if (Array.isArray(value)) return readMessages(value, field);
  if (value === undefined || value === null) throw new RowError(field, "is missing");
  throw new RowError(field, `expected a string or a list of messages, got ${describeType(value)}`);
}

function sft(list: Located[], field: string, opts: NormaliseOptions): Example {
  const all = withSystem(list, opts.systemPrompt);
  checkTurns(all, field, "assistant");
  return { kind: "sft", messages: plain(all) };
}

function normaliseMessages(row: Record<string, unknown>, opts: NormaliseOptions): Example {
  const key = has(row, "messages") ? "messages" : has(row, "conversations") ? "conversations" : null;
  if (key === null) {
    throw new RowError("messages", 'is missing (format "messages" reads "messages" or "conversations")');
  }
  return sft(readMessages(row[key], key), key, opts);
}

function normaliseAlpaca(row: Record<string, unknown>, opts: NormaliseOptions): Example {
  const instruction = requireText(row, "instruction");
  const input = row.input ?? "";
  if (typeof input !== "string") throw new RowError("input", `expected a string, got ${describeType(input)}`);
  const output = requireText(row, "output");
  const user = input.trim() === "" ? instruction : `${instruction}\n\n${input}`;
  return sft(
    [fromString("user", user, "instruction"), fromString("assistant", output, "output")],
    "row",
    opts,
  );
}

function normalisePromptResponse(row: Record<string, unknown>, opts: NormaliseOptions): Example {
  const replyKey = has(row, "response") ? "response" : "completion";
  if (!has(row, replyKey)) throw new RowError("response", 'is missing (or give "completion")');
  const prompt = stringOrMessages(row.prompt, "prompt", "user");
  const reply = stringOrMessages(row[replyKey], replyKey, "assistant");
  return sft([...prompt, ...reply], replyKey, opts);
}

function normaliseText(row: Record<string, unknown>): Example {
  return { kind: "text", text: requireText(row, "text") };
}

/** Length of the longest common prefix of two message lists. */
function commonPrefix(a: readonly Located[], b: readonly Located[]): number {
  let k = 0;
  while (k < a.length && k < b.length && sameMessage(a[k].message, b[k].message)) k++;
  return k;
}

/**
 * Preference rows: a string prompt is one user message, a string chosen/rejected is one
 * assistant message. Message lists may repeat the prompt (trl's conversational format) or
 * carry it entirely when `prompt` is absent (trl's implicit prompt): the turns `chosen` and
 * `rejected` share, up to their last common user message, move into the prompt.
 */
function normalisePreference(row: Record<string, unknown>, opts: NormaliseOptions): Example {
  let prompt = has(row, "prompt") ? stringOrMessages(row.prompt, "prompt", "user") : [];
  let chosen = stringOrMessages(row.chosen, "chosen", "assistant");
  let rejected = stringOrMessages(row.rejected, "rejected", "assistant");
  const startsWithPrompt = (list: Located[]) =>
    prompt.length > 0 && list.length > prompt.length && commonPrefix(prompt, list) === prompt.length;
  if (startsWithPrompt(chosen)) chosen = chosen.slice(prompt.length);
  if (startsWithPrompt(rejected)) rejected = rejected.slice(prompt.length);
  let shared = commonPrefix(chosen, rejected);
  while (shared > 0 && chosen[shared - 1].message.role !== "user") shared--;
  if (shared > 0) {
    prompt = [...prompt, ...chosen.slice(0, shared)];
    chosen = chosen.slice(shared);
    rejected = rejected.slice(shared);
  }
  if (prompt.length === 0) {
    throw new RowError(
      "prompt",
      "is missing, and chosen and rejected share no turns that could be the prompt",
    );
  }
  prompt = withSystem(prompt, opts.systemPrompt);
  checkTurns(prompt, "prompt", "user");
  if (chosen.length === 0) throw new RowError("chosen", "has no reply after the prompt");
  if (rejected.length === 0) throw new RowError("rejected", "has no reply after the prompt");
  checkTurns([...prompt, ...chosen], "chosen", "assistant");
  checkTurns([...prompt, ...rejected], "rejected", "assistant");
  if (chosen.length === rejected.length && commonPrefix(chosen, rejected) === chosen.length) {
    throw new RowError("rejected", "is identical to chosen");
  }
  return { kind: "preference", prompt: plain(prompt), chosen: plain(chosen), rejected: plain(rejected) };
}

/** Normalises one row of `format` into a canonical example; throws {@link RowError} if it is bad. */
export function normaliseRow(format: RowFormat, row: unknown, opts: NormaliseOptions = {}): Example {
  if (!isRecord(row)) throw new RowError("", `expected a JSON object, got ${describeType(row)}`);
  switch (format) {
    case "messages":
      return normaliseMessages(row, opts);
    case "alpaca":
      return normaliseAlpaca(row, opts);
    case "prompt_response":
      return normalisePromptResponse(row, opts);
    case "text":
      return normaliseText(row);
    case "preference":
      return normalisePreference(row, opts);
  }
}
