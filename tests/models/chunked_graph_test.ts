// The WebGPU model graph (kernels/models/graph.ts) on a device whose storage bindings are capped at
// LIMIT bytes (`requestGpu({ maxBindingBytes })`), so that every activation with a row of 16 bytes or
// more is split into row chunks, against the CPU reference backend (kernels/models/reference_backend.ts)
// and against the same model on an uncapped device.
// B = rows, S = tokens per row, T = B·S, D = hidden, H = heads, Hkv = kv heads, hd = head dim, F = ffn,
// V = vocab, r = LoRA rank. The nano checkpoints (D 64, H 4, Hkv 2, hd 16, F 128, V 512, r 4) with
// B = 2, S = 40 (T = 80): h[T,D], q and the attention output [T,H,hd] (rows of 256 bytes) go in chunks of
// 4 tokens, k, v[T,Hkv,hd] of 8, g, u, m[T,F] of 2, lse[T,H] and xa[T,r] of 64, the weights in chunks of 2
// to 4 rows. Only the [T] vectors (positions, docs, targets, rstd) stay whole: their 320 bytes cannot be
// split under a cap that still holds one row of m.
// Tolerances as tests/models/graph_test.ts against the reference (f32: gradients atol 1e-4·max|ref|,
// rtol 1e-3; loss rtol 1e-5); against the uncapped model atol 1e-5·max|g|, rtol 1e-4 (only the
// order of f32 sums differs).
import assert from "node:assert/strict";
import { type Gpu, requestGpu } from "../../kernels/device.ts";
import { createGpuModel, GpuModel } from "../../kernels/models/graph.ts";
import { loadGpuWeights } from "../../kernels/models/gpu_weights.ts";
import type { TinyArch } from "../../kernels/models/tiny.ts";
import type { LoraSpec } from "../../kernels/models/trainable.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpu as shared, gpuTest } from "../kernels/_harness.ts";
import {
  allTargets,
  packedBatch,
  referenceModel,
  type TinyCheckpoint,
  tinyCheckpoint,
  trainedTokens,
  withRandomB,
} from "./_model_fixture.ts";

/** Largest storage binding of the capped device, in bytes. */
const LIMIT = 1024;
const ROWS = 2;
const SEQ = 40;
const SEED = 7;

/** Asserts every gradient of `actual` is within atol = scaled·max|expected|, rtol of `expected`. */
function assertGradients(
  actual: Map<string, ArrayLike<number>>,
  expected: Map<string, ArrayLike<number>>,
  tol: { scaled: number; rtol: number },
  what: string,
): void {
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort());
  for (const [name, ref] of expected) {
    let scale = 0;
    for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
    assert.ok(scale > 0, `${name}: the expected gradient is all zero, so the check would prove nothing`);
    assertClose(actual.get(name)!, ref, {
      atol: tol.scaled * scale,
      rtol: tol.rtol,
      name: `${name} (${what})`,
    });
  }
}

function assertLoss(actual: number, expected: number, rtol: number, what: string): void {
  assert.ok(
    Math.abs(actual - expected) <= rtol * Math.abs(expected),
    `${what}: loss ${actual} differs from ${expected} by more than rtol ${rtol}`,
  );
}

/** The model on the capped device: weights loaded there (split into row chunks), adapters set. */
async function cappedModel(
  gpu: Gpu,
  ckpt: TinyCheckpoint,
  lora: LoraSpec,
  gradientCheckpointing: boolean,
): Promise<GpuModel> {
  const weights = await loadGpuWeights(gpu, ckpt.config, ckpt.dir, { dtype: "f32" });
  const embed = weights.get("model.embed_tokens.weight");
  assert.ok(embed.chunks.length > 1, `the embedding is split under ${LIMIT} bytes`);
  return new GpuModel(gpu, ckpt.config, weights, lora, SEED, gradientCheckpointing);
}

const CASES: [TinyArch, boolean, string][] = [
  ["mistral", false, "sliding window 5, LoRA dropout, activations kept"],
  ["llama", true, "tied embeddings split into chunks, gradient checkpointing"],
];

for (const [arch, checkpointing, feature] of CASES) {
  gpuTest(
    `a decoder with its activations split into row chunks matches the CPU reference and the unsplit model: ${arch} (${feature})`,
    async () => {
      const gpu = await requestGpu({ maxBindingBytes: LIMIT, f16: false });
      const ckpt = await tinyCheckpoint(arch);
      try {
        assert.equal(gpu.maxBindingBytes, LIMIT);
        const { config } = ckpt;
        const T = ROWS * SEQ;
        // Every [T, columns] activation spans several bindings, down to lse[T,H] and xa[T,r].
        const { hiddenSize: D, numHeads: H, numKvHeads: Hkv, headDim: hd, intermediateSize: F } = config;
        for (
          const [name, rowBytes] of [["h", D], ["q", H * hd], ["k", Hkv * hd], ["m", F], ["lse", H], [
            "xa",
            4,
          ]] as const
        ) {
          assert.ok(T * rowBytes * 4 > LIMIT, `${name}[T, ${rowBytes}] f32 is split under ${LIMIT} bytes`);
        }
        const lora = allTargets(4, 8, arch === "mistral" ? 0.1 : 0);
        const batch = packedBatch(config.vocabSize, ROWS, SEQ, 5);
        const n = trainedTokens(batch);

        using whole = await createGpuModel(config, ckpt.dir, lora, SEED, {
          dtype: "f32",
          gradientCheckpointing: checkpointing,
        });
        const weights = withRandomB(await whole.getLora(), 11);
        await whole.setLora(weights);
        using split = await cappedModel(gpu, ckpt, lora, checkpointing);
        await split.setLora(weights);
        using ref = await referenceModel(ckpt, lora, SEED, weights);

        const r = await ref.forwardBackward(batch, n, 1234);
        const w = await whole.forwardBackward(batch, n, 1234);
        const s = await split.forwardBackward(batch, n, 1234);
        assert.equal(s.tokens, r.tokens);
        assertLoss(s.lossSum, r.lossSum, 1e-5, `${arch} split vs reference`);
        assertLoss(s.lossSum, w.lossSum, 1e-6, `${arch} split vs unsplit`);
        const grads = await split.getGradients();
        assertGradients(grads, ref.gradients(), { scaled: 1e-4, rtol: 1e-3 }, "vs reference");
        assertGradients(grads, await whole.getGradients(), { scaled: 1e-5, rtol: 1e-4 }, "vs unsplit");
      } finally {
        await ckpt.cleanup();
        gpu.device.destroy();
      }
    },
  );
}

gpuTest("requestGpu() caps bindings from LATHE_MAX_BINDING_BYTES and refuses a malformed value", async () => {
  const saved = Deno.env.get("LATHE_MAX_BINDING_BYTES");
  try {
    Deno.env.set("LATHE_MAX_BINDING_BYTES", "4096");
    const gpu = await requestGpu();
    try {
      assert.equal(gpu.maxBindingBytes, 4096);
      using t = Tensor.empty(gpu, [100, 16], "f32");
      assert.equal(t.chunks.length, 2, "6400 bytes split at 4096");
    } finally {
      gpu.device.destroy();
    }
    Deno.env.set("LATHE_MAX_BINDING_BYTES", "4k");
    await assert.rejects(requestGpu(), /LATHE_MAX_BINDING_BYTES "4k" is not a byte count of at least 4/);
    // An explicit option wins over the variable; the adapter's limit is never raised.
    const capped = await requestGpu({ maxBindingBytes: 1 << 20 });
    try {
      assert.equal(capped.maxBindingBytes, Math.min(1 << 20, shared!.maxBindingBytes));
    } finally {
      capped.device.destroy();
    }
    await assert.rejects(requestGpu({ maxBindingBytes: 2.5 }), /maxBindingBytes "2.5" must be an integer/);
  } finally {
    if (saved === undefined) Deno.env.delete("LATHE_MAX_BINDING_BYTES");
    else Deno.env.set("LATHE_MAX_BINDING_BYTES", saved);
  }
});
