import assert from "node:assert/strict";
import { learning_rate } from "../../../steps/train/schedule.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { lrAt, planTraining } from "../../../steps/train/schedule.ts";
import { trainConfig } from "./_fixtures.ts";

Deno.test("planTraining() counts ceil(rows / (bs·GA)) steps per epoch and lets max_steps override epochs", () => {
  const c = trainConfig({
    per_device_train_batch_size: 2,
    gradient_accumulation_steps: 4,
    num_train_epochs: 3,
  });
  const p = planTraining(50, c);
  assert.equal(p.rowsPerStep, 8);
  assert.equal(p.stepsPerEpoch, 7);
  assert.equal(p.totalSteps, 21);
  assert.equal(planTraining(50, trainConfig({ ...c, num_train_epochs: 0.5 })).totalSteps, 4);
  assert.equal(planTraining(50, trainConfig({ ...c, max_steps: 5 })).totalSteps, 5);
  assert.throws(() => planTraining(0, c), LatheError);
});

Deno.test("planTraining() takes warmup_steps over warmup_ratio, as transformers does", () => {
  const ratio = planTraining(
    100,
    trainConfig({ max_steps: 100, warmup_ratio: 0.07, lr_scheduler_type: "cosine" }),
  );
  assert.deepEqual(ratio.schedule, { name: "cosine", warmupSteps: 8, totalSteps: 100 }); // ceil(7.000000000000001)
  const steps = planTraining(100, trainConfig({ max_steps: 100, warmup_ratio: 0.5, warmup_steps: 3 }));
  assert.equal(steps.schedule.warmupSteps, 3);
  const c = trainConfig({ max_steps: 10, warmup_steps: 2, learning_rate: 1e-3 });
  const plan = planTraining(4, c);
  for (let s = 0; s < 10; s++) assert.equal(lrAt(c, plan, s), learning_rate(1e-3, plan.schedule, s));
  assert.equal(lrAt(c, plan, 0), 0);
  assert.equal(lrAt(c, plan, 2), 1e-3);
});
