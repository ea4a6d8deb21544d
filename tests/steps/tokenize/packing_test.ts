import assert from "node:assert/strict";
import { OPEN_ROWS, type PackedRow, Packer } from "../../../steps/tokenize/packing.ts";

function doc(n: number, base: number): { ids: number[]; mask: number[] } {
  return {
    ids: Array.from({ length: n }, (_, i) => base + i),
    mask: Array.from({ length: n }, (_, i) => i % 2),
  };
}

function pack(lens: number[], seqLen: number, packing = true): PackedRow[] {
  const rows: PackedRow[] = [];
  const p = new Packer(seqLen, 0, packing, (r) => rows.push(r));
  lens.forEach((n, i) => {
    const d = doc(n, 1000 * (i + 1));
    p.add(d.ids, d.mask);
  });
  p.finish();
  return rows;
}

Deno.test("packing fills rows of exactly seq_len with whole documents, then padding", () => {
  const rows = pack([5, 4, 3, 6, 2], 8);
  for (const r of rows) assert.equal(r.tokens.length, 8);
  // first-fit: [5,3] (full, closed first), [4,2], [6]
  assert.deepEqual(rows.map((r) => r.bounds), [[0, 5, 8], [0, 4, 6], [0, 6]]);
  const [, second] = rows;
  assert.deepEqual([...second.tokens], [2000, 2001, 2002, 2003, 5000, 5001, 0, 0]);
  assert.deepEqual([...second.mask], [0, 1, 0, 1, 0, 1, 0, 0], "padding has mask 0");
  // Every token of every document appears exactly once.
  const all = rows.flatMap((r) => [...r.tokens.subarray(0, r.bounds[r.bounds.length - 1])]).sort();
  assert.deepEqual(all, [5, 4, 3, 6, 2].flatMap((n, i) => doc(n, 1000 * (i + 1)).ids).sort());
});

Deno.test("packing is deterministic and closes the fullest row when the window is full", () => {
  const lens = Array.from({ length: 500 }, (_, i) => 1 + ((i * 37) % 97));
  assert.deepEqual(pack(lens, 128), pack(lens, 128));
  const many = Array.from({ length: OPEN_ROWS + 1 }, () => 70);
  const rows = pack(many, 128);
  assert.equal(rows.length, OPEN_ROWS + 1);
  assert.deepEqual(rows[0].bounds, [0, 70], "the first closed row is a fullest one (the oldest of equals)");
});

Deno.test("without packing every document is its own unpadded row", () => {
  const rows = pack([5, 4, 3], 8, false);
  assert.deepEqual(rows.map((r) => [r.tokens.length, r.bounds]), [[5, [0, 5]], [4, [0, 4]], [3, [0, 3]]]);
});

Deno.test("a document longer than seq_len is refused", () => {
  assert.throws(() => pack([9], 8), RangeError);
});
