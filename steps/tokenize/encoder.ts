/**
 * Text -> token ids, with the token index of given character positions ("cuts"), which is
 * how loss masks find the tokens of each assistant turn.
 *
 * Two implementations give identical ids:
 * - {@link ByteLevelEncoder}, the fast path for byte-level BPE tokenizers (GPT-2 style:
 *   Llama 3, Qwen2/2.5/3, Mistral Nemo, lathe's demo tokenizer). It reproduces
 *   `@huggingface/tokenizers`' `encode_text` step by step (split on added tokens, normalize,
 *   pre-tokenize into words) and memoizes word -> ids (word_cache.ts): byte-level BPE of a
 *   pre-tokenized word does not depend on its neighbours, so the memo is exact. Cache misses
 *   run BPE on ids over typed tables built from the library's own vocabulary and merges
 *   (bpe.ts). Tests compare its ids with the library's on several corpora.
 * - {@link LibraryEncoder} for every other tokenizer (SentencePiece-style BPE such as Gemma):
 *   the library encodes the text, and each cut is located by encoding the prefix before it and
 *   checking that its ids are a prefix of the whole text's ids.
 *
 * Neither adds special tokens (BOS/EOS): callers decide, as transformers'
 * `apply_chat_template` (no special tokens added) and `tokenizer(text)` (post-processor) do.
 * @module
 */
import type { Tokenizer } from "@huggingface/tokenizers";
import { LatheError } from "../../foundation/errors.ts";
import {
  bpeMerge,
  buildByteLevelModel,
  type ByteLevelModel,
  byteStringId,
  hashUnits,
  MergeScratch,
  utf8Into,
  utf8Length,
} from "./bpe.ts";
import { type Scanner, scannerFor } from "./pretokenize.ts";
import type { LoadedTokenizer } from "./tokenizer.ts";
import { WORD_CACHE_MAX_UNITS, WordCache } from "./word_cache.ts";

export { byteLevel, bytesToUnicode } from "./bpe.ts";
export type { ByteLevelModel } from "./bpe.ts";

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
  /**
   * {@link Encoder.encode} without building an id array: fills `cutTokens` / `cutInside` (one
   * slot per cut) and returns the ids as a view that stays valid until the next call.
   */
  encodeView(text: string, cuts: readonly number[], cutTokens: number[], cutInside: boolean[]): Int32Array;
}

/** Thrown when a cut cannot be mapped to a token boundary; callers add the row's location. */
export class BoundaryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BoundaryError";
  }
}

// deno-lint-ignore no-explicit-any
type Any = any;

/** How the fast path splits a section into words. */
interface WordSplit {
  /** The library's compiled pattern. */
  pattern: RegExp;
  /** "split": matches and the gaps between them are words (Split, Isolated); "match": only matches. */
  mode: "split" | "match";
}

/** Why the tokenizer's configuration rules the fast path out, or null. */
function configUnsupported(loaded: LoadedTokenizer): string | null {
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
    return { pattern: lib.pattern, mode: "match" };
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
      return { pattern: p, mode: "split" };
    }
  }
  return null;
}

/** Models already built, by tokenizer (building one takes a few hundred ms). */
const models = new WeakMap<LoadedTokenizer, ByteLevelModel | string>();

/**
 * The fast path's tables for a tokenizer (see bpe.ts), or why it does not apply. The tables
 * are shared memory: a worker that receives the model in a message reads the same tables.
 */
export function byteLevelModelOf(loaded: LoadedTokenizer): ByteLevelModel | string {
  let model = models.get(loaded);
  if (model === undefined) {
    model = buildModel(loaded);
    models.set(loaded, model);
  }
  return model;
}

function buildModel(loaded: LoadedTokenizer): ByteLevelModel | string {
  const why = configUnsupported(loaded);
  if (why) return why;
  const tj = loaded.files.tokenizerJson as Any;
  const lib = (loaded.tokenizer as Any).model;
  const tables = buildByteLevelModel(
    tj.model.merges,
    lib.tokens_to_ids,
    lib.vocab,
    tj.model.ignore_merges ?? false,
  );
  if (typeof tables === "string") return tables;
  const split = wordSplitOf(loaded.tokenizer, tj.pre_tokenizer)!;
  return {
    ...tables,
    pattern: { source: split.pattern.source, flags: split.pattern.flags, mode: split.mode },
    nfc: tj.normalizer?.type === "NFC",
    added: loaded.addedTokens.map((t) => ({
      content: t.content,
      id: t.id,
      lstrip: t.lstrip,
      rstrip: t.rstrip,
    })),
  };
}

/**
 * Why the byte-level fast path cannot reproduce this tokenizer exactly, or null when it can.
 * Exposed for tests and the benchmark.
 */
export function fastPathUnsupported(loaded: LoadedTokenizer): string | null {
  const model = byteLevelModelOf(loaded);
  return typeof model === "string" ? model : null;
}

/** An added token as the splitter sees it. */
interface AddedToken {
  content: string;
  id: number;
  lstrip: boolean;
  rstrip: boolean;
}

/** A node of {@link AddedSplitter}'s trie: children by UTF-16 unit, and the token ending here. */
interface TrieNode {
  children: Map<number, TrieNode>;
  token: AddedToken | null;
}

/**
 * Finds added tokens in text as the library's trie does: at the leftmost position where one
 * starts, the longest one starting there (the same content twice: the last one).
 */
class AddedSplitter {
  #root: TrieNode = { children: new Map(), token: null };
  /** Whether a token starts with this UTF-16 unit. */
  #isFirst = new Uint8Array(65536);
  /** The only first unit, when there is one (then `indexOf` finds candidates). */
  #single: string | null = null;

  constructor(tokens: AddedToken[]) {
    for (const t of tokens) {
      if (t.content.length === 0) continue;
      let node = this.#root;
      for (let i = 0; i < t.content.length; i++) {
        const c = t.content.charCodeAt(i);
        let child = node.children.get(c);
        if (child === undefined) node.children.set(c, child = { children: new Map(), token: null });
        node = child;
      }
      node.token = t;
      this.#isFirst[t.content.charCodeAt(0)] = 1;
    }
    if (this.#root.children.size === 1) {
      this.#single = String.fromCharCode([...this.#root.children.keys()][0]);
    }
  }

  get empty(): boolean {
    return this.#root.children.size === 0;
  }

  /** The next added token at or after `from` and where it starts, or null. */
  next(text: string, from: number): { token: AddedToken; at: number } | null {
    let i = from;
    while (i < text.length) {
      if (this.#single !== null) {
        i = text.indexOf(this.#single, i);
        if (i < 0) return null;
      } else if (!this.#isFirst[text.charCodeAt(i)]) {
        i++;
        continue;
      }
      let node: TrieNode | undefined = this.#root;
      let found: AddedToken | null = null;
      for (let j = i; j < text.length; j++) {
        node = node.children.get(text.charCodeAt(j));
        if (node === undefined) break;
        if (node.token !== null) found = node.token;
      }
      if (found !== null) return { token: found, at: i };
      i++;
    }
    return null;
  }
}

/** A piece of the text between added tokens ([start, end)), or an added token. */
interface Section {
  start: number;
  end: number;
  added: AddedToken | null;
}

/** Whitespace as JavaScript's `trimStart` / `trimEnd` see it (what the library strips with). */
function isJsSpace(c: number): boolean {
  return c === 0x20 || (c >= 0x9 && c <= 0xd) || c === 0xa0 || c === 0x1680 || (c >= 0x2000 && c <= 0x200a) ||
    c === 0x2028 || c === 0x2029 || c === 0x202f || c === 0x205f || c === 0x3000 || c === 0xfeff;
}

/** The memoized byte-level BPE fast path; see the module doc. */
export class ByteLevelEncoder implements Encoder {
  readonly fast = true;
  #model: ByteLevelModel;
  /** A hand-written equivalent of the pre-tokenizer pattern, when there is one (pretokenize.ts). */
  #scan: Scanner | null;
  /** The pre-tokenizer pattern, sticky: `test` at a position without allocating a match. */
  #sticky: RegExp;
  /** The same pattern, global: finds the next match when there is none at a position. */
  #global: RegExp;
  #splitMode: boolean;
  #added: AddedSplitter;
  #cache = new WordCache();
  #scratch = new MergeScratch();
  /** A word's bytes, then its token ids. */
  #parts = new Int32Array(1024);
  /** Ids of the text being encoded. */
  #out = new Int32Array(1 << 16);
  #n = 0;
  // The cuts of the section being encoded: cuts[ci..cEnd) are still to resolve; cut i lies at
  // cuts[i] - shift in the section's body, and its results go to cutTokens / cutInside[i + base].
  #cuts: readonly number[] = [];
  #shift = 0;
  #base = 0;
  #ci = 0;
  #cEnd = 0;
  #cutTokens: number[] = [];
  #cutInside: boolean[] = [];

  /** From a loaded tokenizer, or from a model built by {@link byteLevelModelOf} (in another thread). */
  constructor(source: LoadedTokenizer | ByteLevelModel) {
    let model: ByteLevelModel | string;
    if ("tokenizer" in source) model = byteLevelModelOf(source);
    else model = source;
    if (typeof model === "string") throw new Error(`byte-level fast path does not apply: ${model}`);
    this.#model = model;
    const { source: src, flags, mode } = model.pattern;
    this.#scan = scannerFor(src, flags);
    this.#sticky = new RegExp(src, flags.replace("g", "") + "y");
    this.#global = new RegExp(src, flags.includes("g") ? flags : flags + "g");
    this.#splitMode = mode === "split";
    this.#added = new AddedSplitter(model.added);
  }

  encode(text: string, cuts: readonly number[] = []): Encoded {
    const cutTokens = new Array<number>(cuts.length);
    const cutInside = new Array<boolean>(cuts.length).fill(false);
    const view = this.encodeView(text, cuts, cutTokens, cutInside);
    const ids = new Array<number>(view.length);
    for (let i = 0; i < view.length; i++) ids[i] = view[i];
    return { ids, cutTokens, cutInside };
  }

  encodeView(text: string, cuts: readonly number[], cutTokens: number[], cutInside: boolean[]): Int32Array {
    this.#n = 0;
    for (let j = 0; j < cuts.length; j++) cutInside[j] = false;
    let ci = 0;
    for (const s of this.#sections(text)) {
      while (ci < cuts.length && cuts[ci] <= s.start) cutTokens[ci++] = this.#n;
      if (s.added !== null) {
        while (ci < cuts.length && cuts[ci] < s.end) {
          cutInside[ci] = true;
          cutTokens[ci++] = this.#n + 1;
        }
        this.#push(s.added.id);
        continue;
      }
      if (s.end === s.start) continue;
      const first = ci;
      while (ci < cuts.length && cuts[ci] < s.end) ci++;
      // The pattern sees the section alone (its lookarounds end at the section's ends).
      const raw = text.slice(s.start, s.end);
      let body = raw;
      this.#cuts = cuts;
      this.#shift = s.start;
      this.#base = 0;
      this.#ci = first;
      this.#cEnd = ci;
      if (this.#model.nfc) {
        body = raw.normalize("NFC");
        if (body !== raw && ci > first) {
          this.#cuts = normalizedCuts(raw, body, cuts.slice(first, ci).map((c) => c - s.start));
          this.#shift = 0;
          this.#base = first;
          this.#ci = 0;
          this.#cEnd = ci - first;
        }
      }
      this.#cutTokens = cutTokens;
      this.#cutInside = cutInside;
      this.#encodeSection(body);
    }
    while (ci < cuts.length) cutTokens[ci++] = this.#n;
    this.#cutTokens = [];
    this.#cutInside = [];
    return this.#out.subarray(0, this.#n);
  }

  /** Splits text on added tokens; lstrip / rstrip trim the neighbouring text as the library does. */
  #sections(text: string): Section[] {
    const sections: Section[] = [];
    if (this.#added.empty) {
      if (text.length > 0) sections.push({ start: 0, end: text.length, added: null });
      return sections;
    }
    let prev = 0;
    for (let m = this.#added.next(text, 0); m !== null; m = this.#added.next(text, prev)) {
      if (m.at > prev) sections.push({ start: prev, end: m.at, added: null });
      sections.push({ start: m.at, end: m.at + m.token.content.length, added: m.token });
      prev = m.at + m.token.content.length;
    }
    if (prev < text.length) sections.push({ start: prev, end: text.length, added: null });
    for (let i = 0; i < sections.length; i++) {
      const t = sections[i].added;
      if (t === null) continue;
      if (t.lstrip && i > 0 && sections[i - 1].added === null) {
        const p = sections[i - 1];
        while (p.end > p.start && isJsSpace(text.charCodeAt(p.end - 1))) p.end--;
      }
      if (t.rstrip && i < sections.length - 1 && sections[i + 1].added === null) {
        const n = sections[i + 1];
        while (n.start < n.end && isJsSpace(text.charCodeAt(n.start))) n.start++;
      }
    }
    return sections;
  }

  #push(id: number): void {
    if (this.#n === this.#out.length) this.#grow(this.#n + 1);
    this.#out[this.#n++] = id;
  }

  #grow(need: number): void {
    let n = this.#out.length;
    while (n < need) n *= 2;
    const out = new Int32Array(n);
    out.set(this.#out.subarray(0, this.#n));
    this.#out = out;
  }

  /** Pre-tokenizes a section and appends the ids of its words. */
  #encodeSection(body: string): void {
    const to = body.length;
    let pos = 0;
    const scan = this.#scan;
    if (scan !== null) {
      // The scanned patterns match a non-empty word at every position.
      while (pos < to) {
        const end = scan(body, pos);
        this.#word(body, pos, end);
        pos = end;
      }
    } else {
      // Byte-level patterns usually match at every position too, so the sticky test is the
      // whole loop; the global search covers gaps and empty matches as String.matchAll does.
      const sticky = this.#sticky;
      while (pos < to) {
        sticky.lastIndex = pos;
        if (sticky.test(body)) {
          const end = sticky.lastIndex;
          if (end > pos) {
            this.#word(body, pos, end);
            pos = end;
            continue;
          }
        }
        pos = this.#search(body, pos);
      }
    }
    while (this.#ci < this.#cEnd) this.#cutTokens[this.#index(this.#ci++)] = this.#n;
  }

  /** Index in the caller's cut arrays of #cuts[i]. */
  #index(i: number): number {
    return i + this.#base;
  }

  /** Position in the section's body of #cuts[i]. */
  #cutAt(i: number): number {
    return this.#cuts[i] - this.#shift;
  }

  /**
   * From `pos`, where the sticky test found no word: the matches of the global pattern up to and
   * including the next non-empty one, with the gaps before them (words in "split" mode, as the
   * library's `regex_split`; dropped in "match" mode). Returns where to continue.
   */
  #search(body: string, pos: number): number {
    const re = this.#global;
    re.lastIndex = pos;
    let prev = pos;
    while (true) {
      const m = re.exec(body);
      if (m === null) break;
      if (m.index > prev && this.#splitMode) this.#word(body, prev, m.index);
      const end = m.index + m[0].length;
      prev = end;
      if (end > m.index) {
        this.#word(body, m.index, end);
        return end;
      }
      // An empty match: step over one code point, as String.matchAll does.
      const c = body.charCodeAt(end);
      re.lastIndex = end + (re.unicode && c >= 0xd800 && c <= 0xdbff && end + 1 < body.length ? 2 : 1);
    }
    if (body.length > prev && this.#splitMode) this.#word(body, prev, body.length);
    return body.length;
  }

  /** Appends the ids of the word body[from, to), resolving the cuts before and inside it. */
  #word(body: string, from: number, to: number): void {
    const cache = this.#cache;
    let src: Int32Array, start: number, count: number;
    if (to - from <= WORD_CACHE_MAX_UNITS) {
      const h = hashUnits(body, from, to);
      let e = cache.find(body, from, to, h);
      if (e < 0) {
        const n = this.#bpe(body, from, to); // may replace #parts, so first
        e = cache.add(body, from, to, h, this.#parts, n);
      }
      src = cache.ids;
      start = cache.entries[4 * e + 2];
      count = cache.entries[4 * e + 3];
    } else {
      count = this.#bpe(body, from, to);
      src = this.#parts;
      start = 0;
    }
    if (this.#ci < this.#cEnd && this.#cutAt(this.#ci) < to) {
      this.#wordCuts(body, from, to, src, start, count);
    }
    if (this.#n + count > this.#out.length) this.#grow(this.#n + count);
    const out = this.#out;
    let n = this.#n;
    for (let k = 0; k < count; k++) out[n++] = src[start + k];
    this.#n = n;
  }

  /** Token counts of the cuts up to the end of a word (cuts inside it located by UTF-8 bytes). */
  #wordCuts(body: string, from: number, to: number, ids: Int32Array, start: number, count: number): void {
    const tokens = this.#cutTokens, inside = this.#cutInside;
    while (this.#ci < this.#cEnd && this.#cutAt(this.#ci) <= from) tokens[this.#index(this.#ci++)] = this.#n;
    const tokenBytes = this.#model.tokenBytes;
    const total = utf8Length(body, from, to);
    while (this.#ci < this.#cEnd && this.#cutAt(this.#ci) < to) {
      const cutByte = utf8Length(body, from, this.#cutAt(this.#ci));
      // n = tokens starting before the cut; token n - 1 ends where token n starts (or the word ends).
      let n = 0, b = 0;
      while (n < count && b < cutByte) {
        b += count === 1 ? total : tokenBytes[ids[start + n]];
        n++;
      }
      const j = this.#index(this.#ci++);
      inside[j] = b > cutByte;
      tokens[j] = this.#n + n;
    }
  }

  /** BPE of the word body[from, to) into #parts; returns the number of ids. */
  #bpe(body: string, from: number, to: number): number {
    const model = this.#model;
    if (this.#parts.length < 3 * (to - from)) this.#parts = new Int32Array(3 * (to - from) + 64);
    const parts = this.#parts;
    const n = utf8Into(body, from, to, parts);
    if (model.words !== null) {
      const whole = byteStringId(model.words, parts, n);
      if (whole >= 0) {
        parts[0] = whole;
        return 1;
      }
    }
    const byteIds = model.byteIds;
    for (let i = 0; i < n; i++) parts[i] = byteIds[parts[i]];
    return bpeMerge(model.merges, parts, n, this.#scratch);
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

  encodeView(text: string, cuts: readonly number[], cutTokens: number[], cutInside: boolean[]): Int32Array {
    const e = this.encode(text, cuts);
    for (let j = 0; j < cuts.length; j++) {
      cutTokens[j] = e.cutTokens[j];
      cutInside[j] = false;
    }
    return Int32Array.from(e.ids);
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
