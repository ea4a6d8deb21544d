/**
 * Byte-level BPE on token ids, with the tokenizer held in typed tables: what the fast path of
 * encoder.ts needs, built once from the library's own maps (so every id and rank is the
 * library's) and shared with the workers without copying (the tables live in
 * `SharedArrayBuffer`s and are never written after they are built).
 *
 * - {@link PairTable}: merge rank and merged id by the pair of ids `(left, right)`, open
 *   addressing with 4 int32 per slot `[left, right, rank, merged]` (left = -1: empty).
 * - {@link StringTable}: id by byte-level string, for `ignore_merges` (a word that is itself
 *   a token is not merged).
 * - {@link bpeMerge}: the merge loop. It merges, as the library's heap does, the adjacent pair of
 *   lowest rank, the leftmost among equal ranks, one occurrence at a time, until no pair has a
 *   rank. Merging ids instead of strings gives the same tokens when every string the merges
 *   can reach has its own id, which {@link buildByteLevelModel} checks.
 * @module
 */

/** The GPT-2 byte -> printable character table of byte-level BPE, indexed by byte. */
export function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const table = new Array<string>(256);
  for (const b of bs) table[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (table[b] === undefined) table[b] = String.fromCharCode(256 + n++);
  }
  return table;
}
const BYTE_CHARS = bytesToUnicode();

/** Byte-level form of a string: each UTF-8 byte as its printable character. */
export function byteLevel(text: string): string {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    let c = text.charCodeAt(i);
    if (c < 0x80) out += BYTE_CHARS[c];
    else if (c < 0x800) out += BYTE_CHARS[0xc0 | (c >> 6)] + BYTE_CHARS[0x80 | (c & 63)];
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
        out += BYTE_CHARS[0xf0 | (c >> 18)] + BYTE_CHARS[0x80 | ((c >> 12) & 63)] +
          BYTE_CHARS[0x80 | ((c >> 6) & 63)] + BYTE_CHARS[0x80 | (c & 63)];
        continue;
      }
      out += BYTE_CHARS[0xef] + BYTE_CHARS[0xbf] + BYTE_CHARS[0xbd];
    } else if (c >= 0xd800 && c <= 0xdfff) {
      out += BYTE_CHARS[0xef] + BYTE_CHARS[0xbf] + BYTE_CHARS[0xbd]; // lone surrogate -> U+FFFD
    } else {
      out += BYTE_CHARS[0xe0 | (c >> 12)] + BYTE_CHARS[0x80 | ((c >> 6) & 63)] + BYTE_CHARS[0x80 | (c & 63)];
    }
  }
  return out;
}

/**
 * Writes the UTF-8 bytes of text[from, to) into `out` (lone surrogates as U+FFFD, as
 * `TextEncoder` does); returns the byte count. `out` must hold 3 bytes per UTF-16 unit.
 */
export function utf8Into(text: string, from: number, to: number, out: Int32Array | Uint8Array): number {
  let n = 0;
  for (let i = from; i < to; i++) {
    let c = text.charCodeAt(i);
    if (c < 0x80) out[n++] = c;
    else if (c < 0x800) {
      out[n++] = 0xc0 | (c >> 6);
      out[n++] = 0x80 | (c & 63);
    } else if (c >= 0xd800 && c <= 0xdfff) {
      const d = i + 1 < to ? text.charCodeAt(i + 1) : 0;
      if (c <= 0xdbff && d >= 0xdc00 && d <= 0xdfff) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
        out[n++] = 0xf0 | (c >> 18);
        out[n++] = 0x80 | ((c >> 12) & 63);
        out[n++] = 0x80 | ((c >> 6) & 63);
        out[n++] = 0x80 | (c & 63);
      } else {
        out[n++] = 0xef;
        out[n++] = 0xbf;
        out[n++] = 0xbd;
      }
    } else {
      out[n++] = 0xe0 | (c >> 12);
      out[n++] = 0x80 | ((c >> 6) & 63);
      out[n++] = 0x80 | (c & 63);
    }
  }
  return n;
}

/** UTF-8 length of text[from, to). */
export function utf8Length(text: string, from: number, to: number): number {
  let n = 0;
  for (let i = from; i < to; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < to) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n += 4;
        i++;
      } else n += 3;
    } else n += 3;
  }
  return n;
}

/**
 * Hash of the UTF-16 units text[from, to) (FNV-1a), as the tables and the word cache use it;
 * `h` continues the hash of what precedes them (hash(a + b) = hashUnits(b, .., hashUnits(a, ..))).
 */
export function hashUnits(text: string, from: number, to: number, h = 0x811c9dc5 | 0): number {
  for (let i = from; i < to; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
  return h;
}

/** Slot of a hash in a table of `mask + 1` slots (the high bits folded in). */
export function slotOf(hash: number, mask: number): number {
  return (hash ^ (hash >>> 15)) & mask;
}

function pairHash(left: number, right: number): number {
  let h = Math.imul(left, 0x9e3779b1) ^ Math.imul(right ^ 0x7f4a7c15, 0x85ebca77);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  return h ^ (h >>> 12);
}

/** A power of two with at least `n / load` slots. */
function capacityFor(n: number, load: number): number {
  let c = 16;
  while (c * load < n) c *= 2;
  return c;
}

function sharedInt32(n: number): Int32Array {
  return new Int32Array(new SharedArrayBuffer(4 * n));
}

/** Merge rank and merged id by pair of ids; see the module doc. */
export interface PairTable {
  mask: number;
  /** `[left, right, rank, merged]` per slot. */
  slots: Int32Array;
}

/** The slot index (a multiple of 4) of pair (left, right), or -1 when it has no merge. */
export function pairSlot(table: PairTable, left: number, right: number): number {
  const slots = table.slots;
  const mask = table.mask;
  let s = pairHash(left, right) & mask;
  while (true) {
    const k = s << 2;
    const l = slots[k];
    if (l === left && slots[k + 1] === right) return k;
    if (l === -1) return -1;
    s = (s + 1) & mask;
  }
}

/** Strings to ids, for `ignore_merges`; see the module doc. */
export interface StringTable {
  mask: number;
  /** Entry index + 1 per slot, 0 = empty. */
  slots: Int32Array;
  hashes: Int32Array;
  /** Start of each entry's key in `units`, and its length. */
  starts: Int32Array;
  lengths: Int32Array;
  units: Uint16Array;
  ids: Int32Array;
}

/** Char code of each byte's byte-level character. */
const BYTE_CODES = Int32Array.from(BYTE_CHARS, (c) => c.charCodeAt(0));

/** Id in `table` of the byte-level string of bytes[0..n), or -1 (no string is made). */
export function byteStringId(table: StringTable, bytes: Int32Array, n: number): number {
  let h = 0x811c9dc5 | 0;
  for (let i = 0; i < n; i++) h = Math.imul(h ^ BYTE_CODES[bytes[i]], 0x01000193);
  let s = slotOf(h, table.mask);
  while (true) {
    const e = table.slots[s] - 1;
    if (e < 0) return -1;
    if (table.hashes[e] === h && table.lengths[e] === n) {
      const start = table.starts[e];
      let i = 0;
      while (i < n && table.units[start + i] === BYTE_CODES[bytes[i]]) i++;
      if (i === n) return table.ids[e];
    }
    s = (s + 1) & table.mask;
  }
}

/** Entry of the concatenation a[0, aEnd) + b[from, to) in `table`, or -1. */
function entryOf(
  table: StringTable,
  a: string,
  aFrom: number,
  aTo: number,
  b: string,
  from: number,
  to: number,
): number {
  const h = hashUnits(b, from, to, hashUnits(a, aFrom, aTo));
  const na = aTo - aFrom;
  const len = na + to - from;
  let s = slotOf(h, table.mask);
  while (true) {
    const e = table.slots[s] - 1;
    if (e < 0) return -1;
    if (table.hashes[e] === h && table.lengths[e] === len) {
      const start = table.starts[e];
      let i = 0;
      while (i < na && table.units[start + i] === a.charCodeAt(aFrom + i)) i++;
      while (i < len && table.units[start + i] === b.charCodeAt(from + i - na)) i++;
      if (i === len) return e;
    }
    s = (s + 1) & table.mask;
  }
}

function buildStringTable(entries: [string, number][]): StringTable {
  const n = entries.length;
  const cap = capacityFor(n, 0.5);
  let units = 0;
  for (const [s] of entries) units += s.length;
  const table: StringTable = {
    mask: cap - 1,
    slots: sharedInt32(cap),
    hashes: sharedInt32(n),
    starts: sharedInt32(n),
    lengths: sharedInt32(n),
    units: new Uint16Array(new SharedArrayBuffer(2 * units)),
    ids: sharedInt32(n),
  };
  let at = 0;
  entries.forEach(([s, id], e) => {
    const h = hashUnits(s, 0, s.length);
    table.hashes[e] = h;
    table.starts[e] = at;
    table.lengths[e] = s.length;
    table.ids[e] = id;
    for (let i = 0; i < s.length; i++) table.units[at++] = s.charCodeAt(i);
    let slot = slotOf(h, table.mask);
    while (table.slots[slot] !== 0) slot = (slot + 1) & table.mask;
    table.slots[slot] = e + 1;
  });
  return table;
}

/** Everything the byte-level fast path needs from a tokenizer; plain data (structured-cloneable). */
export interface ByteLevelModel {
  /** Pre-tokenizer pattern (the library's compiled regex) and how its matches make words. */
  pattern: { source: string; flags: string; mode: "split" | "match" };
  /** The normalizer is NFC (else there is none). */
  nfc: boolean;
  /** Added tokens: text is split on them before anything else. */
  added: { content: string; id: number; lstrip: boolean; rstrip: boolean }[];
  /** Id of each byte's token. */
  byteIds: Int32Array;
  /** Byte length of each token a merge can produce, by id (0 for others). */
  tokenBytes: Int32Array;
  merges: PairTable;
  /** Present when the model has `ignore_merges`: a word that is a token is that token. */
  words: StringTable | null;
}

/**
 * The typed tables of a byte-level BPE model. `merges` are as in tokenizer.json ("a b" strings
 * or [a, b] pairs); `tokensToIds` and `vocab` are the library's maps (added tokens included).
 * Returns the reason when ids cannot stand for strings.
 */
export function buildByteLevelModel(
  merges: readonly (string | readonly [string, string])[],
  tokensToIds: Map<string, number>,
  vocab: readonly (string | undefined)[],
  ignoreMerges: boolean,
): Omit<ByteLevelModel, "pattern" | "nfc" | "added"> | string {
  const tokenBytes = new Int32Array(new SharedArrayBuffer(4 * Math.max(1, vocab.length)));
  const strings = buildStringTable([...tokensToIds.entries()]);
  // An id stands for a string when the library maps them both ways.
  const own = new Uint8Array(strings.ids.length);
  for (let e = 0; e < own.length; e++) {
    const id = strings.ids[e];
    const back = vocab[id];
    if (back === undefined || back.length !== strings.lengths[e]) continue;
    let i = 0;
    while (i < back.length && back.charCodeAt(i) === strings.units[strings.starts[e] + i]) i++;
    if (i === back.length) {
      own[e] = 1;
      tokenBytes[id] = back.length;
    }
  }
  /** Id of a + b when it stands for that string, else -1. */
  const idOf = (a: string, b = ""): number => {
    const e = entryOf(strings, a, 0, a.length, b, 0, b.length);
    return e >= 0 && own[e] ? strings.ids[e] : -1;
  };
  const byteIds = new Int32Array(new SharedArrayBuffer(4 * 256));
  for (let b = 0; b < 256; b++) {
    byteIds[b] = idOf(BYTE_CHARS[b]);
    if (byteIds[b] < 0) return `byte token ${JSON.stringify(BYTE_CHARS[b])} is not in the vocabulary`;
  }
  const cap = capacityFor(merges.length, 0.6);
  const table: PairTable = { mask: cap - 1, slots: sharedInt32(4 * cap).fill(-1) };
  for (let rank = 0; rank < merges.length; rank++) {
    const m = merges[rank];
    let a: string, b: string;
    if (typeof m === "string") {
      // As the library's m.split(" ", 2): the text up to the first space, then up to the next.
      const sp = m.indexOf(" ");
      if (sp < 0) return `merge ${JSON.stringify(m)} is not a pair`;
      const end = m.indexOf(" ", sp + 1);
      a = m.slice(0, sp);
      b = end < 0 ? m.slice(sp + 1) : m.slice(sp + 1, end);
    } else [a, b] = m;
    const left = idOf(a), right = idOf(b), merged = idOf(a, b);
    if (left < 0 || right < 0 || merged < 0) {
      return `merge ${JSON.stringify(`${a} ${b}`)} has a part or result without its own id`;
    }
    let s = pairHash(left, right) & table.mask;
    while (true) {
      const k = s << 2;
      if (table.slots[k] === -1 || (table.slots[k] === left && table.slots[k + 1] === right)) {
        // A repeated merge keeps its last rank, as the library's Map of ranks does.
        table.slots[k] = left;
        table.slots[k + 1] = right;
        table.slots[k + 2] = rank;
        table.slots[k + 3] = merged;
        break;
      }
      s = (s + 1) & table.mask;
    }
  }
  return {
    byteIds,
    tokenBytes,
    merges: table,
    words: ignoreMerges ? strings : null,
  };
}

/** Scratch arrays of {@link bpeMerge}, grown on demand. */
export class MergeScratch {
  ranks = new Int32Array(256);
  merged = new Int32Array(256);
  next = new Int32Array(256);
  prev = new Int32Array(256);
  heapRank = new Int32Array(3 * 256);
  heapPos = new Int32Array(3 * 256);

  /** Makes room for a word of `n` parts. */
  reserve(n: number): void {
    if (this.ranks.length >= n) return;
    let c = this.ranks.length;
    while (c < n) c *= 2;
    this.ranks = new Int32Array(c);
    this.merged = new Int32Array(c);
    this.next = new Int32Array(c);
    this.prev = new Int32Array(c);
    // The heap gets n - 1 pairs, then at most 2 per merge.
    this.heapRank = new Int32Array(3 * c);
    this.heapPos = new Int32Array(3 * c);
  }
}

/** Words up to this many bytes are merged by scanning for the best pair; longer ones with a heap. */
const SCAN_MAX = 48;
const NO_RANK = 0x7fffffff;

/**
 * BPE of one word: `parts[0..n)` holds its byte ids and, on return, its token ids; returns
 * their number. See the module doc for the merge order.
 */
export function bpeMerge(table: PairTable, parts: Int32Array, n: number, scratch: MergeScratch): number {
  if (n < 2) return n;
  scratch.reserve(n);
  if (n > SCAN_MAX) return heapMerge(table, parts, n, scratch);
  const slots = table.slots;
  const ranks = scratch.ranks;
  const merged = scratch.merged;
  // ranks[i], merged[i]: the merge of pair (i, i + 1), NO_RANK when there is none.
  for (let i = 0; i + 1 < n; i++) {
    const k = pairSlot(table, parts[i], parts[i + 1]);
    ranks[i] = k < 0 ? NO_RANK : slots[k + 2];
    merged[i] = k < 0 ? -1 : slots[k + 3];
  }
  while (n > 1) {
    let best = 0;
    for (let i = 1; i + 1 < n; i++) if (ranks[i] < ranks[best]) best = i;
    if (ranks[best] === NO_RANK) break;
    parts[best] = merged[best];
    // Short words: shifting by hand beats copyWithin's call overhead.
    for (let i = best + 1; i + 1 < n; i++) {
      parts[i] = parts[i + 1];
      ranks[i - 1] = ranks[i];
      merged[i - 1] = merged[i];
    }
    n--;
    for (let i = best - 1; i <= best; i++) {
      if (i < 0 || i + 1 >= n) continue;
      const k = pairSlot(table, parts[i], parts[i + 1]);
      ranks[i] = k < 0 ? NO_RANK : slots[k + 2];
      merged[i] = k < 0 ? -1 : slots[k + 3];
    }
  }
  return n;
}

/**
 * {@link bpeMerge} for long words: a linked list of parts and a binary heap of candidate pairs
 * keyed by (rank, position of the left part). An entry is stale when its left part is gone or
 * its pair now has another rank; stale entries are skipped when they come up.
 */
function heapMerge(table: PairTable, parts: Int32Array, n: number, scratch: MergeScratch): number {
  const slots = table.slots;
  const { next, prev, heapRank, heapPos } = scratch;
  let size = 0;
  const less = (a: number, b: number) =>
    heapRank[a] < heapRank[b] || (heapRank[a] === heapRank[b] && heapPos[a] < heapPos[b]);
  const swap = (a: number, b: number) => {
    const r = heapRank[a], p = heapPos[a];
    heapRank[a] = heapRank[b];
    heapPos[a] = heapPos[b];
    heapRank[b] = r;
    heapPos[b] = p;
  };
  const push = (rank: number, pos: number) => {
    let i = size++;
    heapRank[i] = rank;
    heapPos[i] = pos;
    while (i > 0) {
      const up = (i - 1) >> 1;
      if (!less(i, up)) break;
      swap(i, up);
      i = up;
    }
  };
  const pop = () => {
    size--;
    heapRank[0] = heapRank[size];
    heapPos[0] = heapPos[size];
    let i = 0;
    while (true) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < size && less(l, m)) m = l;
      if (r < size && less(r, m)) m = r;
      if (m === i) break;
      swap(i, m);
      i = m;
    }
  };
  const offer = (pos: number) => {
    const k = pairSlot(table, parts[pos], parts[next[pos]]);
    if (k >= 0) push(slots[k + 2], pos);
  };
  for (let i = 0; i < n; i++) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  // Every live pair has an entry at all times, so the first valid entry popped is the best pair.
  for (let i = 0; i + 1 < n; i++) offer(i);
  while (size > 0) {
    const rank = heapRank[0], pos = heapPos[0];
    pop();
    if (parts[pos] < 0) continue; // merged into its left neighbour
    const right = next[pos];
    if (right < 0) continue;
    const k = pairSlot(table, parts[pos], parts[right]);
    if (k < 0 || slots[k + 2] !== rank) continue;
    parts[pos] = slots[k + 3];
    parts[right] = -1;
    next[pos] = next[right];
    if (next[pos] >= 0) prev[next[pos]] = pos;
    if (prev[pos] >= 0) offer(prev[pos]);
    if (next[pos] >= 0) offer(pos);
  }
  let m = 0;
  for (let i = 0; i >= 0; i = next[i]) parts[m++] = parts[i];
  return m;
}
