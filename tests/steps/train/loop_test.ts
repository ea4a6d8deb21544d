import assert from "node:assert/strict";
import { join } from "node:path";
import type { LoraConfig } from "../../../formats/peft.ts";
import type { ReferenceModel } from "../../../kernels/models/reference_backend.ts";
import { learning_rate } from "../../../steps/train/schedule.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { sha256File } from "../../../foundation/hash.ts";
import { buildBatch, chunks, epochOrder } from "../../../steps/train/batches.ts";
import { listCheckpoints, writeAdapter } from "../../../steps/train/checkpoint.ts";
import { finalTrainerState, trainLoop, type TrainLoopOptions } from "../../../steps/train/loop.ts";
import { Progress } from "../../../foundation/progress.ts";
import type { TrainSftConfig } from "../../../steps/train/config.ts";
import {
  FaultyModel,
  flatLora,
  makeSplit,
  memoryIo,
  nanoModel,
  packedRow,
  patternDoc,
  patternRows,
  referenceModel,
  type RowSpec,
  trainConfig,
  withTempDir,
} from "./_fixtures.ts";
import type { HostModel } from "../../../kernels/models/load.ts";
import type { Split } from "../../../steps/train/batches.ts";

const PEFT: LoraConfig = {
  baseModelNameOrPath: "tiny",
  r: 8,
  loraAlpha: 16,
  loraDropout: 0.05,
  targetModules: "all-linear",
  useRslora: false,
};

interface World {
  dir: string;
  host: HostModel;
  train: Split;
  eval: Split;
}

async function withWorld(fn: (w: World) => Promise<void>): Promise<void> {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "model"));
    const train = await makeSplit(dir, "train", patternRows(16, 32), { seqLen: 32, packed: true });
    const evalSplit = await makeSplit(dir, "eval", patternRows(4, 32, 7), { seqLen: 32, packed: true });
    await fn({ dir, host, train, eval: evalSplit });
  });
}

function options(w: World, config: TrainSftConfig, over: Partial<TrainLoopOptions> = {}, seed = 1) {
  const mem = memoryIo();
  const opts: TrainLoopOptions = {
    model: referenceModel(w.host, config, seed),
    config,
    lora: PEFT,
    train: w.train,
    eval: w.eval,
    seed,
    checkpointDir: null,
    resume: false,
    io: mem.io,
    ...over,
  };
  return { opts, points: mem.points };
}

/** sha256 of the adapter file the model writes (compared as text, so a failure prints two lines). */
async function adapterHash(dir: string, model: TrainLoopOptions["model"]): Promise<string> {
  await writeAdapter(dir, model, PEFT);
  return (await sha256File(join(dir, "adapter_model.safetensors"))).sha256;
}

Deno.test("trainLoop() lowers the loss over 20 steps on repetitive data and beats the untrained eval loss", async () => {
  await withWorld(async (w) => {
    const config = trainConfig({
      max_steps: 20,
      learning_rate: 1e-2,
      lr_scheduler_type: "constant",
      per_device_train_batch_size: 2,
      gradient_accumulation_steps: 2,
      lora: { dropout: 0 },
    });
    const { opts, points } = options(w, config);
    const result = await trainLoop(opts);
    const losses = points.filter((p) => p.name === "loss").map((p) => p.value);
    assert.equal(losses.length, 20);
    const head = (losses[0] + losses[1]) / 2;
    const tail = (losses[18] + losses[19]) / 2;
    assert.ok(tail < head - 0.5, `loss ${head} -> ${tail}`);
    const m = result.metrics;
    assert.ok(m.eval_loss_before !== null && m.eval_loss !== null);
    assert.ok(m.eval_loss! < m.eval_loss_before! - 0.5, `eval ${m.eval_loss_before} -> ${m.eval_loss}`);
    // ln(512) ≈ 6.24: the random-init model starts near uniform.
    assert.ok(Math.abs(m.eval_loss_before! - Math.log(512)) < 0.2);
    assert.equal(m.steps, 20);
    assert.equal(m.epochs, 5); // 16 rows, 4 per step
    assert.equal(m.trained_tokens, w.train.index.trained_tokens * 5);
    assert.deepEqual(points.filter((p) => p.name === "eval_loss").map((p) => p.step), [0, 20]);
  });
});

Deno.test("trainLoop() is deterministic: the same seed gives identical adapter bytes, another seed different ones", async () => {
  await withWorld(async (w) => {
    const config = trainConfig({ max_steps: 3, learning_rate: 1e-2, gradient_accumulation_steps: 2 });
    assert.equal(config.lora.dropout, 0.05); // dropout masks take part
    const bytes: string[] = [];
    for (const [i, seed] of [7, 7, 8].entries()) {
      const { opts } = options(w, config, {}, seed);
      await trainLoop(opts);
      bytes.push(await adapterHash(join(w.dir, `a${i}`), opts.model));
    }
    assert.deepEqual(bytes[0], bytes[1]);
    assert.notDeepEqual(bytes[0], bytes[2]);
  });
});

// Eight unpacked rows of different lengths training very different token counts.
function unequalRows(): RowSpec[] {
  const lengths = [5, 29, 9, 17, 24, 3, 12, 31];
  const trained = [4, 2, 8, 16, 1, 2, 11, 25];
  return lengths.map((len, i) => ({
    tokens: patternDoc(i, len),
    mask: Array.from({ length: len }, (_, t) => (t >= len - trained[i] ? 1 : 0)),
    bounds: [0, len],
  }));
}

Deno.test("bs 2 × GA 4 equals bs 8 in loss, gradients and weights, with unequal micro-batches", async () => {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "model"), "qwen2");
    const train = await makeSplit(dir, "train", unequalRows(), { seqLen: 32, packed: false });
    const base = {
      max_steps: 1,
      learning_rate: 1e-3,
      lora: { dropout: 0, r: 4 },
      lr_scheduler_type: "constant",
    };
    const run = async (bs: number, ga: number) => {
      const config = trainConfig({
        ...base,
        per_device_train_batch_size: bs,
        gradient_accumulation_steps: ga,
      });
      const inner = referenceModel(host, config, 5);
      let grads: Map<string, Float64Array> | null = null;
      const micro: { lossSum: number; tokens: number }[] = [];
      const model = new FaultyModel(inner, {
        beforeStep: () => (grads = inner.gradients()),
        onMicroBatch: (r) => micro.push(r),
      });
      const mem = memoryIo();
      await trainLoop({
        model,
        config,
        lora: PEFT,
        train,
        eval: null,
        seed: 5,
        checkpointDir: null,
        resume: false,
        io: mem.io,
      });
      const value = (name: string) => mem.points.find((p) => p.name === name)!.value;
      return {
        loss: value("loss"),
        gradNorm: value("grad_norm"),
        grads: grads!,
        micro,
        weights: await flatLora(model),
      };
    };
    const ga = await run(2, 4);
    const one = await run(8, 1);
    assert.equal(ga.micro.length, 4);
    assert.equal(one.micro.length, 1);
    // The micro-batches really differ in trained tokens (the case per-micro-batch means get wrong).
    assert.ok(new Set(ga.micro.map((m) => m.tokens)).size > 1, JSON.stringify(ga.micro));
    const naive = ga.micro.reduce((s, m) => s + m.lossSum / m.tokens, 0) / ga.micro.length;
    assert.ok(Math.abs(naive - one.loss) > 1e-3, `naive ${naive} vs ${one.loss}`);

    assert.ok(Math.abs(ga.loss - one.loss) <= 1e-5, `loss ${ga.loss} vs ${one.loss}`);
    assert.ok(Math.abs(ga.gradNorm - one.gradNorm) <= 1e-5 * one.gradNorm);
    let scale = 0;
    let diff = 0;
    for (const [name, g] of one.grads) {
      const h = ga.grads.get(name)!;
      for (let i = 0; i < g.length; i++) {
        scale = Math.max(scale, Math.abs(g[i]));
        diff = Math.max(diff, Math.abs(g[i] - h[i]));
      }
    }
    assert.ok(scale > 0);
    assert.ok(diff <= 1e-5 * scale, `gradient difference ${diff} (scale ${scale})`);
    let wdiff = 0;
    for (let i = 0; i < one.weights.length; i++) {
      wdiff = Math.max(wdiff, Math.abs(one.weights[i] - ga.weights[i]));
    }
    assert.ok(wdiff <= 1e-5, `weights differ by ${wdiff}`);

    // Normalising each micro-batch by its own tokens (the pre-fix behaviour) does not pass this check.
    const config = trainConfig({ ...base, per_device_train_batch_size: 2, gradient_accumulation_steps: 4 });
    const buggy = referenceModel(host, config, 5) as ReferenceModel;
    const order = epochOrder(train.rows.length, 5, 0);
    for (const rows of chunks(Array.from(order, (i) => train.rows[i]), 2)) {
      const batch = buildBatch(rows, train.index.pad_id);
      const tokens = batch.targets.filter((t) => t !== -100).length;
      await buggy.forwardBackward(batch, tokens * 4, 0);
    }
    let bdiff = 0;
    for (const [name, g] of buggy.gradients()) {
      const h = one.grads.get(name)!;
      for (let i = 0; i < g.length; i++) bdiff = Math.max(bdiff, Math.abs(g[i] - h[i]));
    }
    assert.ok(bdiff > 1e-3 * scale, `per-micro-batch normalisation differs by only ${bdiff}`);
  });
});

Deno.test("trainLoop() logs the learning rate of every update as schedules.ts computes it", async () => {
  await withWorld(async (w) => {
    for (
      const [type, warmup] of [["cosine", { warmup_steps: 2 }], ["linear", { warmup_ratio: 0.3 }]] as const
    ) {
      const config = trainConfig({
        max_steps: 6,
        learning_rate: 3e-3,
        lr_scheduler_type: type,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 1,
        ...warmup,
      });
      const { opts, points } = options(w, config, { eval: null });
      await trainLoop(opts);
      const lrs = points.filter((p) => p.name === "lr");
      const warmupSteps = type === "cosine" ? 2 : 2; // ceil(6 · 0.3) = 2
      assert.deepEqual(lrs.map((p) => p.step), [1, 2, 3, 4, 5, 6]);
      for (const p of lrs) {
        const want = learning_rate(3e-3, { name: type, warmupSteps, totalSteps: 6 }, p.step - 1);
        assert.equal(p.value, want, `${type} step ${p.step}`);
      }
      assert.equal(lrs[0].value, 0); // warmup starts at 0
      assert.equal(lrs[2].value, 3e-3); // peak right after warmup
    }
  });
});

Deno.test("early stopping ends training after `patience` evaluations without improvement", async () => {
  await withWorld(async (w) => {
    // A threshold no change can beat: only the first evaluation counts as an improvement.
    const config = trainConfig({
      max_steps: 10,
      per_device_train_batch_size: 4,
      gradient_accumulation_steps: 1,
      eval_steps: 1,
      early_stopping_patience: 2,
      early_stopping_threshold: 1e3,
    });
    const { opts, points } = options(w, config);
    const result = await trainLoop(opts);
    assert.equal(result.metrics.steps, 3);
    assert.equal(result.metrics.stopped_early, true);
    assert.deepEqual(points.filter((p) => p.name === "eval_loss").map((p) => p.step), [0, 1, 2, 3]);
    const patient = trainConfig({ ...config, early_stopping_patience: null, max_steps: 4 });
    const again = await trainLoop(options(w, patient).opts);
    assert.equal(again.metrics.steps, 4);
    assert.equal(again.metrics.stopped_early, false);
    await assert.rejects(
      () => trainLoop(options(w, trainConfig({ early_stopping_patience: 2, max_steps: 2 })).opts),
      (e: Error) => e instanceof LatheError && /eval_steps is null/.test(e.message),
    );
  });
});

Deno.test("a NaN loss stops training with a clear error and keeps the last good checkpoint", async () => {
  await withWorld(async (w) => {
    const config = trainConfig({
      max_steps: 8,
      save_steps: 2,
      per_device_train_batch_size: 4,
      gradient_accumulation_steps: 1,
    });
    const ckpt = join(w.dir, "ckpt");
    const { opts } = options(w, config, { checkpointDir: ckpt });
    opts.model = new FaultyModel(opts.model, { nanAtStep: 5 });
    await assert.rejects(() => trainLoop(opts), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /^Cannot continue training: the loss of step 5 is NaN; /);
      assert.match(e.message, /last good checkpoint is step 4 at ".*step-4"/);
      assert.match(e.hint ?? "", /learning_rate/);
      return true;
    });
    assert.deepEqual((await listCheckpoints(ckpt)).map((c) => c.step), [2, 4]);
  });
});

Deno.test("a run killed after a checkpoint and resumed ends with the same adapter bytes and log", async () => {
  await withWorld(async (w) => {
    const config = trainConfig({
      max_steps: 7,
      save_steps: 3,
      logging_steps: 2,
      learning_rate: 5e-3,
      per_device_train_batch_size: 2,
      gradient_accumulation_steps: 3, // 6 rows a step: epochs end mid-run
      eval_steps: 2,
    });
    const whole = options(w, config, { checkpointDir: join(w.dir, "whole") });
    const wholeResult = await trainLoop(whole.opts);

    const ckpt = join(w.dir, "ckpt");
    const killed = options(w, config, { checkpointDir: ckpt });
    killed.opts.model = new FaultyModel(killed.opts.model, { throwAtStep: 5 });
    await assert.rejects(() => trainLoop(killed.opts), /injected kill at step 5/);
    assert.deepEqual((await listCheckpoints(ckpt)).map((c) => c.step), [3]);

    // A new process: a fresh model (its own init), resumed from step 3.
    const resumed = options(w, config, { checkpointDir: ckpt, resume: true });
    const result = await trainLoop(resumed.opts);
    assert.equal(result.metrics.resumed_from_step, 3);
    assert.deepEqual(
      await adapterHash(join(w.dir, "r"), resumed.opts.model),
      await adapterHash(join(w.dir, "u"), whole.opts.model),
    );
    const exact = (ps: { name: string; step: number; value: number }[]) =>
      ps.filter((p) => p.name !== "tokens_per_s").map((p) => `${p.name}@${p.step}=${p.value}`);
    assert.deepEqual(exact(resumed.points), exact(whole.points));
    assert.equal(result.metrics.train_loss, wholeResult.metrics.train_loss);
    assert.equal(result.metrics.eval_loss, wholeResult.metrics.eval_loss);
  });
});

/**
 * Eval rows in the training pattern's tokens but the reverse order (next id = previous − 1):
 * training first teaches which ids occur, which lowers the eval loss, then the forward order,
 * which raises it again.
 */
function reversedRows(n: number, seqLen: number): RowSpec[] {
  return Array.from({ length: n }, (_, i) => {
    const doc = Array.from({ length: seqLen - 2 }, (_, t) => 20 + ((80 + i - t) % 8));
    return packedRow(seqLen, [doc]);
  });
}

async function withRisingEval(fn: (w: World) => Promise<void>): Promise<void> {
  await withTempDir(async (dir) => {
    const host = await nanoModel(join(dir, "model"));
    const train = await makeSplit(dir, "train", patternRows(16, 32), { seqLen: 32, packed: true });
    const evalSplit = await makeSplit(dir, "eval", reversedRows(4, 32), { seqLen: 32, packed: true });
    await fn({ dir, host, train, eval: evalSplit });
  });
}

const RISING = {
  learning_rate: 1e-2,
  lr_scheduler_type: "constant",
  per_device_train_batch_size: 4,
  gradient_accumulation_steps: 1,
  lora: { dropout: 0 },
  eval_steps: 1,
};

/** A progress reporter that keeps the text of its final line. */
class FinalLine extends Progress {
  static last = "";
  constructor(total: number, unit?: string) {
    super("test", total, unit, true);
  }
  override done(extra?: string): void {
    FinalLine.last = extra ?? "";
    super.done(extra);
  }
}

/** The eval points after the first step, and the step of the lowest. */
function evalsAfterStart(points: { name: string; step: number; value: number }[]) {
  const evals = points.filter((p) => p.name === "eval_loss" && p.step > 0);
  const best = evals.reduce((a, b) => (b.value < a.value ? b : a));
  return { evals, best };
}

async function fileHash(path: string): Promise<string> {
  return (await sha256File(path)).sha256;
}

Deno.test("load_best_model_at_end exports the adapter of the best evaluation when the eval loss rises after it", async () => {
  await withRisingEval(async (w) => {
    const config = trainConfig({
      ...RISING,
      max_steps: 6,
      save_steps: 1,
      save_total_limit: 2,
      load_best_model_at_end: true,
    });
    const ckpt = join(w.dir, "ckpt");
    const { opts, points } = options(w, config, { checkpointDir: ckpt });
    opts.io.progress = (total, unit) => new FinalLine(total, unit);
    const result = await trainLoop(opts);
    const { evals, best } = evalsAfterStart(points);
    assert.deepEqual(evals.map((p) => p.step), [1, 2, 3, 4, 5, 6]);
    // The data make this a real choice: the loss rises after the best step, which is not the last.
    assert.ok(best.step < 6 && evals[5].value > best.value, JSON.stringify(evals));

    const exported = await adapterHash(join(w.dir, "exported"), opts.model);
    assert.equal(exported, await fileHash(join(ckpt, `step-${best.step}`, "adapter_model.safetensors")));
    assert.notEqual(exported, await fileHash(join(ckpt, "step-6", "adapter_model.safetensors")));
    // save_total_limit 2 rotates the others out but keeps the best checkpoint.
    assert.deepEqual((await listCheckpoints(ckpt)).map((c) => c.step), [best.step, 6]);

    assert.equal(result.metrics.best_global_step, best.step);
    assert.equal(result.metrics.best_metric, best.value);
    assert.equal(result.metrics.best_model_checkpoint, join(ckpt, `step-${best.step}`));
    assert.equal(result.metrics.eval_loss, evals[5].value); // the last evaluation, as before
    const state = finalTrainerState(result, config);
    assert.deepEqual(
      [state.best_global_step, state.best_metric, state.best_model_checkpoint],
      [best.step, best.value, join(ckpt, `step-${best.step}`)],
    );
    assert.deepEqual(Object.keys(state).slice(0, 3), [
      "best_global_step",
      "best_metric",
      "best_model_checkpoint",
    ]);
    assert.match(FinalLine.last, new RegExp(`kept the adapter of step ${best.step} \\(best eval_loss \\d`));

    // The same run without the flag trains identically and exports the last adapter.
    const plain = trainConfig({ ...RISING, max_steps: 6, save_steps: 1 });
    const last = options(w, plain, { checkpointDir: join(w.dir, "plain") });
    const plainResult = await trainLoop(last.opts);
    assert.equal(
      await adapterHash(join(w.dir, "last"), last.opts.model),
      await fileHash(join(ckpt, "step-6", "adapter_model.safetensors")),
    );
    assert.ok(!("best_global_step" in plainResult.metrics));
    assert.ok(!("best_global_step" in finalTrainerState(plainResult, plain)));
  });
});

Deno.test("load_best_model_at_end with early stopping exports the best adapter; greater_is_better flips the choice", async () => {
  await withRisingEval(async (w) => {
    const config = trainConfig({
      ...RISING,
      max_steps: 12,
      save_steps: 1,
      early_stopping_patience: 2,
      load_best_model_at_end: true,
    });
    const ckpt = join(w.dir, "ckpt");
    const { opts, points } = options(w, config, { checkpointDir: ckpt });
    const result = await trainLoop(opts);
    const { evals, best } = evalsAfterStart(points);
    // Two evaluations without improvement after the best one end the run.
    assert.equal(result.metrics.stopped_early, true);
    assert.equal(result.metrics.steps, best.step + 2);
    assert.equal(evals.at(-1)!.step, best.step + 2);
    assert.equal(result.metrics.best_global_step, best.step);
    assert.equal(
      await adapterHash(join(w.dir, "exported"), opts.model),
      await fileHash(join(ckpt, `step-${best.step}`, "adapter_model.safetensors")),
    );

    // A metric where greater is better keeps the highest evaluation after the start instead.
    const greater = trainConfig({
      ...RISING,
      max_steps: 6,
      load_best_model_at_end: true,
      greater_is_better: true,
    });
    const g = options(w, greater);
    const gResult = await trainLoop(g.opts);
    const highest = evalsAfterStart(g.points).evals.reduce((a, b) => (b.value > a.value ? b : a));
    assert.equal(gResult.metrics.best_global_step, highest.step);
    assert.equal(gResult.metrics.best_metric, highest.value);
    assert.equal(gResult.metrics.best_model_checkpoint, null); // no checkpoints were written
  });
});

Deno.test("a load_best_model_at_end run killed after a checkpoint and resumed exports the same best adapter", async () => {
  await withRisingEval(async (w) => {
    const config = trainConfig({ ...RISING, max_steps: 7, save_steps: 2, load_best_model_at_end: true });
    const whole = options(w, config, { checkpointDir: join(w.dir, "whole"), checkpointLabel: "checkpoints" });
    const wholeResult = await trainLoop(whole.opts);
    const best = evalsAfterStart(whole.points).best;
    // The best step has no checkpoint of its own and lies before the one the run resumes from,
    // so only the best adapter kept in that checkpoint can bring it back.
    assert.ok(best.step < 4 && best.step % 2 === 1, `best step ${best.step}`);
    assert.equal(wholeResult.metrics.best_model_checkpoint, null);

    const ckpt = join(w.dir, "ckpt");
    const killed = options(w, config, { checkpointDir: ckpt, checkpointLabel: "checkpoints" });
    killed.opts.model = new FaultyModel(killed.opts.model, { throwAtStep: 5 });
    await assert.rejects(() => trainLoop(killed.opts), /injected kill at step 5/);
    assert.deepEqual((await listCheckpoints(ckpt)).map((c) => c.step), [2, 4]);

    const resumed = options(w, config, { checkpointDir: ckpt, checkpointLabel: "checkpoints", resume: true });
    const result = await trainLoop(resumed.opts);
    assert.equal(result.metrics.resumed_from_step, 4);
    assert.deepEqual(
      await adapterHash(join(w.dir, "r"), resumed.opts.model),
      await adapterHash(join(w.dir, "u"), whole.opts.model),
    );
    const { seconds: _a, tokens_per_s: _b, resumed_from_step: _c, ...same } = result.metrics;
    const { seconds: _d, tokens_per_s: _e, resumed_from_step: _f, ...want } = wholeResult.metrics;
    assert.deepEqual(same, want);
    assert.deepEqual(result.state.bestModel, wholeResult.state.bestModel);
    // Both checkpoints at step 6 hold the same state (but for the time), best adapter included.
    const [a, b] = [join(ckpt, "step-6"), join(w.dir, "whole", "step-6")];
    const loopState = async (dir: string) => {
      const { seconds: _, ...rest } = JSON.parse(await Deno.readTextFile(join(dir, "training_state.json")));
      return rest;
    };
    assert.deepEqual(await loopState(a), await loopState(b));
    const bestFile = join("best_adapter", "adapter_model.safetensors");
    assert.equal(await fileHash(join(a, bestFile)), await fileHash(join(b, bestFile)));
  });
});

Deno.test("load_best_model_at_end needs an eval split, and resumes only from checkpoints that keep the best adapter", async () => {
  await withRisingEval(async (w) => {
    const config = trainConfig({ ...RISING, max_steps: 2, save_steps: 1, load_best_model_at_end: true });
    await assert.rejects(() => trainLoop(options(w, config, { eval: null }).opts), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.equal(e.message, "Cannot use train-sft.load_best_model_at_end: there is no eval split");
      assert.match(e.hint ?? "", /give prepare an eval split .* or drop load_best_model_at_end/);
      return true;
    });
    // Checkpoints written without the flag hold no best adapter.
    const ckpt = join(w.dir, "ckpt");
    await trainLoop(
      options(w, trainConfig({ ...RISING, max_steps: 2, save_steps: 1 }), { checkpointDir: ckpt }).opts,
    );
    await assert.rejects(
      () => trainLoop(options(w, config, { checkpointDir: ckpt, resume: true }).opts),
      /Cannot resume from ".*step-2": it does not hold the best adapter that load_best_model_at_end keeps/,
    );
  });
});

Deno.test("trainLoop() logs mean_token_accuracy as Σ correct / N of each step, averaged over the logging window, and eval_mean_token_accuracy over the eval split", async () => {
  await withWorld(async (w) => {
    const config = trainConfig({
      max_steps: 6,
      learning_rate: 1e-2,
      lr_scheduler_type: "constant",
      per_device_train_batch_size: 2,
      gradient_accumulation_steps: 2,
      per_device_eval_batch_size: 3,
      logging_steps: 2,
      eval_steps: 3,
    });
    const { opts, points } = options(w, config);
    // The micro-batch results of each step, as the backend returned them.
    const steps: { correct: number; tokens: number }[][] = [[]];
    opts.model = new FaultyModel(opts.model, {
      onMicroBatch: (r) => steps.at(-1)!.push({ correct: r.correct, tokens: r.tokens }),
      beforeStep: () => steps.push([]),
    });
    const result = await trainLoop(opts);
    steps.pop();
    assert.equal(steps.length, 6);
    const stepAccuracy = steps.map((micro) => {
      const sum = (k: "correct" | "tokens") => micro.reduce((s, m) => s + m[k], 0);
      return sum("correct") / sum("tokens");
    });
    // The model learns the pattern: most tokens end up predicted.
    assert.ok(stepAccuracy[5] > 0.5 && stepAccuracy[0] < 0.2, JSON.stringify(stepAccuracy));
    const logged = points.filter((p) => p.name === "mean_token_accuracy");
    assert.deepEqual(logged.map((p) => p.step), [2, 4, 6]);
    logged.forEach((p, i) => {
      assert.equal(p.value, (stepAccuracy[2 * i] + stepAccuracy[2 * i + 1]) / 2, `step ${p.step}`);
    });

    // The evaluations: Σ correct / Σ trained tokens over every eval row, counted here from fresh
    // predictions of models holding the adapters before training and after the last step.
    const evals = points.filter((p) => p.name === "eval_mean_token_accuracy");
    assert.deepEqual(evals.map((p) => p.step), [0, 3, 6]);
    const evalAccuracy = (model: ReferenceModel) => {
      let correct = 0;
      let tokens = 0;
      for (const rows of chunks(w.eval.rows, 3)) {
        const batch = buildBatch(rows, w.eval.index.pad_id);
        const { argmax } = model.predictions(batch);
        batch.targets.forEach((y, t) => {
          if (y === -100) return;
          tokens++;
          if (argmax[t] === y) correct++;
        });
      }
      return correct / tokens;
    };
    const fresh = referenceModel(w.host, config, 1);
    assert.equal(evals[0].value, evalAccuracy(fresh));
    await fresh.setLora(await opts.model.getLora());
    assert.equal(evals[2].value, evalAccuracy(fresh));
    assert.ok(evals[2].value > evals[0].value + 0.3, JSON.stringify(evals));
    assert.equal(result.metrics.eval_mean_token_accuracy, evals[2].value);

    // trainer_state.json carries both under trl's names.
    const history = finalTrainerState(result, config).log_history;
    assert.deepEqual(
      history.filter((e) => e.mean_token_accuracy !== undefined).map((e) => [e.step, e.mean_token_accuracy]),
      logged.map((p) => [p.step, p.value]),
    );
    assert.deepEqual(
      history.filter((e) => e.eval_loss !== undefined).map((e) => [e.step, e.eval_mean_token_accuracy]),
      evals.map((p) => [p.step, p.value]),
    );
  });
});

Deno.test("metric_for_best_model mean_token_accuracy keeps the adapter of the most accurate evaluation, and early stopping watches it", async () => {
  await withRisingEval(async (w) => {
    const base = { ...RISING, max_steps: 7, save_steps: 1, load_best_model_at_end: true };
    const config = trainConfig({ ...base, metric_for_best_model: "mean_token_accuracy" });
    const ckpt = join(w.dir, "ckpt");
    const { opts, points } = options(w, config, { checkpointDir: ckpt });
    const result = await trainLoop(opts);
    const after = (name: string) => points.filter((p) => p.name === name && p.step > 0);
    const accuracy = after("eval_mean_token_accuracy");
    assert.deepEqual(accuracy.map((p) => p.step), [1, 2, 3, 4, 5, 6, 7]);
    // The first of the highest accuracies wins (a tie keeps the earlier adapter).
    const best = accuracy.reduce((a, b) => (b.value > a.value ? b : a));
    const lowestLoss = after("eval_loss").reduce((a, b) => (b.value < a.value ? b : a));
    // The data make this a real choice: neither the last step nor the step of the lowest loss.
    assert.ok(best.step < 7 && best.step !== lowestLoss.step, JSON.stringify({ best, lowestLoss }));

    assert.equal(result.metrics.best_global_step, best.step);
    assert.equal(result.metrics.best_metric, best.value);
    const exported = await adapterHash(join(w.dir, "exported"), opts.model);
    assert.equal(exported, await fileHash(join(ckpt, `step-${best.step}`, "adapter_model.safetensors")));

    // Ranking by eval_loss on the same run keeps the adapter of the lowest loss instead.
    const byLoss = options(w, trainConfig(base), { checkpointDir: join(w.dir, "loss") });
    const lossResult = await trainLoop(byLoss.opts);
    assert.equal(lossResult.metrics.best_global_step, lowestLoss.step);

    // Early stopping counts evaluations without a higher accuracy.
    const patience = 2;
    const stopping = trainConfig({
      ...RISING,
      max_steps: 12,
      metric_for_best_model: "eval_mean_token_accuracy",
      early_stopping_patience: patience,
    });
    const early = options(w, stopping);
    const earlyResult = await trainLoop(early.opts);
    // The step at which `patience` evaluations in a row fail to beat the best of `name`.
    const stopStep = (name: string, better: (a: number, b: number) => boolean) => {
      let best: number | null = null;
      let bad = 0;
      for (const p of early.points.filter((p) => p.name === name && p.step > 0)) {
        if (best === null || better(p.value, best)) [best, bad] = [p.value, 0];
        else if (++bad >= patience) return p.step;
      }
      return null;
    };
    const byAccuracy = stopStep("eval_mean_token_accuracy", (a, b) => a > b);
    const byLossStop = stopStep("eval_loss", (a, b) => a < b);
    assert.ok(byAccuracy !== null && byAccuracy !== byLossStop, `${byAccuracy} vs ${byLossStop}`);
    assert.equal(earlyResult.metrics.stopped_early, true);
    assert.equal(earlyResult.metrics.steps, byAccuracy);
  });
});
