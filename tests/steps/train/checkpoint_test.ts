import type { LoraWeights } from "../../../kernels/models/trainable.ts";
import assert from "node:assert/strict";
import { join } from "node:path";
import { type LoraConfig, loraKey, readPeftAdapter } from "../../../formats/peft.ts";
import { SafetensorsFile } from "../../../formats/safetensors.ts";
import { buildBatch } from "../../../steps/train/batches.ts";
import {
  BEST_ADAPTER_DIR,
  listCheckpoints,
  loadCheckpoint,
  pruneCheckpoints,
  saveCheckpoint,
  TRAINING_STATE_FORMAT,
  type TrainingState,
  writeAdapter,
} from "../../../steps/train/checkpoint.ts";
import { trainerState } from "../../../steps/train/trainer_state.ts";
import { makeSplit, nanoModel, patternRows, referenceModel, trainConfig, withTempDir } from "./_fixtures.ts";

const PEFT: LoraConfig = {
  baseModelNameOrPath: "org/tiny",
  r: 4,
  loraAlpha: 8,
  loraDropout: 0.1,
  targetModules: ["v_proj", "q_proj"],
  useRslora: true,
};

function training(step: number): TrainingState {
  return {
    format: TRAINING_STATE_FORMAT,
    step,
    epoch: 1,
    position: 3,
    seed: 9,
    shuffleStream: 2 ** 40,
    dropoutStream: 2 ** 41,
    rows: 12,
    totalSteps: 20,
    lossSum: 12.5,
    tokens: 1000,
    trainedTokens: 700,
    seconds: 1.5,
    evalLossBefore: 6.2,
    bestEvalLoss: 5.9,
    badEvals: 1,
    windowLoss: 3.1,
    windowSteps: 1,
    windowAccuracy: 0.25,
    windowAccuracySteps: 1,
  };
}

const trainer = (step: number) =>
  trainerState({
    step,
    epoch: 1.25,
    history: [{ step: 0, epoch: 0, eval_loss: 6.2 }, { step, epoch: 1.25, loss: 5.5, learning_rate: 1e-3 }],
    bestEvalLoss: 5.9,
    evalSteps: 2,
    loggingSteps: 1,
    maxSteps: 20,
    epochs: 5,
    saveSteps: 2,
    tokens: 1000,
    batchSize: 2,
  });

Deno.test("the exported adapter follows PEFT exactly: config fields, key names, shapes, F32, and it loads back", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "m"));
    const config = trainConfig({
      lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: ["v_proj", "q_proj"] },
    });
    using model = referenceModel(host, config, 2);
    // Non-zero B, so a loader that dropped B would be caught.
    await model.setLora((await model.getLora()).map((w) => ({ ...w, B: w.B.map((_, i) => i / 1000) })));
    const out = join(dir, "adapter");
    await writeAdapter(out, model, PEFT);
    const json = JSON.parse(await Deno.readTextFile(join(out, "adapter_config.json")));
    assert.deepEqual(json, {
      alpha_pattern: {},
      base_model_name_or_path: "org/tiny",
      bias: "none",
      fan_in_fan_out: false,
      inference_mode: true,
      init_lora_weights: true,
      lora_alpha: 8,
      lora_dropout: 0.1,
      modules_to_save: null,
      peft_type: "LORA",
      r: 4,
      rank_pattern: {},
      revision: null,
      target_modules: ["q_proj", "v_proj"],
      task_type: "CAUSAL_LM",
      use_dora: false,
      use_rslora: true,
    });
    using st = await SafetensorsFile.open(join(out, "adapter_model.safetensors"));
    assert.deepEqual(st.metadata, { format: "pt" });
    const expected = new Map<string, number[]>();
    for (const layer of [0, 1]) {
      // D = 64, H·hd = 64, Hkv·hd = 32.
      expected.set(loraKey(layer, "q_proj", "A"), [4, 64]);
      expected.set(loraKey(layer, "q_proj", "B"), [64, 4]);
      expected.set(loraKey(layer, "v_proj", "A"), [4, 64]);
      expected.set(loraKey(layer, "v_proj", "B"), [32, 4]);
    }
    assert.deepEqual(st.names().sort(), [...expected.keys()].sort());
    assert.equal(loraKey(1, "v_proj", "B"), "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
    for (const [name, shape] of expected) {
      assert.equal(st.info(name).dtype, "F32");
      assert.deepEqual(st.info(name).shape, shape);
    }
    const back = await readPeftAdapter(out, host.config);
    for (const w of await model.getLora()) {
      const p = back.get(w.layer, w.module);
      assert.deepEqual(p.a, w.A);
      assert.deepEqual(p.b, w.B);
    }
    assert.equal(back.scaling, 8 / 2); // rsLoRA: alpha / √r
  });
});

Deno.test("saveCheckpoint() and loadCheckpoint() round-trip adapters, AdamW moments and loop state", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "m"));
    const split = await makeSplit(dir, "train", patternRows(2, 16), { seqLen: 16, packed: true });
    const config = trainConfig({
      lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: ["v_proj", "q_proj"] },
    });
    using model = referenceModel(host, config, 2);
    await model.forwardBackward(buildBatch(split.rows, split.index.pad_id), 30, 1);
    await model.optimizerStep({
      lr: 1e-2,
      beta1: 0.9,
      beta2: 0.99,
      eps: 1e-8,
      weightDecay: 0,
      maxGradNorm: 1,
    });
    const root = join(dir, "ckpt");
    // One optimizer step taken: the loop state is at step 1 too.
    const path = await saveCheckpoint(root, model, PEFT, training(1), trainer(1));
    assert.equal(path, join(root, "step-1"));
    const files = [...Deno.readDirSync(path)].map((e) => e.name).sort();
    assert.deepEqual(files, [
      "adapter_config.json",
      "adapter_model.safetensors",
      "optimizer.safetensors",
      "trainer_state.json",
      "training_state.json",
    ]);
    const loaded = await loadCheckpoint(path, host.config);
    assert.deepEqual(loaded.training, training(1));
    assert.deepEqual(loaded.trainer, trainer(1));
    const opt = await model.getOptimizerState();
    assert.equal(loaded.optimizer.step, 1);
    assert.deepEqual(loaded.optimizer.m, opt.m);
    assert.deepEqual(loaded.optimizer.v, opt.v);
    const lora = await model.getLora();
    const byKey = new Map(loaded.lora.map((w) => [`${w.layer}.${w.module}`, w]));
    for (const w of lora) {
      assert.deepEqual(byKey.get(`${w.layer}.${w.module}`)!.A, w.A);
      assert.deepEqual(byKey.get(`${w.layer}.${w.module}`)!.B, w.B);
    }
    assert.equal(loaded.best, null);
    // A mismatch between the optimizer file and the loop state is refused.
    const bad = await saveCheckpoint(root, model, PEFT, training(7), trainer(7));
    await assert.rejects(() => loadCheckpoint(bad, host.config), /optimizer state is at step 1/);
  });
});

Deno.test("a checkpoint of a load_best_model_at_end run keeps the best adapter beside the current one, bit for bit", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "m"));
    const config = trainConfig({ lora: { r: 4, alpha: 8, target_modules: ["v_proj", "q_proj"] } });
    using model = referenceModel(host, config, 2);
    // The best adapter differs from the model's, whose B is 0 at init.
    const best = (await model.getLora()).map((w) => ({
      ...w,
      A: w.A.map((v) => v / 3),
      B: w.B.map((_, i) => Math.fround(Math.PI * (i + 1) / 7)),
    }));
    // No optimizer step taken: the loop state is at step 0.
    const state = { ...training(0), bestModel: { step: 0, metric: 5.25, checkpoint: "checkpoints/step-0" } };
    const path = await saveCheckpoint(join(dir, "ckpt"), model, PEFT, state, trainer(0), best);
    assert.ok((await Deno.stat(join(path, BEST_ADAPTER_DIR, "adapter_model.safetensors"))).isFile);
    const loaded = await loadCheckpoint(path, host.config);
    assert.deepEqual(loaded.training.bestModel, state.bestModel);
    const byKey = new Map((loaded.best as LoraWeights[]).map((w) => [`${w.layer}.${w.module}`, w]));
    assert.equal(byKey.size, best.length);
    for (const w of best) {
      assert.deepEqual(byKey.get(`${w.layer}.${w.module}`)!.A, w.A);
      assert.deepEqual(byKey.get(`${w.layer}.${w.module}`)!.B, w.B);
    }
    const current = new Map(loaded.lora.map((w) => [`${w.layer}.${w.module}`, w]));
    for (const w of await model.getLora()) assert.deepEqual(current.get(`${w.layer}.${w.module}`)!.B, w.B);
  });
});

Deno.test("listCheckpoints() ignores and removes half-written checkpoints; pruneCheckpoints() keeps the newest", async () => {
  await withTempDir(async (root) => {
    for (const name of ["step-2", "step-10", "step-4", ".step-12.tmp-abcd1234", "other"]) {
      await Deno.mkdir(join(root, name));
    }
    assert.deepEqual((await listCheckpoints(root)).map((c) => c.step), [2, 4, 10]);
    assert.ok(![...Deno.readDirSync(root)].some((e) => e.name.includes(".tmp-")));
    await pruneCheckpoints(root, 2);
    assert.deepEqual((await listCheckpoints(root)).map((c) => c.step), [4, 10]);
    assert.deepEqual(await listCheckpoints(join(root, "missing")), []);
  });
});

Deno.test("pruneCheckpoints() never deletes the best model's checkpoint, as transformers' rotation", async () => {
  const cases: { limit: number; keep: number | null; left: number[] }[] = [
    { limit: 2, keep: null, left: [6, 8] },
    { limit: 2, keep: 4, left: [4, 8] }, // the best ranks as the second newest
    { limit: 3, keep: 2, left: [2, 6, 8] },
    { limit: 1, keep: 4, left: [4, 8] }, // limit 1: the newest stays too, so a run can resume
    { limit: 1, keep: 8, left: [8] },
    { limit: 2, keep: 5, left: [6, 8] }, // no checkpoint at that step: plain rotation
  ];
  for (const c of cases) {
    await withTempDir(async (root) => {
      for (const step of [2, 4, 6, 8]) await Deno.mkdir(join(root, `step-${step}`));
      await pruneCheckpoints(root, c.limit, c.keep);
      assert.deepEqual((await listCheckpoints(root)).map((x) => x.step), c.left, JSON.stringify(c));
    });
  }
});
