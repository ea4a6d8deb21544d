import assert from "node:assert/strict";
import { embedding_backward, embedding_forward } from "../../../kernels/reference/embedding.ts";
import { checkGradient, dot, random, randomArray } from "./_check.ts";

Deno.test("embedding_forward gathers the rows of E named by ids", () => {
  const E = Float32Array.of(0, 1, 10, 11, 20, 21); // V = 3, D = 2
  const out = embedding_forward(E, [2, 0, 2], { V: 3, D: 2 });
  assert.ok(out instanceof Float32Array);
  assert.deepEqual([...out], [20, 21, 0, 1, 20, 21]);
});

Deno.test("embedding_backward scatter-adds repeated ids and matches finite differences", () => {
  const rand = random(11);
  const V = 5, D = 3;
  const ids = [1, 4, 1, 0, 1];
  const E = randomArray(rand, V * D);
  const dout = randomArray(rand, ids.length * D);
  const dE = embedding_backward(dout, ids, { V, D });
  checkGradient("dE", E, dE, () => dot(embedding_forward(E, ids, { V, D }), dout));
  // row 1 collects tokens 0, 2 and 4; row 2 is never read
  assert.equal(dE[1 * D], dout[0] + dout[2 * D] + dout[4 * D]);
  assert.deepEqual([...dE.subarray(2 * D, 3 * D)], [0, 0, 0]);
});

Deno.test("embedding_forward names the token whose id is outside the vocabulary", () => {
  assert.throws(
    () => embedding_forward(new Float32Array(6), [0, 3], { V: 3, D: 2 }),
    /Cannot embed token 1: id "3" is outside the vocabulary \[0, 3\)/,
  );
});
