import assert from "node:assert/strict";
import { type EarlyStoppingState, isBetter, recordEval } from "../../../steps/train/early_stopping.ts";

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

Deno.test("recordEval() and isBetter() follow greater_is_better: a rising metric improves, a falling one does not", () => {
  assert.equal(isBetter(0.7, 0.6, true), true);
  assert.equal(isBetter(0.5, 0.6, true), false);
  assert.equal(isBetter(0.5, 0.6, false), true);
  assert.equal(isBetter(0.6, 0.6, false), false); // ties keep the earlier best, as transformers
  assert.equal(isBetter(9, null, false), true);
  const s: EarlyStoppingState = { best: null, bad: 0 };
  assert.equal(recordEval(s, 0.5, 2, 0, true), false);
  assert.equal(recordEval(s, 0.4, 2, 0, true), false); // lower is worse here
  assert.deepEqual(s, { best: 0.5, bad: 1 });
  assert.equal(recordEval(s, 0.8, 2, 0, true), false);
  assert.deepEqual(s, { best: 0.8, bad: 0 });
  assert.equal(recordEval(s, 0.7, 2, 0, true), false);
  assert.equal(recordEval(s, 0.1, 2, 0, true), true);
});
