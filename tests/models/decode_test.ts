// KV-cache decoding (kernels/models/decode.ts) on the tiny Llama (tied embeddings, llama3 RoPE),
// Mistral (sliding window 5, shorter than the sequences) and Qwen2 (q/k/v biases), with random
// non-zero LoRA B on all seven projections, three prompts of different lengths in one batch:
// - the logits of every decode step equal the last-token logits of a fresh prefill of the whole
//   sequence so far (f32: |Δ| ≤ 2e-4·(1 + max|logit|); f16: 2e-2·(1 + max|logit|));
// - greedy continuations equal the CPU reference's (kernels/reference/decoder.ts, f64, full
//   forward each step) token for token, and the first logits agree with its (f32 tolerance);
// - the same on an NF4 base (the reference runs on the dequantized weights).
import assert from "node:assert/strict";
import { createGpuModel } from "../../kernels/models/graph.ts";
import { Decoder } from "../../kernels/models/decode.ts";
import { loadHostModel } from "../../kernels/models/load.ts";
import type { TinyArch } from "../../kernels/models/tiny.ts";
import type { LoraSpec, LoraWeights } from "../../kernels/models/trainable.ts";
import { lora_scaling } from "../../kernels/reference/linear_lora.ts";
import { projectionPath } from "../../formats/model_config.ts";
import { loadModelConfig } from "../../formats/model_config.ts";
import { assertClose, gpuTest, rng } from "../kernels/_harness.ts";
import {
  allTargets,
  quantizedCheckpoint,
  referenceLastLogits,
  tinyCheckpoint,
  withRandomB,
} from "./_model_fixture.ts";

const STEPS = 6;

function argmax(z: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < z.length; i++) if (z[i] > z[best]) best = i;
  return best;
}

function prompts(V: number, seed: number): number[][] {
  const next = rng(seed);
  return [5, 9, 3].map((n) => Array.from({ length: n }, () => Math.floor(next() * V)));
}

/** The CPU reference's logits of the last token of `ids`, with the adapters `weights`. */
async function referenceLogits(dir: string, lora: LoraSpec, weights: LoraWeights[]) {
  const host = await loadHostModel(dir);
  const scaling = lora_scaling(lora.alpha, lora.r, lora.useRslora);
  const adapters = new Map(
    weights.map((
      w,
    ) => [projectionPath(w.layer, w.module), { A: w.A, B: w.B, r: lora.r, scaling, dropout: null }]),
  );
  return (ids: number[]): Float64Array => referenceLastLogits(host.config, host.weights, adapters, ids);
}

async function checkDecoding(dir: string, dtype: "f16" | "f32", withReference: boolean): Promise<void> {
  const config = await loadModelConfig(dir);
  const lora = allTargets();
  using model = await createGpuModel(config, dir, lora, 5, { dtype });
  const weights = withRandomB(await model.getLora(), 7, 0.3);
  await model.setLora(weights);
  using decoder = new Decoder(model, 3, 32);
  const seqs = prompts(config.vocabSize, 11);
  let logits = await decoder.prefill(seqs);
  const tol = dtype === "f32" ? 2e-4 : 2e-2;
  const ref = withReference ? await referenceLogits(dir, lora, weights) : null;
  for (let s = 0; s < STEPS; s++) {
    // A fresh prefill of every sequence so far gives the same next-token logits.
    using fresh = new Decoder(model, 3, 32);
    const full = await fresh.prefill(seqs);
    for (let b = 0; b < seqs.length; b++) {
      const scale = 1 + Math.max(...full[b].map(Math.abs));
      assertClose(logits[b], full[b], { atol: tol * scale, rtol: 0, name: `step ${s} sequence ${b}` });
      if (ref && s === 0) {
        assertClose(logits[b], ref(seqs[b]), { atol: 1e-4 * scale, rtol: 0, name: `reference logits ${b}` });
      }
    }
    const next = logits.map(argmax);
    next.forEach((t, b) => seqs[b].push(t));
    logits = await decoder.step(next);
  }
  if (ref) {
    // Greedy continuations of the CPU reference, a full forward per token.
    const start = prompts(config.vocabSize, 11);
    for (let b = 0; b < start.length; b++) {
      const ids = [...start[b]];
      for (let s = 0; s < STEPS; s++) ids.push(argmax(ref(ids)));
      assert.deepEqual(ids, seqs[b], `sequence ${b}: greedy tokens differ from the reference's`);
    }
  }
}

const ARCHS: TinyArch[] = ["llama", "mistral", "qwen2"];

for (const arch of ARCHS) {
  gpuTest(`decode steps equal the full forward, greedy equals the CPU reference: ${arch}, f32`, async () => {
    const ckpt = await tinyCheckpoint(arch);
    try {
      await checkDecoding(ckpt.dir, "f32", true);
    } finally {
      await ckpt.cleanup();
    }
  });
}

gpuTest(
  "decode steps equal the full forward in f16 (llama) and on an NF4 base (mistral, f32, with the reference)",
  async (gpu) => {
    if (gpu.f16) {
      const ckpt = await tinyCheckpoint("llama");
      try {
        await checkDecoding(ckpt.dir, "f16", false);
      } finally {
        await ckpt.cleanup();
      }
    }
    await quantizedCheckpoint("mistral", {}, async (dir) => await checkDecoding(dir, "f32", true));
  },
);
