import assert from "node:assert/strict";
import { rmsnorm_backward, rmsnorm_forward } from "../../../kernels/reference/rmsnorm.ts";
import { assertClose, checkGradient, dot, random, randomArray } from "./_check.ts";

Deno.test("rmsnorm_forward divides by the root mean square and multiplies by w", () => {
  // x = [3, 4]: mean(x²) = 12.5, so y = x / sqrt(12.5) · w
  const x = Float64Array.of(3, 4);
  const w = Float64Array.of(1, 2);
  const { y, rstd } = rmsnorm_forward(x, w, { T: 1, D: 2, eps: 0 });
  assertClose(y, [3 / Math.sqrt(12.5), 8 / Math.sqrt(12.5)], { atol: 0, rtol: 1e-15 });
  assertClose(rstd, [1 / Math.sqrt(12.5)], { atol: 0, rtol: 1e-15 });
});

Deno.test("rmsnorm_forward adds eps inside the square root", () => {
  const { y, rstd } = rmsnorm_forward(new Float64Array(4), Float64Array.of(1, 1, 1, 1), {
    T: 1,
    D: 4,
    eps: 1e-6,
  });
  assert.deepEqual([...y], [0, 0, 0, 0]);
  assertClose(rstd, [1e3], { atol: 0, rtol: 1e-12 });
});

Deno.test("rmsnorm_backward matches central finite differences for dx and dw", () => {
  const rand = random(1);
  const T = 3, D = 5, eps = 1e-5;
  const x = randomArray(rand, T * D, 2);
  const w = randomArray(rand, D);
  const dy = randomArray(rand, T * D);
  const { rstd } = rmsnorm_forward(x, w, { T, D, eps });
  const { dx, dw } = rmsnorm_backward(dy, x, w, rstd, { T, D, eps });
  const loss = () => dot(rmsnorm_forward(x, w, { T, D, eps }).y, dy);
  checkGradient("dx", x, dx, loss);
  checkGradient("dw", w, dw, loss);
});

Deno.test("rmsnorm_backward recomputes rstd when it is not given", () => {
  const rand = random(2);
  const T = 2, D = 6, eps = 1e-6;
  const x = randomArray(rand, T * D);
  const w = randomArray(rand, D);
  const dy = randomArray(rand, T * D);
  const saved = rmsnorm_backward(dy, x, w, rmsnorm_forward(x, w, { T, D, eps }).rstd, { T, D, eps });
  const recomputed = rmsnorm_backward(dy, x, w, null, { T, D, eps });
  assertClose(recomputed.dx, saved.dx, { atol: 0, rtol: 1e-14 });
  assertClose(recomputed.dw, saved.dw, { atol: 0, rtol: 1e-14 });
});

Deno.test("rmsnorm references return Float32Array for Float32Array input and reject wrong shapes", () => {
  const x = Float32Array.of(1, 2, 3, 4);
  const w = Float32Array.of(1, 1);
  const { y, rstd } = rmsnorm_forward(x, w, { T: 2, D: 2, eps: 1e-6 });
  assert.ok(y instanceof Float32Array && rstd instanceof Float32Array);
  assert.ok(rmsnorm_backward(y, x, w, rstd, { T: 2, D: 2, eps: 1e-6 }).dx instanceof Float32Array);
  assert.throws(() => rmsnorm_forward(x, w, { T: 3, D: 2, eps: 1e-6 }), /x\[T,D\]: it holds 4 values/);
});
