import assert from "node:assert/strict";
import { hashUnits } from "../../../steps/tokenize/bpe.ts";
import { WORD_CACHE_ENTRIES, WordCache } from "../../../steps/tokenize/word_cache.ts";

/** The ids [k, k + 1, ..., k + (k % 4)] stored for word k. */
function idsOf(k: number): Int32Array {
  return Int32Array.from({ length: 1 + (k % 4) }, (_, i) => k + i);
}

function lookup(cache: WordCache, text: string, from: number, to: number): number[] | null {
  const e = cache.find(text, from, to, hashUnits(text, from, to));
  if (e < 0) return null;
  const start = cache.entries[4 * e + 2];
  return Array.from(cache.ids.subarray(start, start + cache.entries[4 * e + 3]));
}

Deno.test("the word cache finds words inside a text by position, across growth", () => {
  const cache = new WordCache();
  const words = Array.from({ length: 20_000 }, (_, k) => ` w${k.toString(36)}é`);
  const text = words.join("");
  let at = 0;
  words.forEach((w, k) => {
    assert.equal(lookup(cache, text, at, at + w.length), null, "absent before it is added");
    const ids = idsOf(k);
    cache.add(text, at, at + w.length, hashUnits(text, at, at + w.length), ids, ids.length);
    at += w.length;
  });
  assert.equal(cache.size, words.length);
  at = 0;
  words.forEach((w, k) => {
    assert.deepEqual(lookup(cache, text, at, at + w.length), Array.from(idsOf(k)), w);
    // The same characters elsewhere (a fresh string) are the same word; a prefix is another.
    assert.deepEqual(lookup(cache, `x${w}`, 1, 1 + w.length), Array.from(idsOf(k)));
    assert.equal(lookup(cache, text, at, at + w.length - 1), null);
    at += w.length;
  });
});

Deno.test("the word cache starts over when it is full", () => {
  const cache = new WordCache();
  const one = new Int32Array([7]);
  for (let k = 0; k < WORD_CACHE_ENTRIES; k++) {
    const w = k.toString(36);
    cache.add(w, 0, w.length, hashUnits(w, 0, w.length), one, 1);
  }
  assert.equal(cache.size, WORD_CACHE_ENTRIES);
  assert.deepEqual(lookup(cache, "0", 0, 1), [7]);
  cache.add("new", 0, 3, hashUnits("new", 0, 3), new Int32Array([1, 2]), 2);
  assert.equal(cache.size, 1);
  assert.equal(lookup(cache, "0", 0, 1), null);
  assert.deepEqual(lookup(cache, "new", 0, 3), [1, 2]);
});
