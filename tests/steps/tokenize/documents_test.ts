import assert from "node:assert/strict";
import { ChatRenderer } from "../../../steps/tokenize/chat.ts";
import { type DocOptions, DocumentBuilder } from "../../../steps/tokenize/documents.ts";
import { makeEncoder } from "../../../steps/tokenize/encoder.ts";
import type { LoadedTokenizer } from "../../../steps/tokenize/tokenizer.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { CHAT, DEMO_TOKENIZER, lenmlDir, tokenizer } from "./_fixtures.ts";

function builder(loaded: LoadedTokenizer, opts: Partial<DocOptions> = {}): DocumentBuilder {
  return new DocumentBuilder(loaded, makeEncoder(loaded), new ChatRenderer(loaded), {
    kind: "sft",
    trainOn: "completions",
    maxSeqLen: 4096,
    overlong: "drop",
    ...opts,
  });
}

const plain = (l: LoadedTokenizer, s: string) => l.tokenizer.encode(s, { add_special_tokens: false }).ids;

Deno.test("text rows get BOS as transformers adds it, and EOS appended", async () => {
  // Gemma: GemmaTokenizer with add_bos_token -> <bos> first; EOS (<end_of_turn>, 106) appended.
  const gemma = await tokenizer(lenmlDir("gemma3"));
  const g = builder(gemma, { kind: "text" }).text("Hello");
  assert.deepEqual(g.ids, [2, ...plain(gemma, "Hello"), 106]);
  // Llama 3 (this tokenizer.json's post-processor adds nothing): no BOS; EOS <|end_of_text|>.
  const llama = await tokenizer(lenmlDir("llama3"));
  assert.deepEqual(builder(llama, { kind: "text" }).text("Hello").ids, [9906, 128001]);
  // The demo tokenizer: bos_token null; EOS <|im_end|> (511), not doubled when already last.
  const demo = await tokenizer(DEMO_TOKENIZER);
  const d = builder(demo, { kind: "text" }).text("Hi<|im_end|>");
  assert.deepEqual(d.ids, [...plain(demo, "Hi"), 511]);
  assert.equal(d.mask[0], 0, "the first token is never a target");
  assert.ok(d.mask.slice(1).every((m) => m === 1));
});

Deno.test("overlong rows are dropped or truncated, and counted", async () => {
  const demo = await tokenizer(DEMO_TOKENIZER);
  const row = { messages: CHAT };
  const full = builder(demo).row(row, "x").docs[0];
  const dropped = builder(demo, { maxSeqLen: 10 }).row(row, "x");
  assert.deepEqual(dropped, { docs: [], overlong: true, empty: false, tokenized: full.ids.length });
  const cut = builder(demo, { maxSeqLen: full.ids.length - 2, overlong: "truncate" }).row(row, "x");
  assert.equal(cut.overlong, true);
  assert.deepEqual(cut.docs[0].ids, full.ids.slice(0, full.ids.length - 2));
  assert.deepEqual([...cut.docs[0].mask], [...full.mask.slice(0, full.ids.length - 2)]);
});

Deno.test("a row with no trained token is dropped as empty", async () => {
  const demo = await tokenizer(DEMO_TOKENIZER);
  const noAssistant = builder(demo).row({ messages: CHAT.slice(0, 2) }, "x");
  assert.deepEqual([noAssistant.docs.length, noAssistant.empty], [0, true]);
  // Truncated before the assistant turn starts.
  const early = builder(demo, { maxSeqLen: 8, overlong: "truncate" }).row({ messages: CHAT }, "x");
  assert.deepEqual([early.docs.length, early.overlong, early.empty], [0, true, true]);
});

Deno.test("preference rows become a chosen/rejected pair masked on the completion", async () => {
  const demo = await tokenizer(DEMO_TOKENIZER);
  const b = builder(demo, { kind: "preference", trainOn: "all" });
  const r = b.row({ prompt: "Ship 2 mugs", chosen: '{"n":2}', rejected: '{"n":3}' }, "x");
  assert.equal(r.docs.length, 2);
  const [chosen, rejected] = r.docs;
  const text = (ids: number[]) => demo.tokenizer.decode(ids);
  assert.equal(
    text(chosen.ids),
    '<|im_start|>user\nShip 2 mugs<|im_end|>\n<|im_start|>assistant\n{"n":2}<|im_end|>\n',
  );
  assert.equal(text(chosen.ids.filter((_, i) => chosen.mask[i])), '{"n":2}<|im_end|>\n');
  assert.equal(text(rejected.ids.filter((_, i) => rejected.mask[i])), '{"n":3}<|im_end|>\n');
  // Message lists work the same.
  const m = b.row({
    prompt: [{ role: "user", content: "Ship 2 mugs" }],
    chosen: [{ role: "assistant", content: '{"n":2}' }],
    rejected: [{ role: "assistant", content: '{"n":3}' }],
  }, "x");
  assert.deepEqual(m.docs[0].ids, chosen.ids);
});

Deno.test("preference rows that prefer nothing are errors naming the row", async () => {
  const demo = await tokenizer(DEMO_TOKENIZER);
  const b = builder(demo, { kind: "preference" });
  const a = (content: string) => ({ role: "assistant", content });
  const u = (content: string) => ({ role: "user", content });
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ prompt: "Ship", chosen: '{"n":2}', rejected: '{"n":2}' }, /"chosen" and "rejected" are identical/],
    [{ prompt: "Ship", chosen: "  ", rejected: '{"n":2}' }, /"chosen" is empty/],
    [{ prompt: "Ship", chosen: '{"n":2}', rejected: [] }, /"rejected" is empty/],
    [
      { prompt: "Ship", chosen: [a("x"), u("one"), a("y")], rejected: [a("x"), u("two"), a("z")] },
      /the prompts differ between "chosen" and "rejected"/,
    ],
  ];
  for (const [row, pattern] of cases) {
    assert.throws(() => b.row(row, "pairs.jsonl:7"), (e) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /^Cannot tokenize pairs\.jsonl:7: /);
      assert.match(e.message, pattern);
      return true;
    });
  }
});

Deno.test("malformed rows are errors naming the row", async () => {
  const demo = await tokenizer(DEMO_TOKENIZER);
  assert.throws(
    () => builder(demo).row({ messages: [{ role: "user" }] }, "train.jsonl:3 (source a.jsonl:9)"),
    (e: unknown) =>
      e instanceof LatheError && e.message.startsWith("Cannot tokenize train.jsonl:3 (source a.jsonl:9)") &&
      e.message.includes("messages[0]"),
  );
  assert.throws(
    () => builder(demo, { kind: "text" }).row({ text: 3 }, "t:1"),
    /field "text" is not a string/,
  );
});
