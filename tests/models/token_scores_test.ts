// Per-token scores and weighted backwards (what DPO is built on), on tiny random checkpoints with
// random non-zero LoRA B, for the CPU reference and the WebGPU graph.
//   logp[t] = log softmax(logits[t])[y[t]] (trained t), logitSum[t] = Σ_v logits[t,v]
//   weighted backward: gradient of Σ_t w[t]·(−logp[t]) for random w
// Reference: the weighted gradient matches central differences of Σ_t w[t]·(−logp[t]) from
// its own f64 forwards (|fd − g| ≤ 1e-6 + 1e-4·|g|: f64 with ε = 1e-4 leaves O(ε²) ≈ 1e-8), and
// w = 1/N reproduces forwardBackward's gradient (to 1e-12 relative).
// GPU against the reference: f32 logp within 2e-5 absolute (log-probabilities near −6.2, f32 sums
// against f64), logitSum within 1e-4·(1 + |ref|); gradients with graph_test.ts's f32 tolerances
// (1e-4·scale + 1e-3·|ref|), with and without checkpointing; f16 within its tolerances.
import assert from "node:assert/strict";
import { createGpuModel } from "../../kernels/models/graph.ts";
import type { TinyArch } from "../../kernels/models/tiny.ts";
import type { LoraWeights, TokenScores } from "../../kernels/models/trainable.ts";
import { loraKey } from "../../formats/peft.ts";
import { assertClose, gpuTest, rng } from "../kernels/_harness.ts";
import {
  allTargets,
  packedBatch,
  referenceModel,
  tinyCheckpoint,
  trainedTokens,
  withRandomB,
} from "./_model_fixture.ts";

const SEED = 7;

/** Random weights on trained tokens (either sign, as a DPO pair's sides), 0 elsewhere. */
function randomWeights(targets: Int32Array, seed: number): Float64Array {
  const next = rng(seed);
  return Float64Array.from(targets, (y) => (y === -100 ? 0 : (next() - 0.5) * 0.2));
}

function weighted(scores: TokenScores, w: Float64Array): number {
  let sum = 0;
  for (let t = 0; t < w.length; t++) sum -= w[t] * scores.logp[t];
  return sum;
}

Deno.test("reference: the weighted backward is the gradient of Σ w·(−logp) (central differences), and w = 1/N is forwardBackward", async () => {
  const ckpt = await tinyCheckpoint("qwen2");
  try {
    const lora = allTargets();
    const batch = packedBatch(ckpt.config.vocabSize, 2, 12, 3);
    const { initialAdapters } = await import("../../kernels/models/trainable.ts");
    const init = initialAdapters(ckpt.config, lora, SEED).map((p) => ({
      layer: p.layer,
      module: p.module,
      A: p.a,
      B: p.b,
    }));
    const weights = withRandomB(init, 5, 0.3);
    using model = await referenceModel(ckpt, lora, SEED, weights);
    const w = randomWeights(batch.targets, 9);
    await model.forwardBackwardWeighted(batch, 0, () => w);
    const grads = model.gradients();
    const objective = async (ws: LoraWeights[]) => {
      await model.setLora(ws);
      return weighted(await model.scoreTokens(batch), w);
    };
    const eps = 1e-4;
    for (
      const [layer, module, which, i] of [[0, "q_proj", "A", 3], [0, "down_proj", "B", 5], [
        1,
        "v_proj",
        "B",
        0,
      ]] as const
    ) {
      const perturbed = (d: number) =>
        weights.map((x) =>
          x.layer === layer && x.module === module
            ? { ...x, [which]: Float32Array.from(x[which], (v, k) => (k === i ? v + d : v)) }
            : x
        );
      // f32 adapters: the step is the rounded difference actually applied.
      const up = perturbed(eps);
      const down = perturbed(-eps);
      const pick = (ws: LoraWeights[]) => ws.find((x) => x.layer === layer && x.module === module)![which][i];
      const fd = ((await objective(up)) - (await objective(down))) / (pick(up) - pick(down));
      const g = grads.get(loraKey(layer, module, which))![i];
      assert.ok(
        Math.abs(fd - g) <= 1e-6 + 1e-4 * Math.abs(g),
        `${layer} ${module} ${which}[${i}]: fd ${fd} vs ${g}`,
      );
    }
    await model.setLora(weights);
    await model.zeroGrad();
    const n = trainedTokens(batch);
    await model.forwardBackward(batch, n, 0);
    const plain = model.gradients();
    await model.zeroGrad();
    await model.forwardBackwardWeighted(
      batch,
      0,
      (s) => Float64Array.from(s.logp, (_, t) => batch.targets[t] === -100 ? 0 : 1 / n),
    );
    for (const [name, g] of model.gradients()) {
      assertClose(g, plain.get(name)!, { atol: 1e-15, rtol: 1e-12, name });
    }
  } finally {
    await ckpt.cleanup();
  }
});

const ARCHS: TinyArch[] = ["llama", "mistral", "qwen2"];

for (const arch of ARCHS) {
  gpuTest(
    `GPU scores and weighted gradients match the CPU reference, f32, with and without checkpointing: ${arch}`,
    async () => {
      const ckpt = await tinyCheckpoint(arch);
      try {
        const lora = allTargets();
        const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 5);
        using gpu = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, { dtype: "f32" });
        const weights = withRandomB(await gpu.getLora(), 11);
        await gpu.setLora(weights);
        using ckptGpu = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, {
          dtype: "f32",
          gradientCheckpointing: true,
        });
        await ckptGpu.setLora(weights);
        using ref = await referenceModel(ckpt, lora, SEED, weights);
        const w = randomWeights(batch.targets, 13);
        const r = await ref.forwardBackwardWeighted(batch, 0, () => w);
        const g = await gpu.forwardBackwardWeighted(batch, 0, () => w);
        const c = await ckptGpu.forwardBackwardWeighted(batch, 0, () => w);
        assertClose(g.logp, r.logp, { atol: 2e-5, rtol: 0, name: "logp" });
        assertClose(g.logitSum, r.logitSum, { atol: 1e-4, rtol: 1e-4, name: "logitSum" });
        assert.ok(
          r.logp.some((x) => x !== 0) && batch.targets.every((y, t) => y !== -100 || r.logp[t] === 0),
        );
        const scored = await gpu.scoreTokens(batch);
        assert.deepEqual(
          scored.logp,
          g.logp,
          "scoring and the training forward give the same bits without dropout",
        );
        const expected = ref.gradients();
        const grads = await gpu.getGradients();
        for (const [name, e] of expected) {
          let scale = 0;
          for (const x of e) scale = Math.max(scale, Math.abs(x));
          assert.ok(scale > 0, name);
          assertClose(grads.get(name)!, e, { atol: 1e-4 * scale, rtol: 1e-3, name });
        }
        assert.deepEqual(c.logp, g.logp);
        assert.deepEqual(await ckptGpu.getGradients(), grads, "checkpointing changes the weighted gradients");
      } finally {
        await ckpt.cleanup();
      }
    },
  );
}

gpuTest(
  "GPU scores and weighted gradients in f16 stay within f16 tolerance of the reference (llama)",
  async () => {
    const ckpt = await tinyCheckpoint("llama");
    try {
      const lora = allTargets();
      const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 8);
      using gpu = await createGpuModel(ckpt.config, ckpt.dir, lora, SEED, {
        dtype: "f16",
        gradientCheckpointing: true,
      });
      const weights = withRandomB(await gpu.getLora(), 11);
      await gpu.setLora(weights);
      using ref = await referenceModel(ckpt, lora, SEED, weights);
      const w = randomWeights(batch.targets, 17);
      const r = await ref.forwardBackwardWeighted(batch, 0, () => w);
      const g = await gpu.forwardBackwardWeighted(batch, 0, () => w);
      assertClose(g.logp, r.logp, { atol: 2e-2, rtol: 1e-2, name: "logp" });
      const grads = await gpu.getGradients();
      for (const [name, e] of ref.gradients()) {
        let scale = 0;
        for (const x of e) scale = Math.max(scale, Math.abs(x));
        assertClose(grads.get(name)!, e, { atol: 2e-2 * scale, rtol: 5e-2, name });
      }
    } finally {
      await ckpt.cleanup();
    }
  },
);
