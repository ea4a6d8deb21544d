// train-sft with finetuning: full on the webgpu backend (nano Llama, synthetic chats):
// - every weight trains and the step writes a Hugging Face model directory (model/) in the base's
//   dtype with its config and tokenizer, which loads as a model (and no adapter);
// - the same seed gives the same bytes; a run killed after a checkpoint and resumed ends with the
//   bytes and the metrics of an uninterrupted run;
// - the memory plan counts masters, gradients and moments; a 7B full fine-tune says plainly it cannot
//   fit a 24 GiB card;
// - bad input: a 4-bit base, an init_adapter, the cpu-reference backend.
import assert from "node:assert/strict";
import { join } from "node:path";
import { expectedTensors, loadModelConfig, parseModelConfig } from "../../../formats/model_config.ts";
import { checkFits } from "../../../steps/train/memory.ts";
import { ModelWeights } from "../../../formats/safetensors.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { FAILURE_FILE, readManifest } from "../../../foundation/manifest.ts";
import { planTrainingMemory } from "../../../kernels/models/memory_plan.ts";
import { CHECKPOINTS_DIR, trainSftHooks } from "../../../steps/train_sft.ts";
import { listCheckpoints } from "../../../steps/train/checkpoint.ts";
import { gpuTest } from "../../kernels/_harness.ts";
import { FaultyModel, ROOT } from "./_fixtures.ts";
import { sftUpstream, trainSft, withSftSetup } from "./_sft_runs.ts";

const FULL = {
  finetuning: "full",
  max_steps: 5,
  per_device_train_batch_size: 2,
  gradient_accumulation_steps: 1,
  learning_rate: 2e-3,
  eval_steps: 5,
  save_steps: 2,
};

const train = trainSft;

gpuTest("train-sft finetuning: full trains every weight and writes a model directory", async () => {
  await withSftSetup({ arch: "llama" }, async (s) => {
    const out = await train(s, FULL);
    const m = out.manifest.metrics as Record<string, number>;
    assert.ok(m.eval_loss < m.eval_loss_before, `eval loss ${m.eval_loss_before} -> ${m.eval_loss}`);
    assert.ok(
      "model/config.json" in out.manifest.outputs && "model/model.safetensors" in out.manifest.outputs,
    );
    assert.ok(!("adapter" in out.manifest.outputs), "no adapter");
    const dir = join(s.runs, "a", "train-sft", "model");
    const config = await loadModelConfig(dir);
    assert.equal(config.torchDtype, "float32", "the base's dtype");
    using trained = await ModelWeights.open(dir);
    using base = await ModelWeights.open(s.model);
    assert.deepEqual(trained.names().sort(), base.names().sort());
    for (const name of base.names()) {
      const a = await trained.readFloat32(name), b = await base.readFloat32(name);
      assert.ok(a.some((x, i) => x !== b[i]), `${name} trained`);
    }
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
      assert.ok(`model/${f}` in out.manifest.outputs, f);
    }
    // The planner's figure for this step against the pool's measured peak.
    const planned = m.memory_planned_bytes, peak = m.memory_peak_bytes;
    assert.ok(Math.abs(planned - peak) <= 0.1 * peak, `planned ${planned} bytes, measured ${peak}`);
  });
});

gpuTest("a killed full fine-tune resumes to the bytes and metrics of an uninterrupted run", async () => {
  await withSftSetup({ arch: "qwen2" }, async (s) => {
    trainSftHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 4 });
    await assert.rejects(() => train(s, FULL), /injected kill at step 4/);
    delete trainSftHooks.wrapModel;
    const failure = await readManifest(join(s.runs, "a", "train-sft", FAILURE_FILE));
    const kept = join(s.runs, "a", CHECKPOINTS_DIR, failure.key);
    assert.deepEqual((await listCheckpoints(kept)).map((c) => c.step), [2]);
    Deno.env.set("LATHE_RESUME", "1");
    const resumed = await train(s, FULL);
    Deno.env.delete("LATHE_RESUME");
    assert.equal(resumed.manifest.metrics.resumed_from_step, 2);
    await sftUpstream(s, "b");
    const whole = await train(s, FULL, "b", true);
    assert.equal(
      resumed.manifest.outputs["model/model.safetensors"].sha256,
      whole.manifest.outputs["model/model.safetensors"].sha256,
      "the same weights, to the byte",
    );
    assert.equal(resumed.manifest.metrics.eval_loss, whole.manifest.metrics.eval_loss);
    await sftUpstream(s, "c");
    const again = await train(s, FULL, "c", true);
    assert.equal(
      again.manifest.outputs["model/model.safetensors"].sha256,
      whole.manifest.outputs["model/model.safetensors"].sha256,
      "same seed, same bytes",
    );
  });
});

Deno.test("the memory plan of a full fine-tune counts masters, gradients and moments; 7B does not fit 24 GiB", async () => {
  const json = JSON.parse(
    await Deno.readTextFile(
      join(ROOT, "tests/fixtures/hub_configs/mistralai--Mistral-7B-Instruct-v0.3.json"),
    ),
  );
  const mistral = parseModelConfig(json, "Mistral-7B-Instruct-v0.3");
  let params = 0;
  for (const shape of expectedTensors(mistral).values()) params += shape.reduce((a, b) => a * b, 1);
  const settings = { batchRows: 1, seqLen: 2048, gradientCheckpointing: true, dtype: "f16" as const };
  const limits = { maxBindingBytes: 2 ** 31, software: false };
  const plan = planTrainingMemory(mistral, { ...settings, lora: { r: 16, targets: [] }, full: true }, limits);
  const part = (name: string) => plan.parts.find((x) => x.name.startsWith(name))?.bytes ?? -1;
  assert.equal(part("f32 master"), 4 * params, "an f32 copy of every weight beside the f16 one");
  assert.equal(part("weight gradients"), 4 * params);
  assert.equal(part("AdamW"), 8 * params);
  assert.ok(plan.total > 18 * params, `${plan.total} bytes for ${params} parameters`);
  assert.throws(
    () => checkFits(plan, { bytes: 24 * 2 ** 30, source: "LATHE_GPU_MEMORY" }, "a 24 GiB card"),
    (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /^Cannot train on a 24 GiB card: one training step needs 1\d\d\.\d\d GiB/);
      return true;
    },
  );
});

Deno.test("finetuning: full refuses a 4-bit base, an init_adapter and the cpu-reference backend", async () => {
  await withSftSetup({ arch: "llama", quantize: { quant_type: "nf4" } }, async (s) => {
    await assert.rejects(() => train(s, FULL), (e: Error) => {
      assert.ok(e instanceof LatheError, String(e));
      assert.match(e.message, /Cannot fine-tune every weight of a 4-bit base/);
      return true;
    });
  });
  await withSftSetup({ arch: "llama" }, async (s) => {
    await assert.rejects(() => train(s, { ...FULL, init_adapter: "x" }), /init_adapter/);
    await assert.rejects(() => train(s, { ...FULL, backend: "cpu-reference" }), /cpu-reference backend/);
  });
});
