import assert from "node:assert/strict";
import { join } from "node:path";
import { buildTinyTokenizer, corpusOf, trainBpe, VOCAB_SIZE } from "../../../scripts/make_tiny_tokenizer.ts";
import { bytesToUnicode } from "../../../steps/tokenize/encoder.ts";
import { DEMO_TOKENIZER, ROOT, tokenizer } from "./_fixtures.ts";

Deno.test("the demo tokenizer is what make_tiny_tokenizer.ts trains on data/demo/sft.jsonl", async () => {
  const path = join(ROOT, "data", "demo", "sft.jsonl");
  const { tokenizerJson, config } = buildTinyTokenizer(corpusOf(await Deno.readTextFile(path), path));
  assert.equal(
    await Deno.readTextFile(join(DEMO_TOKENIZER, "tokenizer.json")),
    JSON.stringify(tokenizerJson, null, 2) + "\n",
    "data/demo/tokenizer is stale: run `deno run -A scripts/make_tiny_tokenizer.ts`",
  );
  assert.equal(
    await Deno.readTextFile(join(DEMO_TOKENIZER, "tokenizer_config.json")),
    JSON.stringify(config, null, 2) + "\n",
  );
});

Deno.test("the demo tokenizer loads with 512 ids, ChatML specials and round-trips text", async () => {
  const t = await tokenizer(DEMO_TOKENIZER);
  assert.equal(t.vocabSize, VOCAB_SIZE);
  assert.deepEqual(
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map((s) => t.tokenizer.token_to_id(s)),
    [509, 510, 511],
  );
  assert.deepEqual([t.bosId, t.eosId, t.padId], [null, 511, 509]);
  assert.ok(t.chatTemplate?.includes("<|im_start|>"));
  const text = 'Ship 3 red mugs to Zürich 🎉 {"day":12}';
  const ids = t.tokenizer.encode(text, { add_special_tokens: false }).ids;
  assert.ok(ids.length < new TextEncoder().encode(text).length, "merges shorten the text");
  assert.equal(t.tokenizer.decode(ids), text);
});

Deno.test("trainBpe merges the most frequent pair first, ties by text", () => {
  const base = bytesToUnicode();
  const merges = trainBpe(new Map([["abab", 3], ["cd", 3], ["xy", 1]]), base, base.length + 3);
  // (a,b) occurs 6 times; then (ab,ab) and (c,d) 3 times each: "ab" sorts before "c".
  assert.deepEqual(merges, [["a", "b"], ["ab", "ab"], ["c", "d"]]);
});
