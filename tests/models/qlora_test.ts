// QLoRA: the WebGPU graph on a 4-bit base (the quantize step's output: NF4 with double
// quantization, FP4 without) against the CPU reference run on the dequantized weights
// (kernels/models/load.ts dequantizes 4-bit checkpoints with formats/bnb4bit.ts). Tiny Llama,
// Mistral and Qwen2 with LoRA on all seven projections and random non-zero B, packed rows.
//
// The GPU dequantizes each 4-bit weight to exactly the reference's f32 values (tests/kernels/
// quant_4bit_test.ts), so the f32 tolerances are graph_test.ts's: per gradient tensor with
// scale = max|ref|, |gpu − ref| ≤ 1e-4·scale + 1e-3·|ref|; loss rtol 1e-5. In f16 (weights
// rounded to f16 once, activations f16): 2e-2·scale + 5e-2·|ref|, loss rtol 1e-3.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { bnb4bitTensors, encode4bit, quantizeStats } from "../../formats/bnb4bit.ts";
import { quantizedWeightNames } from "../../formats/bnb4bit_checkpoint.ts";
import { expectedTensors, loadModelConfig } from "../../formats/model_config.ts";
import { ModelWeights, type TensorSource, writeModelWeights } from "../../formats/safetensors.ts";
import { getGpu } from "../../kernels/device.ts";
import { loadGpuWeights } from "../../kernels/models/gpu_weights.ts";
import { createGpuModel } from "../../kernels/models/graph.ts";
import { loadHostModel } from "../../kernels/models/load.ts";
import { createReferenceModel } from "../../kernels/models/reference_backend.ts";
import type { TinyArch } from "../../kernels/models/tiny.ts";
import { memoryStats, resetPeakMemory } from "../../kernels/tensor.ts";
import { assertClose, gpuTest } from "../kernels/_harness.ts";
import {
  allTargets,
  packedBatch,
  quantizedCheckpoint,
  trainedTokens,
  withRandomB,
} from "./_model_fixture.ts";

const SEED = 7;
const F32 = { scaled: 1e-4, rtol: 1e-3, loss: 1e-5 };
const F16 = { scaled: 2e-2, rtol: 5e-2, loss: 1e-3 };

async function compare(dir: string, dtype: "f16" | "f32", what: string): Promise<void> {
  const tol = dtype === "f32" ? F32 : F16;
  const config = await loadModelConfig(dir);
  const lora = allTargets();
  const batch = packedBatch(config.vocabSize, 2, 16, 5);
  const n = trainedTokens(batch);
  using model = await createGpuModel(config, dir, lora, SEED, { dtype, gradientCheckpointing: true });
  const weights = withRandomB(await model.getLora(), 11);
  await model.setLora(weights);
  const host = await loadHostModel(dir);
  using ref = createReferenceModel(host.config, host.weights, lora, SEED);
  await ref.setLora(weights);
  const r = await ref.forwardBackward(batch, n, 1);
  const g = await model.forwardBackward(batch, n, 1);
  assert.equal(g.tokens, r.tokens);
  assert.ok(
    Math.abs(g.lossSum - r.lossSum) <= tol.loss * Math.abs(r.lossSum),
    `${what}: loss ${g.lossSum} vs reference ${r.lossSum}`,
  );
  const grads = await model.getGradients();
  const want = ref.gradients();
  assert.deepEqual([...grads.keys()].sort(), [...want.keys()].sort());
  for (const [name, expected] of want) {
    let scale = 0;
    for (const v of expected) scale = Math.max(scale, Math.abs(v));
    assert.ok(scale > 0, `${name}: the reference gradient is all zero`);
    assertClose(grads.get(name)!, expected, {
      atol: tol.scaled * scale,
      rtol: tol.rtol,
      name: `${what} ${name}`,
    });
  }
}

const ARCHS: TinyArch[] = ["llama", "mistral", "qwen2"];

for (const arch of ARCHS) {
  gpuTest(
    `QLoRA (NF4, double quant) gradients match the reference on the dequantized base: ${arch}`,
    async () => {
      await quantizedCheckpoint(arch, {}, (dir) => compare(dir, "f32", `${arch} nf4`));
    },
  );
}

gpuTest("QLoRA on FP4 without double quantization, blocksize 128, lm_head and mlp kept: llama", async () => {
  await quantizedCheckpoint("llama", {
    quant_type: "fp4",
    double_quant: false,
    blocksize: 128,
    skip_modules: ["lm_head", "mlp"],
  }, (dir) => compare(dir, "f32", "llama fp4"));
});

// Pre-quantized checkpoints as transformers saves them, written by scripts/golden/nf4_checkpoints.py.
const GOLDEN = new URL("../fixtures/golden/nf4/checkpoints/", import.meta.url);
for (const name of ["nf4-dq", "nf4", "fp4-dq-skip", "fp4"]) {
  gpuTest(
    `a pre-quantized checkpoint trains on the GPU as the reference does on its dequantized weights: ${name}`,
    async () => {
      await compare(fileURLToPath(new URL(name, GOLDEN)), "f32", name);
    },
  );
}

gpuTest("QLoRA in f16 stays within f16 tolerance of the dequantized reference: mistral", async () => {
  await quantizedCheckpoint("mistral", {}, (dir) => compare(dir, "f16", "mistral nf4 f16"));
}, { needsF16: true });

gpuTest(
  "a 4-bit base stays 4-bit on the GPU: codes, absmax codes and tables, nothing widened",
  async (gpu) => {
    await quantizedCheckpoint("llama", {}, async (dir) => {
      const config = await loadModelConfig(dir);
      using weights = await loadGpuWeights(gpu, config, dir, { dtype: "f32" });
      assert.equal(weights.quantizedCount, 7 * config.numLayers);
      assert.ok(weights.isQuantized("model.layers.0.mlp.down_proj.weight"));
      assert.ok(!weights.isQuantized("model.embed_tokens.weight"));
      assert.throws(() => weights.get("model.layers.0.self_attn.q_proj.weight"), /is 4-bit/);
      // Bytes: f32 for every float tensor; per 4-bit weight n/2 code bytes, one absmax code per
      // 64 weights and the f32 tables (16 + 256 + nested absmax), each padded to 4 bytes.
      let want = 0;
      for (const [name, shape] of expectedTensors(config)) {
        const n = shape.reduce((a, b) => a * b, 1);
        if (!weights.isQuantized(name)) want += n * 4;
        else {
          const nb = Math.ceil(n / 64);
          want += Math.ceil(n / 8) * 4 + Math.ceil(nb / 4) * 4 + (272 + Math.ceil(nb / 256)) * 4;
        }
      }
      assert.equal(weights.byteLength, want);
      // One projection in use at a time: its dequantized copy is pooled again after the product.
      const live = memoryStats(gpu).liveBytes;
      {
        using W = weights.matrix("model.layers.1.mlp.up_proj.weight");
        assert.deepEqual(W.tensor.shape, [config.intermediateSize, config.hiddenSize]);
        assert.ok(memoryStats(gpu).liveBytes > live);
      }
      assert.equal(memoryStats(gpu).liveBytes, live);
    });
  },
);

gpuTest("layer inputs offloaded to host memory give the same bits with less GPU memory", async (gpu) => {
  await quantizedCheckpoint("mistral", {}, async (dir) => {
    const config = await loadModelConfig(dir);
    const lora = allTargets(4, 8, 0.1);
    const batch = packedBatch(config.vocabSize, 2, 16, 5);
    const n = trainedTokens(batch);
    const run = async (offloadLayerInputs: boolean) => {
      using model = await createGpuModel(config, dir, lora, SEED, {
        dtype: "f32",
        gradientCheckpointing: true,
        offloadLayerInputs,
      });
      await model.setLora(withRandomB(await model.getLora(), 11));
      resetPeakMemory(gpu);
      const base = memoryStats(gpu).liveBytes;
      const r = await model.forwardBackward(batch, n, 3);
      const peak = memoryStats(gpu).peakBytes - base;
      return { loss: r.lossSum, grads: await model.getGradients(), peak };
    };
    const kept = await run(false);
    const offloaded = await run(true);
    assert.equal(offloaded.loss, kept.loss);
    assert.deepEqual(offloaded.grads, kept.grads);
    // h_0..h_{L-2} no longer wait on the GPU: (L − 1) f32 [T,D] buffers less at the peak.
    const T = 2 * 16, D = config.hiddenSize;
    assert.ok(
      kept.peak - offloaded.peak >= (config.numLayers - 1) * 4 * T * D,
      `peak ${kept.peak} -> ${offloaded.peak}`,
    );
  });
});

gpuTest(
  "a 4-bit lm_head (a skip list that leaves it out) is held dequantized and trains as the reference",
  async () => {
    await quantizedCheckpoint("mistral", {}, async (dir) => {
      // Quantize the stored lm_head too, as transformers 4.x does when llm_int8_skip_modules omits it.
      const out = await Deno.makeTempDir({ prefix: "lathe-4bit-head-" });
      try {
        using file = await ModelWeights.open(dir);
        const tensors: TensorSource[] = [];
        for (const name of file.names()) {
          const info = file.info(name);
          if (name !== "lm_head.weight") {
            tensors.push({ name, dtype: info.dtype, shape: info.shape, data: () => file.readBytes(name) });
            continue;
          }
          const stats = quantizeStats(await file.readFloat32(name), [...info.shape]);
          const values = await file.readFloat32(name);
          tensors.push(...bnb4bitTensors(name, stats, info.dtype as "F32", () => encode4bit(values, stats)));
        }
        await writeModelWeights(out, tensors);
        const config = JSON.parse(await Deno.readTextFile(join(dir, "config.json")));
        config.quantization_config.llm_int8_skip_modules = ["embed_tokens"];
        await Deno.writeTextFile(join(out, "config.json"), JSON.stringify(config, null, 2));
        using written = await ModelWeights.open(out);
        assert.ok(
          quantizedWeightNames(written.names()).has("lm_head.weight"),
          "the checkpoint's lm_head is 4-bit",
        );
        const loaded = await loadModelConfig(out);
        using weights = await loadGpuWeights(await getGpu(), loaded, out, { dtype: "f32" });
        assert.ok(!weights.isQuantized("lm_head.weight"), "held as a float tensor for the loss");
        assert.ok(weights.get("lm_head.weight").dtype === "f32");
        await compare(out, "f32", "mistral with a 4-bit lm_head");
      } finally {
        await Deno.remove(out, { recursive: true });
      }
    });
  },
);
