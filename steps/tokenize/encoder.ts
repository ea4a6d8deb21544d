/**
 * Text -> token ids, with the token index of given character positions ("cuts"), which is
 * how loss masks find the tokens of each assistant turn.
 *
 * Two implementations give identical ids:
 * - {@link ByteLevelEncoder}, the fast path for byte-level BPE tokenizers (GPT-2 style:
 *   Llama 3, Qwen2/2.5/3, Mistral Nemo, lathe's demo tokenizer). It reproduces
 *   `@huggingface/tokenizers`' `encode_text` step by step (split on added tokens, normalize,
 *   pre-tokenize into words) and memoizes word -> ids: byte-level BPE of a pre-tokenized word
 *   does not depend on its neighbours, so the cache is exact. Cache misses call the library's
 *   own BPE model. Tests compare its ids with the library's on several corpora.
 * - {@link LibraryEncoder} for every other tokenizer (SentencePiece-style BPE such as Gemma):
 *   the library encodes the text, and each cut is located by encoding the prefix before it and
 *   checking that its ids are a prefix of the whole text's ids.
 *
 * Neither adds special tokens (BOS/EOS): callers decide, as transformers'
 * `apply_chat_template` (no special tokens added) and `tokenizer(text)` (post-processor) do.
 * @module
 */
import type { Tokenizer } from "@huggingface/tokenizers";
import { LatheError } from "../errors.ts";
import type { LoadedTokenizer } from "./tokenizer.ts";

/** Token ids of a text and, per cut, the number of tokens that start before the cut. */
export interface Encoded {
  ids: number[];
  /** cutTokens[j] = number of tokens whose first character lies before cuts[j]. */
  cutTokens: number[];
  /**
   * cutInside[j]: cuts[j] falls strictly inside a token (token cutTokens[j] - 1 starts before it
   * and ends after it); a fast-path result only, the library encoder rejects such cuts.
   */
  cutInside: boolean[];
}

/** Encodes text without adding special tokens. */
export interface Encoder {
  /** True for the memoized byte-level fast path. */
  readonly fast: boolean;
  /** Encodes `text`; `cuts` are ascending character (UTF-16) positions in `text`. */
  encode(text: string, cuts?: readonly number[]): Encoded;
}

/** Thrown when a cut cannot be mapped to a token boundary; callers add the row's location. */
export class BoundaryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BoundaryError";
  }
}

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

/** UTF-8 length of text[from, to). */
function utf8Length(text: string, from: number, to: number): number {
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

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

// deno-lint-ignore no-explicit-any
type Any = any;

/** Library internals the fast path reuses (the same regex objects and BPE model). */
interface LibraryParts {
  preTokenizer: Any;
  model: Any;
  tokensToIds: Map<string, number>;
  vocab: string[];
  unkId: number | undefined;
}

function libraryParts(tok: Tokenizer): LibraryParts {
  const t = tok as Any;
  return {
    preTokenizer: t.pre_tokenizer,
    model: t.model,
    tokensToIds: t.model.tokens_to_ids,
    vocab: t.model.vocab,
    unkId: t.model.unk_token_id,
  };
}

/** How the fast path splits a section into words. */
interface WordSplit {
  /** The library's compiled pattern (cloned so its `lastIndex` is ours). */
  pattern: RegExp;
  /** "split": matches and the gaps between them are words (Split, Isolated); "match": only matches. */
  mode: "split" | "match";
}

/**
 * Why the byte-level fast path cannot reproduce this tokenizer exactly, or null when it can.
 * Exposed for tests and the benchmark.
 */
export function fastPathUnsupported(loaded: LoadedTokenizer): string | null {
  const tj = loaded.files.tokenizerJson as Any;
  const cfg = loaded.files.config as Any;
  const m = tj.model ?? {};
  if (m.type !== "BPE") return `model type "${m.type}" is not BPE`;
  if (m.dropout) return "BPE dropout";
  if (m.byte_fallback) return "byte_fallback BPE";
  if (m.continuing_subword_prefix || m.end_of_word_suffix || m.continuing_subword_suffix) {
    return "subword prefix/suffix";
  }
  const norm = tj.normalizer;
  if (norm !== null && norm !== undefined && norm.type !== "NFC") return `normalizer "${norm.type}"`;
  if (cfg.remove_space === true || cfg.do_lowercase_and_remove_accent === true) return "text cleanup flags";
  if (norm && loaded.addedTokens.some((t) => t.normalized)) return "normalized added tokens";
  if (!wordSplitOf(loaded.tokenizer, tj.pre_tokenizer)) return "pre-tokenizer is not byte-level";
  return null;
}

function wordSplitOf(tok: Tokenizer, pre: Any): WordSplit | null {
  const lib = (tok as Any).pre_tokenizer;
  if (!pre || !lib) return null;
  if (pre.type === "ByteLevel") {
    if (pre.add_prefix_space || pre.use_regex === false) return null;
    return { pattern: new RegExp(lib.pattern.source, lib.pattern.flags), mode: "match" };
  }
  if (pre.type === "Sequence" && Array.isArray(pre.pretokenizers) && pre.pretokenizers.length === 2) {
    const [split, bl] = pre.pretokenizers;
    if (
      split.type === "Split" && split.invert === false &&
      String(split.behavior).toLowerCase() === "isolated" &&
      bl.type === "ByteLevel" && bl.use_regex === false && !bl.add_prefix_space
    ) {
      const p = lib.tokenizers[0].pattern as RegExp | null;
      if (!p) return null;
      return { pattern: new RegExp(p.source, p.flags), mode: "split" };
    }
  }
  return null;
}

const UTF8 = new TextEncoder();

/** Words up to this length are merged by the quadratic loop; longer ones by the library's heap. */
const MERGE_LOOP_MAX = 64;

/** Most words kept in the memo before it is cleared (output never depends on it). */
const CACHE_LIMIT = 1 << 20;

/** The memoized byte-level BPE fast path; see the module doc. */
export class ByteLevelEncoder implements Encoder {
  readonly fast = true;
  #lib: LibraryParts;
  #split: WordSplit;
  #nfc: boolean;
  #ignoreMerges: boolean;
  #added: RegExp | null;
  #addedIds: Map<string, { id: number; lstrip: boolean; rstrip: boolean }>;
  #cache = new Map<string, number[]>();
  /** Merge rank by "left right" (byte-level tokens never contain a space). */
  #ranks: Map<string, number>;
  /**
   * The same merges on ids, when every merge's parts and result are in the vocabulary:
   * rank by pair key `left * V + right`, merged id by rank, and the id of each byte.
   */
  #idMerges: { v: number; rank: Map<number, number>; merged: Int32Array; byteIds: Int32Array } | null;

  constructor(loaded: LoadedTokenizer) {
    const why = fastPathUnsupported(loaded);
    if (why) throw new Error(`byte-level fast path does not apply: ${why}`);
    const tj = loaded.files.tokenizerJson as Any;
    this.#lib = libraryParts(loaded.tokenizer);
    this.#split = wordSplitOf(loaded.tokenizer, tj.pre_tokenizer)!;
    this.#nfc = tj.normalizer?.type === "NFC";
    this.#ignoreMerges = tj.model.ignore_merges ?? false;
    this.#ranks = new Map();
    const merges = (tj.model.merges as (string | [string, string])[]).map((m) =>
      typeof m === "string" ? m.split(" ", 2) as [string, string] : m
    );
    merges.forEach(([a, b], rank) => this.#ranks.set(`${a} ${b}`, rank)); // a repeat keeps its last rank
    this.#idMerges = this.#buildIdMerges(merges, loaded.vocabSize);
    this.#addedIds = new Map();
    for (const t of loaded.addedTokens) {
      this.#addedIds.set(t.content, { id: t.id, lstrip: t.lstrip, rstrip: t.rstrip });
    }
    // The library splits on added tokens with a trie: the longest token starting at the
    // leftmost position. An alternation sorted longest-first matches the same.
    const contents = [...this.#addedIds.keys()].filter((c) => c.length > 0).sort((a, b) =>
      b.length - a.length || (a < b ? -1 : a > b ? 1 : 0)
    );
    this.#added = contents.length > 0 ? new RegExp(contents.map(escapeRegExp).join("|"), "g") : null;
  }

  encode(text: string, cuts: readonly number[] = []): Encoded {
    const ids: number[] = [];
    const cutTokens = new Array<number>(cuts.length);
    const cutInside = new Array<boolean>(cuts.length).fill(false);
    let ci = 0;
    // Sections: [start, text] pieces between added tokens, then the added tokens themselves.
    type Section = { start: number; text: string; added: number | null };
    const sections: Section[] = [];
    if (this.#added) {
      const re = this.#added;
      re.lastIndex = 0;
      let prev = 0;
      for (let m = re.exec(text); m !== null; m = re.exec(text)) {
        if (m.index > prev) sections.push({ start: prev, text: text.slice(prev, m.index), added: null });
        sections.push({ start: m.index, text: m[0], added: this.#addedIds.get(m[0])!.id });
        prev = m.index + m[0].length;
      }
      if (prev < text.length) sections.push({ start: prev, text: text.slice(prev), added: null });
      // lstrip / rstrip of added tokens trim the neighbouring sections (as the library does).
      for (let i = 0; i < sections.length; i++) {
        const s = sections[i];
        if (s.added === null) continue;
        const spec = this.#addedIds.get(s.text)!;
        if (spec.lstrip && i > 0 && sections[i - 1].added === null) {
          sections[i - 1].text = sections[i - 1].text.trimEnd();
        }
        if (spec.rstrip && i < sections.length - 1 && sections[i + 1].added === null) {
          const next = sections[i + 1];
          const trimmed = next.text.trimStart();
          next.start += next.text.length - trimmed.length;
          next.text = trimmed;
        }
      }
    } else if (text.length > 0) sections.push({ start: 0, text, added: null });

    for (const s of sections) {
      const end = s.start + s.text.length;
      while (ci < cuts.length && cuts[ci] <= s.start) cutTokens[ci++] = ids.length;
      if (s.added !== null) {
        while (ci < cuts.length && cuts[ci] < end) {
          cutInside[ci] = true;
          cutTokens[ci++] = ids.length + 1;
        }
        ids.push(s.added);
        continue;
      }
      if (s.text.length === 0) continue;
      let local: number[] = [];
      const first = ci;
      while (ci < cuts.length && cuts[ci] < end) local.push(cuts[ci++] - s.start);
      let body = s.text;
      if (this.#nfc) {
        const normalized = body.normalize("NFC");
        if (normalized !== body && local.length > 0) local = normalizedCuts(body, normalized, local);
        body = normalized;
      }
      const { counts, inside } = this.#encodeSection(body, ids, local);
      for (let j = 0; j < counts.length; j++) {
        cutTokens[first + j] = counts[j];
        cutInside[first + j] = inside[j];
      }
    }
    while (ci < cuts.length) cutTokens[ci++] = ids.length;
    return { ids, cutTokens, cutInside };
  }

  /**
   * Pre-tokenizes and encodes one normalized section, appending to `ids`; returns per cut the
   * token count and whether the cut falls inside a token (see {@link Encoded}).
   */
  #encodeSection(body: string, ids: number[], cuts: number[]): { counts: number[]; inside: boolean[] } {
    const counts: number[] = [];
    const inside = new Array<boolean>(cuts.length).fill(false);
    let ci = 0;
    const emit = (from: number, to: number): void => {
      const word = body.slice(from, to);
      while (ci < cuts.length && cuts[ci] <= from) counts[ci++] = ids.length;
      const wordIds = this.#word(word);
      if (ci < cuts.length && cuts[ci] < to) {
        // A cut inside a word: locate it by UTF-8 bytes (byte-level token length = bytes).
        const starts: number[] = [];
        let b = 0;
        for (const id of wordIds) {
          starts.push(b);
          b += this.#lib.vocab[id]?.length ?? 0;
        }
        while (ci < cuts.length && cuts[ci] < to) {
          const cutByte = utf8Length(body, from, cuts[ci]);
          let n = 0;
          while (n < starts.length && starts[n] < cutByte) n++;
          // Token n - 1 starts before the cut; it ends where token n starts (or the word ends).
          inside[ci] = (n < starts.length ? starts[n] : b) > cutByte;
          counts[ci++] = ids.length + n;
        }
      }
      for (let k = 0; k < wordIds.length; k++) ids.push(wordIds[k]);
    };
    const re = this.#split.pattern;
    re.lastIndex = 0;
    let prev = 0;
    if (this.#split.mode === "split") {
      for (const m of body.matchAll(re)) {
        if (m.index > prev) emit(prev, m.index);
        if (m[0].length > 0) emit(m.index, m.index + m[0].length);
        prev = m.index + m[0].length;
      }
      if (prev < body.length) emit(prev, body.length);
    } else {
      for (const m of body.matchAll(re)) if (m[0].length > 0) emit(m.index, m.index + m[0].length);
    }
    while (ci < cuts.length) counts[ci++] = ids.length;
    return { counts, inside };
  }

  /** ids of one pre-tokenized word (memoized). */
  #word(word: string): number[] {
    const hit = this.#cache.get(word);
    if (hit !== undefined) return hit;
    const lib = this.#lib;
    const bl = byteLevel(word);
    let out: number[];
    const whole = this.#ignoreMerges ? lib.tokensToIds.get(bl) : undefined;
    if (whole !== undefined) out = [whole];
    else {
      if (this.#idMerges && bl.length <= MERGE_LOOP_MAX) out = this.#mergeIds(word);
      else {
        const tokens: string[] = bl.length <= MERGE_LOOP_MAX ? this.#merge(bl) : lib.model.encode([bl]);
        out = [];
        for (const t of tokens) {
          const id = lib.tokensToIds.get(t) ?? lib.unkId;
          if (id !== undefined) out.push(id);
        }
      }
    }
    if (this.#cache.size >= CACHE_LIMIT) this.#cache.clear();
    this.#cache.set(word, out);
    return out;
  }

  #buildIdMerges(
    merges: [string, string][],
    vocabSize: number,
  ): { v: number; rank: Map<number, number>; merged: Int32Array; byteIds: Int32Array } | null {
    const ids = this.#lib.tokensToIds;
    const byteIds = new Int32Array(256);
    for (let b = 0; b < 256; b++) {
      const id = ids.get(BYTE_CHARS[b]);
      if (id === undefined) return null;
      byteIds[b] = id;
    }
    const rank = new Map<number, number>();
    const merged = new Int32Array(merges.length);
    for (let r = 0; r < merges.length; r++) {
      const [a, b] = merges[r];
      const ia = ids.get(a), ib = ids.get(b), iab = ids.get(a + b);
      if (ia === undefined || ib === undefined || iab === undefined) return null;
      rank.set(ia * vocabSize + ib, r);
      merged[r] = iab;
    }
    return { v: vocabSize, rank, merged, byteIds };
  }

  /** {@link ByteLevelEncoder.#merge} on ids: the word's UTF-8 bytes, merged by rank. */
  #mergeIds(word: string): number[] {
    const m = this.#idMerges!;
    const bytes = UTF8.encode(word);
    const parts: number[] = new Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) parts[i] = m.byteIds[bytes[i]];
    while (parts.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i + 1 < parts.length; i++) {
        const r = m.rank.get(parts[i] * m.v + parts[i + 1]);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      parts.splice(best, 2, m.merged[bestRank]);
    }
    return parts;
  }

  /**
   * Byte-level BPE of one word, as the library's heap does it: repeatedly merge the adjacent pair
   * of lowest rank, the leftmost among equal ranks, one occurrence at a time.
   */
  #merge(word: string): string[] {
    const parts = Array.from(word);
    const ranks = this.#ranks;
    while (parts.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i + 1 < parts.length; i++) {
        const r = ranks.get(parts[i] + " " + parts[i + 1]);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      parts.splice(best, 2, parts[best] + parts[best + 1]);
    }
    return parts;
  }
}

/**
 * Cut positions of `raw` mapped into its NFC form, by normalizing the pieces between cuts
 * separately; valid when that equals normalizing the whole (no composition across a cut).
 */
function normalizedCuts(raw: string, normalized: string, cuts: number[]): number[] {
  const out: number[] = [];
  let prev = 0;
  let acc = "";
  for (const c of cuts) {
    acc += raw.slice(prev, c).normalize("NFC");
    out.push(acc.length);
    prev = c;
  }
  acc += raw.slice(prev).normalize("NFC");
  if (acc !== normalized) {
    throw new BoundaryError("Unicode normalization (NFC) composes characters across a turn boundary");
  }
  return out;
}

/** The library itself, for tokenizers the fast path does not cover; see the module doc. */
export class LibraryEncoder implements Encoder {
  readonly fast = false;
  #tok: Tokenizer;

  constructor(loaded: LoadedTokenizer) {
    this.#tok = loaded.tokenizer;
  }

  encode(text: string, cuts: readonly number[] = []): Encoded {
    const ids = this.#ids(text);
    const cutTokens = cuts.map((c) => {
      if (c <= 0) return 0;
      if (c >= text.length) return ids.length;
      const prefix = this.#ids(text.slice(0, c));
      for (let i = 0; i < prefix.length; i++) {
        if (prefix[i] !== ids[i]) {
          throw new BoundaryError(
            `the tokenizer merges characters across position ${c} (the text before it does not ` +
              `tokenize to a prefix of the whole text's tokens)`,
          );
        }
      }
      return prefix.length;
    });
    return { ids, cutTokens, cutInside: cuts.map(() => false) };
  }

  #ids(text: string): number[] {
    return text.length === 0 ? [] : this.#tok.encode(text, { add_special_tokens: false }).ids;
  }
}

/** The fastest exact encoder for a tokenizer. */
export function makeEncoder(loaded: LoadedTokenizer): Encoder {
  return fastPathUnsupported(loaded) === null ? new ByteLevelEncoder(loaded) : new LibraryEncoder(loaded);
}

/** Wraps a {@link BoundaryError} as a user-facing error for a row. */
export function boundaryFailure(error: BoundaryError, where: string): LatheError {
  return new LatheError(`Cannot compute the loss mask of ${where}: ${error.message}`, {
    hint: "the assistant turn must start and end on token boundaries; a chat_template override " +
      "that separates turns with special tokens avoids this",
  });
}
