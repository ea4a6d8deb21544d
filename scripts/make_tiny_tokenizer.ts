/**
 * Trains the demo's tiny byte-level BPE tokenizer (vocab 512) on the demo SFT chats and writes
 * it as a Hugging Face tokenizer directory:
 *
 * ```
 * deno run -A scripts/make_tiny_tokenizer.ts [--data data/demo/sft.jsonl] [--out data/demo/tokenizer]
 * ```
 *
 * Training: every message content and role name is split with the GPT-2 pre-tokenizer pattern
 * (what a `ByteLevel` pre-tokenizer with `use_regex: true` applies), mapped to byte-level
 * characters, and BPE merges are learned greedily: the most frequent adjacent pair (ties
 * broken by the pair's text, so the result is deterministic) is merged, until the vocabulary
 * holds 256 byte tokens + merges + 3 special tokens = 512 ids.
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { writeFileAtomic } from "../foundation/atomic.ts";
import { LatheError, runMain } from "../foundation/errors.ts";
import { byteLevel, bytesToUnicode } from "../steps/tokenize/encoder.ts";
import { CHATML_TEMPLATE } from "../steps/tokenize/chat.ts";

/** Total ids, special tokens included. */
export const VOCAB_SIZE = 512;
/** Special tokens, appended after the BPE vocabulary in this order. */
export const SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/** GPT-2's pre-tokenizer pattern. */
const GPT2_PATTERN = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/**
 * Learns BPE merges from byte-level word counts until `size` tokens exist (`base` + one new
 * token per merge; a merge whose result already exists adds none). Returns the merges in order.
 */
export function trainBpe(wordCounts: Map<string, number>, base: string[], size: number): [string, string][] {
  const known = new Set(base);
  const words = [...wordCounts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .map(([w, count]) => ({ symbols: Array.from(w), count }));
  const learned: [string, string][] = [];
  while (known.size < size) {
    const pairs = new Map<string, number>();
    for (const { symbols, count } of words) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = symbols[i] + "\u0000" + symbols[i + 1];
        pairs.set(key, (pairs.get(key) ?? 0) + count);
      }
    }
    let best: string | null = null;
    let bestCount = 0;
    for (const [key, count] of pairs) {
      if (count > bestCount || (count === bestCount && best !== null && key < best)) {
        best = key;
        bestCount = count;
      }
    }
    if (best === null || bestCount < 2) break;
    const [a, b] = best.split("\u0000") as [string, string];
    learned.push([a, b]);
    known.add(a + b);
    for (const w of words) {
      const s = w.symbols;
      const out: string[] = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          out.push(a + b);
          i++;
        } else out.push(s[i]);
      }
      w.symbols = out;
    }
  }
  return learned;
}

/** Texts the tokenizer is trained on: every role and content of every chat in a messages JSONL. */
export function corpusOf(jsonl: string, path: string): string[] {
  const texts: string[] = [];
  jsonl.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    let row: { messages?: { role: string; content: string }[] };
    try {
      row = JSON.parse(line);
    } catch {
      throw new LatheError(`Cannot read ${path}:${i + 1}: not valid JSON`);
    }
    for (const m of row.messages ?? []) texts.push(m.role, m.content);
  });
  return texts;
}

/** Builds tokenizer.json and tokenizer_config.json from training texts. */
export function buildTinyTokenizer(texts: string[]): { tokenizerJson: unknown; config: unknown } {
  const counts = new Map<string, number>();
  for (const t of texts) {
    for (const m of t.matchAll(GPT2_PATTERN)) {
      const w = byteLevel(m[0]);
      counts.set(w, (counts.get(w) ?? 0) + 1);
    }
  }
  const base = bytesToUnicode();
  const merges = trainBpe(counts, base, VOCAB_SIZE - SPECIAL_TOKENS.length);
  const ids = new Map<string, number>();
  for (const c of base) ids.set(c, ids.size);
  for (const [a, b] of merges) if (!ids.has(a + b)) ids.set(a + b, ids.size);
  const vocab = Object.fromEntries(ids);
  const first = ids.size;
  const added = SPECIAL_TOKENS.map((content, i) => ({
    id: first + i,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  const tokenizerJson = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  };
  const config = {
    add_bos_token: false,
    add_eos_token: false,
    added_tokens_decoder: Object.fromEntries(added.map(({ id, ...rest }) => [String(id), rest])),
    additional_special_tokens: ["<|im_start|>", "<|im_end|>"],
    bos_token: null,
    chat_template: CHATML_TEMPLATE,
    clean_up_tokenization_spaces: false,
    eos_token: "<|im_end|>",
    model_max_length: 2048,
    pad_token: "<|endoftext|>",
    tokenizer_class: "PreTrainedTokenizerFast",
    unk_token: null,
  };
  return { tokenizerJson, config };
}

if (import.meta.main) {
  await runMain(async () => {
    const { values } = parseArgs({
      args: Deno.args,
      options: {
        data: { type: "string", default: "data/demo/sft.jsonl" },
        out: { type: "string", default: "data/demo/tokenizer" },
      },
    });
    let jsonl: string;
    try {
      jsonl = await Deno.readTextFile(values.data);
    } catch {
      throw new LatheError(`Cannot read "${values.data}": no such file`, {
        hint: "run scripts/make_demo_data.ts first, or pass --data",
      });
    }
    const { tokenizerJson, config } = buildTinyTokenizer(corpusOf(jsonl, values.data));
    await writeFileAtomic(join(values.out, "tokenizer.json"), JSON.stringify(tokenizerJson, null, 2) + "\n");
    await writeFileAtomic(join(values.out, "tokenizer_config.json"), JSON.stringify(config, null, 2) + "\n");
    console.log(`wrote ${values.out}/tokenizer.json and tokenizer_config.json (${VOCAB_SIZE} ids)`);
  });
}
