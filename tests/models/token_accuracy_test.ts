// Token accuracy (trl's mean_token_accuracy numerator) of the WebGPU model graph against the CPU
// reference backend: the count of trained tokens whose argmax logit is the target must be the same
// integer. The reference's predictions (f64 argmax and the margin to the runner-up) aim half of the
// trained targets at the predicted token, so the count is far from zero, and the check requires every
// trained token's margin to exceed what f32 rounding of the logits can move (1e-3 against an error of
// about 1e-5), so both backends must pick the same argmax everywhere.
// B = rows, S = tokens per row, T = B·S.
import assert from "node:assert/strict";
import { createGpuModel } from "../../kernels/models/graph.ts";
import type { Batch, LoraSpec } from "../../kernels/models/trainable.ts";
import type { ReferenceModel } from "../../kernels/models/reference_backend.ts";
import type { TinyArch } from "../../kernels/models/tiny.ts";
import { gpuTest } from "../kernels/_harness.ts";
import {
  allTargets,
  packedBatch,
  referenceModel,
  type TinyCheckpoint,
  tinyCheckpoint,
  trainedTokens,
  withRandomB,
} from "./_model_fixture.ts";

const SEED = 7;
/** Smallest top-1 − top-2 logit gap of a trained token for the exact comparison to be meaningful. */
const MARGIN = 1e-3;

async function withCheckpoint(arch: TinyArch, fn: (ckpt: TinyCheckpoint) => Promise<void>): Promise<void> {
  const ckpt = await tinyCheckpoint(arch);
  try {
    await fn(ckpt);
  } finally {
    await ckpt.cleanup();
  }
}

/**
 * `batch` with every other trained target replaced by the reference's prediction (under the
 * dropout masks of `dropoutSeed`, or none); returns it and the number of targets that are now
 * predicted (the expected count).
 */
function aimedBatch(
  ref: ReferenceModel,
  batch: Batch,
  dropoutSeed: number | null = null,
): { batch: Batch; expected: number } {
  const { argmax, margin } = ref.predictions(batch, dropoutSeed);
  const targets = batch.targets.slice();
  let k = 0;
  let expected = 0;
  for (let t = 0; t < targets.length; t++) {
    if (targets[t] === -100) continue;
    assert.ok(margin[t] > MARGIN, `token ${t}: top-2 logit margin ${margin[t]} is within rounding`);
    if (k++ % 2 === 0) targets[t] = argmax[t];
    if (targets[t] === argmax[t]) expected++;
  }
  return { batch: { ...batch, targets }, expected };
}

for (const arch of ["llama", "qwen2"] as const) {
  gpuTest(
    `the webgpu graph counts exactly the reference's correctly predicted tokens: ${arch}, training and evaluation`,
    async () => {
      await withCheckpoint(arch, async (ckpt) => {
        const lora: LoraSpec = allTargets();
        using model = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, { dtype: "f32" });
        const weights = withRandomB(await model.getLora(), 11);
        await model.setLora(weights);
        using ckptModel = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, {
          dtype: "f32",
          gradientCheckpointing: true,
        });
        await ckptModel.setLora(weights);
        using ref = await referenceModel(ckpt, lora, SEED, weights);
        const { batch, expected } = aimedBatch(ref, packedBatch(ckpt.config.vocabSize, 3, 16, 17));
        const n = trainedTokens(batch);
        assert.ok(expected >= n / 2 && expected < n, `${expected} of ${n} tokens are predicted`);

        const r = await ref.forwardBackward(batch, n, 1);
        const g = await model.forwardBackward(batch, n, 1);
        const c = await ckptModel.forwardBackward(batch, n, 1);
        assert.equal(r.correct, expected);
        assert.equal(g.correct, expected);
        assert.equal(c.correct, expected);
        const [e, eRef] = [await model.evaluate(batch), await ref.evaluate(batch)];
        assert.equal(eRef.correct, expected);
        assert.equal(e.correct, expected);
        assert.equal(e.tokens, n);
      });
    },
  );
}

gpuTest(
  "with LoRA dropout the webgpu graph counts the reference's correct tokens under the same masks (mistral)",
  async () => {
    await withCheckpoint("mistral", async (ckpt) => {
      const lora = allTargets(4, 8, 0.25);
      using model = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, { dtype: "f32" });
      const weights = withRandomB(await model.getLora(), 13, 0.4);
      await model.setLora(weights);
      using ref = await referenceModel(ckpt, lora, SEED, weights);
      // Aimed at the predictions under the masks of seed 1234.
      const { batch, expected } = aimedBatch(ref, packedBatch(ckpt.config.vocabSize, 2, 16, 6), 1234);
      const n = trainedTokens(batch);
      const r = await ref.forwardBackward(batch, n, 1234);
      const g = await model.forwardBackward(batch, n, 1234);
      assert.equal(r.correct, expected);
      assert.equal(g.correct, expected);
      // The masks matter: without dropout some trained tokens predict another token.
      const [masked, plain] = [ref.predictions(batch, 1234).argmax, ref.predictions(batch).argmax];
      assert.ok(
        batch.targets.some((y, t) => y !== -100 && masked[t] !== plain[t]),
        "dropout moves no argmax",
      );
    });
  },
);
