/**
 * `tokenize.add_special_tokens`. The expected files and ids are what transformers 4.57.6 (tokenizers
 * 0.22.2) gives for `tok.add_special_tokens({"additional_special_tokens": [...]},
 * replace_additional_special_tokens=False)`, `tok.save_pretrained(dir)` and
 * `tok(text, add_special_tokens=False)` on the same tokenizers.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../../foundation/errors.ts";
import { runStep } from "../../../steps/runner.ts";
import { step } from "../../../steps/tokenize.ts";
import { ChatRenderer } from "../../../steps/tokenize/chat.ts";
import { DocumentBuilder } from "../../../steps/tokenize/documents.ts";
import {
  ByteLevelEncoder,
  type Encoder,
  fastPathUnsupported,
  LibraryEncoder,
} from "../../../steps/tokenize/encoder.ts";
import { ShardReader, type ShardRow } from "../../../steps/tokenize/shards.ts";
import { addSpecialTokens, type SpecialTokensAdded } from "../../../steps/tokenize/special_tokens.ts";
import {
  buildTokenizer,
  loadTokenizer,
  readTokenizerFiles,
  type TokenizerFiles,
  tokenizerSources,
  writeTokenizerFiles,
} from "../../../steps/tokenize/tokenizer.ts";
import { DEMO_TOKENIZER, fakePrepare, lenmlDir, ROOT, writeJsonl } from "./_fixtures.ts";

/** An added token as transformers writes it into tokenizer.json (field order included). */
const inJson = (id: number, content: string) => ({
  id,
  content,
  single_word: false,
  lstrip: false,
  rstrip: false,
  normalized: false,
  special: true,
});
/** The same token in tokenizer_config.json `added_tokens_decoder` (keys sorted, as transformers writes them). */
const inConfig = (content: string) => ({
  content,
  lstrip: false,
  normalized: false,
  rstrip: false,
  single_word: false,
  special: true,
});

type Raw = Record<string, unknown>;

/** tokenizer.json added tokens and added_tokens_decoder entries that differ from the source's. */
function changes(before: TokenizerFiles, after: TokenizerFiles) {
  const was = new Set((before.tokenizerJson.added_tokens as Raw[]).map((t) => JSON.stringify(t)));
  const decoder = (before.config.added_tokens_decoder ?? {}) as Raw;
  return {
    added: (after.tokenizerJson.added_tokens as Raw[]).filter((t) => !was.has(JSON.stringify(t))),
    decoder: Object.fromEntries(
      Object.entries(after.config.added_tokens_decoder as Raw).filter(([id, t]) =>
        JSON.stringify(decoder[id]) !== JSON.stringify(t)
      ),
    ),
  };
}

/** Checks ids and key order of the changed entries against transformers' files. */
function assertWrittenAsTransformers(
  before: TokenizerFiles,
  r: SpecialTokensAdded,
  expected: { added: [number, string][]; list: string[]; counts: [number, number] },
): void {
  const c = changes(before, r.files);
  assert.deepEqual(c.added, expected.added.map(([id, s]) => inJson(id, s)));
  for (const t of c.added) {
    assert.deepEqual(Object.keys(t), Object.keys(inJson(0, "")), "tokenizer.json field order");
  }
  assert.deepEqual(c.decoder, Object.fromEntries(expected.added.map(([id, s]) => [String(id), inConfig(s)])));
  for (const t of Object.values(c.decoder)) {
    assert.deepEqual(Object.keys(t as Raw), Object.keys(inConfig("")));
  }
  assert.deepEqual(r.files.config.additional_special_tokens, expected.list);
  const ids = (r.files.tokenizerJson.added_tokens as Raw[]).map((t) => Number(t.id));
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b), "added tokens sorted by id");
  assert.deepEqual(
    [ids.length, Object.keys(r.files.config.added_tokens_decoder as Raw).length],
    expected.counts,
  );
}

/** Both encoders where the fast path applies, else the library's. */
function encoders(files: TokenizerFiles): { loaded: ReturnType<typeof buildTokenizer>; encoders: Encoder[] } {
  const loaded = buildTokenizer(files, "test");
  const list: Encoder[] = [new LibraryEncoder(loaded)];
  if (fastPathUnsupported(loaded) === null) list.push(new ByteLevelEncoder(loaded));
  return { loaded, encoders: list };
}

function assertEncodes(encs: Encoder[], cases: [string, number[]][]): void {
  for (const e of encs) {
    for (const [text, ids] of cases) {
      assert.deepEqual(e.encode(text).ids, ids, `${e.fast ? "fast" : "library"}: ${JSON.stringify(text)}`);
    }
  }
}

const CALL = '<|im_start|>assistant\nCall <tool_call>{"a": 1}</tool_call><|im_end|>\n';

Deno.test("add_special_tokens on the demo tokenizer gives ids 512 and 513, written as transformers writes them", async () => {
  const before = await readTokenizerFiles(DEMO_TOKENIZER);
  const snapshot = JSON.stringify(before);
  const r = addSpecialTokens(before, ["<tool_call>", "<|think|>", "<|im_end|>"]);
  assert.deepEqual(r.newTokens, [{ content: "<tool_call>", id: 512 }, { content: "<|think|>", id: 513 }]);
  assert.deepEqual(
    r.presentTokens,
    [{ content: "<|im_end|>", id: 511 }],
    "an existing token is not added again",
  );
  assert.deepEqual([r.baseVocabSize, r.vocabSize], [512, 514]);
  assertWrittenAsTransformers(before, r, {
    added: [[512, "<tool_call>"], [513, "<|think|>"]],
    list: ["<|im_start|>", "<|im_end|>", "<tool_call>", "<|think|>"],
    counts: [5, 5],
  });
  assert.equal(JSON.stringify(before), snapshot, "the given files are not modified");

  const { loaded, encoders: encs } = encoders(r.files);
  assert.equal(encs.length, 2, "the fast path still applies");
  assert.equal(loaded.vocabSize, 514);
  assertEncodes(encs, [
    ["x<tool_call>y", [120, 512, 121]],
    [" <tool_call> ", [32, 512, 32]],
    ["<tool_call><tool_call>", [512, 512]],
    ["<|think|>\nHello world", [513, 10, 72, 303, 305, 321, 263, 108, 100]],
    ["Hello <tool_call>world<|think|>", [72, 303, 305, 32, 512, 119, 263, 108, 100, 513]],
    [CALL, [
      510,
      295,
      10,
      67,
      97,
      108,
      108,
      32,
      512,
      297,
      97,
      256,
      322,
      125,
      60,
      47,
      336,
      111,
      108,
      95,
      99,
      97,
      108,
      108,
      62,
      511,
      10,
    ]],
  ]);
});

Deno.test("add_special_tokens marks a string the tokenizer has special and keeps its id", async () => {
  const before = await readTokenizerFiles(DEMO_TOKENIZER);
  // "<|endoftext|>": an identical added token, only listed; "quantity": a model vocabulary entry.
  const r = addSpecialTokens(before, ["<|endoftext|>", "quantity", "<tool_call>"]);
  assert.deepEqual(r.newTokens, [{ content: "<tool_call>", id: 512 }]);
  assert.deepEqual(r.presentTokens, [{ content: "<|endoftext|>", id: 509 }, {
    content: "quantity",
    id: 279,
  }]);
  assertWrittenAsTransformers(before, r, {
    added: [[279, "quantity"], [512, "<tool_call>"]],
    list: ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "quantity", "<tool_call>"],
    counts: [5, 5],
  });
  const { encoders: encs } = encoders(r.files);
  assertEncodes(encs, [
    ['{"quantity": 3, "item": "mug"}', [297, 279, 256, 32, 51, 44, 32, 34, 283, 256, 32, 34, 402, 34, 125]],
    ["Othello's quantity<|im_end|>", [79, 332, 303, 305, 39, 115, 32, 279, 511]],
    ["<|think|>", [60, 124, 332, 310, 107, 124, 62]],
  ]);
});

Deno.test("add_special_tokens on Gemma 3 (byte-fallback BPE, the library encoder)", async () => {
  const before = await readTokenizerFiles(lenmlDir("gemma3"));
  // "<unused6240>" is an added token that is not special; "<end_of_turn>" an identical one.
  const r = addSpecialTokens(before, ["<tool_call>", "<|think|>", "<unused6240>", "<end_of_turn>"]);
  assert.deepEqual(r.newTokens, [{ content: "<tool_call>", id: 262145 }, {
    content: "<|think|>",
    id: 262146,
  }]);
  assert.deepEqual(r.presentTokens, [{ content: "<unused6240>", id: 262142 }, {
    content: "<end_of_turn>",
    id: 106,
  }]);
  assert.deepEqual([r.baseVocabSize, r.vocabSize], [262145, 262147]);
  assertWrittenAsTransformers(before, r, {
    added: [[262142, "<unused6240>"], [262145, "<tool_call>"], [262146, "<|think|>"]],
    list: ["<tool_call>", "<|think|>", "<unused6240>", "<end_of_turn>"],
    counts: [6417, 6417],
  });
  const { loaded, encoders: encs } = encoders(r.files);
  assert.equal(fastPathUnsupported(loaded), "byte_fallback BPE");
  assertEncodes(encs, [
    ["x<tool_call>y", [236781, 262145, 236762]],
    [" <tool_call> ", [236743, 262145, 236743]],
    ["<|think|>\nHello world", [262146, 107, 9259, 1902]],
    ["Hello <tool_call>world<|think|>", [9259, 236743, 262145, 12392, 262146]],
    ["<unused6240> x<unused6240>", [262142, 1123, 262142]],
  ]);
});

Deno.test("a special token in the assistant's text is one token and does not end its turn", async () => {
  const r = addSpecialTokens(await readTokenizerFiles(DEMO_TOKENIZER), ["<tool_call>", "<|think|>"]);
  const { loaded, encoders: encs } = encoders(r.files);
  const answer = '<|think|>Weather.<tool_call>{"name": "weather"}';
  const messages = [{ role: "user", content: "Weather <tool_call>?" }, {
    role: "assistant",
    content: answer,
  }];
  for (const enc of encs) {
    const doc = (kind: "sft" | "text") =>
      new DocumentBuilder(loaded, enc, new ChatRenderer(loaded), {
        kind,
        trainOn: "completions",
        maxSeqLen: 512,
        overlong: "drop",
      });
    const chat = doc("sft").sft(messages, "row 1");
    assert.equal(chat.ids.filter((id) => id === 512).length, 2, "<tool_call> in user and assistant text");
    // Trained: the whole answer and the end of turn, not only up to <tool_call>.
    const trained = chat.ids.filter((_, i) => chat.mask[i] === 1);
    assert.deepEqual(trained, enc.encode(answer + "<|im_end|>\n").ids);
    assert.deepEqual(trained.slice(0, 1), [513]);
    const text = doc("text").text("Use <tool_call> now");
    assert.deepEqual(text.ids, [...enc.encode("Use ").ids, 512, ...enc.encode(" now").ids, 511]);
  }
});

Deno.test("add_special_tokens rejects empty strings, repeats and a colliding id, naming the key", async () => {
  const files = await readTokenizerFiles(DEMO_TOKENIZER);
  const names = (pattern: RegExp) => (e: unknown) => e instanceof LatheError && pattern.test(e.message);
  assert.throws(
    () => addSpecialTokens(files, ["<a>", ""]),
    names(/tokenize\.add_special_tokens\[1\]: an empty string cannot be a token/),
  );
  assert.throws(
    () => addSpecialTokens(files, ["<a>", "<b>", "<a>"]),
    names(/tokenize\.add_special_tokens\[2\]: "<a>" is listed twice \(entries 0 and 2\)/),
  );
  // A model vocabulary with a gap: the library's next id (its entry count, 2) is taken.
  const gappy: TokenizerFiles = {
    ...files,
    tokenizerJson: {
      ...files.tokenizerJson,
      added_tokens: [],
      model: { type: "BPE", vocab: { a: 0, b: 2 }, merges: [] },
    },
  };
  assert.throws(
    () => addSpecialTokens(gappy, ["<x>"]),
    names(/"<x>" \(tokenize\.add_special_tokens\): its id would be 2/),
  );
});

/** Runs the fake prepare on `rows`, then tokenize with `config`; returns the run's directory. */
async function tokenizeRun(dir: string, runId: string, rows: unknown[], config: Record<string, unknown>) {
  const runs = join(dir, "runs");
  const common = { runsRoot: runs, runId, recipe: null, seed: 1, projectRoot: ROOT, quiet: true };
  await writeJsonl(join(dir, "train.jsonl"), rows);
  await runStep(fakePrepare, { ...common, config: { train: join(dir, "train.jsonl"), kind: "sft" } });
  return { out: await runStep(step, { ...common, config }), stepDir: join(runs, runId, "tokenize") };
}

Deno.test("the tokenize step writes the run's tokenizer and new ids, and encodes them in the shards", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // The demo tokenizer with byte_fallback set: the same ids through the library encoder.
    const demo = await readTokenizerFiles(DEMO_TOKENIZER);
    const fallback = join(dir, "fallback");
    await Deno.mkdir(fallback);
    const model = demo.tokenizerJson.model as Raw;
    await Deno.writeTextFile(
      join(fallback, "tokenizer.json"),
      JSON.stringify({ ...demo.tokenizerJson, model: { ...model, byte_fallback: true } }),
    );
    await Deno.writeTextFile(join(fallback, "tokenizer_config.json"), JSON.stringify(demo.config));
    const rows = Array.from({ length: 12 }, (_, i) => ({
      messages: [
        { role: "user", content: `Order ${i}?` },
        { role: "assistant", content: `<|think|>ok<tool_call>{"order": ${i}}` },
      ],
    }));
    const tokens: number[][] = [];
    for (
      const [runId, tokenizer, fast] of [["fast", DEMO_TOKENIZER, true], [
        "library",
        fallback,
        false,
      ]] as const
    ) {
      const { out, stepDir } = await tokenizeRun(join(dir), runId, rows, {
        tokenizer,
        max_seq_len: 64,
        workers: 2,
        add_special_tokens: ["<tool_call>", "<|think|>", "<|im_end|>"],
      });
      const m = out.manifest;
      assert.equal(m.metrics.fast_path, fast);
      assert.deepEqual([m.metrics.vocab_size, m.metrics.new_token_count], [514, 2]);
      for (const name of ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "new_tokens"]) {
        assert.ok(name in m.outputs, name);
      }
      assert.deepEqual(JSON.parse(await Deno.readTextFile(join(stepDir, m.outputs.new_tokens.path))), {
        vocab_size: 514,
        base_vocab_size: 512,
        new_tokens: [{ content: "<tool_call>", id: 512 }, { content: "<|think|>", id: 513 }],
        present_tokens: [{ content: "<|im_end|>", id: 511 }],
      });
      const written = await readTokenizerFiles(join(stepDir, "tokenizer"));
      const source = await readTokenizerFiles(tokenizer);
      assert.deepEqual(written, addSpecialTokens(source, ["<tool_call>", "<|think|>", "<|im_end|>"]).files);
      assert.equal((await loadTokenizer(join(stepDir, "tokenizer"))).vocabSize, 514);
      const reader = await ShardReader.open(join(stepDir, "train", "index.json"));
      assert.equal(reader.index.vocab_size, 514);
      assert.equal(reader.index.special_ids["<tool_call>"], 512);
      const all: number[] = [];
      for await (const row of reader.rows() as AsyncIterable<ShardRow>) {
        all.push(...row.tokens);
        // Every <tool_call> is trained (it is inside the assistant's answer).
        row.tokens.forEach((id, i) => id === 512 && assert.equal(row.mask[i], 1));
      }
      assert.equal(all.filter((id) => id === 512).length, 12);
      assert.equal(all.filter((id) => id === 513).length, 12);
      tokens.push(all);
    }
    assert.deepEqual(tokens[1], tokens[0], "the library encoder gives the fast path's ids");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the tokenize config rejects a bad add_special_tokens list, naming the entry", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (
      const [list, pattern] of [
        [["<a>", ""], /tokenize\.add_special_tokens\.1: an empty string cannot be a token/],
        [["<a>", "<a>"], /tokenize\.add_special_tokens\.1: "<a>" is listed twice/],
      ] as const
    ) {
      await assert.rejects(
        () => tokenizeRun(dir, "bad", [], { tokenizer: "data/demo/tokenizer", add_special_tokens: list }),
        (e: unknown) => e instanceof LatheError && pattern.test(e.message),
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("writeTokenizerFiles() writes a directory that reads back the same, chat_template.jinja included", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const r = addSpecialTokens(await readTokenizerFiles(DEMO_TOKENIZER), ["<tool_call>"]);
    const files = { ...r.files, chatTemplateFile: "{{ messages[0]['content'] }}" };
    const paths = await writeTokenizerFiles(dir, files);
    assert.deepEqual(paths, await tokenizerSources(dir));
    assert.deepEqual(await readTokenizerFiles(dir), files);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
