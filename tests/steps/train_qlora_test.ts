// train-sft on a 4-bit base (QLoRA): a quantize step upstream in the same run feeds train-sft
// through its optional `base` input. The adapter is a PEFT adapter naming the original model;
// the webgpu backend agrees with the cpu-reference backend (which dequantizes the base on the
// host); same seed, same adapter bytes; a killed run resumes to the bytes of an uninterrupted one.
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadModelConfig } from "../../formats/model_config.ts";
import { readPeftAdapter } from "../../formats/peft.ts";
import { LatheError } from "../../foundation/errors.ts";
import { FAILURE_FILE, readManifest } from "../../foundation/manifest.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { type RunOutcome, runStep } from "../../steps/runner.ts";
import { step, trainSftHooks } from "../../steps/train_sft.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { type SftSetup, sftUpstream, withSftSetup } from "./train/_sft_runs.ts";
import { DEMO_TOKENIZER, FaultyModel, ROOT } from "./train/_fixtures.ts";

type Setup = SftSetup;
const upstream = sftUpstream;
const withSetup = (fn: (s: Setup) => Promise<void>) => withSftSetup({ arch: "mistral", quantize: {} }, fn);

function train(s: Setup, config: Record<string, unknown>, runId = "a", force = false): Promise<RunOutcome> {
  return runStep(step, {
    runsRoot: s.runs,
    runId,
    recipe: null,
    config: { model: s.model, lora: { r: 4, alpha: 8, target_modules: ["q_proj", "v_proj"] }, ...config },
    seed: 11,
    projectRoot: ROOT,
    quiet: true,
    force,
  });
}

const SMALL = {
  max_steps: 5,
  per_device_train_batch_size: 2,
  gradient_accumulation_steps: 2,
  learning_rate: 2e-2,
  eval_steps: 2,
  save_steps: 2,
};

gpuTest("train-sft trains LoRA on the quantize step's 4-bit base and names the original model", async () => {
  await withSetup(async (s) => {
    const out = await train(s, SMALL);
    const m = out.manifest;
    const quantized = await readManifest(join(s.runs, "a", "quantize", "manifest.json"));
    assert.equal(m.inputs.base.key, quantized.key, "the quantize step is an input of train-sft");
    assert.deepEqual(Object.keys(m.sources), [], "the base is not hashed again: quantize's key covers it");
    assert.ok(
      (m.metrics.eval_loss as number) < (m.metrics.eval_loss_before as number),
      "the eval loss falls",
    );
    // The memory plan beside the measured peak (within 10 %; eval batches never exceed a training step).
    const [planned, peak] = [m.metrics.memory_planned_bytes, m.metrics.memory_peak_bytes] as number[];
    assert.ok(
      planned > 0 && Math.abs(planned - peak) <= 0.1 * peak,
      `planned ${planned} vs measured ${peak}`,
    );
    const adapter = await readPeftAdapter(
      join(s.runs, "a", "train-sft", "adapter"),
      await loadModelConfig(s.model),
    );
    assert.equal(adapter.config.baseModelNameOrPath, s.model);
    assert.deepEqual([...adapter.config.targetModules].sort(), ["q_proj", "v_proj"]);
  });
});

gpuTest("QLoRA on webgpu agrees with the cpu-reference backend on the dequantized base", async (gpu) => {
  await withSetup(async (s) => {
    const config = { ...SMALL, max_steps: 3, save_steps: null };
    const web = (await train(s, config)).manifest;
    const cpu = (await train(s, { ...config, backend: "cpu-reference" })).manifest;
    const tol = gpu.f16 ? 5e-3 : 1e-4;
    for (const k of ["eval_loss_before", "train_loss", "eval_loss"]) {
      const [a, b] = [cpu.metrics[k] as number, web.metrics[k] as number];
      assert.ok(Math.abs(a - b) <= tol * Math.abs(a), `${k}: cpu ${a} vs webgpu ${b}`);
    }
  });
});

gpuTest("QLoRA: same seed, same adapter bytes; a killed run resumes to the same bytes", async () => {
  await withSetup(async (s) => {
    trainSftHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 4 });
    await assert.rejects(() => train(s, SMALL), /injected kill at step 4/);
    delete trainSftHooks.wrapModel;
    const failure = await readManifest(join(s.runs, "a", "train-sft", FAILURE_FILE));
    assert.equal(failure.status, "failed");
    Deno.env.set("LATHE_RESUME", "1");
    const resumed = await train(s, SMALL);
    Deno.env.delete("LATHE_RESUME");
    assert.equal(resumed.manifest.metrics.resumed_from_step, 2);

    await upstream(s, "b");
    const whole = await train(s, SMALL, "b", true);
    const again = await train(s, SMALL, "b", true);
    const sha = (o: RunOutcome) => o.manifest.outputs.adapter_weights.sha256;
    assert.equal(sha(whole), sha(again), "same seed, same bytes");
    assert.equal(sha(resumed), sha(whole), "resumed = uninterrupted");
  });
});

Deno.test("train-sft refuses a quantize step that quantized another model", async () => {
  await withSetup(async (s) => {
    const other = join(s.dir, "other");
    await writeTinyModel(other, { arch: "mistral", size: "nano", seed: 5, tokenizerDir: DEMO_TOKENIZER });
    await assert.rejects(() => train(s, { ...SMALL, model: other, backend: "cpu-reference" }), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /it quantized ".*tiny-mistral".*train-sft\.model is ".*other"/);
      assert.match(e.hint ?? "", /set train-sft\.model to the model quantize\.model names/);
      return true;
    });
  });
});

gpuTest(
  "a step that cannot fit the adapter's memory stops before loading, with the figure and what would fit",
  async () => {
    await withSetup(async (s) => {
      Deno.env.set("LATHE_GPU_MEMORY", "200000");
      try {
        await assert.rejects(() => train(s, { ...SMALL, gradient_checkpointing: false }), (e: Error) => {
          assert.ok(e instanceof LatheError);
          assert.match(
            e.message,
            /one training step needs [\d.]+ [KM]iB of GPU memory .*the adapter has 195\.31 KiB \(LATHE_GPU_MEMORY\)/,
          );
          assert.match(e.message, /Peak GPU memory of one training step/);
          assert.match(e.hint ?? "", /gradient_checkpointing: true -> /);
          return true;
        });
      } finally {
        Deno.env.delete("LATHE_GPU_MEMORY");
      }
      const failure = await readManifest(join(s.runs, "a", "train-sft", FAILURE_FILE));
      assert.equal(failure.status, "failed");
    });
  },
);
