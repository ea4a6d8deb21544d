// The WebGPU model graph (kernels/models/graph.ts) against the CPU reference backend
// (kernels/models/reference_backend.ts on kernels/reference/decoder.ts, f64), on tiny random
// checkpoints: Llama (tied embeddings, llama3 RoPE scaling), Mistral (sliding window 5, shorter
// than the documents), Qwen2 (q/k/v biases). LoRA on all seven projections with random non-zero B,
// so every gradient path is live; packed rows with two documents each and padding.
//
// Tolerances, per gradient tensor with scale = max|ref| over that tensor:
//   f32: |gpu − ref| ≤ 1e-4·scale + 1e-3·|ref|; loss rtol 1e-5 (f32 sums against f64).
//   f16 weights and activations: |gpu − ref| ≤ 2e-2·scale + 5e-2·|ref|; loss rtol 1e-3 (the
//   reference keeps f32 weights, so this includes the f16 rounding of the weights).
// Checkpointing on and off run the same kernels on the same inputs: their gradients are equal.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { loadHostModel } from "../../kernels/models/load.ts";
import { createGpuModel } from "../../kernels/models/graph.ts";
import { f16ArrayToF32 } from "../../kernels/half.ts";
import { createReferenceModel } from "../../kernels/models/reference_backend.ts";
import { loadGpuWeights } from "../../kernels/models/gpu_weights.ts";
import { type TinyArch, writeTinyModel } from "../../kernels/models/tiny.ts";
import type { AdamWStep, Batch, LoraSpec } from "../../kernels/models/trainable.ts";
import { memoryStats, readTensors } from "../../kernels/tensor.ts";
import { assertClose, gpuTest } from "../kernels/_harness.ts";
import {
  allTargets,
  packedBatch,
  referenceModel,
  type TinyCheckpoint,
  tinyCheckpoint,
  trainedTokens,
  withRandomB,
} from "./_model_fixture.ts";

const F32 = { scaled: 1e-4, rtol: 1e-3, loss: 1e-5 };
const F16 = { scaled: 2e-2, rtol: 5e-2, loss: 1e-3 };
const SEED = 7;

/** Asserts every gradient tensor of `actual` is within `tol` of `expected` (same names). */
function assertGradients(
  actual: Map<string, ArrayLike<number>>,
  expected: Map<string, ArrayLike<number>>,
  tol: { scaled: number; rtol: number },
): void {
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort());
  for (const [name, ref] of expected) {
    let scale = 0;
    for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
    assert.ok(scale > 0, `${name}: the reference gradient is all zero, so the check would prove nothing`);
    assertClose(actual.get(name)!, ref, { atol: tol.scaled * scale, rtol: tol.rtol, name });
  }
}

function assertLoss(actual: number, expected: number, rtol: number, what: string): void {
  assert.ok(
    Math.abs(actual - expected) <= rtol * Math.abs(expected),
    `${what}: loss ${actual} differs from the reference's ${expected} by more than rtol ${rtol}`,
  );
}

/** A GPU model on `ckpt` with random non-zero B (seeded); returns the adapters it got too. */
async function gpuModel(
  ckpt: TinyCheckpoint,
  lora: LoraSpec,
  options: { dtype: "f16" | "f32"; gradientCheckpointing?: boolean },
) {
  const model = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, options);
  const weights = withRandomB(await model.getLora(), 11);
  await model.setLora(weights);
  return { model, weights };
}

async function withCheckpoint(arch: TinyArch, fn: (ckpt: TinyCheckpoint) => Promise<void>): Promise<void> {
  const ckpt = await tinyCheckpoint(arch);
  try {
    await fn(ckpt);
  } finally {
    await ckpt.cleanup();
  }
}

gpuTest(
  "createGpuModel() initialises the adapters as the CPU reference does (PEFT init, same seed)",
  async () => {
    await withCheckpoint("llama", async (ckpt) => {
      const lora = allTargets();
      using model = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, { dtype: "f32" });
      const host = await loadHostModel(ckpt.dir);
      using ref = createReferenceModel(host.config, host.weights, lora, SEED);
      const [g, r] = [await model.getLora(), await ref.getLora()];
      assert.equal(g.length, 2 * 7);
      assert.deepEqual(g, r);
      assert.ok(g.every((w) => w.B.every((x) => x === 0)), "B starts at zero");
      assert.match(model.backend, /^webgpu: /);
    });
  },
);

const ARCHS: [TinyArch, string][] = [
  ["llama", "tied embeddings, llama3 RoPE"],
  ["mistral", "sliding window 5"],
  ["qwen2", "q/k/v biases"],
];

for (const [arch, feature] of ARCHS) {
  gpuTest(
    `f32 loss and all LoRA gradients match the CPU reference, with and without checkpointing: ${arch} (${feature})`,
    async () => {
      await withCheckpoint(arch, async (ckpt) => {
        const lora = allTargets();
        const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 5);
        const n = trainedTokens(batch);
        const { model, weights } = await gpuModel(ckpt, lora, { dtype: "f32" });
        using _m = model;
        using ckptModel = (await gpuModel(ckpt, lora, { dtype: "f32", gradientCheckpointing: true })).model;
        using ref = await referenceModel(ckpt, lora, SEED, weights);
        const r = await ref.forwardBackward(batch, n, 1);
        const g = await model.forwardBackward(batch, n, 1);
        const c = await ckptModel.forwardBackward(batch, n, 1);
        assert.equal(g.tokens, r.tokens);
        assertLoss(g.lossSum, r.lossSum, F32.loss, arch);
        const grads = await model.getGradients();
        assertGradients(grads, ref.gradients(), F32);
        assert.equal(c.lossSum, g.lossSum);
        assert.deepEqual(await ckptModel.getGradients(), grads, "checkpointing changes the gradients");
      });
    },
  );
}

gpuTest(
  "f16 weights and activations stay within f16 tolerance of the CPU reference (all archs, checkpointed)",
  async () => {
    for (const [arch] of ARCHS) {
      await withCheckpoint(arch, async (ckpt) => {
        const lora = allTargets();
        const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 9);
        const n = trainedTokens(batch);
        const { model, weights } = await gpuModel(ckpt, lora, { dtype: "f16", gradientCheckpointing: true });
        using _m = model;
        assert.equal(model.dtype, "f16");
        using ref = await referenceModel(ckpt, lora, SEED, weights);
        const r = await ref.forwardBackward(batch, n, 1);
        const g = await model.forwardBackward(batch, n, 1);
        assertLoss(g.lossSum, r.lossSum, F16.loss, `${arch} f16`);
        assertGradients(await model.getGradients(), ref.gradients(), F16);
      });
    }
  },
  { needsF16: true },
);

gpuTest("LoRA dropout draws the reference's masks: same dropoutSeed, same gradients (mistral)", async () => {
  await withCheckpoint("mistral", async (ckpt) => {
    const lora = allTargets(4, 8, 0.25);
    const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 6);
    const n = trainedTokens(batch);
    const { model, weights } = await gpuModel(ckpt, lora, { dtype: "f32", gradientCheckpointing: true });
    using _m = model;
    using ref = await referenceModel(ckpt, lora, SEED, weights);
    const r = await ref.forwardBackward(batch, n, 1234);
    const g = await model.forwardBackward(batch, n, 1234);
    assertLoss(g.lossSum, r.lossSum, F32.loss, "dropout");
    assertGradients(await model.getGradients(), ref.gradients(), F32);
    // Another seed drops other inputs: the loss moves.
    await model.zeroGrad();
    const other = await model.forwardBackward(batch, n, 99);
    assert.notEqual(other.lossSum, g.lossSum);
    // Evaluation runs without dropout.
    const e = await model.evaluate(batch);
    const eRef = await ref.evaluate(batch);
    assertLoss(e.lossSum, eRef.lossSum, F32.loss, "evaluate");
  });
});

gpuTest("micro-batch gradients add up in the buffers, and zeroGrad() clears them (qwen2)", async () => {
  await withCheckpoint("qwen2", async (ckpt) => {
    const lora = allTargets();
    const b1 = packedBatch(ckpt.config.vocabSize, 2, 16, 21);
    const b2 = packedBatch(ckpt.config.vocabSize, 1, 12, 22);
    const n = trainedTokens(b1) + trainedTokens(b2);
    const { model, weights } = await gpuModel(ckpt, lora, { dtype: "f32" });
    using _m = model;
    using ref = await referenceModel(ckpt, lora, SEED, weights);
    for (const b of [b1, b2]) {
      await model.forwardBackward(b, n, 1);
      await ref.forwardBackward(b, n, 1);
    }
    assertGradients(await model.getGradients(), ref.gradients(), F32);
    await model.zeroGrad();
    for (const [name, g] of await model.getGradients()) {
      assert.ok(g.every((x) => x === 0), `${name} not zeroed`);
    }
  });
});

gpuTest("evaluate() returns the forward loss and leaves the gradients untouched (llama)", async () => {
  await withCheckpoint("llama", async (ckpt) => {
    const lora = allTargets();
    const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 31);
    const { model } = await gpuModel(ckpt, lora, { dtype: "f32" });
    using _m = model;
    const e = await model.evaluate(batch);
    for (const [, g] of await model.getGradients()) assert.ok(g.every((x) => x === 0));
    const t = await model.forwardBackward(batch, 1, 1);
    assert.equal(e.tokens, trainedTokens(batch));
    assertLoss(e.lossSum, t.lossSum, 1e-6, "evaluate vs forwardBackward");
  });
});

gpuTest(
  "optimizerStep() clips and steps as the reference AdamW; optimizer state round-trips (llama)",
  async () => {
    await withCheckpoint("llama", async (ckpt) => {
      const lora = allTargets();
      const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 41);
      const n = trainedTokens(batch);
      const { model, weights } = await gpuModel(ckpt, lora, { dtype: "f32" });
      using _m = model;
      using ref = await referenceModel(ckpt, lora, SEED, weights);
      // maxGradNorm far below the norm: the clip scale is active. AdamW divides each gradient element
      // by its own magnitude; eps 1e-4 keeps that a smooth function of the gradient, so the GPU's f32
      // gradient error (about 1e-6 relative) stays that small in the parameters (with eps 1e-8, an
      // element whose |g| is near eps would turn it into an O(lr) difference).
      const hp: AdamWStep = {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-4,
        weightDecay: 0.1,
        maxGradNorm: 0.05,
      };
      for (let step = 0; step < 2; step++) {
        await ref.forwardBackward(batch, n, 1);
        await model.forwardBackward(batch, n, 1);
        const r = await ref.optimizerStep(hp);
        const g = await model.optimizerStep(hp);
        assert.ok(r.gradNorm > hp.maxGradNorm);
        assertLoss(g.gradNorm, r.gradNorm, 1e-5, `grad norm at step ${step + 1}`);
      }
      const [gl, rl] = [await model.getLora(), await ref.getLora()];
      const tol = { atol: 1e-6, rtol: 1e-4 };
      gl.forEach((w, i) => {
        assertClose(w.A, rl[i].A, { ...tol, name: `${w.layer} ${w.module} A` });
        assertClose(w.B, rl[i].B, { ...tol, name: `${w.layer} ${w.module} B` });
      });
      for (const [, g] of await model.getGradients()) {
        assert.ok(g.every((x) => x === 0), "the step zeroes gradients");
      }
      const state = await model.getOptimizerState();
      const refState = await ref.getOptimizerState();
      assert.equal(state.step, 2);
      assertGradients(state.m, refState.m, F32);
      assertGradients(state.v, refState.v, { scaled: 1e-4, rtol: 2e-3 });

      // A second model given the adapters and the state continues exactly as the first.
      using resumed = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED + 1, { dtype: "f32" });
      await resumed.setLora(gl);
      await resumed.setOptimizerState(state);
      for (const m of [model, resumed]) {
        await m.forwardBackward(batch, n, 1);
        await m.optimizerStep(hp);
      }
      assert.deepEqual(await resumed.getLora(), await model.getLora());
      assert.deepEqual(await resumed.getOptimizerState(), await model.getOptimizerState());
    });
  },
);

gpuTest(
  "forwardBackward() refuses malformed batches and returns zero for a batch with nothing to train",
  async () => {
    await withCheckpoint("llama", async (ckpt) => {
      using model = await createGpuModel(ckpt.config, ckpt.dir, allTargets(), SEED, { dtype: "f32" });
      const good = packedBatch(ckpt.config.vocabSize, 1, 8, 3);
      const bad = (patch: Partial<Batch>): Batch => ({ ...good, ...patch });
      await assert.rejects(
        model.forwardBackward(bad({ docs: new Uint32Array(7) }), 4, 1),
        /batch\.docs holds 7 values/,
      );
      const targets = good.targets.slice();
      targets[2] = 512;
      await assert.rejects(model.forwardBackward(bad({ targets }), 4, 1), /batch\.targets\[2\] is 512/);
      await assert.rejects(model.forwardBackward(good, 0, 1), /normaliser 0 must be positive/);
      await assert.rejects(
        model.setLora((await model.getLora()).slice(1)),
        /setLora got 13 distinct adapters, the model has 14/,
      );
      const none = await model.forwardBackward(bad({ targets: new Int32Array(8).fill(-100) }), 4, 1);
      assert.deepEqual(none, { lossSum: 0, tokens: 0, correct: 0 });
    });
  },
);

gpuTest("disposing the model returns every buffer it allocated", async (gpu) => {
  await withCheckpoint("mistral", async (ckpt) => {
    const before = memoryStats(gpu).liveBytes;
    {
      using model = await createGpuModel(ckpt.config, ckpt.dir, allTargets(), SEED, {
        dtype: "f32",
        gradientCheckpointing: true,
      });
      const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 3);
      await model.forwardBackward(batch, 10, 1);
      await model.optimizerStep({
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0,
        maxGradNorm: 1,
      });
      assert.ok(memoryStats(gpu).liveBytes > before);
    }
    assert.equal(memoryStats(gpu).liveBytes, before);
  });
});

gpuTest(
  "loadGpuWeights() streams a sharded bf16 checkpoint exactly into f32, and into f16 by rounding",
  async (gpu) => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-gpu-weights-" });
    try {
      const tokenizerDir = fileURLToPath(new URL("../../data/demo/tokenizer", import.meta.url));
      const { config } = await writeTinyModel(dir, {
        arch: "qwen2",
        size: "nano",
        dtype: "bf16",
        maxShardBytes: 40_000,
        tokenizerDir,
      });
      assert.ok([...Deno.readDirSync(dir)].some((e) => e.name === "model.safetensors.index.json"));
      const host = await loadHostModel(dir);
      const dtypes: ("f32" | "f16")[] = gpu.f16 ? ["f32", "f16"] : ["f32"];
      for (const dtype of dtypes) {
        using weights = await loadGpuWeights(gpu, config, dir, { dtype });
        const names = [...host.weights.keys()];
        const got = await readTensors(names.map((n) => weights.get(n)));
        names.forEach((name, i) => {
          const t = weights.get(name);
          const f32 = t.dtype === "f32";
          assert.equal(t.dtype, name.endsWith("norm.weight") || name.endsWith(".bias") ? "f32" : dtype, name);
          const want = host.weights.get(name)!;
          const have = f32 ? got[i] as Float32Array : f16ArrayToF32(got[i] as Uint16Array);
          assert.deepEqual(have, f32 ? want : Float32Array.from(want, (x) => Math.f16round(x)), name);
        });
      }
      // A config that does not match the weights is refused before anything is uploaded.
      const wrong = { ...config, hiddenSize: 32 };
      await assert.rejects(loadGpuWeights(gpu, wrong, dir, { dtype: "f32" }), /do not match config\.json/);
      await assert.rejects(loadGpuWeights(gpu, config, join(dir, "nowhere")), /does not exist/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
