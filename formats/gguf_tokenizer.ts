/**
 * A Hugging Face tokenizer as llama.cpp reads it from GGUF metadata (`tokenizer.ggml.*`), written as
 * llama.cpp's `convert_hf_to_gguf.py` writes it (FORMATS.md "GGUF", Tokenizer).
 *
 * Two vocabularies:
 * - **byte-level BPE** (GPT-2, Llama 3, Qwen2; `tokenizer.json` model BPE without byte fallback, a
 *   ByteLevel decoder) → `tokenizer.ggml.model = "gpt2"`: tokens in id order (`[PAD{i}]` for
 *   unused ids up to the model's vocab size), token types (added special tokens — or ones that look
 *   special, `<|…|>` — control, other added tokens user-defined, the rest normal), the merges as
 *   `"a b"` strings, and `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp must apply. The
 *   converter names it from a hash of the tokenizer's output on a test text; here it is named from
 *   the pre-tokenizer's split pattern, which is what that hash identifies: GPT-2's (ByteLevel with
 *   its own regex) → `gpt-2`, Llama 3's → `llama-bpe`, Qwen2's → `qwen2`. Any other pattern is
 *   refused: llama.cpp would split words differently from the model's training.
 * - **SentencePiece-style BPE** (Llama 2, Mistral; BPE with `byte_fallback` and `▁` for spaces) →
 *   `"llama"` with `scores` and types (`<0xNN>` byte tokens 6, `<unk>` 2, special tokens 3). llama.cpp
 *   merges the adjacent pair whose result has the highest score, so each token's score is minus the
 *   rank of the merge that makes it (0 for tokens no merge makes): the same merge order as the
 *   tokenizer's BPE. (The converter's `tokenizer.json`-only path writes −1000 for every token, which
 *   leaves llama.cpp no merge order; with a `tokenizer.model` it copies SentencePiece's scores, which
 *   for a BPE model are that same order.)
 *
 * Both carry the special token ids (`tokenizer_config.json`'s `bos_token` … resolved through the
 * added tokens, else `config.json`'s `*_token_id`), `add_bos_token`/`add_eos_token` as transformers
 * applies them to a text, and the chat template.
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import { gguf, type GgufValue } from "./gguf.ts";

/** llama.cpp token types (`llama_token_type`). */
export const TOKEN_TYPE = { normal: 1, unknown: 2, control: 3, userDefined: 4, unused: 5, byte: 6 } as const;

/** What the tokenizer metadata is made from. */
export interface GgufTokenizerSource {
  /** Parsed `tokenizer.json`. */
  tokenizerJson: Record<string, unknown>;
  /** Parsed `tokenizer_config.json`. */
  tokenizerConfig: Record<string, unknown>;
  /** Parsed `config.json` of the model (fallback special token ids). */
  modelConfig: Record<string, unknown>;
  /** The model's chat template, or null. */
  chatTemplate: string | null;
  /** The model's vocabulary size (rows of the embedding); the token list is padded to it. */
  vocabSize: number;
  /** Whether transformers puts BOS before / EOS after a plain text. */
  addBos: boolean;
  addEos: boolean;
  /** For messages: where the tokenizer came from. */
  where: string;
}

/** Split patterns llama.cpp knows, by its `tokenizer.ggml.pre` name. */
const PRE_PATTERNS: Record<string, string> = {
  "llama-bpe":
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  "qwen2":
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

type Json = Record<string, unknown>;

/** The llama.cpp pre-tokenizer name of a byte-level BPE `pre_tokenizer`. */
export function ggufPreTokenizer(pre: Json | null | undefined, where: string): string {
  const refuse = (what: string) =>
    new LatheError(
      `Cannot export tokenizer "${where}" to GGUF: its pre-tokenizer (${what}) is not one llama.cpp knows`,
      {
        hint:
          `supported: GPT-2's ByteLevel regex (gpt-2), Llama 3's split pattern (llama-bpe), Qwen2's (qwen2)`,
      },
    );
  if (!pre) throw refuse("none");
  if (pre.type === "ByteLevel") {
    if (pre.use_regex === false) throw refuse("ByteLevel without its regex");
    return "gpt-2";
  }
  if (pre.type === "Sequence" && Array.isArray(pre.pretokenizers)) {
    const parts = pre.pretokenizers as Json[];
    const split = parts.find((p) => p.type === "Split");
    const pattern = (split?.pattern as Json | undefined)?.Regex;
    const byteLevel = parts.find((p) => p.type === "ByteLevel");
    if (parts.length === 2 && typeof pattern === "string" && byteLevel && byteLevel.use_regex === false) {
      for (const [name, p] of Object.entries(PRE_PATTERNS)) if (p === pattern) return name;
      throw refuse(`split pattern ${JSON.stringify(pattern).slice(0, 80)}`);
    }
  }
  throw refuse(`type ${String(pre.type)}`);
}

/** True for added tokens llama.cpp's converter treats as control although not marked special. */
function looksSpecial(text: string): boolean {
  return ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].includes(text) ||
    (text.startsWith("<|") && text.endsWith("|>")) || (text.startsWith("<｜") && text.endsWith("｜>")) ||
    (text.startsWith("<unused") && text.endsWith(">"));
}

function tokenString(value: unknown): string | null {
  if (typeof value === "string") return value;
  if (value && typeof value === "object" && typeof (value as Json).content === "string") {
    return (value as { content: string }).content;
  }
  return null;
}

/** Merges as llama.cpp stores them: "a b", a space inside a part written as U+0120 + 256. */
function mergeStrings(merges: unknown[]): string[] {
  return merges.map((m) => {
    if (typeof m === "string") return m;
    if (Array.isArray(m) && m.length === 2) {
      return m.map((part: string) => part.replaceAll(" ", String.fromCharCode(0x20 + 256))).join(" ");
    }
    throw new LatheError(`Cannot export tokenizer merges: entry ${JSON.stringify(m)} is not "a b" or [a, b]`);
  });
}

/**
 * The `tokenizer.ggml.*` metadata (and `tokenizer.chat_template`) of a Hugging Face tokenizer, in
 * the converter's key order.
 */
export function ggufTokenizerMetadata(src: GgufTokenizerSource): [string, GgufValue][] {
  const model = src.tokenizerJson.model as Json | undefined;
  if (!model || model.type !== "BPE") {
    throw new LatheError(
      `Cannot export tokenizer "${src.where}" to GGUF: its model is ${String(model?.type)}, not BPE`,
      {
        hint:
          "GGUF export supports byte-level BPE (Llama 3, Qwen2) and SentencePiece-style BPE (Llama 2, Mistral)",
      },
    );
  }
  const vocab = model.vocab as Record<string, number>;
  const added = (src.tokenizerJson.added_tokens ?? []) as {
    id: number;
    content: string;
    special?: boolean;
  }[];
  const byId = new Map<number, string>();
  for (const [text, id] of Object.entries(vocab)) byId.set(id, text);
  const addedById = new Map<number, { content: string; special: boolean }>();
  for (const t of added) {
    byId.set(t.id, t.content);
    addedById.set(t.id, { content: t.content, special: t.special ?? false });
  }
  for (const id of byId.keys()) {
    if (id >= src.vocabSize) {
      throw new LatheError(
        `Cannot export tokenizer "${src.where}" to GGUF: token id ${id} is beyond the model's vocab_size ${src.vocabSize}`,
        {
          hint: "the tokenizer has tokens the model has no embedding rows for: resize the model's embeddings",
        },
      );
    }
  }
  const byteFallback = model.byte_fallback === true;
  const tokens: string[] = [];
  const types: number[] = [];
  const scores: number[] = [];
  // Score of a token: −(rank of the merge that makes it); tokens no merge makes score 0.
  const rank = new Map<string, number>();
  const merges = mergeStrings((model.merges ?? []) as unknown[]);
  if (byteFallback) {
    for (const [i, m] of merges.entries()) {
      const text = m.replace(" ", "");
      if (!rank.has(text)) rank.set(text, i);
    }
  }
  for (let id = 0; id < src.vocabSize; id++) {
    const text = byId.get(id);
    if (text === undefined) {
      tokens.push(`[PAD${id}]`);
      types.push(TOKEN_TYPE.unused);
      scores.push(-10000);
      continue;
    }
    const a = addedById.get(id);
    if (a && (a.special || looksSpecial(a.content))) {
      types.push(TOKEN_TYPE.control);
      tokens.push(text);
      scores.push(byteFallback ? -1000 : 0);
    } else if (a && !(text in vocab && vocab[text] === id)) {
      types.push(TOKEN_TYPE.userDefined);
      tokens.push(byteFallback ? text.replaceAll("\u2581", " ") : text);
      scores.push(byteFallback ? -1000 : 0);
    } else if (byteFallback && /^<0x[0-9A-Fa-f]{2}>$/.test(text)) {
      types.push(TOKEN_TYPE.byte);
      tokens.push(text);
      scores.push(0);
    } else if (byteFallback && text === model.unk_token) {
      types.push(TOKEN_TYPE.unknown);
      tokens.push(text);
      scores.push(0);
    } else {
      types.push(TOKEN_TYPE.normal);
      tokens.push(text);
      scores.push(byteFallback ? -(rank.get(text) ?? 0) : 0);
    }
  }
  const out: [string, GgufValue][] = [];
  if (byteFallback) {
    out.push(["tokenizer.ggml.model", gguf.str("llama")], ["tokenizer.ggml.pre", gguf.str("default")]);
    out.push(["tokenizer.ggml.tokens", gguf.strings(tokens)]);
    out.push(["tokenizer.ggml.scores", gguf.f32s(scores)]);
    out.push(["tokenizer.ggml.token_type", gguf.i32s(types)]);
  } else {
    const decoder = src.tokenizerJson.decoder as Json | undefined;
    if (decoder?.type !== "ByteLevel") {
      throw new LatheError(
        `Cannot export tokenizer "${src.where}" to GGUF: a BPE without byte fallback must have a ByteLevel decoder (it has ${
          String(decoder?.type)
        })`,
      );
    }
    const pre = ggufPreTokenizer(src.tokenizerJson.pre_tokenizer as Json | null, src.where);
    out.push(["tokenizer.ggml.model", gguf.str("gpt2")], ["tokenizer.ggml.pre", gguf.str(pre)]);
    out.push(["tokenizer.ggml.tokens", gguf.strings(tokens)]);
    out.push(["tokenizer.ggml.token_type", gguf.i32s(types)]);
    out.push(["tokenizer.ggml.merges", gguf.strings(merges)]);
  }
  // Special ids: tokenizer_config's strings through the added tokens first, then config.json's ids.
  const ids = new Map<string, number>();
  for (const kind of ["bos", "eos", "unk", "sep", "pad"]) {
    const s = tokenString(src.tokenizerConfig[`${kind}_token`]);
    const id = s === null ? undefined : added.find((t) => t.content === s)?.id;
    if (id !== undefined && id < src.vocabSize) ids.set(kind, id);
  }
  for (const kind of ["bos", "eos", "unk", "sep", "pad"]) {
    const id = src.modelConfig[`${kind}_token_id`];
    if (!ids.has(kind) && typeof id === "number" && Number.isInteger(id) && id >= 0 && id < src.vocabSize) {
      ids.set(kind, id);
    }
  }
  const keys: Record<string, string> = {
    bos: "bos_token_id",
    eos: "eos_token_id",
    unk: "unknown_token_id",
    sep: "seperator_token_id",
    pad: "padding_token_id",
  };
  for (const [kind, id] of ids) out.push([`tokenizer.ggml.${keys[kind]}`, gguf.u32(id)]);
  out.push(["tokenizer.ggml.add_bos_token", gguf.bool(src.addBos)]);
  out.push(["tokenizer.ggml.add_eos_token", gguf.bool(src.addEos)]);
  if (src.chatTemplate !== null) out.push(["tokenizer.chat_template", gguf.str(src.chatTemplate)]);
  return out;
}
