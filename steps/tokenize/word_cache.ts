/**
 * The fast path's memo of pre-tokenized word -> token ids. Byte-level BPE of a word does not
 * depend on its neighbours, so a hit is exact. Keys are looked up straight from the text
 * (hash and compare of its UTF-16 units: no substring is made), and everything lives in typed
 * arrays, laid out so a hit touches few cache lines:
 * - `slots`: open addressing, 2 int32 per slot `[hash, entry + 1]` (0 = empty), so most
 *   mismatches are rejected without leaving the slot array;
 * - `entries`: 4 int32 per entry `[keyStart, keyLength, idStart, idCount]`, ranges of the
 *   `keys` (UTF-16 units) and `ids` pools.
 * @module
 */
import { slotOf } from "./bpe.ts";

/** Entries kept before the memo starts over (its contents never change the output). */
export const WORD_CACHE_ENTRIES = 1 << 20;
/** Longer words are not memoized (long runs of spaces or digits are rare and each one differs). */
export const WORD_CACHE_MAX_UNITS = 256;

function grown<T extends Int32Array | Uint16Array>(a: T, need: number): T {
  if (need <= a.length) return a;
  let n = a.length;
  while (n < need) n *= 2;
  const b = new (a.constructor as { new (n: number): T })(n);
  b.set(a);
  return b;
}

/** See the module doc. Fields are read directly by the encoder's inner loop. */
export class WordCache {
  mask = (1 << 12) - 1;
  slots = new Int32Array(2 << 12);
  entries = new Int32Array(4 << 11);
  keys = new Uint16Array(1 << 14);
  ids = new Int32Array(1 << 13);
  size = 0;
  #keysUsed = 0;
  #idsUsed = 0;

  /** Entry of text[from, to) with hash `h` (see `hashUnits`), or -1. */
  find(text: string, from: number, to: number, h: number): number {
    const len = to - from;
    const slots = this.slots, entries = this.entries, keys = this.keys, mask = this.mask;
    let s = slotOf(h, mask);
    while (true) {
      const e = slots[2 * s + 1] - 1;
      if (e < 0) return -1;
      if (slots[2 * s] === h && entries[4 * e + 1] === len) {
        const start = entries[4 * e];
        let i = 0;
        while (i < len && keys[start + i] === text.charCodeAt(from + i)) i++;
        if (i === len) return e;
      }
      s = (s + 1) & mask;
    }
  }

  /** Adds text[from, to) (absent, hash `h`) with ids[0..n); returns its entry. */
  add(text: string, from: number, to: number, h: number, ids: Int32Array, n: number): number {
    if (this.size >= WORD_CACHE_ENTRIES) this.clear();
    const len = to - from;
    const e = this.size++;
    this.entries = grown(this.entries, 4 * (e + 1));
    this.keys = grown(this.keys, this.#keysUsed + len);
    this.ids = grown(this.ids, this.#idsUsed + n);
    const entries = this.entries;
    entries[4 * e] = this.#keysUsed;
    entries[4 * e + 1] = len;
    entries[4 * e + 2] = this.#idsUsed;
    entries[4 * e + 3] = n;
    for (let i = from; i < to; i++) this.keys[this.#keysUsed++] = text.charCodeAt(i);
    this.ids.set(ids.subarray(0, n), this.#idsUsed);
    this.#idsUsed += n;
    if (2 * this.size > this.mask + 1) this.#rehash(2 * (this.mask + 1));
    this.#place(h, e);
    return e;
  }

  /** Forgets every entry. */
  clear(): void {
    this.slots.fill(0);
    this.size = 0;
    this.#keysUsed = 0;
    this.#idsUsed = 0;
  }

  #place(h: number, e: number): void {
    let s = slotOf(h, this.mask);
    while (this.slots[2 * s + 1] !== 0) s = (s + 1) & this.mask;
    this.slots[2 * s] = h;
    this.slots[2 * s + 1] = e + 1;
  }

  #rehash(count: number): void {
    const old = this.slots;
    this.slots = new Int32Array(2 * count);
    this.mask = count - 1;
    for (let s = 0; s < old.length; s += 2) if (old[s + 1] !== 0) this.#place(old[s], old[s + 1] - 1);
  }
}
