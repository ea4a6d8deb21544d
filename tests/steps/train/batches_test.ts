import assert from "node:assert/strict";
import { buildBatch, chunks, epochOrder, loadSplit, trainedTokens } from "../../../steps/train/batches.ts";
import type { ShardRow } from "../../../steps/tokenize/shards.ts";
import { PAD, withTempDir, writeSplit } from "./_fixtures.ts";

function row(tokens: number[], mask: number[], bounds: number[]): ShardRow {
  return {
    index: 0,
    tokens: Uint16Array.from(tokens),
    mask: Uint8Array.from(mask),
    bounds: Uint32Array.from(bounds),
  };
}

Deno.test("buildBatch() shifts targets within documents, resets positions per document and isolates padding", () => {
  // Two documents [10 11 12] and [20 21], then two pad slots; the second token of doc 1 is context.
  const packed = row([10, 11, 12, 20, 21, PAD, PAD], [0, 0, 1, 0, 1, 0, 0], [0, 3, 5]);
  const b = buildBatch([packed], PAD);
  assert.equal(b.rows, 1);
  assert.equal(b.seqLen, 7);
  assert.deepEqual([...b.tokens], [10, 11, 12, 20, 21, PAD, PAD]);
  // target[t] = token[t+1] when t+1 is trained and in the same document; never across documents.
  assert.deepEqual([...b.targets], [-100, 12, -100, 21, -100, -100, -100]);
  assert.deepEqual([...b.positions], [0, 1, 2, 0, 1, 0, 1]);
  assert.deepEqual([...b.docs], [0, 0, 0, 1, 1, 2, 2]);
  assert.equal(trainedTokens(b), 2);
});

Deno.test("buildBatch() pads unpacked rows of different lengths to the longest", () => {
  const short = row([5, 6], [0, 1], [0, 2]);
  const long = row([7, 8, 9, 10], [0, 1, 1, 1], [0, 4]);
  const b = buildBatch([short, long], PAD);
  assert.equal(b.seqLen, 4);
  assert.deepEqual([...b.tokens], [5, 6, PAD, PAD, 7, 8, 9, 10]);
  assert.deepEqual([...b.targets], [6, -100, -100, -100, 8, 9, 10, -100]);
  assert.deepEqual([...b.positions], [0, 1, 0, 1, 0, 1, 2, 3]);
  assert.deepEqual([...b.docs], [0, 0, 1, 1, 0, 0, 0, 0]);
  assert.throws(() => buildBatch([], PAD), RangeError);
});

Deno.test("epochOrder() is a seeded permutation that changes with the epoch and the seed", () => {
  const a = epochOrder(50, 1, 0);
  assert.deepEqual([...a].sort((x, y) => x - y), Array.from({ length: 50 }, (_, i) => i));
  assert.deepEqual(epochOrder(50, 1, 0), a);
  assert.notDeepEqual(epochOrder(50, 1, 1), a);
  assert.notDeepEqual(epochOrder(50, 2, 0), a);
  assert.deepEqual([...epochOrder(1, 1, 0)], [0]);
  assert.deepEqual(chunks([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]]);
});

Deno.test("loadSplit() holds every row of every shard in order", async () => {
  await withTempDir(async (dir) => {
    const rows = Array.from({ length: 9 }, (_, i) => ({
      tokens: Array.from({ length: 3 + i }, (_, t) => 30 + i + t),
      mask: [0, ...Array.from({ length: 2 + i }, () => 1)],
      bounds: [0, 3 + i],
    }));
    const path = await writeSplit(dir, "train", rows, { seqLen: 16, packed: false, shardTokens: 20 });
    const split = await loadSplit(path);
    assert.equal(split.rows.length, 9);
    assert.ok(split.index.shards.length > 2);
    split.rows.forEach((r, i) => assert.deepEqual([...r.tokens], rows[i].tokens));
  });
});
