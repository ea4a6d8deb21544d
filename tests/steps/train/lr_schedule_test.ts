import assert from "node:assert/strict";
import {
  learning_rate,
  type ScheduleConfig,
  type ScheduleName,
  warmup_steps_for,
} from "../../../steps/train/schedule.ts";
import { assertClose } from "../../kernels/reference/_check.ts";

// transformers tests/optimization/test_optimization.py (ScheduleInitTest.test_schedulers): lr 10, the
// learning rate before each of 10 scheduler.step() calls, compared there with a tolerance of 1e-2.
const TRANSFORMERS: [ScheduleName, number, number[]][] = [
  ["constant", 0, [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]],
  ["constant_with_warmup", 4, [0.0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]],
  ["linear", 2, [0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25]],
  ["cosine", 2, [0.0, 5.0, 10.0, 9.61, 8.53, 6.91, 5.0, 3.08, 1.46, 0.38]],
];

for (const [name, warmupSteps, expected] of TRANSFORMERS) {
  Deno.test(`learning_rate "${name}" matches transformers' get_scheduler at steps 0..9`, () => {
    const config: ScheduleConfig = { name, warmupSteps, totalSteps: 10 };
    const lrs = expected.map((_, step) => learning_rate(10, config, step));
    assertClose(lrs, expected, { atol: 1e-2, rtol: 0 });
  });
}

Deno.test("learning_rate is 0 at the last step; then linear stays 0 and cosine rises, as in transformers", () => {
  const linear: ScheduleConfig = { name: "linear", warmupSteps: 2, totalSteps: 10 };
  const cosine: ScheduleConfig = { name: "cosine", warmupSteps: 2, totalSteps: 10 };
  assertClose([learning_rate(1, linear, 10), learning_rate(1, linear, 12)], [0, 0], { atol: 1e-16, rtol: 0 });
  // progress (12 − 2) / 8 = 1.25: ½·(1 + cos(1.25π))
  assertClose([learning_rate(1, cosine, 10), learning_rate(1, cosine, 12)], [
    0,
    0.5 * (1 + Math.cos(1.25 * Math.PI)),
  ], {
    atol: 1e-16,
    rtol: 1e-15,
  });
});

Deno.test("warmup_steps_for prefers warmup steps and rounds a ratio up as transformers", () => {
  assert.equal(warmup_steps_for({ steps: 5, ratio: 0.5 }, 100), 5);
  assert.equal(warmup_steps_for({ ratio: 0.03 }, 100), 3);
  assert.equal(warmup_steps_for({ ratio: 0.1 }, 25), 3); // 2.5 -> 3
  assert.equal(warmup_steps_for({ ratio: 0.07 }, 100), 8); // 7.000000000000001 -> 8, as math.ceil in Python
  assert.equal(warmup_steps_for({}, 100), 0);
});
