import assert from "node:assert/strict";
import {
  count_correct,
  count_trained,
  cross_entropy_backward,
  cross_entropy_forward,
  IGNORE_INDEX,
  lm_head_argmax,
  lm_head_cross_entropy_backward,
  lm_head_cross_entropy_forward,
  NO_ARGMAX,
  token_argmax,
} from "../../../kernels/reference/cross_entropy.ts";
import { assertClose, checkGradient, dot, random, randomArray } from "./_check.ts";

// logits[T,V] = hidden[T,D] · W[V,D]ᵀ, for comparing the fused variant with the plain one
function logitsOf(hidden: Float64Array, W: Float64Array, T: number, D: number, V: number): Float64Array {
  const z = new Float64Array(T * V);
  for (let t = 0; t < T; t++) {
    for (let v = 0; v < V; v++) {
      z[t * V + v] = dot(hidden.subarray(t * D, t * D + D), W.subarray(v * D, v * D + D));
    }
  }
  return z;
}

Deno.test("cross_entropy_forward of uniform logits is ln V", () => {
  const T = 3, V = 7;
  const { loss, lse } = cross_entropy_forward(new Float64Array(T * V), [0, 6, 3], { T, V, n: T });
  assertClose([loss], [Math.log(7)], { atol: 0, rtol: 1e-15 });
  assertClose(lse, [Math.log(7), Math.log(7), Math.log(7)], { atol: 0, rtol: 1e-15 });
  const fused = lm_head_cross_entropy_forward(randomArray(random(1), T * 4), new Float64Array(V * 4), [
    0,
    6,
    3,
  ], {
    T,
    V,
    D: 4,
    n: T,
    chunk: 3,
  });
  assertClose([fused.loss], [Math.log(7)], { atol: 0, rtol: 1e-15 });
});

Deno.test("cross_entropy sums over trained tokens and divides by the given N", () => {
  const rand = random(12);
  const T = 4, V = 5;
  const logits = randomArray(rand, T * V, 3);
  const targets = [2, IGNORE_INDEX, 4, IGNORE_INDEX];
  assert.equal(count_trained(targets), 2);
  const mean = cross_entropy_forward(logits, targets, { T, V, n: 2 });
  // −log softmax(logits[t])[target] by hand for t = 0 and 2
  const nll = (t: number, y: number) => {
    const row = Array.from(logits.subarray(t * V, t * V + V));
    return Math.log(row.reduce((s, z) => s + Math.exp(z), 0)) - row[y];
  };
  assertClose([mean.loss], [(nll(0, 2) + nll(2, 4)) / 2], { atol: 0, rtol: 1e-14 });
  // normalising by the tokens of the whole accumulation step (say 8) scales the loss and gradient
  const accumulated = cross_entropy_forward(logits, targets, { T, V, n: 8 });
  assertClose([accumulated.loss], [mean.loss / 4], { atol: 0, rtol: 1e-14 });
  const dl = cross_entropy_backward(logits, targets, mean.lse, { T, V, n: 8 });
  assert.deepEqual([...dl.subarray(V, 2 * V)], [0, 0, 0, 0, 0]); // ignored token 1
  // a mask of 0 leaves a token out like -100 does
  const masked = cross_entropy_forward(logits, [2, 1, 4, 0], { T, V, n: 2, mask: [1, 0, 1, 0] });
  assertClose([masked.loss], [mean.loss], { atol: 0, rtol: 0 });
});

Deno.test("cross_entropy_backward matches central finite differences for dlogits", () => {
  const rand = random(13);
  const T = 3, V = 6;
  const logits = randomArray(rand, T * V, 3);
  const targets = [5, IGNORE_INDEX, 0];
  const dims = { T, V, n: 2.5 };
  const { lse } = cross_entropy_forward(logits, targets, dims);
  const dlogits = cross_entropy_backward(logits, targets, lse, dims, 1.5);
  checkGradient("dlogits", logits, dlogits, () => 1.5 * cross_entropy_forward(logits, targets, dims).loss);
});

Deno.test("lm_head_cross_entropy_forward in vocabulary chunks equals the full-logits loss", () => {
  const rand = random(14);
  const T = 5, D = 4, V = 10;
  const hidden = randomArray(rand, T * D, 2);
  const W = randomArray(rand, V * D, 2);
  const targets = [9, 0, IGNORE_INDEX, 3, 7];
  const full = cross_entropy_forward(logitsOf(hidden, W, T, D, V), targets, { T, V, n: 4 });
  for (const chunk of [1, 3, 4, 10, 1024]) {
    const fused = lm_head_cross_entropy_forward(hidden, W, targets, { T, V, D, n: 4, chunk });
    assertClose([fused.loss], [full.loss], { atol: 0, rtol: 1e-14 }, `loss (chunk ${chunk})`);
    assertClose(fused.lse, full.lse, { atol: 0, rtol: 1e-14 }, `lse (chunk ${chunk})`);
  }
});

Deno.test("lm_head_cross_entropy_backward matches central finite differences for dhidden and dW", () => {
  const rand = random(15);
  const T = 4, D = 3, V = 7;
  const hidden = randomArray(rand, T * D, 2);
  const W = randomArray(rand, V * D, 2);
  const targets = [6, IGNORE_INDEX, 2, 2];
  const dims = { T, V, D, n: 3, chunk: 3 };
  const { lse } = lm_head_cross_entropy_forward(hidden, W, targets, dims);
  const { dhidden, dW } = lm_head_cross_entropy_backward(hidden, W, targets, lse, dims, 1, true);
  const loss = () => lm_head_cross_entropy_forward(hidden, W, targets, dims).loss;
  checkGradient("dhidden", hidden, dhidden, loss);
  assert.ok(dW);
  checkGradient("dW", W, dW, loss);
  assert.equal(lm_head_cross_entropy_backward(hidden, W, targets, lse, dims).dW, null);
});

Deno.test("cross_entropy names a target outside the vocabulary and a non-positive N", () => {
  assert.throws(
    () => cross_entropy_forward(new Float64Array(6), [1, 3], { T: 2, V: 3, n: 2 }),
    /token 1: target "3" is neither -100 nor in \[0, 3\)/,
  );
  assert.throws(() => cross_entropy_forward(new Float64Array(6), [1, 2], { T: 2, V: 3, n: 0 }), /N "0"/);
});

Deno.test("token_argmax takes the lowest index among equal maxima and never a NaN", () => {
  const logits = Float64Array.from([
    ...[1, 3, 3, 2], // tie at 1 and 2
    ...[5, 5, 5, 5], // all equal
    ...[NaN, 0, 7, NaN], // NaN is skipped
    ...[-Infinity, -Infinity, -Infinity, -Infinity], // nothing above −∞
    ...[-2, -1, -1.5, -Infinity],
  ]);
  assert.deepEqual([...token_argmax(logits, 5, 4)], [1, 0, 2, NO_ARGMAX, 1]);
  // Trained tokens whose argmax is the target; ignored and masked tokens never count.
  assert.equal(count_correct([1, 0, 2, NO_ARGMAX, 1], [1, 0, IGNORE_INDEX, 3, 2]), 2);
  assert.equal(count_correct([1, 0, 2, NO_ARGMAX, 1], [1, 0, 2, 3, 1], [1, 0, 1, 1, 1]), 3);
  const full = cross_entropy_forward(logits.subarray(0, 8), [2, 0], { T: 2, V: 4, n: 2 });
  assert.equal(full.correct, 1); // target 2 ties with 1, which wins
});

Deno.test("lm_head_cross_entropy_forward counts correct tokens as the full logits do for every chunk size, ties included", () => {
  const rand = random(16);
  const T = 12, D = 5, V = 23;
  const hidden = new Float64Array(T * D);
  // Rows 3, 9 and 17 are equal, as are 6 and 20: ties within a chunk and across chunks.
  // Unit rows: hidden along a row makes that row's logit (and its copies') the largest.
  const pool = randomArray(rand, V * D, 2);
  for (let v = 0; v < V; v++) {
    const row = pool.subarray(v * D, v * D + D);
    const norm = Math.hypot(...row);
    for (let d = 0; d < D; d++) row[d] /= norm;
  }
  const W = pool.slice();
  for (const [to, from] of [[9, 3], [17, 3], [20, 6]]) W.set(pool.subarray(from * D, from * D + D), to * D);
  // Every token predicts a tied row (hidden points along it); targets aim at each copy.
  for (let t = 0; t < T; t++) {
    const row = t % 2 === 0 ? 3 : 6;
    for (let d = 0; d < D; d++) hidden[t * D + d] = 3 * W[row * D + d];
  }
  const argmax = token_argmax(logitsOf(hidden, W, T, D, V), T, V);
  assert.ok(argmax.some((a) => a === 3) && argmax.some((a) => a === 6), `argmax ${argmax}`);
  const targets = Array.from({ length: T }, (_, t) => [argmax[t], 9, 17, 20, IGNORE_INDEX, 0][t % 6]);
  const want = targets.filter((y, t) => y === argmax[t]).length;
  assert.ok(want >= 2);
  const dims = { T, V, D, n: 1 };
  for (const chunk of [1, 4, 7, 10, 23, 1024]) {
    const fused = lm_head_cross_entropy_forward(hidden, W, targets, { ...dims, chunk });
    assert.deepEqual([...fused.argmax], [...argmax], `argmax (chunk ${chunk})`);
    assert.equal(fused.correct, want, `correct (chunk ${chunk})`);
  }
  const plain = cross_entropy_forward(logitsOf(hidden, W, T, D, V), targets, { T, V, n: 1 });
  assert.equal(plain.correct, want);
  // A mask leaves tokens out of the count as it leaves them out of the loss.
  const mask = Array.from({ length: T }, (_, t) => (t < 6 ? 0 : 1));
  const masked = lm_head_cross_entropy_forward(hidden, W, targets, { ...dims, chunk: 4, mask });
  assert.equal(masked.correct, targets.filter((y, t) => t >= 6 && y === argmax[t]).length);
  // lm_head_argmax: the same argmax, a zero margin on ties, the gap to the runner-up otherwise.
  const top = lm_head_argmax(hidden, W, { T, V, D });
  assert.deepEqual([...top.argmax], [...argmax]);
  const z = logitsOf(hidden, W, T, D, V);
  for (let t = 0; t < T; t++) {
    const row = Array.from(z.subarray(t * V, t * V + V)).sort((a, b) => b - a);
    assert.equal(top.margin[t], row[0] - row[1], `margin of token ${t}`);
  }
  assert.ok(top.margin.every((m) => m === 0), "every maximum here is tied");
});
