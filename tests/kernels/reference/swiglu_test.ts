import { swiglu_backward, swiglu_forward } from "../../../kernels/reference/swiglu.ts";
import { assertClose, checkGradient, dot, random, randomArray } from "./_check.ts";

Deno.test("swiglu_forward is silu(g)·u", () => {
  // silu(0) = 0, silu(1) = 1 / (1 + e^-1), silu(-2) = -2 / (1 + e^2)
  const h = swiglu_forward(Float64Array.of(0, 1, -2), Float64Array.of(5, 2, 3));
  assertClose(h, [0, 2 * 0.7310585786300049, 3 * -0.2384058440442351], { atol: 0, rtol: 1e-14 });
});

Deno.test("swiglu_backward at g = 0 gives dg = dh·u/2 and du = 0", () => {
  const { dg, du } = swiglu_backward(Float64Array.of(3), Float64Array.of(0), Float64Array.of(4));
  assertClose(dg, [6], { atol: 0, rtol: 1e-15 });
  assertClose(du, [0], { atol: 0, rtol: 0 });
});

Deno.test("swiglu_backward matches central finite differences for dg and du", () => {
  const rand = random(10);
  const n = 3 * 7;
  const g = randomArray(rand, n, 4);
  const u = randomArray(rand, n, 2);
  const dh = randomArray(rand, n);
  const { dg, du } = swiglu_backward(dh, g, u);
  const loss = () => dot(swiglu_forward(g, u), dh);
  checkGradient("dg", g, dg, loss);
  checkGradient("du", u, du, loss);
});
