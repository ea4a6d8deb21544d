import assert from "node:assert/strict";
import { join } from "node:path";
import {
  docStarts,
  documentIds,
  type IndexMeta,
  positions,
  ShardReader,
  ShardWriter,
} from "../../../steps/tokenize/shards.ts";
import { LatheError } from "../../../foundation/errors.ts";

const META = (vocab: number): Omit<IndexMeta, "split"> & { split: string } => ({
  split: "train",
  kind: "sft",
  vocab_size: vocab,
  seq_len: 8,
  packed: true,
  paired: false,
  pad_id: 0,
  bos_id: null,
  eos_id: 7,
  special_ids: { eos_token: 7 },
  tokenizer_sha256: "a".repeat(64),
});

const ROWS = [
  { tokens: [5, 6, 7, 9, 9, 7, 0, 0], mask: [0, 1, 1, 0, 1, 1, 0, 0], bounds: [0, 3, 6] },
  { tokens: [1, 2, 3, 4, 5, 6, 7, 8], mask: [0, 1, 1, 1, 1, 1, 1, 1], bounds: [0, 8] },
  { tokens: [70000, 3, 0, 0, 0, 0, 0, 0], mask: [0, 1, 0, 0, 0, 0, 0, 0], bounds: [0, 2] },
];

async function roundTrip(vocab: number, shardTokens: number) {
  const dir = await Deno.makeTempDir();
  try {
    const w = new ShardWriter(dir, vocab, shardTokens);
    const rows = vocab <= 65536 ? ROWS.slice(0, 2) : ROWS;
    for (const r of rows) await w.add(r.tokens, Uint8Array.from(r.mask), r.bounds);
    const index = await w.finish(META(vocab));
    const reader = await ShardReader.open(join(dir, "index.json"));
    const back = [];
    for await (const row of reader.rows(true)) back.push(row);
    return { index, reader, rows, back };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("shards round-trip through the reader (uint16, one shard)", async () => {
  const { index, back, rows } = await roundTrip(512, 1 << 20);
  assert.equal(index.dtype, "uint16");
  assert.deepEqual([index.rows, index.tokens, index.content_tokens, index.documents], [2, 16, 14, 3]);
  assert.equal(index.trained_tokens, 11);
  assert.equal(index.shards.length, 1);
  assert.deepEqual(back.map((r) => [...r.tokens]), rows.map((r) => r.tokens));
  assert.deepEqual(back.map((r) => [...r.mask]), rows.map((r) => r.mask));
  assert.deepEqual(back.map((r) => [...r.bounds]), rows.map((r) => r.bounds));
  assert.deepEqual(docStarts(back[0]), [0, 3]);
  assert.deepEqual([...positions(back[0])], [0, 1, 2, 0, 1, 2, 0, 0]);
  assert.deepEqual([...documentIds(back[0])], [0, 0, 0, 1, 1, 1, -1, -1]);
});

Deno.test("shards use uint32 above 65536 ids and split between rows", async () => {
  const { index, back, rows } = await roundTrip(70001, 16);
  assert.equal(index.dtype, "uint32");
  assert.deepEqual(index.shards.map((s) => [s.row_start, s.rows, s.num_tokens]), [[0, 2, 16], [2, 1, 8]]);
  assert.deepEqual(back.map((r) => r.index), [0, 1, 2]);
  assert.deepEqual(back.map((r) => [...r.tokens]), rows.map((r) => r.tokens));
  assert.equal(back[2].tokens[0], 70000);
});

Deno.test("the shard files are little-endian as docs/shards.md specifies", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const w = new ShardWriter(dir, 512, 1 << 20);
    await w.add([0x0102, 3], Uint8Array.from([0, 1]), [0, 2]);
    await w.finish(META(512));
    assert.deepEqual([...await Deno.readFile(join(dir, "tokens-00000.bin"))], [0x02, 0x01, 3, 0]);
    assert.deepEqual([...await Deno.readFile(join(dir, "mask-00000.bin"))], [0, 1]);
    // row_ptr [0, 2], bound_ptr [0, 2], bounds [0, 2] as uint32 LE
    const docs = new DataView((await Deno.readFile(join(dir, "docs-00000.bin"))).buffer);
    assert.deepEqual(Array.from({ length: 6 }, (_, i) => docs.getUint32(4 * i, true)), [0, 2, 0, 2, 0, 2]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the reader rejects a damaged shard", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const w = new ShardWriter(dir, 512, 1 << 20);
    await w.add([1, 2, 3], Uint8Array.from([0, 1, 1]), [0, 3]);
    await w.finish(META(512));
    const reader = await ShardReader.open(join(dir, "index.json"));
    await Deno.writeFile(join(dir, "mask-00000.bin"), Uint8Array.from([0, 1, 0]));
    await assert.rejects(() => reader.shard(0, true), LatheError);
    await Deno.writeFile(join(dir, "mask-00000.bin"), Uint8Array.from([0, 1]));
    await assert.rejects(() => reader.shard(0), /2 bytes, the index says 3/);
    await Deno.writeTextFile(join(dir, "index.json"), "{}");
    await assert.rejects(() => ShardReader.open(join(dir, "index.json")), LatheError);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
