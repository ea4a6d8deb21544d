import assert from "node:assert/strict";
import { join } from "node:path";
import { createHash } from "node:crypto";
import {
  percentile,
  readChunks,
  type SplitOptions,
  tokenizeSplit,
} from "../../../steps/tokenize/pipeline.ts";
import { WorkerPool } from "../../../steps/tokenize/pool.ts";
import { ShardReader } from "../../../steps/tokenize/shards.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { DEMO_TOKENIZER, syntheticChats, tokenizer, writeJsonl } from "./_fixtures.ts";

const DOC = {
  kind: "sft" as const,
  trainOn: "completions" as const,
  maxSeqLen: 128,
  overlong: "drop" as const,
};

async function splitOptions(): Promise<SplitOptions> {
  const t = await tokenizer(DEMO_TOKENIZER);
  return {
    split: "train",
    kind: "sft",
    maxSeqLen: 128,
    packing: true,
    shardTokens: 4096,
    chunkChars: 2000,
    meta: {
      vocab_size: t.vocabSize,
      pad_id: t.padId,
      bos_id: t.bosId,
      eos_id: t.eosId,
      special_ids: {},
      tokenizer_sha256: "0".repeat(64),
    },
  };
}

async function hashDir(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for await (const e of Deno.readDir(dir)) {
    out[e.name] = createHash("sha256").update(await Deno.readFile(join(dir, e.name))).digest("hex");
  }
  return out;
}

Deno.test("readChunks cuts whole lines and numbers them", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = join(dir, "x.jsonl");
    const lines = Array.from({ length: 50 }, (_, i) => `{"n":${i},"pad":"${"é".repeat(i % 7)}"}`);
    await Deno.writeTextFile(path, lines.join("\n") + "\n");
    const chunks = [];
    for await (const c of readChunks(path, undefined, 64)) chunks.push(c);
    assert.ok(chunks.length > 5);
    assert.equal(chunks.map((c) => c.text).join(""), lines.join("\n") + "\n");
    for (const c of chunks) {
      assert.ok(c.text.endsWith("\n"));
      assert.equal(JSON.parse(c.text.split("\n")[0]).n, c.firstLine - 1);
      assert.equal(c.file, "x.jsonl");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("percentile uses the nearest rank", () => {
  const v = Uint32Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual([50, 90, 99, 100].map((p) => percentile(v, p)), [5, 9, 10, 10]);
  assert.equal(percentile(new Uint32Array(0), 50), 0);
});

Deno.test("the split is byte-identical with 1 and 2 workers over many chunks", async () => {
  const dir = await Deno.makeTempDir();
  const pools: WorkerPool[] = [];
  try {
    const input = join(dir, "train.jsonl");
    const rows = syntheticChats(400);
    await writeJsonl(input, rows);
    const opts = await splitOptions();
    const hashes = [];
    for (const workers of [1, 2]) {
      const pool = await WorkerPool.start(workers, {
        tokenizerDir: DEMO_TOKENIZER,
        chatTemplate: null,
        doc: DOC,
      });
      pools.push(pool);
      const stats = await tokenizeSplit(pool, input, join(dir, `w${workers}`), opts);
      assert.equal(stats.inputRows, 400);
      assert.equal(stats.index.documents, 400);
      assert.ok(stats.index.shards.length > 1, "several shards");
      hashes.push(await hashDir(join(dir, `w${workers}`)));
    }
    assert.deepEqual(hashes[0], hashes[1]);

    // Every document of the shards is one input chat, in full.
    const t = await tokenizer(DEMO_TOKENIZER);
    const reader = await ShardReader.open(join(dir, "w2", "index.json"));
    const texts: string[] = [];
    for await (const row of reader.rows(true)) {
      assert.equal(row.tokens.length, 128);
      for (let d = 0; d + 1 < row.bounds.length; d++) {
        texts.push(t.tokenizer.decode([...row.tokens.subarray(row.bounds[d], row.bounds[d + 1])]));
      }
      const end = row.bounds[row.bounds.length - 1];
      assert.ok(row.tokens.subarray(end).every((id) => id === t.padId));
      assert.ok(row.mask.subarray(end).every((m) => m === 0));
    }
    const expected = rows.map((r) =>
      r.messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join("")
    );
    assert.deepEqual(texts.sort(), expected.sort());
  } finally {
    for (const p of pools) p.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a bad line fails the split with its file and line", async () => {
  const dir = await Deno.makeTempDir();
  const pool = await WorkerPool.start(2, { tokenizerDir: DEMO_TOKENIZER, chatTemplate: null, doc: DOC });
  try {
    const input = join(dir, "train.jsonl");
    const lines = syntheticChats(60).map((r) => JSON.stringify(r));
    lines[41] = "{not json";
    await Deno.writeTextFile(input, lines.join("\n") + "\n");
    const opts = await splitOptions();
    await assert.rejects(
      () => tokenizeSplit(pool, input, join(dir, "out2"), opts),
      (e: unknown) => e instanceof LatheError && e.message.startsWith("Cannot tokenize train.jsonl:42:"),
    );
    // The pool stays usable after a failed run.
    await Deno.writeTextFile(input, syntheticChats(30).map((r) => JSON.stringify(r)).join("\n"));
    assert.equal((await tokenizeSplit(pool, input, join(dir, "out3"), opts)).inputRows, 30);
  } finally {
    pool.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a tokenizer outside the fast path is loaded by each worker and gives the same shards", async () => {
  const dir = await Deno.makeTempDir();
  const pools: WorkerPool[] = [];
  try {
    // The demo tokenizer with byte_fallback set: the library encodes it (every byte is in its
    // vocabulary, so the ids do not change), the fast path declines it.
    const demo = await tokenizer(DEMO_TOKENIZER);
    const tokDir = join(dir, "tokenizer");
    await Deno.mkdir(tokDir);
    const tj = demo.files.tokenizerJson as { model: Record<string, unknown> };
    await Deno.writeTextFile(
      join(tokDir, "tokenizer.json"),
      JSON.stringify({ ...tj, model: { ...tj.model, byte_fallback: true } }),
    );
    await Deno.writeTextFile(join(tokDir, "tokenizer_config.json"), JSON.stringify(demo.files.config));
    const input = join(dir, "train.jsonl");
    await writeJsonl(input, syntheticChats(60));
    const opts = await splitOptions();
    const hashes = [];
    for (const [tokenizerDir, fast] of [[DEMO_TOKENIZER, true], [tokDir, false]] as const) {
      const pool = await WorkerPool.start(2, { tokenizerDir, chatTemplate: null, doc: DOC });
      pools.push(pool);
      assert.equal(pool.fast, fast);
      const out = join(dir, fast ? "fast" : "library");
      assert.equal((await tokenizeSplit(pool, input, out, opts)).inputRows, 60);
      hashes.push(await hashDir(out));
    }
    assert.deepEqual(hashes[1], hashes[0]);
  } finally {
    for (const p of pools) p.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the pool reports a tokenizer that cannot be loaded, and a bad chat template", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await assert.rejects(
      () => WorkerPool.start(2, { tokenizerDir: dir, chatTemplate: null, doc: DOC }),
      (e: unknown) => e instanceof LatheError && e.message.includes("tokenizer.json"),
    );
    await assert.rejects(
      () => WorkerPool.start(2, { tokenizerDir: DEMO_TOKENIZER, chatTemplate: "{% for %}", doc: DOC }),
      (e: unknown) => e instanceof LatheError && e.message.startsWith("Cannot parse the chat template"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
