import assert from "node:assert/strict";
import { join } from "node:path";
import { readPeftAdapter } from "../../formats/peft.ts";
import { loadModelConfig } from "../../formats/model_config.ts";
import { LatheError } from "../../foundation/errors.ts";
import { FAILURE_FILE, readManifest } from "../../foundation/manifest.ts";
import { loadStep } from "../../steps/registry.ts";
import { canonicalJson, sha256File, sha256Hex } from "../../foundation/hash.ts";
import { resolveConfig, type RunOutcome, runStep } from "../../steps/runner.ts";
import { bestModelSettings } from "../../steps/train/config.ts";
import { step as tokenizeStep } from "../../steps/tokenize.ts";
import { CHECKPOINTS_DIR, step, TrainSftConfig, trainSftHooks } from "../../steps/train_sft.ts";
import { listCheckpoints } from "../../steps/train/checkpoint.ts";
import { fakePrepare } from "./tokenize/_fixtures.ts";
import { FaultyModel, ROOT } from "./train/_fixtures.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { type SftSetup, sftUpstream, withSftSetup } from "./train/_sft_runs.ts";

type Setup = SftSetup;
const upstream = sftUpstream;
const withSetup = (fn: (s: Setup) => Promise<void>) => withSftSetup({ arch: "llama" }, fn);

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
    finetuning: "lora",
    lora: {
      r: 8,
      alpha: 16,
      dropout: 0.05,
      target_modules: "all-linear",
      use_rslora: false,
      bias: "none",
      modules_to_save: null,
      trainable_token_indices: null,
    },
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
    offload_layer_inputs: false,
    eval_steps: null,
    load_best_model_at_end: false,
    metric_for_best_model: "eval_loss",
    greater_is_better: false,
    early_stopping_patience: null,
    early_stopping_threshold: 0,
    save_steps: 500,
    save_total_limit: null,
    logging_steps: 1,
  });
  assert.throws(() => TrainSftConfig.parse({ model: "m", lora: { lora_alpha: 16 } }));
  // greater_is_better is resolved from the metric's name, as transformers does.
  assert.equal(
    TrainSftConfig.parse({ model: "m", metric_for_best_model: "mean_token_accuracy" }).greater_is_better,
    true,
  );
  assert.throws(() => TrainSftConfig.parse({ model: "m", max_steps: 0 }));
  assert.throws(() => TrainSftConfig.parse({ model: "m", lora: { target_modules: ["lm_head"] } }));
});

Deno.test("train-sft best-model keys resolve as transformers reads them: spelled-out defaults keep the key, what cannot work is rejected", () => {
  const hash = (raw: Record<string, unknown>) =>
    sha256Hex(canonicalJson(resolveConfig(step, { model: "m", eval_steps: 5, ...raw })));
  const plain = hash({});
  // Spelling a default out, or giving transformers' null, resolves to the config without the key.
  for (
    const same of [
      { load_best_model_at_end: false },
      { metric_for_best_model: "loss" },
      { metric_for_best_model: "eval_loss", greater_is_better: false },
      { metric_for_best_model: null, greater_is_better: null },
    ]
  ) {
    assert.equal(hash(same), plain, JSON.stringify(same));
  }
  assert.notEqual(hash({ load_best_model_at_end: true }), plain);
  assert.notEqual(hash({ greater_is_better: true }), plain);
  // "loss" is "eval_loss" (transformers prefixes "eval_"), and the direction follows the name.
  const on = resolveConfig(step, {
    model: "m",
    eval_steps: 5,
    load_best_model_at_end: true,
    metric_for_best_model: "loss",
  });
  assert.deepEqual(bestModelSettings(on), { loadBest: true, metric: "eval_loss", greaterIsBetter: false });
  assert.equal(
    hash({ load_best_model_at_end: true, metric_for_best_model: "loss" }),
    hash({ load_best_model_at_end: true }),
  );
  assert.deepEqual(bestModelSettings(resolveConfig(step, { model: "m" })), {
    loadBest: false,
    metric: "eval_loss",
    greaterIsBetter: false,
  });
  // trl's token accuracy: "mean_token_accuracy" reads as "eval_mean_token_accuracy", and a name
  // not ending in "loss" makes a larger value better.
  const accuracy = { load_best_model_at_end: true, metric_for_best_model: "mean_token_accuracy" };
  assert.deepEqual(bestModelSettings(resolveConfig(step, { model: "m", eval_steps: 5, ...accuracy })), {
    loadBest: true,
    metric: "eval_mean_token_accuracy",
    greaterIsBetter: true,
  });
  const byAccuracy = hash(accuracy);
  assert.notEqual(byAccuracy, hash({ load_best_model_at_end: true }));
  for (
    const same of [
      { ...accuracy, metric_for_best_model: "eval_mean_token_accuracy" },
      { ...accuracy, greater_is_better: true },
      { ...accuracy, greater_is_better: null },
    ]
  ) {
    assert.equal(hash(same), byAccuracy, JSON.stringify(same));
  }
  assert.notEqual(hash({ ...accuracy, greater_is_better: false }), byAccuracy);

  const invalid = (raw: Record<string, unknown>, pattern: RegExp) =>
    assert.throws(() => resolveConfig(step, { model: "m", ...raw }), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, pattern);
      return true;
    });
  invalid(
    { eval_steps: 5, metric_for_best_model: "accuracy" },
    /train-sft\.metric_for_best_model: unknown metric "accuracy" \(read as "eval_accuracy"\); the evaluation computes "eval_loss", "eval_mean_token_accuracy"/,
  );
  invalid(
    { eval_steps: 5, metric_for_best_model: "eval_token_accuracy" },
    /unknown metric "eval_token_accuracy";/,
  );
  invalid(
    { load_best_model_at_end: true },
    /train-sft\.load_best_model_at_end: needs evaluations during training, but eval_steps is null .*; set eval_steps/,
  );
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
      const k of [
        "train_loss",
        "eval_loss",
        "eval_loss_before",
        "eval_mean_token_accuracy",
        "tokens_per_s",
        "trained_tokens",
        "seconds",
      ]
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
    assert.deepEqual(at("mean_token_accuracy"), [1, 2, 3, 4]);
    assert.deepEqual(at("eval_loss"), [0, 2, 4]);
    assert.deepEqual(at("eval_mean_token_accuracy"), [0, 2, 4]);
    const accuracies = lines.filter((l) => l.name.endsWith("mean_token_accuracy")).map((l) => l.value);
    assert.ok(accuracies.every((a) => a >= 0 && a <= 1), JSON.stringify(accuracies));
    assert.equal(m.metrics.eval_mean_token_accuracy, lines.at(-1)!.value);
    assert.equal(lines.at(-1)!.name, "eval_mean_token_accuracy");

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

/** The eval points after the first step, and the step of the lowest. */
function bestEval(lines: MetricLine[]): { evals: MetricLine[]; best: MetricLine } {
  const evals = lines.filter((l) => l.name === "eval_loss" && l.step > 0);
  return { evals, best: evals.reduce((a, b) => (b.value < a.value ? b : a)) };
}

// A learning rate at which the eval loss of the synthetic chats rises again before step 6.
const BEST = { ...SMALL, max_steps: 6, learning_rate: 2e-2, lr_scheduler_type: "constant", eval_steps: 1 };

Deno.test("train-sft with load_best_model_at_end exports the best evaluation's adapter and records which one", async () => {
  await withSetup(async (s) => {
    const out = await train(s, { ...BEST, save_steps: 1, load_best_model_at_end: true });
    const dir = join(s.runs, "a", "train-sft");
    const { evals, best } = bestEval(await metricLines(dir));
    assert.deepEqual(evals.map((l) => l.step), [1, 2, 3, 4, 5, 6]);
    assert.ok(best.step < 6 && evals[5].value > best.value, JSON.stringify(evals));

    const weights = out.manifest.outputs.adapter_weights.sha256;
    const kept = (step: number) => join(dir, "checkpoints", `step-${step}`, "adapter_model.safetensors");
    assert.equal(weights, (await sha256File(kept(best.step))).sha256);
    assert.notEqual(weights, (await sha256File(kept(6))).sha256);
    const m = out.manifest.metrics;
    assert.equal(m.best_global_step, best.step);
    assert.equal(m.best_metric, best.value);
    assert.equal(m.best_model_checkpoint, `checkpoints/step-${best.step}`);
    assert.equal(m.eval_loss, evals[5].value);
    const state = JSON.parse(await Deno.readTextFile(join(dir, "trainer_state.json")));
    assert.deepEqual(
      [state.best_global_step, state.best_metric, state.best_model_checkpoint],
      [best.step, best.value, `checkpoints/step-${best.step}`],
    );
    // The checkpoint's own trainer_state.json names itself, relative to the step directory.
    const own = JSON.parse(
      await Deno.readTextFile(join(dir, "checkpoints", `step-${best.step}`, "trainer_state.json")),
    );
    assert.equal(own.best_model_checkpoint, `checkpoints/step-${best.step}`);

    // Without an eval split the step stops before loading the model.
    await runStep(fakePrepare, {
      runsRoot: s.runs,
      runId: "c",
      recipe: null,
      seed: 1,
      projectRoot: ROOT,
      quiet: true,
      config: { train: join(s.dir, "train.jsonl"), kind: "sft" },
    });
    await runStep(tokenizeStep, {
      runsRoot: s.runs,
      runId: "c",
      recipe: null,
      seed: 1,
      projectRoot: ROOT,
      quiet: true,
      config: { tokenizer: "data/demo/tokenizer", max_seq_len: 96, workers: 1 },
    });
    trainSftHooks.wrapModel = () => {
      throw new Error("the model was loaded");
    };
    await assert.rejects(
      () => train(s, { ...BEST, load_best_model_at_end: true }, "c"),
      /Cannot use train-sft\.load_best_model_at_end: there is no eval split/,
    );
  });
});

Deno.test("a killed train-sft with load_best_model_at_end resumes to the adapter and record of an uninterrupted run", async () => {
  await withSetup(async (s) => {
    const config = { ...BEST, save_steps: 2, load_best_model_at_end: true };
    trainSftHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 5 });
    await assert.rejects(() => train(s, config), /injected kill at step 5/);
    delete trainSftHooks.wrapModel;
    Deno.env.set("LATHE_RESUME", "1");
    const resumed = await train(s, config);
    Deno.env.delete("LATHE_RESUME");
    assert.equal(resumed.manifest.metrics.resumed_from_step, 4);

    await upstream(s, "b");
    const whole = await train(s, config, "b", true);
    // The exported adapter is not the last one.
    assert.ok((whole.manifest.metrics.best_global_step as number) < 6);
    assert.equal(
      resumed.manifest.outputs.adapter_weights.sha256,
      whole.manifest.outputs.adapter_weights.sha256,
    );
    for (const k of ["best_global_step", "best_metric", "best_model_checkpoint", "eval_loss", "train_loss"]) {
      assert.equal(resumed.manifest.metrics[k], whole.manifest.metrics[k], k);
    }
    // trainer_state.json is the same but for the timings.
    const timings = new Set(["train_runtime", "train_tokens_per_second", "tokens_per_second"]);
    const state = async (run: string) => {
      const text = await Deno.readTextFile(join(s.runs, run, "train-sft", "trainer_state.json"));
      return JSON.parse(text, (key, value) => (timings.has(key) ? undefined : value));
    };
    const [a, b] = [await state("a"), await state("b")];
    assert.equal(a.best_global_step, whole.manifest.metrics.best_global_step);
    assert.deepEqual(a, b);
  });
});

gpuTest(
  "train-sft on the webgpu backend agrees with the cpu-reference backend and records the adapter",
  async (gpu) => {
    await withSetup(async (s) => {
      // Three steps at a high rate: enough for some eval tokens to be predicted.
      const config = { ...SMALL, max_steps: 3, learning_rate: 2e-2, save_steps: null };
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
      // The accuracy is a count: equal in f32; in f16 one of the 37 trained eval tokens may flip
      // when the rounding swaps its top two logits.
      const [a, b] = [cpu.metrics.eval_mean_token_accuracy, web.metrics.eval_mean_token_accuracy] as number[];
      assert.ok(a > 0, "some eval tokens are predicted");
      assert.ok(
        Math.abs(a - b) <= (gpu.f16 ? 1.5 / 37 : 1e-12),
        `eval_mean_token_accuracy: cpu ${a} vs webgpu ${b}`,
      );
    });
  },
);

Deno.test('lora.bias accepts peft\'s default "none" and refuses biases lathe does not train', () => {
  assert.equal(resolveConfig(step, { model: "m", lora: { bias: "none" } }).lora.bias, "none");
  assert.throws(() => resolveConfig(step, { model: "m", lora: { bias: "all" } }), (e: Error) => {
    assert.ok(e instanceof LatheError);
    assert.match(e.message, /lora\.bias must be "none": lathe trains LoRA adapters without biases/);
    return true;
  });
});
