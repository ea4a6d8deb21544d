import assert from "node:assert/strict";
import { mulberry32 } from "../../../foundation/random.ts";
import {
  BoundaryError,
  ByteLevelEncoder,
  byteLevelModelOf,
  fastPathUnsupported,
  LibraryEncoder,
  makeEncoder,
} from "../../../steps/tokenize/encoder.ts";
import { ChatRenderer } from "../../../steps/tokenize/chat.ts";
import { scannerFor } from "../../../steps/tokenize/pretokenize.ts";
import { buildTokenizer } from "../../../steps/tokenize/tokenizer.ts";
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

/** The demo tokenizer with its pre-tokenizer replaced by a Split on `regex` (Isolated) + ByteLevel. */
async function demoWithSplit(regex: string) {
  const demo = await tokenizer(DEMO_TOKENIZER);
  const tokenizerJson = {
    ...demo.files.tokenizerJson,
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Split", pattern: { Regex: regex }, behavior: "Isolated", invert: false },
        { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
  };
  return buildTokenizer({ ...demo.files, tokenizerJson }, `demo with Split ${regex}`);
}

Deno.test("patterns without a scanner are matched by the regex, gaps and empty matches as the library", async () => {
  const r = mulberry32(17);
  const texts = [...TRICKY, ...Array.from({ length: 300 }, () => randomText(r))];
  // Letters only (the rest are gaps), empty matches everywhere, and an unrecognised spelling of GPT-2's.
  for (
    const regex of [
      "\\p{L}+",
      "\\p{L}*",
      "x*|\\p{N}",
      "(?:'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+)",
    ]
  ) {
    const loaded = await demoWithSplit(regex);
    const model = byteLevelModelOf(loaded);
    assert.ok(typeof model !== "string", regex);
    assert.equal(scannerFor(model.pattern.source, model.pattern.flags), null);
    const fast = new ByteLevelEncoder(loaded);
    for (const text of texts) {
      const expected = loaded.tokenizer.encode(text, { add_special_tokens: false }).ids;
      assert.deepEqual(fast.encode(text).ids, expected, `${regex}: ${JSON.stringify(text)}`);
    }
  }
});

/** Random text over letters, digits, whitespace, punctuation, astral characters and special tokens. */
function randomText(r: () => number): string {
  const pieces = [..."abcxyzé日0123 \t\n\r\u00a0.,'!-", "𝐀", "🎉", "\ud800", "'s", "<|im_end|>", "  "];
  let s = "";
  for (let n = Math.floor(r() * 40); n > 0; n--) s += pieces[Math.floor(r() * pieces.length)];
  return s;
}

Deno.test("long words (heap merge, not memoized) give the library's ids", async () => {
  const r = mulberry32(5);
  const letters = Array.from({ length: 600 }, () => "abcdefghijklmnopqrstuvwxyz"[Math.floor(r() * 26)]).join(
    "",
  );
  const texts = [
    "a".repeat(300),
    "ab".repeat(150),
    " x" + letters,
    letters.slice(0, 49),
    "1234567890".repeat(30),
    "=-".repeat(200),
    "日本語".repeat(40),
    "🎉".repeat(70),
    " ".repeat(400) + "end",
    "\n".repeat(300),
  ];
  for (const name of ["llama3", "qwen3", "demo"] as const) {
    const loaded = await tokenizer(name === "demo" ? DEMO_TOKENIZER : lenmlDir(name));
    const fast = new ByteLevelEncoder(loaded);
    for (const text of texts) {
      const expected = loaded.tokenizer.encode(text, { add_special_tokens: false }).ids;
      assert.deepEqual(fast.encode(text).ids, expected, `${name}: ${JSON.stringify(text.slice(0, 20))}`);
      assert.deepEqual(fast.encode(text).ids, expected, `${name}, second call`);
    }
  }
});

Deno.test("cuts after characters that NFC composes land on the library's token counts", async () => {
  const loaded = await tokenizer(lenmlDir("qwen3"));
  const fast = new ByteLevelEncoder(loaded);
  const library = new LibraryEncoder(loaded);
  const text = "<|im_start|>user\ncafe\u0301 au lait, nai\u0308ve<|im_end|>\n" +
    "<|im_start|>assistant\nA\u030a and e\u0301 again<|im_end|>\n";
  const cuts = [
    text.indexOf(" au"),
    text.indexOf(", nai"),
    text.indexOf("A\u030a"),
    text.indexOf(" again"),
    text.length,
  ];
  const expected = library.encode(text, cuts);
  const got = fast.encode(text, cuts);
  assert.deepEqual(got.ids, expected.ids);
  assert.deepEqual(got.cutTokens, expected.cutTokens);
  assert.deepEqual(got.cutInside, [false, false, false, false, false]);
  assert.throws(() => fast.encode("e\u0301", [1]), BoundaryError, "a cut between a letter and its accent");
});

Deno.test("encodeView gives encode's ids and cuts, in a view reused by the next call", async () => {
  const loaded = await tokenizer(lenmlDir("llama3"));
  const enc = new ByteLevelEncoder(loaded);
  const text = "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>";
  const cuts = [text.indexOf("Hello"), text.indexOf(" there") + 2, text.length];
  const { ids, cutTokens, cutInside } = enc.encode(text, cuts);
  const t: number[] = [], inside: boolean[] = [];
  const view = enc.encodeView(text, cuts, t, inside);
  assert.deepEqual(Array.from(view), ids);
  assert.deepEqual([t, inside], [cutTokens, cutInside]);
  assert.deepEqual(cutInside, [false, true, false]);
  enc.encodeView("x", [], [], []);
  assert.notDeepEqual(Array.from(view), ids, "the view is only valid until the next call");
});

Deno.test("merges the fast path cannot express on ids send the tokenizer to the library encoder", async () => {
  const demo = await tokenizer(DEMO_TOKENIZER);
  const tj = demo.files.tokenizerJson as { model: { merges: unknown[]; vocab: Record<string, number> } };
  const [a, b] =
    (typeof tj.model.merges[0] === "string"
      ? (tj.model.merges[0] as string).split(" ")
      : tj.model.merges[0]) as [string, string];
  const vocab = { ...tj.model.vocab };
  delete vocab[a + b];
  const loaded = buildTokenizer(
    { ...demo.files, tokenizerJson: { ...tj, model: { ...tj.model, vocab } } },
    "demo without a merge result",
  );
  assert.match(fastPathUnsupported(loaded) ?? "", /has a part or result without its own id/);
  assert.ok(makeEncoder(loaded) instanceof LibraryEncoder);
  assert.throws(() => new ByteLevelEncoder(loaded), /fast path does not apply/);
});
