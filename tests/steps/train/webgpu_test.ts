// The training loop (steps/train/loop.ts) on the WebGPU backend (kernels/models/graph.ts) for every
// supported architecture, on nano tiny checkpoints (D 64, L 2, V 512): Llama (tied embeddings,
// llama3 RoPE scaling), Mistral (sliding window 32, shorter than the 64-token rows), Qwen2 (q/k/v
// biases). Runs on whatever adapter the machine has (CI: lavapipe, and llvmpipe through
// DENO_WEBGPU_BACKEND=gl); skipped only where no WebGPU adapter exists at all.
import assert from "node:assert/strict";
import { join } from "node:path";
import type { LoraConfig } from "../../../formats/peft.ts";
import { type Gpu, tryGetGpu } from "../../../kernels/device.ts";
import { createGpuModel, type GpuModel } from "../../../kernels/models/graph.ts";
import { loadModelConfig, type ModelConfig } from "../../../formats/model_config.ts";
import { TINY_ARCHS, type TinyArch, writeTinyModel } from "../../../kernels/models/tiny.ts";
import type { AdamWStep, Batch, LoraWeights } from "../../../kernels/models/trainable.ts";
import type { WeightDType } from "../../../kernels/models/gpu_weights.ts";
import { recorder } from "../../../kernels/recorder.ts";
import { sha256File } from "../../../foundation/hash.ts";
import { writeAdapter } from "../../../steps/train/checkpoint.ts";
import type { TrainSftConfig } from "../../../steps/train/config.ts";
import { trainLoop } from "../../../steps/train/loop.ts";
import type { Split } from "../../../steps/train/batches.ts";
import {
  DEMO_TOKENIZER,
  FaultyModel,
  flatLora,
  loraSpec,
  makeSplit,
  memoryIo,
  patternDoc,
  patternRows,
  type RowSpec,
  trainConfig,
  withTempDir,
} from "./_fixtures.ts";

const gpu: Gpu | null = await tryGetGpu();
if (gpu === null) {
  console.warn(
    "warning: no WebGPU adapter: the WebGPU training-loop tests are skipped " +
      "(apt-get install mesa-vulkan-drivers gives the lavapipe software adapter)",
  );
}

/** A test on the process's adapter; ignored (with the warning above) only when there is none. */
function webgpuTest(name: string, fn: (gpu: Gpu) => Promise<void>): void {
  Deno.test({
    name,
    ignore: gpu === null,
    // WebGPU keeps device-wide resources and async work alive across tests by design.
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      await fn(gpu!);
      await recorder(gpu!).sync();
    },
  });
}

const PEFT: LoraConfig = {
  baseModelNameOrPath: "tiny",
  r: 8,
  loraAlpha: 16,
  loraDropout: 0.05,
  targetModules: "all-linear",
  useRslora: false,
};

const SEQ = 64;

/** A nano checkpoint of `arch` under `dir`; returns its directory and config. */
async function nanoCheckpoint(dir: string, arch: TinyArch): Promise<{ dir: string; config: ModelConfig }> {
  const out = join(dir, `model-${arch}`);
  await writeTinyModel(out, { arch, size: "nano", seed: 3, tokenizerDir: DEMO_TOKENIZER });
  return { dir: out, config: await loadModelConfig(out) };
}

/** A GPU model of the checkpoint for `config` (dtype: the adapter's default unless given). */
async function gpuModel(
  ckpt: { dir: string; config: ModelConfig },
  config: TrainSftConfig,
  seed: number,
  dtype?: WeightDType,
): Promise<GpuModel> {
  return await createGpuModel(ckpt.config, ckpt.dir, loraSpec(config), seed, {
    dtype,
    gradientCheckpointing: config.gradient_checkpointing,
  });
}

/** Runs the loop with quiet io, no checkpoints; returns the result and the logged points. */
async function train(model: GpuModel | FaultyModel, config: TrainSftConfig, splits: {
  train: Split;
  eval: Split | null;
}, seed: number) {
  const mem = memoryIo();
  const result = await trainLoop({
    model,
    config,
    lora: PEFT,
    train: splits.train,
    eval: splits.eval,
    seed,
    checkpointDir: null,
    resume: false,
    io: mem.io,
  });
  return { result, points: mem.points };
}

const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;

webgpuTest("a tiny Llama, Mistral and Qwen2 each train on WebGPU: the loss falls", async (gpu) => {
  await withTempDir(async (dir) => {
    const splits = {
      train: await makeSplit(dir, "train", patternRows(8, SEQ), { seqLen: SEQ, packed: true }),
      eval: await makeSplit(dir, "eval", patternRows(2, SEQ, 5), { seqLen: SEQ, packed: true }),
    };
    // Production defaults otherwise: gradient checkpointing on, the adapter's dtype (f16 with shader-f16).
    const config = trainConfig({
      max_steps: 10,
      learning_rate: 1e-2,
      lr_scheduler_type: "constant",
      per_device_train_batch_size: 2,
      gradient_accumulation_steps: 1,
    });
    for (const arch of TINY_ARCHS) {
      using model = await gpuModel(await nanoCheckpoint(dir, arch), config, 1);
      const { result, points } = await train(model, config, splits, 1);
      const what = `${arch} (${model.dtype}) on ${gpu.info.description}`;
      assert.equal(result.metrics.backend, `webgpu: ${gpu.info.description}`);
      const losses = points.filter((p) => p.name === "loss").map((p) => p.value);
      assert.equal(losses.length, 10, what);
      // The random-init model starts near uniform over V = 512: ln 512 ≈ 6.24.
      assert.ok(Math.abs(losses[0] - Math.log(512)) < 0.3, `${what}: first loss ${losses[0]}`);
      // Margin 0.5 nats on both (the drops are 0.8 to 1.2 nats on every arch and dtype).
      const tail = mean(losses.slice(-3));
      assert.ok(tail < losses[0] - 0.5, `${what}: loss ${losses[0]} -> mean of the last 3 ${tail}`);
      const { eval_loss_before: before, eval_loss: after } = result.metrics;
      assert.ok(before !== null && after !== null, what);
      assert.ok(after < before - 0.5, `${what}: eval loss ${before} -> ${after}`);
    }
  });
});

/** sha256 of the adapter_model.safetensors the model's adapters make. */
async function adapterHash(dir: string, model: GpuModel): Promise<string> {
  await writeAdapter(dir, model, PEFT);
  return (await sha256File(join(dir, "adapter_model.safetensors"))).sha256;
}

webgpuTest(
  "the same seed gives identical adapter bytes on the same WebGPU adapter; another seed differs",
  async () => {
    await withTempDir(async (dir) => {
      const ckpt = await nanoCheckpoint(dir, "llama");
      const splits = {
        train: await makeSplit(dir, "train", patternRows(8, SEQ), { seqLen: SEQ, packed: true }),
        eval: null,
      };
      const config = trainConfig({
        max_steps: 3,
        learning_rate: 1e-2,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        lora: { dropout: 0.1 }, // dropout masks take part
      });
      const hashes: string[] = [];
      // Same adapter init (seed 7) throughout: the third run differs only in the loop's seed
      // (row order and dropout masks).
      for (const [i, seed] of [7, 7, 8].entries()) {
        using model = await gpuModel(ckpt, config, 7);
        await train(model, config, splits, seed);
        hashes.push(await adapterHash(join(dir, `adapter-${i}`), model));
      }
      assert.equal(hashes[0], hashes[1]);
      assert.notEqual(hashes[0], hashes[2]);
    });
  },
);

/**
 * Eight unpacked rows of different lengths (up to 61 tokens) training very different token
 * counts, so micro-batches of two hold unequal trained-token counts.
 */
function unequalRows(): RowSpec[] {
  const lengths = [9, 61, 17, 33, 48, 5, 24, 57];
  const trained = [8, 3, 16, 30, 2, 4, 21, 50];
  return lengths.map((len, i) => ({
    tokens: patternDoc(i, len),
    mask: Array.from({ length: len }, (_, t) => (t >= len - trained[i] ? 1 : 0)),
    bounds: [0, len],
  }));
}

/** Random non-zero B (seeded), so that the gradients of A are live too (fresh adapters have B = 0). */
function withLiveB(weights: LoraWeights[]): LoraWeights[] {
  let s = 12345;
  const next = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
  return weights.map((w) => ({ ...w, B: Float32Array.from(w.B, () => 0.2 * next()) }));
}

/** Delegates to a GPU model and reads its accumulated gradients just before the optimizer step. */
class GradientTap extends FaultyModel {
  readonly gpu: GpuModel;
  grads: Map<string, Float32Array> | null = null;
  constructor(gpu: GpuModel, onMicroBatch: (r: { lossSum: number; tokens: number }, b: Batch) => void) {
    super(gpu, { onMicroBatch });
    this.gpu = gpu;
  }
  override async optimizerStep(hp: AdamWStep) {
    this.grads = await this.gpu.getGradients();
    return await super.optimizerStep(hp);
  }
}

/** max |x − y| over the elements, and max |y| (the scale). */
function maxDiff(x: ArrayLike<number>, y: ArrayLike<number>): { diff: number; scale: number } {
  assert.equal(x.length, y.length);
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < y.length; i++) {
    scale = Math.max(scale, Math.abs(y[i]));
    diff = Math.max(diff, Math.abs(x[i] - y[i]));
  }
  return { diff, scale };
}

webgpuTest("bs 2 × GA 4 equals bs 8 on WebGPU to 1e-5 in loss and gradients", async () => {
  await withTempDir(async (dir) => {
    const ckpt = await nanoCheckpoint(dir, "qwen2");
    const split = await makeSplit(dir, "train", unequalRows(), { seqLen: SEQ, packed: false });
    const lr = 1e-3;
    const base = {
      max_steps: 1,
      learning_rate: lr,
      lr_scheduler_type: "constant",
      lora: { dropout: 0, r: 4 },
    };
    const configOf = (bs: number, ga: number) =>
      trainConfig({ ...base, per_device_train_batch_size: bs, gradient_accumulation_steps: ga });
    const start = async (config: TrainSftConfig) => {
      const model = await gpuModel(ckpt, config, 5, "f32");
      await model.setLora(withLiveB(await model.getLora()));
      return model;
    };
    const run = async (bs: number, ga: number) => {
      const config = configOf(bs, ga);
      using inner = await start(config);
      const before = await flatLora(inner);
      const micro: { lossSum: number; tokens: number; batch: Batch }[] = [];
      const tap = new GradientTap(inner, (r, batch) => micro.push({ ...r, batch }));
      const { points } = await train(tap, config, { train: split, eval: null }, 5);
      const value = (name: string) => points.find((p) => p.name === name)!.value;
      return {
        loss: value("loss"),
        gradNorm: value("grad_norm"),
        grads: tap.grads!,
        micro,
        weights: await flatLora(inner),
        before,
      };
    };
    const ga = await run(2, 4);
    const one = await run(8, 1);
    assert.equal(ga.micro.length, 4);
    assert.equal(one.micro.length, 1);
    // The micro-batches really differ in trained tokens (the case per-micro-batch means get wrong).
    assert.ok(new Set(ga.micro.map((m) => m.tokens)).size > 1, JSON.stringify(ga.micro.map((m) => m.tokens)));

    // Loss (Σ lossSum / N): relative 1e-5.
    assert.ok(Math.abs(ga.loss - one.loss) <= 1e-5 * one.loss, `loss ${ga.loss} vs ${one.loss}`);
    assert.ok(
      Math.abs(ga.gradNorm - one.gradNorm) <= 1e-5 * one.gradNorm,
      `${ga.gradNorm} vs ${one.gradNorm}`,
    );
    // Gradients: every element of every LoRA tensor within 1e-5 · that tensor's max |gradient|.
    assert.deepEqual([...ga.grads.keys()].sort(), [...one.grads.keys()].sort());
    for (const [name, g] of one.grads) {
      const { diff, scale } = maxDiff(ga.grads.get(name)!, g);
      assert.ok(scale > 0, `${name}: the gradient is all zero, so the check would prove nothing`);
      assert.ok(diff <= 1e-5 * scale, `${name}: gradients differ by ${diff} (max |gradient| ${scale})`);
    }
    // One AdamW step moves each weight by up to about lr; both runs moved them alike, to 1e-2 · lr.
    const moved = maxDiff(one.weights, one.before).diff;
    const wdiff = maxDiff(ga.weights, one.weights).diff;
    assert.ok(moved > 0.5 * lr, `the step moved the weights by only ${moved}`);
    assert.ok(wdiff <= 1e-2 * lr, `weights differ by ${wdiff} after one step of lr ${lr}`);

    // Normalising each micro-batch by its own trained tokens (then averaging) gives other
    // gradients, far outside the tolerance above: the check can fail.
    using naive = await start(configOf(2, 4));
    for (const m of ga.micro) await naive.forwardBackward(m.batch, m.tokens * ga.micro.length, 0);
    const naiveGrads = await naive.getGradients();
    const wrong = [...one.grads].map(([name, g]) => maxDiff(naiveGrads.get(name)!, g));
    const worst = Math.max(...wrong.map((w) => w.diff / w.scale));
    assert.ok(worst > 1e-3, `per-micro-batch normalisation is off by only ${worst} of max |gradient|`);
    const naiveLoss = mean(ga.micro.map((m) => m.lossSum / m.tokens));
    assert.ok(Math.abs(naiveLoss - one.loss) > 1e-3, `naive ${naiveLoss} vs ${one.loss}`);
  });
});
