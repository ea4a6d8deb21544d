// Full fine-tuning on the WebGPU graph (kernels/models/full_params.ts, graph.ts, layer.ts) against
// the f64 CPU reference's gradient of every base weight (kernels/reference/decoder.ts
// `decoder_backward(full)`, itself checked by central differences): the tiny Llama (tied
// embeddings: the head's and the gather's gradients summed into one table, llama3 RoPE), Mistral
// (sliding window 5, untied lm_head) and Qwen2 (q/k/v biases), packed rows with two documents and
// padding. Tolerances as tests/models/graph_test.ts: per tensor with scale = max|ref|,
//   f32: |gpu − ref| ≤ 1e-4·scale + 1e-3·|ref|;  f16 compute copies: 2e-2·scale + 5e-2·|ref|.
// Then training: AdamW moves every weight, the f16 compute copies follow their f32 masters, the loss
// falls, and the same seed gives the same bytes twice; setWeights restores a state exactly.
import assert from "node:assert/strict";
import { loadHostModel } from "../../kernels/models/load.ts";
import { createGpuModel } from "../../kernels/models/graph.ts";
import type { AdamWStep, LoraSpec } from "../../kernels/models/trainable.ts";
import { decoder_backward, decoder_forward } from "../../kernels/reference/decoder.ts";
import { assertClose, gpuTest } from "../kernels/_harness.ts";
import { packedBatch, tinyCheckpoint, trainedTokens } from "./_model_fixture.ts";

const NO_LORA: LoraSpec = { r: 1, alpha: 1, dropout: 0, targets: [], useRslora: false };
const F32 = { scaled: 1e-4, rtol: 1e-3 };
const F16 = { scaled: 2e-2, rtol: 5e-2 };
const HP: AdamWStep = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, maxGradNorm: 1 };

for (const arch of ["llama", "mistral", "qwen2"] as const) {
  for (const dtype of ["f32", "f16"] as const) {
    gpuTest(
      `full fine-tuning gradients of every weight equal the reference's: ${arch}, ${dtype}`,
      async (gpu) => {
        if (dtype === "f16" && !gpu.f16) return;
        const ckpt = await tinyCheckpoint(arch);
        try {
          const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 5);
          const n = trainedTokens(batch);
          using model = await createGpuModel(ckpt.config, ckpt.dir, NO_LORA, 1, { dtype, full: true });
          const r = await model.forwardBackward(batch, n, 0);
          const got = await model.getWeightGradients();
          const host = await loadHostModel(ckpt.dir);
          const fwd = decoder_forward(host.config, host.weights, new Map(), {
            B: batch.rows,
            S: batch.seqLen,
            ids: batch.tokens,
            targets: batch.targets,
            positions: batch.positions,
            docIds: batch.docs,
            numItems: n,
          });
          assert.ok(Math.abs(r.lossSum / n - fwd.loss) <= (dtype === "f32" ? 1e-5 : 1e-3) * fwd.loss);
          const want = decoder_backward(fwd, 1, null, true).weights!;
          assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), "a gradient for every weight");
          const tol = dtype === "f32" ? F32 : F16;
          for (const [name, ref] of want) {
            let scale = 0;
            for (const x of ref) scale = Math.max(scale, Math.abs(x));
            assert.ok(scale > 0, `${name}: the reference gradient is all zero`);
            assertClose(got.get(name)!, ref, { atol: tol.scaled * scale, rtol: tol.rtol, name });
          }
        } finally {
          await ckpt.cleanup();
        }
      },
    );
  }
}

gpuTest(
  "full fine-tuning trains every weight, deterministically; setWeights restores a state",
  async (gpu) => {
    const ckpt = await tinyCheckpoint("qwen2");
    try {
      const dtype = gpu.f16 ? "f16" : "f32";
      const run = async () => {
        using model = await createGpuModel(ckpt.config, ckpt.dir, NO_LORA, 1, { dtype, full: true });
        const start = await model.getWeights();
        const losses: number[] = [];
        for (let step = 0; step < 6; step++) {
          const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 100 + (step % 2));
          const n = trainedTokens(batch);
          losses.push((await model.forwardBackward(batch, n, 0)).lossSum / n);
          await model.optimizerStep({ ...HP, lr: 3e-3 });
        }
        const end = await model.getWeights();
        // Restoring the start gives the start's loss again.
        const probe = packedBatch(ckpt.config.vocabSize, 2, 16, 100);
        const before = (await model.evaluate(probe)).lossSum;
        await model.setWeights(start);
        const restored = (await model.evaluate(probe)).lossSum;
        return { start, end, losses, before, restored };
      };
      const a = await run();
      for (const [name, w] of a.start) {
        assert.ok(a.end.get(name)!.some((x, i) => x !== w[i]), `${name} moved`);
      }
      assert.ok(a.losses[4] < a.losses[0] && a.losses[5] < a.losses[1], `loss falls: ${a.losses}`);
      assert.ok(a.before < a.restored, "the trained weights fit the probe better than the start");
      const b = await run();
      for (const [name, w] of a.end) {
        assert.deepEqual(
          new Uint8Array(b.end.get(name)!.buffer),
          new Uint8Array(w.buffer),
          `${name}: same bytes`,
        );
      }
      assert.equal(a.restored, b.restored);
    } finally {
      await ckpt.cleanup();
    }
  },
);

// Beside LoRA adapters (fresh: B = 0, so the base's forward is the reference's): peft's modules_to_save
// trains embed_tokens and lm_head in full, trainable_token_indices only some embedding rows.
gpuTest("modules_to_save: embed_tokens and lm_head gradients beside LoRA equal the reference's", async () => {
  const ckpt = await tinyCheckpoint("qwen2");
  try {
    const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 9);
    const n = trainedTokens(batch);
    const lora: LoraSpec = { r: 4, alpha: 8, dropout: 0, targets: ["q_proj", "v_proj"], useRslora: false };
    using model = await createGpuModel(ckpt.config, ckpt.dir, lora, 1, {
      dtype: "f32",
      trainedSubset: { names: ["model.embed_tokens.weight", "lm_head.weight"] },
    });
    await model.forwardBackward(batch, n, 0);
    const got = await model.getWeightGradients();
    assert.deepEqual([...got.keys()].sort(), ["lm_head.weight", "model.embed_tokens.weight"]);
    const host = await loadHostModel(ckpt.dir);
    const fwd = decoder_forward(host.config, host.weights, new Map(), {
      B: batch.rows,
      S: batch.seqLen,
      ids: batch.tokens,
      targets: batch.targets,
      positions: batch.positions,
      docIds: batch.docs,
      numItems: n,
    });
    const want = decoder_backward(fwd, 1, null, true).weights!;
    for (const name of got.keys()) {
      const ref = want.get(name)!;
      let scale = 0;
      for (const x of ref) scale = Math.max(scale, Math.abs(x));
      assertClose(got.get(name)!, ref, { atol: F32.scaled * scale, rtol: F32.rtol, name });
    }
    assert.ok((await model.getGradients()).size > 0, "the adapters train too");
  } finally {
    await ckpt.cleanup();
  }
});

gpuTest(
  "trainable_token_indices: only the listed rows move (tied table: both its paths train them)",
  async () => {
    const ckpt = await tinyCheckpoint("llama");
    try {
      const rows = [3, 40, 300];
      const lora: LoraSpec = { r: 4, alpha: 8, dropout: 0, targets: ["q_proj"], useRslora: false };
      using model = await createGpuModel(ckpt.config, ckpt.dir, lora, 1, {
        dtype: "f32",
        trainedSubset: { names: ["model.embed_tokens.weight"], embedRows: rows },
      });
      const before = (await model.getWeights()).get("model.embed_tokens.weight")!.slice();
      for (let step = 0; step < 3; step++) {
        const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 20 + step);
        await model.forwardBackward(batch, trainedTokens(batch), 0);
        await model.optimizerStep({ ...HP, lr: 1e-2, weightDecay: 0.1 });
      }
      const after = (await model.getWeights()).get("model.embed_tokens.weight")!;
      const D = ckpt.config.hiddenSize;
      for (let r = 0; r < ckpt.config.vocabSize; r++) {
        const moved = after.subarray(r * D, r * D + D).some((x, i) => x !== before[r * D + i]);
        assert.equal(moved, rows.includes(r), `row ${r}`);
      }
      const extras = await model.getExtras();
      assert.deepEqual([...extras.keys()], ["tokens"]);
      assert.deepEqual(extras.get("tokens")!.subarray(D, 2 * D), after.subarray(40 * D, 41 * D));
    } finally {
      await ckpt.cleanup();
    }
  },
);
