/**
 * One prepared row -> tokenized documents with loss masks. A document is what packing places
 * into a row: token ids and a mask where 1 marks a token the loss is computed on (a prediction
 * target). The first token of every document is never a target (nothing in the document
 * precedes it), so its mask is always 0.
 *
 * - sft rows (`messages`): rendered with the chat template, tokenized without adding special
 *   tokens (transformers' `apply_chat_template(messages, tokenize=True)`); `train_on` picks
 *   the masked spans (see chat.ts for the span rule).
 * - text rows: `tokenizer(text)` as transformers does it (BOS/EOS per tokenizer.ts'
 *   `textSpecials`), then EOS appended unless already last; every token is a target.
 * - preference rows: `prompt + chosen` and `prompt + rejected`, each masked on the completion
 *   (assistant turns after the prompt), emitted as a pair.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import { BoundaryError, type Encoder } from "./encoder.ts";
import type { ChatRenderer, Message, Span } from "./chat.ts";
import type { TokenizerFacts } from "./tokenizer.ts";

/** Which tokens of a chat are trained. */
export type TrainOn = "all" | "completions" | "last_turn";
/** What to do with a document longer than `max_seq_len`. */
export type Overlong = "truncate" | "drop";
/** The row formats `prepare` writes. */
export type DataKind = "sft" | "text" | "preference";

/** A tokenized document. */
export interface Doc {
  ids: number[];
  /** 1 = loss target, 0 = context only; same length as `ids`. */
  mask: Uint8Array;
}

/** A tokenized document with its ids in a typed array, as the pipeline carries it. */
export interface TypedDoc {
  ids: Int32Array;
  /** 1 = loss target, 0 = context only; same length as `ids`. */
  mask: Uint8Array;
}

/** What one row became. */
export interface RowResult<D = Doc> {
  /** 0 docs (dropped), 1 doc (sft, text) or 2 docs (preference: chosen, rejected). */
  docs: D[];
  /** The row (either side of a pair) was longer than max_seq_len. */
  overlong: boolean;
  /** The row was dropped because no token of it is trained (after truncation). */
  empty: boolean;
  /** Tokens the row produced before truncation or dropping. */
  tokenized: number;
}

/** Options that shape documents. */
export interface DocOptions {
  kind: DataKind;
  trainOn: TrainOn;
  maxSeqLen: number;
  overlong: Overlong;
}

function fail(where: string, problem: string, hint?: string): LatheError {
  return new LatheError(`Cannot tokenize ${where}: ${problem}`, {
    hint: hint ?? "rerun the prepare step, or fix the source row it names",
  });
}

/** A message list; a plain string is one message of `role` (a preference prompt or completion). */
function messagesOf(value: unknown, field: string, where: string, role = "assistant"): Message[] {
  if (typeof value === "string") return [{ role, content: value }];
  if (!Array.isArray(value)) throw fail(where, `field "${field}" is not a list of messages`);
  value.forEach((m, i) => {
    if (!m || typeof m !== "object" || typeof m.role !== "string" || typeof m.content !== "string") {
      throw fail(where, `${field}[${i}] is not a message {"role": string, "content": string}`);
    }
  });
  return value as Message[];
}

/**
 * A preference pair's sides must be a real choice: each answers with some text, the two answers
 * differ, and the turns that are not the assistant's (a prompt carried inside the sides) agree.
 */
function checkPair(chosen: Message[], rejected: Message[], where: string): void {
  for (const [name, side] of [["chosen", chosen], ["rejected", rejected]] as const) {
    const answer = side.filter((m) => m.role === "assistant");
    if (answer.length === 0 || answer.every((m) => m.content.trim() === "")) {
      throw fail(
        where,
        `"${name}" is empty (no assistant text to train on)`,
        "drop the row or fill in the answer",
      );
    }
  }
  if (JSON.stringify(chosen) === JSON.stringify(rejected)) {
    throw fail(
      where,
      '"chosen" and "rejected" are identical, so the pair prefers nothing',
      "drop the row or fix the rejected answer",
    );
  }
  const others = (side: Message[]) => JSON.stringify(side.filter((m) => m.role !== "assistant"));
  if (others(chosen) !== others(rejected)) {
    throw fail(
      where,
      'the prompts differ between "chosen" and "rejected" (their turns other than the assistant\'s are not the same)',
      'give both sides the same prompt: put it in "prompt" and only the answers in "chosen" and "rejected"',
    );
  }
}

/**
 * Whether two documents hold the same tokens before their first trained token. The last token of
 * the shorter prefix is left out: BPE may merge it with the start of the answer differently on
 * each side.
 */
function samePrompt(a: TypedDoc, b: TypedDoc): boolean {
  const start = (d: TypedDoc) => {
    const i = d.mask.indexOf(1);
    return i === -1 ? d.ids.length : i;
  };
  const n = Math.min(start(a), start(b)) - 1;
  for (let i = 0; i < n; i++) if (a.ids[i] !== b.ids[i]) return false;
  return true;
}

function plain(doc: TypedDoc): Doc {
  return { ids: Array.from(doc.ids), mask: doc.mask };
}

/** Turns prepared rows into documents; one instance per worker. */
export class DocumentBuilder {
  #loaded: TokenizerFacts;
  #encoder: Encoder;
  #chat: ChatRenderer;
  #opts: DocOptions;
  /** Reused per-cut results of the encoder. */
  #cutTokens: number[] = [];
  #cutInside: boolean[] = [];

  constructor(loaded: TokenizerFacts, encoder: Encoder, chat: ChatRenderer, opts: DocOptions) {
    this.#loaded = loaded;
    this.#encoder = encoder;
    this.#chat = chat;
    this.#opts = opts;
  }

  /** Tokenizes one parsed row; `where` names it in errors (file:line and source). */
  row(row: Record<string, unknown>, where: string): RowResult {
    const r = this.typedRow(row, where);
    return { ...r, docs: r.docs.map(plain) };
  }

  /** {@link DocumentBuilder.row} with typed-array ids (what the workers send on). */
  typedRow(row: Record<string, unknown>, where: string): RowResult<TypedDoc> {
    switch (this.#opts.kind) {
      case "sft":
        return this.#finish([this.#sft(messagesOf(row.messages, "messages", where), where)]);
      case "text": {
        if (typeof row.text !== "string") throw fail(where, `field "text" is not a string`);
        return this.#finish([this.#text(row.text)]);
      }
      case "preference": {
        const prompt = messagesOf(row.prompt, "prompt", where, "user");
        const sides = [messagesOf(row.chosen, "chosen", where), messagesOf(row.rejected, "rejected", where)];
        checkPair(sides[0], sides[1], where);
        const [chosen, rejected] = sides.map((side) => this.#completion(prompt, side, where));
        if (!samePrompt(chosen, rejected)) {
          throw fail(
            where,
            "the prompt renders differently on the chosen and rejected sides (their tokens before the first " +
              "trained token differ)",
            'give both sides the same prompt: put it in "prompt" and only the answers in "chosen" and "rejected"',
          );
        }
        return this.#finish([chosen, rejected]);
      }
    }
  }

  /** A chat document with `train_on` masks. */
  sft(messages: Message[], where: string): Doc {
    return plain(this.#sft(messages, where));
  }

  #sft(messages: Message[], where: string): TypedDoc {
    const assistants: number[] = [];
    messages.forEach((m, i) => {
      if (m.role === "assistant") assistants.push(i);
    });
    const mode = this.#opts.trainOn;
    const which = mode === "all" ? [] : mode === "last_turn" ? assistants.slice(-1) : assistants;
    const doc = this.#chatDoc(messages, which, where);
    if (mode === "all") doc.mask.fill(1);
    doc.mask[0] = 0;
    return doc;
  }

  /** A plain-text document: BOS/EOS as the tokenizer adds them, then EOS if not already last. */
  text(text: string): Doc {
    return plain(this.#text(text));
  }

  #text(text: string): TypedDoc {
    const l = this.#loaded;
    const body = this.#encoder.encodeView(text, [], this.#cutTokens, this.#cutInside);
    const n = l.textPrefix.length + body.length + l.textSuffix.length;
    let ids = new Int32Array(n + 1);
    ids.set(l.textPrefix);
    ids.set(body, l.textPrefix.length);
    ids.set(l.textSuffix, l.textPrefix.length + body.length);
    if (l.eosId !== null && (n === 0 || ids[n - 1] !== l.eosId)) ids[n] = l.eosId;
    else ids = ids.subarray(0, n);
    const mask = new Uint8Array(ids.length).fill(1);
    mask[0] = 0;
    return { ids, mask };
  }

  #completion(prompt: Message[], completion: Message[], where: string): TypedDoc {
    const messages = [...prompt, ...completion];
    const which: number[] = [];
    for (let i = prompt.length; i < messages.length; i++) if (messages[i].role === "assistant") which.push(i);
    const doc = this.#chatDoc(messages, which, where);
    doc.mask[0] = 0;
    return doc;
  }

  #chatDoc(messages: Message[], which: number[], where: string): TypedDoc {
    let text: string;
    let spans: Span[];
    try {
      ({ text, spans } = this.#chat.spans(messages, which));
    } catch (error) {
      throw fail(
        where,
        `the chat template failed: ${(error as Error).message}`,
        "check that the conversation fits the model's chat template (role order, roles it knows), " +
          "or set tokenize.chat_template",
      );
    }
    const cuts = spans.flat();
    const cutTokens = this.#cutTokens, cutInside = this.#cutInside;
    let ids: Int32Array;
    try {
      // A copy: the encoder's view is overwritten by its next call.
      ids = this.#encoder.encodeView(text, cuts, cutTokens, cutInside).slice();
    } catch (error) {
      if (error instanceof BoundaryError) {
        throw fail(where, `cannot compute the loss mask: ${error.message}`, "set tokenize.chat_template");
      }
      throw error;
    }
    // A token is a target when any of its characters lies in a span, as in transformers'
    // assistant_masks: a token merged across a turn's start (e.g. "\n\n" of the header's "\n"
    // and the answer's leading "\n") is a target, so no character of the answer is left untrained.
    const mask = new Uint8Array(ids.length);
    for (let j = 0; j < spans.length; j++) {
      const from = cutTokens[2 * j] - (cutInside[2 * j] ? 1 : 0);
      mask.fill(1, from, cutTokens[2 * j + 1]);
    }
    return { ids, mask };
  }

  /** Applies max_seq_len and drops documents without a trained token. */
  #finish(docs: TypedDoc[]): RowResult<TypedDoc> {
    const max = this.#opts.maxSeqLen;
    const tokenized = docs.reduce((n, d) => n + d.ids.length, 0);
    const overlong = docs.some((d) => d.ids.length > max);
    if (overlong) {
      if (this.#opts.overlong === "drop") return { docs: [], overlong, empty: false, tokenized };
      docs = docs.map((d) => ({ ids: d.ids.slice(0, max), mask: d.mask.slice(0, max) }));
    }
    if (docs.some((d) => !d.mask.includes(1))) return { docs: [], overlong, empty: true, tokenized };
    return { docs, overlong, empty: false, tokenized };
  }
}
