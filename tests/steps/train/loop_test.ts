import assert from "node:assert/strict";
import { join } from "node:path";
import type { LoraConfig } from "../../../formats/peft.ts";
import type { ReferenceModel } from "../../../kernels/models/reference_backend.ts";
import { learning_rate } from "../../../kernels/reference/schedules.ts";
import { LatheError } from "../../../steps/errors.ts";
import { sha256File } from "../../../steps/hash.ts";
import { buildBatch, chunks, epochOrder } from "../../../steps/train/batches.ts";
import { listCheckpoints, writeAdapter } from "../../../steps/train/checkpoint.ts";
import { trainLoop, type TrainLoopOptions } from "../../../steps/train/loop.ts";
import type { TrainSftConfig } from "../../../steps/train/config.ts";
import {
  FaultyModel,
  flatLora,
  makeSplit,
  memoryIo,
  nanoModel,
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
