import assert from "node:assert/strict";
import {
  BoundaryError,
  ByteLevelEncoder,
  fastPathUnsupported,
  LibraryEncoder,
  makeEncoder,
} from "../../../steps/tokenize/encoder.ts";
import { ChatRenderer } from "../../../steps/tokenize/chat.ts";
import { DEMO_TOKENIZER, lenmlDir, ROOT, syntheticChats, tokenizer } from "./_fixtures.ts";

/** Texts that exercise the pre-tokenizer's corners. */
const TRICKY = [
  "",
  "a",
  "    ",
  "\n\n\n   \n",
  "Hello world! How are you?\n\nI'm fine, thanks. 12345 1234567 3.14159",
  "  leading spaces\t\ttabs\r\n\r\nCRLF   trailing   ",
  "DON'T you'LL we'VE they'd I'm",
  "Unicode: café naïve — “quotes” 日本語のテキスト 🎉🎉 emoji 👩‍👩‍👧 e\u0301 decomposed Å",
  "x\u00a0y\u2003z\u3000w",
  "lone \ud800 surrogate",
  '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{"a": [1, 2]}<|im_end|>',
  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n  x<|eot_id|>",
  "tight<|im_end|><|im_end|>text<|endoftext|>",
  '{"name":"Vera","item":"lamp","quantity":1,"color":"green","city":"Delhi"}',
];

async function corpus(): Promise<string[]> {
  const demo = (await Deno.readTextFile(`${ROOT}/data/demo/sft.jsonl`)).split("\n").slice(0, 200);
  const readme = await Deno.readTextFile(`${ROOT}/node_modules/@huggingface/tokenizers/README.md`);
  return [...TRICKY, ...demo, readme];
}

for (const name of ["llama3", "qwen3", "demo"] as const) {
  Deno.test(`byte-level fast path gives the library's ids (${name})`, async () => {
    const loaded = await tokenizer(name === "demo" ? DEMO_TOKENIZER : lenmlDir(name));
    assert.equal(fastPathUnsupported(loaded), null);
    const fast = new ByteLevelEncoder(loaded);
    const texts = await corpus();
    const renderer = new ChatRenderer(loaded);
    for (const row of syntheticChats(50)) texts.push(renderer.render(row.messages, false));
    for (const text of texts) {
      const expected = loaded.tokenizer.encode(text, { add_special_tokens: false }).ids;
      assert.deepEqual(fast.encode(text).ids, expected, JSON.stringify(text.slice(0, 60)));
      assert.deepEqual(fast.encode(text).ids, expected, "second call (memoized words)");
    }
  });
}

Deno.test("Gemma 3 (byte-fallback SentencePiece BPE) uses the library encoder", async () => {
  const loaded = await tokenizer(lenmlDir("gemma3"));
  assert.equal(fastPathUnsupported(loaded), "byte_fallback BPE");
  const enc = makeEncoder(loaded);
  assert.ok(enc instanceof LibraryEncoder);
  const text = "<start_of_turn>model\nHi there<end_of_turn>\n";
  const { ids, cutTokens } = enc.encode(text, [0, 21, 29, text.length]);
  assert.deepEqual(ids, loaded.tokenizer.encode(text, { add_special_tokens: false }).ids);
  assert.deepEqual(cutTokens, [0, 3, ids.length - 2, ids.length]);
});

Deno.test("cuts map character positions to token counts", async () => {
  const loaded = await tokenizer(lenmlDir("qwen3"));
  const enc = new ByteLevelEncoder(loaded);
  const text = "<|im_start|>assistant\nHello world<|im_end|>\n";
  // tokens: <|im_start|> assistant \n Hello " world" <|im_end|> \n
  const start = text.indexOf("Hello");
  const end = text.length;
  const inside = text.indexOf("world") + 2; // inside the token " world"
  const { ids, cutTokens } = enc.encode(text, [0, start, inside, end]);
  assert.equal(ids.length, 7);
  assert.deepEqual(cutTokens, [0, 3, 5, 7]);
  assert.deepEqual(enc.encode(text, [1]).cutTokens, [1], "a cut inside a special token counts it");
});

Deno.test("a cut through a token the library merges is located by UTF-8 bytes", async () => {
  const loaded = await tokenizer(lenmlDir("llama3"));
  const enc = new ByteLevelEncoder(loaded);
  // "\n\n\n" is one token (1432) between "a" (64) and "b" (65); a cut after its first newline
  // falls inside it, and a token belongs to the side its first character is on.
  const text = "a\n\n\nb";
  const { ids, cutTokens } = enc.encode(text, [2, 3, 4]);
  assert.deepEqual(ids, [64, 1432, 65]);
  assert.deepEqual(ids, loaded.tokenizer.encode(text, { add_special_tokens: false }).ids);
  assert.deepEqual(cutTokens, [2, 2, 2]);
});

Deno.test("the library encoder rejects a cut that splits a merged token", async () => {
  const loaded = await tokenizer(lenmlDir("gemma3"));
  const enc = new LibraryEncoder(loaded);
  const text = "Hello";
  assert.throws(() => enc.encode(text, [2]), BoundaryError);
});
