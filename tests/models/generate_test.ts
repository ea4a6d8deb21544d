// Generation (kernels/models/generate.ts) and stacked adapters (kernels/models/stack_adapters.ts)
// on the tiny models:
// - a stop id ends its sequence (kept, as transformers keeps the EOS), the others run to
//   max_new_tokens; the streamed tokens are the returned ones;
// - sampling with a seed gives the same tokens whatever the batch grouping, another seed others;
// - two adapters stacked (SFT then DPO) give the logits of the CPU reference with the first
//   merged into the base and the second as its adapter (f32 tolerance), and greedy tokens equal.
import assert from "node:assert/strict";
import { createGpuModel } from "../../kernels/models/graph.ts";
import { Decoder } from "../../kernels/models/decode.ts";
import { generate } from "../../kernels/models/generate.ts";
import { loadHostModel } from "../../kernels/models/load.ts";
import { DEFAULT_SAMPLING } from "../../kernels/models/sampling.ts";
import { stackAdapters } from "../../kernels/models/stack_adapters.ts";
import type { LoraSpec, LoraWeights } from "../../kernels/models/trainable.ts";
import { initialAdapters } from "../../kernels/models/trainable.ts";
import { projectionPath, projectionShape } from "../../formats/model_config.ts";
import { assertClose, gpuTest, rng } from "../kernels/_harness.ts";
import { allTargets, referenceLastLogits, tinyCheckpoint, withRandomB } from "./_model_fixture.ts";

function prompts(V: number, seed: number, lengths: number[]): number[][] {
  const next = rng(seed);
  return lengths.map((n) => Array.from({ length: n }, () => Math.floor(next() * V)));
}

gpuTest(
  "generate: a stop id ends its sequence, max_new_tokens the others; streaming; seeds and grouping",
  async () => {
    const ckpt = await tinyCheckpoint("qwen2");
    try {
      using model = await createGpuModel(ckpt.config, ckpt.dir, allTargets(), 3, { dtype: "f32" });
      await model.setLora(withRandomB(await model.getLora(), 2, 0.3));
      const ps = prompts(ckpt.config.vocabSize, 5, [4, 7, 2]);
      const greedy = {
        prompts: ps,
        maxNewTokens: 6,
        sampling: DEFAULT_SAMPLING,
        stop: new Set<number>(),
        seed: 1,
      };
      const free = await generate(model, greedy);
      assert.deepEqual(free.map((g) => [g.tokens.length, g.finishReason]), [[6, "length"], [6, "length"], [
        6,
        "length",
      ]]);
      // Stop on sequence 0's third token: it ends there, keeping it; a sequence that never makes it runs on.
      const stopId = free[0].tokens[2];
      const streamed: number[][] = [[], [], []];
      const stopped = await generate(
        model,
        { ...greedy, stop: new Set([stopId]) },
        (i, t) => streamed[i].push(t),
      );
      assert.ok(stopped[0].tokens.length <= 3);
      assert.equal(stopped[0].finishReason, "stop");
      for (const [b, g] of stopped.entries()) {
        assert.deepEqual(streamed[b], g.tokens, "streamed = returned");
        const at = free[b].tokens.indexOf(stopId);
        assert.deepEqual(g.tokens, at === -1 ? free[b].tokens : free[b].tokens.slice(0, at + 1));
        assert.equal(g.finishReason, at === -1 ? "length" : "stop");
      }
      const sampled = {
        ...greedy,
        sampling: { ...DEFAULT_SAMPLING, doSample: true, temperature: 1.5, topK: 0 },
      };
      const a = await generate(model, { ...sampled, seed: 9 });
      const b = await generate(model, { ...sampled, seed: 9, batchSize: 1 });
      assert.deepEqual(
        b.map((g) => g.tokens),
        a.map((g) => g.tokens),
        "the same seed, grouped otherwise",
      );
      const c = await generate(model, { ...sampled, seed: 10 });
      assert.notDeepEqual(c.map((g) => g.tokens), a.map((g) => g.tokens));
      await assert.rejects(() => generate(model, { ...greedy, maxNewTokens: 0 }), /max_new_tokens 0/);
      // A prompt that fills the context leaves no room for an answer: refused before anything runs.
      const context = ckpt.config.maxPositionEmbeddings;
      await assert.rejects(
        () => generate(model, { ...greedy, prompts: [[1, 2], new Array(context).fill(1)] }),
        new RegExp(`prompt 1: its ${context} tokens fill the model's context of ${context}`),
      );
    } finally {
      await ckpt.cleanup();
    }
  },
);

gpuTest(
  "two stacked adapters equal the first merged into the base with the second on top (CPU reference), in prefill and decode",
  async () => {
    const ckpt = await tinyCheckpoint("llama");
    try {
      const config = ckpt.config;
      const sftSpec: LoraSpec = {
        r: 4,
        alpha: 8,
        dropout: 0,
        targets: ["q_proj", "v_proj", "down_proj"],
        useRslora: false,
      };
      const dpoSpec: LoraSpec = {
        r: 2,
        alpha: 6,
        dropout: 0,
        targets: ["q_proj", "o_proj"],
        useRslora: false,
      };
      const init = (spec: LoraSpec, seed: number): LoraWeights[] =>
        withRandomB(
          initialAdapters(config, spec, seed).map((p) => ({
            layer: p.layer,
            module: p.module,
            A: p.a,
            B: p.b,
          })),
          seed,
          0.3,
        );
      const sft = init(sftSpec, 4);
      const dpo = init(dpoSpec, 6);
      const stacked = stackAdapters(config, [{ spec: sftSpec, weights: sft }, {
        spec: dpoSpec,
        weights: dpo,
      }]);
      assert.equal(stacked.spec.r, 6);
      assert.deepEqual(stacked.spec.targets, ["q_proj", "v_proj", "o_proj", "down_proj"]);
      using model = await createGpuModel(config, ckpt.dir, stacked.spec, 1, { dtype: "f32" });
      await model.setLora(stacked.weights);
      using decoder = new Decoder(model, 1, 16);
      const ps = prompts(config.vocabSize, 3, [6]);
      const gpu = await decoder.prefill(ps);

      // The reference: W' = W + s·B·A of the SFT adapter, then the DPO adapter on W'.
      const host = await loadHostModel(ckpt.dir);
      const weights = new Map(host.weights);
      const s = sftSpec.alpha / sftSpec.r;
      for (const w of sft) {
        const name = `${projectionPath(w.layer, w.module)}.weight`;
        const [N, K] = projectionShape(config, w.module);
        const merged = Float32Array.from(weights.get(name)!);
        for (let n = 0; n < N; n++) {
          for (let k = 0; k < K; k++) {
            let acc = 0;
            for (let j = 0; j < sftSpec.r; j++) acc += w.B[n * sftSpec.r + j] * w.A[j * K + k];
            merged[n * K + k] += s * acc;
          }
        }
        weights.set(name, merged);
      }
      const adapters = new Map(
        dpo.map((w) => [projectionPath(w.layer, w.module), {
          A: w.A,
          B: w.B,
          r: dpoSpec.r,
          scaling: dpoSpec.alpha / dpoSpec.r,
          dropout: null,
        }]),
      );
      const ref = referenceLastLogits(config, weights, adapters, ps[0]);
      const scale = 1 + Math.max(...ref.map(Math.abs));
      assertClose(gpu[0], ref, { atol: 1e-4 * scale, rtol: 0, name: "stacked logits" });
      // Decode steps with the stacked adapters equal a fresh prefill of the sequence so far.
      const seq = [...ps[0]];
      let logits = gpu;
      for (let s = 0; s < 4; s++) {
        const next = logits[0].indexOf(Math.max(...logits[0]));
        seq.push(next);
        logits = await decoder.step([next]);
        using fresh = new Decoder(model, 1, 16);
        const full = await fresh.prefill([seq]);
        const sc = 1 + Math.max(...full[0].map(Math.abs));
        assertClose(logits[0], full[0], { atol: 2e-4 * sc, rtol: 0, name: `stacked decode step ${s}` });
      }
    } finally {
      await ckpt.cleanup();
    }
  },
);
