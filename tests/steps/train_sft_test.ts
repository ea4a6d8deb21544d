import assert from "node:assert/strict";
import { join } from "node:path";
import { readPeftAdapter } from "../../formats/peft.ts";
import { loadModelConfig } from "../../kernels/models/config.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { LatheError } from "../../steps/errors.ts";
import { FAILURE_FILE, readManifest } from "../../steps/manifest.ts";
import { loadStep } from "../../steps/registry.ts";
import { type RunOutcome, runStep } from "../../steps/runner.ts";
import { step as tokenizeStep } from "../../steps/tokenize.ts";
import { CHECKPOINTS_DIR, step, TrainSftConfig, trainSftHooks } from "../../steps/train_sft.ts";
import { listCheckpoints } from "../../steps/train/checkpoint.ts";
import { fakePrepare, syntheticChats, writeJsonl } from "./tokenize/_fixtures.ts";
import { DEMO_TOKENIZER, FaultyModel, ROOT } from "./train/_fixtures.ts";
import { gpuTest } from "../kernels/_harness.ts";

interface Setup {
  dir: string;
  runs: string;
  model: string;
}

/** prepare (fake) and tokenize into run `runId`, with a nano llama model beside them. */
async function upstream(s: Setup, runId: string): Promise<void> {
  const common = { runsRoot: s.runs, runId, recipe: null, seed: 1, projectRoot: ROOT, quiet: true };
  await runStep(fakePrepare, {
    ...common,
    config: { train: join(s.dir, "train.jsonl"), eval: join(s.dir, "eval.jsonl"), kind: "sft" },
  });
  await runStep(tokenizeStep, {
    ...common,
    config: { tokenizer: "data/demo/tokenizer", max_seq_len: 96, workers: 1 },
  });
}

async function withSetup(fn: (s: Setup) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-train-sft-" });
  try {
    const s = { dir, runs: join(dir, "runs"), model: join(dir, "tiny-llama") };
    await writeJsonl(join(dir, "train.jsonl"), syntheticChats(12));
    await writeJsonl(join(dir, "eval.jsonl"), syntheticChats(3));
    await writeTinyModel(s.model, { arch: "llama", size: "nano", seed: 2, tokenizerDir: DEMO_TOKENIZER });
    await upstream(s, "a");
    await fn(s);
  } finally {
    delete trainSftHooks.wrapModel;
    Deno.env.delete("LATHE_RESUME");
    await Deno.remove(dir, { recursive: true });
  }
}

function train(s: Setup, config: Record<string, unknown>, runId = "a", force = false): Promise<RunOutcome> {
  return runStep(step, {
    runsRoot: s.runs,
    runId,
    recipe: null,
    config: { model: s.model, backend: "cpu-reference", ...config },
    seed: 11,
    projectRoot: ROOT,
    quiet: true,
    force,
  });
}

const SMALL = {
  max_steps: 4,
  per_device_train_batch_size: 2,
  gradient_accumulation_steps: 1,
  learning_rate: 5e-3,
  eval_steps: 2,
  save_steps: 2,
};

interface MetricLine {
  name: string;
  step: number;
  value: number;
}

async function metricLines(dir: string): Promise<MetricLine[]> {
  const text = await Deno.readTextFile(join(dir, "metrics.jsonl"));
  return text.trim().split("\n").map((l) => JSON.parse(l));
}

Deno.test("train-sft config fills the documented defaults and rejects unknown keys", () => {
  assert.deepEqual(TrainSftConfig.parse({ model: "m" }), {
    model: "m",
    revision: "main",
    backend: "webgpu",
    lora: { r: 8, alpha: 16, dropout: 0.05, target_modules: "all-linear", use_rslora: false },
    init_adapter: null,
    per_device_train_batch_size: 1,
    per_device_eval_batch_size: null,
    gradient_accumulation_steps: 8,
    max_steps: -1,
    num_train_epochs: 3,
    learning_rate: 2e-4,
    lr_scheduler_type: "linear",
    warmup_ratio: 0,
    warmup_steps: 0,
    weight_decay: 0,
    adam_beta1: 0.9,
    adam_beta2: 0.999,
    adam_epsilon: 1e-8,
    max_grad_norm: 1,
    gradient_checkpointing: true,
    eval_steps: null,
    early_stopping_patience: null,
    early_stopping_threshold: 0,
    save_steps: 500,
    save_total_limit: null,
    logging_steps: 1,
  });
  assert.throws(() => TrainSftConfig.parse({ model: "m", lora: { lora_alpha: 16 } }));
  assert.throws(() => TrainSftConfig.parse({ model: "m", max_steps: 0 }));
  assert.throws(() => TrainSftConfig.parse({ model: "m", lora: { target_modules: ["lm_head"] } }));
});

Deno.test("train-sft runs end to end on a tokenize upstream: PEFT adapter, metrics, plot, trainer state, checkpoints", async () => {
  await withSetup(async (s) => {
    assert.equal(await loadStep("train-sft"), step);
    const out = await train(s, SMALL);
    assert.equal(out.status, "ran");
    const m = out.manifest;
    const dir = join(s.runs, "a", "train-sft");
    assert.deepEqual(Object.keys(m.outputs).sort(), [
      "adapter",
      "adapter_weights",
      "loss_plot",
      "metrics_log",
      "trainer_state",
    ]);
    assert.deepEqual(Object.keys(m.sources).sort(), ["model/config.json", "model/model.safetensors"]);
    for (
      const k of ["train_loss", "eval_loss", "eval_loss_before", "tokens_per_s", "trained_tokens", "seconds"]
    ) {
      assert.equal(typeof m.metrics[k], "number", k);
    }
    assert.equal(m.metrics.steps, 4);
    assert.equal(m.metrics.backend, "cpu-reference");
    assert.equal(m.metrics.resumed_from_step, null);
    assert.ok((m.metrics.eval_loss as number) < (m.metrics.eval_loss_before as number));

    const adapter = await readPeftAdapter(join(dir, "adapter"), await loadModelConfig(s.model));
    assert.equal(adapter.config.baseModelNameOrPath, s.model);
    assert.equal(adapter.pairs.size, 2 * 7);

    const lines = await metricLines(dir);
    const at = (name: string) => lines.filter((l) => l.name === name).map((l) => l.step);
    assert.deepEqual(at("loss"), [1, 2, 3, 4]);
    assert.deepEqual(at("lr"), [1, 2, 3, 4]);
    assert.deepEqual(at("grad_norm"), [1, 2, 3, 4]);
    assert.deepEqual(at("tokens_per_s"), [1, 2, 3, 4]);
    assert.deepEqual(at("eval_loss"), [0, 2, 4]);

    const state = JSON.parse(await Deno.readTextFile(join(dir, "trainer_state.json")));
    assert.equal(state.global_step, 4);
    assert.equal(state.log_history.filter((e: { loss?: number }) => e.loss !== undefined).length, 4);
    assert.equal(state.log_history.at(-1).train_loss, m.metrics.train_loss);
    const svg = await Deno.readTextFile(join(dir, "loss.svg"));
    assert.equal(svg.match(/<polyline/g)?.length, 2);

    // Checkpoints moved into the step directory; the run-level directory is gone.
    assert.deepEqual((await listCheckpoints(join(dir, "checkpoints"))).map((c) => c.step), [2, 4]);
    assert.equal(await Deno.stat(join(s.runs, "a", CHECKPOINTS_DIR)).catch(() => null), null);
    assert.equal((await train(s, SMALL)).status, "cached");

    // Continuing from the adapter: the new run's untrained eval loss is the old run's final one.
    const next = await train(s, { ...SMALL, max_steps: 1, init_adapter: join(dir, "adapter") });
    assert.ok(Object.keys(next.manifest.sources).includes("init_adapter/weights"));
    assert.ok(
      Math.abs((next.manifest.metrics.eval_loss_before as number) - (m.metrics.eval_loss as number)) < 1e-12,
    );
    await assert.rejects(
      () => train(s, { ...SMALL, lora: { r: 4 }, init_adapter: join(dir, "adapter") }),
      (e: Error) => e instanceof LatheError && /r=8 .* r=4/.test(e.message),
    );
  });
});

Deno.test("a killed train-sft resumes with LATHE_RESUME=1 and ends with the bytes of an uninterrupted run", async () => {
  await withSetup(async (s) => {
    const config = { ...SMALL, max_steps: 5, gradient_accumulation_steps: 2 };
    trainSftHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 4 });
    await assert.rejects(() => train(s, config), /injected kill at step 4/);
    delete trainSftHooks.wrapModel;
    const failure = await readManifest(join(s.runs, "a", "train-sft", FAILURE_FILE));
    assert.equal(failure.status, "failed");
    const kept = join(s.runs, "a", CHECKPOINTS_DIR, failure.key);
    assert.deepEqual((await listCheckpoints(kept)).map((c) => c.step), [2]);

    // Without a decision the leftover checkpoints are not silently reused or lost.
    await assert.rejects(() => train(s, config), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /an interrupted run with the same key left 1 checkpoint\(s\).*latest: step 2/);
      assert.match(
        e.hint ?? "",
        /--resume \(LATHE_RESUME=1\) to continue from it, or --restart \(LATHE_RESUME=0\)/,
      );
      return true;
    });
    Deno.env.set("LATHE_RESUME", "1");
    const resumed = await train(s, config);
    Deno.env.delete("LATHE_RESUME");
    assert.equal(resumed.manifest.metrics.resumed_from_step, 2);
    assert.equal(resumed.manifest.key, failure.key);

    await upstream(s, "b");
    const whole = await train(s, config, "b", true);
    assert.equal(whole.manifest.metrics.resumed_from_step, null);
    assert.equal(
      resumed.manifest.outputs.adapter_weights.sha256,
      whole.manifest.outputs.adapter_weights.sha256,
    );
    const exact = (ls: MetricLine[]) =>
      ls.filter((l) => l.name !== "tokens_per_s").map((l) => [l.name, l.step, l.value]);
    assert.deepEqual(
      exact(await metricLines(join(s.runs, "a", "train-sft"))),
      exact(await metricLines(join(s.runs, "b", "train-sft"))),
    );
  });
});

Deno.test("a NaN loss fails train-sft with failure.json naming the last good checkpoint, which is kept", async () => {
  await withSetup(async (s) => {
    trainSftHooks.wrapModel = (model) => new FaultyModel(model, { nanAtStep: 3 });
    await assert.rejects(() => train(s, SMALL), /the loss of step 3 is NaN/);
    const failure = await readManifest(join(s.runs, "a", "train-sft", FAILURE_FILE));
    assert.match(failure.error ?? "", /last good checkpoint is step 2 at ".*step-2"/);
    const kept = join(s.runs, "a", CHECKPOINTS_DIR, failure.key);
    assert.deepEqual((await listCheckpoints(kept)).map((c) => c.step), [2]);
    // Starting over on purpose (LATHE_RESUME=0) discards them and trains from step 0.
    delete trainSftHooks.wrapModel;
    Deno.env.set("LATHE_RESUME", "0");
    const fresh = await train(s, SMALL);
    assert.equal(fresh.manifest.metrics.resumed_from_step, null);
    assert.equal(fresh.manifest.metrics.steps, 4);
    assert.equal(await Deno.stat(kept).catch(() => null), null);
  });
});

gpuTest(
  "train-sft on the webgpu backend agrees with the cpu-reference backend and records the adapter",
  async (gpu) => {
    await withSetup(async (s) => {
      const config = { ...SMALL, max_steps: 2, save_steps: null };
      const cpu = (await train(s, config)).manifest;
      const web = (await train(s, { ...config, backend: "webgpu" })).manifest;
      assert.equal(web.env.gpu?.description, gpu.info.description);
      assert.match(String(web.metrics.backend), /^webgpu/);
      // f16 weights and activations where the adapter offers shader-f16, else f32.
      const tol = gpu.f16 ? 5e-3 : 1e-4;
      for (const k of ["eval_loss_before", "train_loss", "eval_loss"]) {
        const [a, b] = [cpu.metrics[k] as number, web.metrics[k] as number];
        assert.ok(Math.abs(a - b) <= tol * Math.abs(a), `${k}: cpu ${a} vs webgpu ${b}`);
      }
    });
  },
);
