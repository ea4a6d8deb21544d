// The cpu-reference TrainableModel (kernels/models/reference_backend.ts) against the contract the
// training loop relies on.
import assert from "node:assert/strict";
import { join } from "node:path";
import { loraKey } from "../../../formats/peft.ts";
import { loraDropoutSeed } from "../../../kernels/models/reference_backend.ts";
import { buildBatch } from "../../../steps/train/batches.ts";
import { makeSplit, nanoModel, patternRows, referenceModel, trainConfig, withTempDir } from "./_fixtures.ts";

Deno.test("reference model: fresh adapters follow PEFT init (B = 0, A within ±1/√in) and depend on the seed", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "m"));
    const config = trainConfig({ lora: { r: 4, target_modules: ["q_proj", "down_proj"] } });
    using a = referenceModel(host, config, 1);
    using b = referenceModel(host, config, 1);
    using c = referenceModel(host, config, 2);
    const wa = await a.getLora();
    assert.deepEqual(wa.map((w) => `${w.layer}.${w.module}`), [
      "0.down_proj",
      "0.q_proj",
      "1.down_proj",
      "1.q_proj",
    ]);
    for (const w of wa) {
      const inFeatures = w.module === "down_proj" ? 128 : 64;
      assert.equal(w.A.length, 4 * inFeatures);
      assert.ok(w.B.every((v) => v === 0));
      assert.ok(w.A.every((v) => Math.abs(v) <= 1 / Math.sqrt(inFeatures)));
    }
    assert.deepEqual(await b.getLora(), wa);
    assert.notDeepEqual((await c.getLora())[0].A, wa[0].A);
  });
});

Deno.test("reference model: gradients match finite differences of the loss through the contract", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "m"), "mistral");
    const split = await makeSplit(dir, "train", patternRows(2, 16), { seqLen: 16, packed: true });
    const batch = buildBatch(split.rows, split.index.pad_id);
    const config = trainConfig({ lora: { r: 2, dropout: 0, target_modules: ["v_proj", "up_proj"] } });
    using model = referenceModel(host, config, 4);
    // Make B non-zero so both A and B gradients are informative.
    const weights = (await model.getLora()).map((w) => ({
      ...w,
      B: w.B.map((_, i) => 0.01 * Math.sin(i + 1)),
    }));
    await model.setLora(weights);
    const N = 7; // any normaliser: the gradient is of Σ CE / N
    const { lossSum } = await model.forwardBackward(batch, N, 0);
    const grads = model.gradients();
    const lossAt = async () => (await model.evaluate(batch)).lossSum / N;
    assert.ok(Math.abs((await lossAt()) - lossSum / N) < 1e-12);
    const h = 1e-3;
    for (const [w, which, i] of [[0, "A", 3], [1, "B", 5], [3, "A", 17], [2, "B", 0]] as const) {
      const pair = weights[w];
      const arr = which === "A" ? pair.A : pair.B;
      const keep = arr[i];
      arr[i] = keep + h;
      await model.setLora(weights);
      const up = await lossAt();
      arr[i] = keep - h;
      await model.setLora(weights);
      const down = await lossAt();
      arr[i] = keep;
      await model.setLora(weights);
      const fd = (up - down) / (2 * h);
      const g = grads.get(loraKey(pair.layer, pair.module, which))![i];
      assert.ok(
        Math.abs(fd - g) <= 1e-4 * Math.max(1, Math.abs(g)) + 2e-6,
        `${which}[${i}]: fd ${fd} vs ${g}`,
      );
    }
  });
});

Deno.test("reference model: accumulates gradients, zeroes them on a step, and round-trips optimizer state", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "m"));
    const split = await makeSplit(dir, "train", patternRows(2, 16), { seqLen: 16, packed: true });
    const batch = buildBatch(split.rows, split.index.pad_id);
    const config = trainConfig({ lora: { r: 2, dropout: 0.2 } });
    using model = referenceModel(host, config, 4);
    const hp = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, maxGradNorm: 0 };
    await model.forwardBackward(batch, 10, 1);
    const once = model.gradients();
    await model.forwardBackward(batch, 10, 1);
    for (const [name, g] of model.gradients()) {
      g.forEach((v, i) =>
        assert.ok(Math.abs(v - 2 * once.get(name)![i]) <= 1e-12 * Math.max(1, Math.abs(v)))
      );
    }
    await model.zeroGrad();
    assert.ok([...model.gradients().values()].every((g) => g.every((v) => v === 0)));
    // Dropout (B = 0, so it shows in dB only): the same seed drops the same inputs; another seed others.
    const dB = async (seed: number) => {
      await model.zeroGrad();
      await model.forwardBackward(batch, 10, seed);
      return model.gradients().get(loraKey(0, "q_proj", "B"))!;
    };
    const first = await dB(1);
    assert.ok(first.some((v) => v !== 0));
    assert.deepEqual(await dB(1), first);
    assert.notDeepEqual(await dB(2), first);
    await model.forwardBackward(batch, 10, 1);
    const { gradNorm } = await model.optimizerStep(hp);
    assert.ok(gradNorm > 0);
    assert.ok([...model.gradients().values()].every((g) => g.every((v) => v === 0)));
    const state = await model.getOptimizerState();
    assert.equal(state.step, 1);
    assert.equal(state.m.size, 2 * 7 * 2);
    assert.ok(state.m.has(loraKey(1, "gate_proj", "B")));
    using other = referenceModel(host, config, 9);
    await other.setLora(await model.getLora());
    await other.setOptimizerState(state);
    for (const m of [model, other]) {
      await m.forwardBackward(batch, 10, 3);
      await m.optimizerStep(hp);
    }
    assert.deepEqual(await other.getLora(), await model.getLora());
    assert.equal((await other.getOptimizerState()).step, 2);
    const partial = (await model.getLora()).slice(1);
    await assert.rejects(() => other.setLora(partial), /distinct adapters/);
  });
});

Deno.test("loraDropoutSeed() gives every adapter of a micro-batch its own u32 seed", () => {
  const seeds = new Set<number>();
  for (let layer = 0; layer < 4; layer++) {
    for (const m of ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const) {
      const s = loraDropoutSeed(0xdeadbeef, layer, m);
      assert.ok(Number.isInteger(s) && s >= 0 && s < 2 ** 32);
      seeds.add(s);
    }
  }
  assert.equal(seeds.size, 28);
  assert.equal(loraDropoutSeed(0, 0, "q_proj"), 0x9e3779b9);
});
