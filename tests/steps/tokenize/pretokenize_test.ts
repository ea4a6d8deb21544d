import assert from "node:assert/strict";
import { mulberry32 } from "../../../foundation/random.ts";
import { byteLevelModelOf } from "../../../steps/tokenize/encoder.ts";
import {
  GPT2_PATTERN,
  LLAMA3_PATTERN,
  QWEN2_PATTERN,
  type Scanner,
  scannerFor,
} from "../../../steps/tokenize/pretokenize.ts";
import { DEMO_TOKENIZER, lenmlDir, tokenizer } from "./_fixtures.ts";

/**
 * Pieces of random text: characters where the classes of the patterns differ (letters and marks,
 * numbers of every kind, Unicode versus JavaScript whitespace, CR / LF, punctuation, astral
 * code points, lone surrogates) and the contractions in both cases.
 */
const PIECES = [
  ..."abcdeglmrstvxABDELMRSTVßéǅʼ日本𝐀",
  ..."0123456789٣½Ⅻ",
  "𝟙",
  "\u0301",
  ..." \t\n\r\v\f\u00a0\u0085\u1680\u2003\u2028\u3000\ufeff\u200b",
  ..."'’.,!?-(){}\"—“#",
  "🎉",
  "\u200d",
  "\ud800",
  "\udc00",
  "'s",
  "'S",
  "'re",
  "'RE",
  "'ll",
  "'Ve",
  "'d",
  "\r\n",
  "  ",
  " \n ",
];

function randomText(r: () => number): string {
  let s = "";
  const n = Math.floor(r() * 24);
  for (let i = 0; i < n; i++) s += PIECES[Math.floor(r() * PIECES.length)];
  return s;
}

/** Words of `text` by the regex: its matches, which must cover the text one after the other. */
function regexWords(source: string, text: string): string[] {
  const words: string[] = [];
  let at = 0;
  for (const m of text.matchAll(new RegExp(source, "gu"))) {
    assert.equal(m.index, at, `the pattern leaves a gap in ${JSON.stringify(text)}`);
    assert.ok(m[0].length > 0);
    words.push(m[0]);
    at += m[0].length;
  }
  assert.equal(at, text.length);
  return words;
}

function scannerWords(scan: Scanner, text: string): string[] {
  const words: string[] = [];
  for (let at = 0; at < text.length;) {
    const end = scan(text, at);
    assert.ok(end > at && end <= text.length);
    words.push(text.slice(at, end));
    at = end;
  }
  return words;
}

for (
  const [name, source] of [["Llama 3", LLAMA3_PATTERN], ["Qwen2", QWEN2_PATTERN], ["GPT-2", GPT2_PATTERN]]
) {
  Deno.test(`the ${name} scanner splits random text exactly as its regex does`, () => {
    const scan = scannerFor(source, "gu");
    assert.ok(scan);
    const r = mulberry32(name.length * 7919);
    for (let i = 0; i < 20_000; i++) {
      const text = randomText(r);
      assert.deepEqual(scannerWords(scan, text), regexWords(source, text), JSON.stringify(text));
    }
  });
}

Deno.test("scanners cover the pre-tokenizers of Llama 3, Qwen3 and the demo tokenizer, nothing else", async () => {
  for (const dir of [lenmlDir("llama3"), lenmlDir("qwen3"), DEMO_TOKENIZER]) {
    const model = byteLevelModelOf(await tokenizer(dir));
    assert.ok(typeof model !== "string");
    assert.ok(scannerFor(model.pattern.source, model.pattern.flags), `a scanner for ${dir}`);
  }
  assert.equal(scannerFor(LLAMA3_PATTERN, "g"), null);
  assert.equal(scannerFor(LLAMA3_PATTERN.replace("{1,3}", "{1,4}"), "gu"), null);
});
