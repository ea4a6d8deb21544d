// The merge step on a tiny Llama with an adapter on q, v and down_proj (peft's invariants):
// - merged weights are W + s·B·A (f64 reference, f32 within 1e-6 relative), other tensors unchanged;
// - the merged model's logits equal the unmerged model's (GPU, f32 within 1e-4 of the logit scale);
// - a zero adapter gives the base's values, bit for bit, in the base's dtype;
// - an adapter holding a NaN is refused and no manifest claims success.
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadModelConfig, projectionPath, projectionShape } from "../../formats/model_config.ts";
import { type LoraConfig, writePeftAdapter } from "../../formats/peft.ts";
import { ModelWeights, toFloat32 } from "../../formats/safetensors.ts";
import { FAILURE_FILE } from "../../foundation/manifest.ts";
import { LatheError } from "../../foundation/errors.ts";
import { Decoder } from "../../kernels/models/decode.ts";
import { createGpuModel } from "../../kernels/models/graph.ts";
import { initialAdapters, type LoraSpec } from "../../kernels/models/trainable.ts";
import { runStep } from "../../steps/runner.ts";
import { MERGED_DIR, step } from "../../steps/merge.ts";
import { assertClose, gpuTest } from "../kernels/_harness.ts";
import { tinyCheckpoint, withRandomB } from "../models/_model_fixture.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";

const TOKENIZER = join(ROOT, "data", "demo", "tokenizer");
import { ROOT } from "./train/_fixtures.ts";

const SPEC: LoraSpec = {
  r: 4,
  alpha: 12,
  dropout: 0,
  targets: ["q_proj", "v_proj", "down_proj"],
  useRslora: false,
};

async function withSetup(
  fn: (
    s: { dir: string; model: string; adapter: string; weights: ReturnType<typeof withRandomB> },
  ) => Promise<void>,
  bScale = 0.3,
) {
  const ckpt = await tinyCheckpoint("llama");
  const dir = await Deno.makeTempDir({ prefix: "lathe-merge-" });
  try {
    const pairs = initialAdapters(ckpt.config, SPEC, 3);
    const weights = bScale === 0
      ? pairs.map((p) => ({ layer: p.layer, module: p.module, A: p.a, B: p.b }))
      : withRandomB(pairs.map((p) => ({ layer: p.layer, module: p.module, A: p.a, B: p.b })), 5, bScale);
    const adapter = join(dir, "adapter");
    const peft: LoraConfig = {
      baseModelNameOrPath: ckpt.dir,
      r: SPEC.r,
      loraAlpha: SPEC.alpha,
      loraDropout: 0,
      targetModules: SPEC.targets,
      useRslora: false,
    };
    await writePeftAdapter(
      adapter,
      ckpt.config,
      peft,
      weights.map((w) => ({ layer: w.layer, module: w.module, a: w.A, b: w.B })),
    );
    await fn({ dir, model: ckpt.dir, adapter, weights });
  } finally {
    await Deno.remove(dir, { recursive: true });
    await ckpt.cleanup();
  }
}

const merge = (s: { dir: string; model: string; adapter: string }, dtype = "float32", runId = "m") =>
  runStep(step, {
    runsRoot: join(s.dir, "runs"),
    runId,
    recipe: null,
    config: { model: s.model, adapters: [s.adapter], dtype },
    seed: 1,
    projectRoot: ROOT,
    quiet: true,
  });

gpuTest("merge writes W + s·B·A, and the merged model's logits equal base + adapter's", async () => {
  await withSetup(async (s) => {
    const out = await merge(s);
    assert.equal(out.manifest.metrics.projections_merged, 3 * 2);
    const mergedDir = join(s.dir, "runs", "m", "merge", MERGED_DIR);
    const config = await loadModelConfig(mergedDir);
    using base = await ModelWeights.open(s.model);
    using merged = await ModelWeights.open(mergedDir);
    assert.deepEqual(merged.names().sort(), base.names().sort());
    const scale = SPEC.alpha / SPEC.r;
    for (const name of base.names()) {
      const w = toFloat32(base.info(name).dtype, await base.readBytes(name), name);
      const m = toFloat32(merged.info(name).dtype, await merged.readBytes(name), name);
      const pair = s.weights.find((x) => `${projectionPath(x.layer, x.module)}.weight` === name);
      if (!pair) {
        assert.deepEqual(m, w, `${name} unchanged`);
        continue;
      }
      const [N, K] = projectionShape(config, pair.module);
      const want = Float64Array.from(w, (v, i) => {
        const [n, k] = [Math.floor(i / K), i % K];
        let acc = 0;
        for (let j = 0; j < SPEC.r; j++) acc += pair.B[n * SPEC.r + j] * pair.A[j * K + k];
        return v + scale * acc;
      });
      assert.equal(want.length, N * K);
      assertClose(m, want, { atol: 1e-6, rtol: 1e-6, name });
    }
    // Logits: base + adapter (unmerged) against the merged model (its adapter zero).
    const prompt = [[3, 17, 250, 9, 41, 7]];
    using unmerged = await createGpuModel(config, s.model, SPEC, 1, { dtype: "f32" });
    await unmerged.setLora(s.weights);
    using one = new Decoder(unmerged, 1, 8);
    const a = await one.prefill(prompt);
    using plain = await createGpuModel(config, mergedDir, SPEC, 1, { dtype: "f32" });
    using two = new Decoder(plain, 1, 8);
    const b = await two.prefill(prompt);
    const sc = 1 + Math.max(...a[0].map(Math.abs));
    assertClose(b[0], a[0], { atol: 1e-4 * sc, rtol: 0, name: "merged vs unmerged logits" });
  });
});

Deno.test("merge with a zero adapter gives the base's bits; an adapter with a NaN is refused", async () => {
  await withSetup(async (s) => {
    await merge(s, "float32");
    using base = await ModelWeights.open(s.model);
    using merged = await ModelWeights.open(join(s.dir, "runs", "m", "merge", MERGED_DIR));
    for (const name of base.names()) {
      if (base.info(name).dtype !== "F32") continue;
      assert.deepEqual(await merged.readBytes(name), await base.readBytes(name), name);
    }
    // A NaN in lora_B: refused, and the step leaves only its failure record.
    const poisoned = s.weights.map((
      w,
      i,
    ) => (i === 1 ? { ...w, B: w.B.map((x, j) => (j === 2 ? NaN : x)) } : w));
    const config = await loadModelConfig(s.model);
    const bad = join(s.dir, "bad");
    await writePeftAdapter(bad, config, {
      baseModelNameOrPath: s.model,
      r: SPEC.r,
      loraAlpha: SPEC.alpha,
      loraDropout: 0,
      targetModules: SPEC.targets,
      useRslora: false,
    }, poisoned.map((w) => ({ layer: w.layer, module: w.module, a: w.A, b: w.B })));
    await assert.rejects(() => merge({ ...s, adapter: bad }, "float16", "nan"), (e: Error) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /lora_B\[2\] is NaN/);
      return true;
    });
    assert.deepEqual([...Deno.readDirSync(join(s.dir, "runs", "nan", "merge"))].map((e) => e.name), [
      FAILURE_FILE,
    ]);
  }, 0);
});

Deno.test("merge refuses an adapter whose shapes do not fit the base, before writing anything", async () => {
  await withSetup(async (s) => {
    // An adapter made for the micro Llama (D 128) merged into the nano one (D 64).
    const other = await Deno.makeTempDir({ prefix: "lathe-merge-micro-" });
    try {
      const { config } = await writeTinyModel(other, {
        arch: "llama",
        size: "micro",
        seed: 1,
        tokenizerDir: TOKENIZER,
      });
      const pairs = initialAdapters(config, SPEC, 3);
      const adapter = join(s.dir, "micro-adapter");
      await writePeftAdapter(adapter, config, {
        baseModelNameOrPath: other,
        r: SPEC.r,
        loraAlpha: SPEC.alpha,
        loraDropout: 0,
        targetModules: SPEC.targets,
        useRslora: false,
      }, pairs);
      await assert.rejects(() => merge({ ...s, adapter }, "float16", "shape"), (e: Error) => {
        assert.ok(e instanceof LatheError);
        assert.match(e.message, /^Cannot merge adapter ".*micro-adapter" into ".*": /);
        assert.match(e.hint ?? "", /the base it was trained on/);
        return true;
      });
      assert.deepEqual([...Deno.readDirSync(join(s.dir, "runs", "shape", "merge"))].map((e) => e.name), [
        FAILURE_FILE,
      ]);
    } finally {
      await Deno.remove(other, { recursive: true });
    }
  });
});
