/**
 * kernels/reference/decoder.ts against PyTorch + transformers + peft: the goldens of
 * scripts/golden/tiny_models.py (tests/fixtures/golden/models/) on lathe's own tiny checkpoints.
 * Tolerances: GOLDEN_TOLERANCE in _golden.ts (derived from each case's recorded f32 − f64 error).
 */
import assert from "node:assert/strict";
import { loraKey } from "../../formats/peft.ts";
import { projectionPath } from "../../formats/model_config.ts";
import { createReferenceModel } from "../../kernels/models/reference_backend.ts";
import type { LoraSpec, LoraWeights } from "../../kernels/models/trainable.ts";
import { decoder_backward, decoder_forward, decoder_loss } from "../../kernels/reference/decoder.ts";
import { lora_scaling, type LoraAdapter } from "../../kernels/reference/linear_lora.ts";
import {
  assertAllClose,
  GOLDEN_CASES,
  GOLDEN_TOLERANCE,
  type GoldenCase,
  loadGoldenCase,
  type OpenGoldenCase,
  openGoldenCase,
} from "./_golden.ts";

async function withGolden(name: string, fn: (golden: OpenGoldenCase) => Promise<void> | void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-golden-" });
  try {
    await fn(await openGoldenCase(name, dir));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// LoRA adapters for the reference decoder, by module path (dropout 0: no mask).
function decoderAdapters(spec: LoraSpec, weights: readonly LoraWeights[]): Map<string, LoraAdapter> {
  const scaling = lora_scaling(spec.alpha, spec.r, spec.useRslora);
  return new Map(
    weights.map((
      w,
    ) => [projectionPath(w.layer, w.module), { A: w.A, B: w.B, r: spec.r, scaling, dropout: null }]),
  );
}

// logits[T,V] = xF[T,D] · headᵀ: the lm_head on the decoder's final normed hidden state.
function logitsOf(xF: Float64Array, head: ArrayLike<number>, T: number, V: number, D: number): Float64Array {
  const out = new Float64Array(T * V);
  for (let t = 0; t < T; t++) {
    for (let v = 0; v < V; v++) {
      let s = 0;
      for (let d = 0; d < D; d++) s += xF[t * D + d] * head[v * D + d];
      out[t * V + v] = s;
    }
  }
  return out;
}

function decoderInput(golden: GoldenCase) {
  const { batch } = golden;
  return {
    B: batch.rows,
    S: batch.seqLen,
    ids: batch.tokens,
    targets: batch.targets,
    positions: batch.positions,
    docIds: batch.docs,
  };
}

Deno.test("golden fixtures cover every case the generator writes, each with logits and 28 LoRA gradients", async () => {
  const files = [...Deno.readDirSync(new URL("../fixtures/golden/models/", import.meta.url))]
    .filter((e) => e.isFile && e.name.endsWith(".json")).map((e) => e.name.replace(/\.json$/, "")).sort();
  assert.deepEqual(files, [...GOLDEN_CASES].sort());
  for (const name of GOLDEN_CASES) {
    const golden = await loadGoldenCase(name);
    const { rows, seq_len } = golden.meta;
    assert.deepEqual(golden.expected.logitsShape, [rows, seq_len, 512], name);
    // nano: 2 layers × 7 projections × (A, B)
    assert.equal(golden.expected.grads.size, 28, name);
    assert.ok(golden.expected.numItems > 0 && golden.expected.numItems < rows * seq_len, name);
    // every gradient tensor carries signal (B is non-zero, so no path is cut)
    for (const [key, g] of golden.expected.grads) {
      assert.ok(g.some((x) => Math.abs(x) > 1e-6), `${name} ${key}`);
    }
  }
});

Deno.test("golden cases exercise what they claim: packing, window, bias, prompt mask", async () => {
  const cases = new Map(
    await Promise.all(GOLDEN_CASES.map(async (n) => [n, await loadGoldenCase(n)] as const)),
  );
  const packed = cases.get("llama_packed")!.batch;
  assert.ok(packed.positions.some((p, t) => t > 0 && p === 0) && packed.docs.includes(1));
  const window = cases.get("mistral_window")!.batch;
  assert.ok(window.seqLen > 32);
  const packedWindow = cases.get("mistral_packed_window")!.batch;
  assert.ok(packedWindow.docs.filter((d) => d === 0).length > 32 && packedWindow.docs.includes(1));
  assert.equal(cases.get("qwen2_bias")!.batch.rows, 2);
  const prompt = cases.get("qwen2_prompt_masked")!;
  assert.deepEqual([...prompt.batch.targets.slice(0, 6)], Array(6).fill(-100));
  assert.ok(prompt.batch.targets[6] >= 0);
});

for (const name of GOLDEN_CASES) {
  Deno.test(`decoder_forward/backward match transformers + peft on golden "${name}": loss, logits, LoRA gradients`, async () => {
    await withGolden(name, (golden) => {
      const { config, weights } = golden.model;
      // The adapter written by peft's save_pretrained reads back with the recorded hyper-parameters.
      assert.equal(golden.lora.spec.r, golden.meta.lora.r);
      assert.equal(golden.lora.spec.alpha, golden.meta.lora.lora_alpha);
      assert.equal(golden.lora.adapter.scaling, golden.meta.lora.lora_alpha / golden.meta.lora.r);
      assert.deepEqual([...golden.lora.spec.targets].sort(), [...golden.meta.lora.target_modules].sort());
      assert.equal(golden.lora.weights.length, 7 * config.numLayers);

      const adapters = decoderAdapters(golden.lora.spec, golden.lora.weights);
      const input = decoderInput(golden);
      const forward = decoder_forward(config, weights, adapters, input);
      assert.equal(forward.numItems, golden.expected.numItems);
      assertAllClose([forward.loss], [golden.expected.loss], GOLDEN_TOLERANCE.loss, `${name} loss`);

      const [B, S, V] = golden.expected.logitsShape;
      const logits = logitsOf(forward.saved.xF, forward.saved.head, B * S, V, config.hiddenSize);
      assertAllClose(logits, golden.expected.logits, GOLDEN_TOLERANCE.logits, `${name} logits`);

      const grads = decoder_backward(forward);
      const seen = new Set<string>();
      for (const w of golden.lora.weights) {
        const g = grads.lora.get(projectionPath(w.layer, w.module));
        assert.ok(g, `${name}: no gradient for ${projectionPath(w.layer, w.module)}`);
        for (const [which, actual] of [["A", g.dA], ["B", g.dB]] as const) {
          const key = loraKey(w.layer, w.module, which);
          const expected = golden.expected.grads.get(key);
          assert.ok(expected, `${name}: golden has no gradient "${key}"`);
          assertAllClose(actual, expected, GOLDEN_TOLERANCE.grads, `${name} d ${key}`);
          seen.add(key);
        }
      }
      assert.deepEqual([...seen].sort(), [...golden.expected.grads.keys()].sort());

      // The adapters matter: without them the loss is far outside the tolerance.
      const base = decoder_loss(config, weights, new Map(), input);
      assert.ok(
        Math.abs(base - golden.expected.loss) > 100 * GOLDEN_TOLERANCE.loss.rtol * golden.expected.loss,
      );
    });
  });
}

Deno.test("the golden comparison rejects a window off by one and llama3 RoPE scaling left out", async () => {
  await withGolden("mistral_window", (golden) => {
    const { config, weights } = golden.model;
    const offByOne = { ...config, layerWindows: config.layerWindows.map((w) => (w === null ? null : w - 1)) };
    const adapters = decoderAdapters(golden.lora.spec, golden.lora.weights);
    const grads = decoder_backward(decoder_forward(offByOne, weights, adapters, decoderInput(golden)));
    const key = loraKey(0, "q_proj", "A");
    assert.throws(
      () =>
        assertAllClose(
          grads.lora.get(projectionPath(0, "q_proj"))!.dA,
          golden.expected.grads.get(key)!,
          GOLDEN_TOLERANCE.grads,
          key,
        ),
      /q_proj\.lora_A\.weight: element \d+ is/,
    );
  });
  await withGolden("llama_single", (golden) => {
    const { config, weights } = golden.model;
    const plainRope = { ...config, ropeScaling: null };
    const adapters = decoderAdapters(golden.lora.spec, golden.lora.weights);
    const forward = decoder_forward(plainRope, weights, adapters, decoderInput(golden));
    const [B, S, V] = golden.expected.logitsShape;
    const logits = logitsOf(forward.saved.xF, forward.saved.head, B * S, V, config.hiddenSize);
    assert.throws(
      () => assertAllClose(logits, golden.expected.logits, GOLDEN_TOLERANCE.logits, "logits"),
      /logits/,
    );
  });
});

Deno.test("the cpu-reference TrainableModel reproduces every golden loss and gradient through Batch and LoraWeights", async () => {
  for (const name of GOLDEN_CASES) {
    await withGolden(name, async (golden) => {
      using model = createReferenceModel(golden.model.config, golden.model.weights, golden.lora.spec, 0);
      await model.setLora(golden.lora.weights);
      const n = golden.expected.numItems;
      const { lossSum, tokens } = await model.forwardBackward(golden.batch, n, 1234);
      assert.equal(tokens, n);
      assertAllClose([lossSum / n], [golden.expected.loss], GOLDEN_TOLERANCE.loss, `${name} loss`);
      const grads = model.gradients();
      assert.deepEqual([...grads.keys()].sort(), [...golden.expected.grads.keys()].sort());
      for (const [key, expected] of golden.expected.grads) {
        assertAllClose(grads.get(key)!, expected, GOLDEN_TOLERANCE.grads, `${name} d ${key}`);
      }
      const evaluated = await model.evaluate(golden.batch);
      assertAllClose(
        [evaluated.lossSum / n],
        [golden.expected.loss],
        GOLDEN_TOLERANCE.loss,
        `${name} eval loss`,
      );
    });
  }
});
