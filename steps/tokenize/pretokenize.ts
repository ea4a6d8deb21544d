/**
 * Hand-written scanners for the pre-tokenizer patterns of the common byte-level tokenizers,
 * equivalent to the library's compiled regular expressions: a scanner returns where the match
 * that the regex finds at a position ends, without running the regex engine or allocating.
 * Each of these patterns matches a non-empty word at every position, so the words of a text are
 * the matches taken one after the other from its start.
 *
 * - {@link LLAMA3_PATTERN} (Llama 3, with `\p{N}{1,3}`) and {@link QWEN2_PATTERN} (Qwen2 / 2.5 / 3,
 *   with `\p{N}`), as `@huggingface/tokenizers` rewrites them for JavaScript (`\s` as
 *   `\p{White_Space}`, `(?i:...)` as character classes);
 * - {@link GPT2_PATTERN}, the `ByteLevel` pre-tokenizer's own (GPT-2, RoBERTa, lathe's demo
 *   tokenizer), where `\s` is JavaScript's.
 *
 * Character classes come from the same regex engine (`\p{L}`, `\p{N}`, `\p{White_Space}`, `\s`
 * tested once per UTF-16 unit, astral code points on demand). Tests compare the scanners with
 * the regexes on random text drawn from the characters where the classes differ.
 * @module
 */

/** Llama 3's pattern as the library compiles it (flags "gu"). */
export const LLAMA3_PATTERN = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|" +
  "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\p{White_Space}\\p{L}\\p{N}]+[\\r\\n]*|" +
  "\\p{White_Space}*[\\r\\n]+|\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";
/** Qwen2's pattern (Llama 3's with single digits) as the library compiles it (flags "gu"). */
export const QWEN2_PATTERN = LLAMA3_PATTERN.replace("\\p{N}{1,3}", "\\p{N}");
/** The `ByteLevel` pre-tokenizer's pattern (flags "gu"). */
export const GPT2_PATTERN =
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/** Returns the end (> pos) of the word that starts at `pos` (< text.length). */
export type Scanner = (text: string, pos: number) => number;

/** Class bits of a code point. */
const LETTER = 1, NUMBER = 2, SPACE = 4, JS_SPACE = 8;

let bmp: Uint8Array | null = null;
const astral = new Map<number, number>();
const RE_L = /\p{L}/u, RE_N = /\p{N}/u, RE_WS = /\p{White_Space}/u, RE_JS = /\s/u;

function classify(s: string): number {
  return (RE_L.test(s) ? LETTER : 0) | (RE_N.test(s) ? NUMBER : 0) | (RE_WS.test(s) ? SPACE : 0) |
    (RE_JS.test(s) ? JS_SPACE : 0);
}

/** Class bits of every BMP code unit (surrogates 0: alone they are neither letters nor spaces). */
function bmpClasses(): Uint8Array {
  if (bmp === null) {
    bmp = new Uint8Array(65536);
    for (let c = 0; c < 65536; c++) if (c < 0xd800 || c > 0xdfff) bmp[c] = classify(String.fromCharCode(c));
  }
  return bmp;
}

function astralClass(cp: number): number {
  let k = astral.get(cp);
  if (k === undefined) {
    k = classify(String.fromCodePoint(cp));
    astral.set(cp, k);
  }
  return k;
}

/**
 * The code point at text[i]: its class bits, plus 16 when it takes two units (a surrogate
 * pair). A lone surrogate is a code point of its own with no class, as in a /u regex.
 */
function classAt(table: Uint8Array, text: string, i: number): number {
  const c = text.charCodeAt(i);
  if (c < 0xd800 || c > 0xdbff) return table[c];
  const d = i + 1 < text.length ? text.charCodeAt(i + 1) : 0;
  if (d < 0xdc00 || d > 0xdfff) return 0;
  return astralClass(0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00)) | 16;
}

/** Code units of the code point whose {@link classAt} is `k`. */
const width = (k: number): number => (k & 16 ? 2 : 1);

/** End of the run of code points having `bit` that starts at `i`. */
function runEnd(table: Uint8Array, text: string, i: number, bit: number): number {
  while (i < text.length) {
    const k = classAt(table, text, i);
    if (!(k & bit)) break;
    i += width(k);
  }
  return i;
}

/** End of the run of code points having none of `bits` that starts at `i`. */
function runEndWithout(table: Uint8Array, text: string, i: number, bits: number): number {
  while (i < text.length) {
    const k = classAt(table, text, i);
    if (k & bits) break;
    i += width(k);
  }
  return i;
}

const lower = (c: number): number => c | 0x20;
const isCrLf = (c: number): boolean => c === 0x0a || c === 0x0d;

/** End of a contraction ('s 't 're 've 'm 'll 'd) at `p`, or -1; `fold`: either case per letter. */
function contraction(text: string, p: number, fold: boolean): number {
  if (text.charCodeAt(p) !== 0x27 || p + 1 >= text.length) return -1;
  const f = (c: number) => (fold ? lower(c) : c);
  const a = f(text.charCodeAt(p + 1));
  if (a === 0x73 || a === 0x74 || a === 0x6d || a === 0x64) return p + 2; // s t m d
  if (p + 2 >= text.length) return -1;
  const b = f(text.charCodeAt(p + 2));
  if ((a === 0x72 && b === 0x65) || (a === 0x76 && b === 0x65) || (a === 0x6c && b === 0x6c)) return p + 3; // re ve ll
  return -1;
}

/** Scanner of the Llama 3 / Qwen2 patterns; `maxDigits`: 3 or 1. */
function llamaScanner(maxDigits: number): Scanner {
  const table = bmpClasses();
  const WORDY = LETTER | NUMBER | SPACE;
  return (text, p) => {
    const len = text.length;
    // '(?i:s|t|re|ve|m|ll|d)
    const c = text.charCodeAt(p);
    if (c === 0x27) {
      const end = contraction(text, p, true);
      if (end > 0) return end;
    }
    const k = classAt(table, text, p);
    const q = p + width(k);
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (k & LETTER) return runEnd(table, text, q, LETTER);
    if (!(k & NUMBER) && !isCrLf(c) && q < len && classAt(table, text, q) & LETTER) {
      return runEnd(table, text, q, LETTER);
    }
    // \p{N}{1,maxDigits}
    if (k & NUMBER) {
      let end = q;
      for (let n = 1; n < maxDigits && end < len; n++) {
        const kn = classAt(table, text, end);
        if (!(kn & NUMBER)) break;
        end += width(kn);
      }
      return end;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    let from = -1;
    if (!(k & WORDY)) from = p;
    else if (c === 0x20 && q < len && !(classAt(table, text, q) & WORDY)) from = q;
    if (from >= 0) {
      let end = runEndWithout(table, text, from, WORDY);
      while (end < len && isCrLf(text.charCodeAt(end))) end++;
      return end;
    }
    // Here text[p] is whitespace. \s*[\r\n]+ ends after the run's last CR / LF; then
    // \s+(?!\S) leaves out the run's last space unless the text ends; then \s+.
    const end = runEnd(table, text, p, SPACE);
    for (let i = end - 1; i >= p; i--) if (isCrLf(text.charCodeAt(i))) return i + 1;
    if (end === len || end - p < 2) return end;
    return end - 1;
  };
}

/** Scanner of the GPT-2 `ByteLevel` pattern. */
function gpt2Scanner(): Scanner {
  const table = bmpClasses();
  const WORDY = LETTER | NUMBER | JS_SPACE;
  return (text, p) => {
    const len = text.length;
    const c = text.charCodeAt(p);
    if (c === 0x27) {
      const end = contraction(text, p, false);
      if (end > 0) return end;
    }
    const k = classAt(table, text, p);
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': the optional space belongs to the run after it.
    let from = p, kind = k;
    if (c === 0x20 && p + 1 < len) {
      const next = classAt(table, text, p + 1);
      if (next & LETTER || next & NUMBER || !(next & WORDY)) {
        from = p + 1;
        kind = next;
      }
    }
    if (kind & LETTER) return runEnd(table, text, from, LETTER);
    if (kind & NUMBER) return runEnd(table, text, from, NUMBER);
    if (!(kind & WORDY)) return runEndWithout(table, text, from, WORDY);
    // Here text[p] is whitespace: \s+(?!\S) leaves out the run's last space unless the text ends; then \s+.
    const end = runEnd(table, text, p, JS_SPACE);
    if (end === len || end - p < 2) return end;
    return end - 1;
  };
}

/** A scanner equivalent to the regex `source` with `flags`, or null when none is known. */
export function scannerFor(source: string, flags: string): Scanner | null {
  if (flags !== "gu" && flags !== "ug") return null;
  if (source === LLAMA3_PATTERN) return llamaScanner(3);
  if (source === QWEN2_PATTERN) return llamaScanner(1);
  if (source === GPT2_PATTERN) return gpt2Scanner();
  return null;
}
