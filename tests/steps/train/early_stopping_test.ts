import assert from "node:assert/strict";
import { type EarlyStoppingState, recordEval } from "../../../steps/train/early_stopping.ts";

Deno.test("recordEval() resets on an improvement beyond the threshold and stops after `patience` others", () => {
  const s: EarlyStoppingState = { best: null, bad: 0 };
  assert.equal(recordEval(s, 2.0, 2, 0.01), false); // first evaluation: the best so far
  assert.deepEqual(s, { best: 2.0, bad: 0 });
  assert.equal(recordEval(s, 1.995, 2, 0.01), false); // better, but within the threshold
  assert.deepEqual(s, { best: 2.0, bad: 1 });
  assert.equal(recordEval(s, 1.5, 2, 0.01), false); // a real improvement resets the count
  assert.deepEqual(s, { best: 1.5, bad: 0 });
  assert.equal(recordEval(s, 1.6, 2, 0.01), false);
  assert.equal(recordEval(s, 1.7, 2, 0.01), true);
  const never: EarlyStoppingState = { best: null, bad: 0 };
  for (const loss of [1, 2, 3, 4]) assert.equal(recordEval(never, loss, null, 0), false);
  assert.deepEqual(never, { best: 1, bad: 3 });
});
