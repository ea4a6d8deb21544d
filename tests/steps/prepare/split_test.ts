import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { hashFraction, isEvalRow, splitFraction, weightCopies } from "../../../steps/prepare/split.ts";

const ids = Array.from(
  { length: 20_000 },
  (_, i) => createHash("sha256").update(`row ${i}`).digest("hex").slice(0, 16),
);

Deno.test("splitFraction() is sha256(seed:id) read as a fraction", () => {
  const hex = createHash("sha256").update("42:0123456789abcdef").digest("hex");
  const want = Number(BigInt(`0x${hex.slice(0, 13)}`)) / 2 ** 52;
  assert.equal(splitFraction(42, "0123456789abcdef"), want);
  assert.ok(want >= 0 && want < 1);
  assert.notEqual(splitFraction(43, "0123456789abcdef"), want);
});

Deno.test("isEvalRow() sends about eval_fraction of rows to eval, none at 0", () => {
  const share = ids.filter((id) => isEvalRow(7, id, 0.1)).length / ids.length;
  assert.ok(share > 0.09 && share < 0.11, `share ${share}`);
  assert.equal(ids.filter((id) => isEvalRow(7, id, 0)).length, 0);
  // a larger fraction keeps every row the smaller one chose
  for (const id of ids.slice(0, 2000)) if (isEvalRow(7, id, 0.1)) assert.ok(isEvalRow(7, id, 0.3));
});

Deno.test("weightCopies() writes floor(weight) copies plus a hashed fractional copy", () => {
  assert.equal(weightCopies(1, ids[0], 1), 1);
  assert.equal(weightCopies(1, ids[0], 3), 3);
  const total = (w: number) => ids.reduce((sum, id) => sum + weightCopies(1, id, w), 0) / ids.length;
  const half = total(0.5);
  assert.ok(half > 0.48 && half < 0.52, `mean copies ${half}`);
  const more = total(2.25);
  assert.ok(more > 2.23 && more < 2.27, `mean copies ${more}`);
  // independent of the split: the eval rows are not favoured by a weight below 1
  const evalKept = ids.filter((id) => isEvalRow(1, id, 0.1));
  const keptShare = evalKept.filter((id) => weightCopies(1, id, 0.5) > 0).length / evalKept.length;
  assert.ok(keptShare > 0.45 && keptShare < 0.55, `kept ${keptShare}`);
  assert.equal(hashFraction("x"), hashFraction("x"));
});
