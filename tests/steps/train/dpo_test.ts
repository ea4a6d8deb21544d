// The DPO objective (steps/train/dpo.ts):
// - against PyTorch autograd (scripts/golden/dpo.py → tests/fixtures/golden/dpo.json): for every
//   loss_type (label smoothing, RPO, reference-free), the step's loss, trl's metrics and
//   d loss / d logits from lathe's chain (per-token log-probs, sequence sums, pair losses, per-token
//   weights, w·(softmax − onehot)) within 1e-12 relative (both f64);
// - ℓ(h) and ∂ℓ/∂h against central differences for every loss_type (1e-7);
// - on the tiny Llama, Mistral and Qwen2 with LoRA (CPU reference, f64): the objective's adapter
//   gradients against central differences of the step loss (1e-6 + 1e-4·|g|), bs 2 × GA 2 equal to
//   bs 4 × GA 1 (1e-12), and with the reference equal to the policy the first loss is ln 2 and
//   every reward 0; the WebGPU graph's DPO gradients (f32, and NF4 bases) against the reference's.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { loraKey } from "../../../formats/peft.ts";
import { PROJECTIONS } from "../../../formats/model_config.ts";
import type {
  Batch,
  LoraWeights,
  TokenScores,
  TokenWeighting,
  TrainableModel,
} from "../../../kernels/models/trainable.ts";
import type { Split } from "../../../steps/train/batches.ts";
import { DPO_LOSS_TYPES } from "../../../steps/train/config.ts";
import {
  DPO_METRICS,
  dpoObjective,
  type DpoSettings,
  pairLoss,
  scoreSplit,
  tableReference,
} from "../../../steps/train/dpo.ts";
import type { ShardRow } from "../../../steps/tokenize/shards.ts";
import { assertClose, gpuTest, rng } from "../../kernels/_harness.ts";
import {
  quantizedCheckpoint,
  referenceModel,
  type TinyCheckpoint,
  tinyCheckpoint,
  withRandomB,
} from "../../models/_model_fixture.ts";
import { loadModelConfig } from "../../../formats/model_config.ts";
import { createGpuModel } from "../../../kernels/models/graph.ts";
import type { TinyArch } from "../../../kernels/models/tiny.ts";

interface GoldenCase {
  name: string;
  loss_type: DpoSettings["lossType"];
  beta: number;
  label_smoothing: number;
  rpo_alpha: number | null;
  reference_free: boolean;
  pairs: number;
  S: number;
  V: number;
  logits: number[];
  targets: number[];
  ref: number[];
  loss: number;
  metrics: Record<string, number>;
  dlogits: number[];
}

const GOLDEN = JSON.parse(
  await Deno.readTextFile(fileURLToPath(new URL("../../fixtures/golden/dpo.json", import.meta.url))),
) as { cases: GoldenCase[] };

function settingsOf(
  c: {
    loss_type: DpoSettings["lossType"];
    beta: number;
    label_smoothing: number;
    rpo_alpha: number | null;
    reference_free: boolean;
  },
): DpoSettings {
  return {
    lossType: c.loss_type,
    beta: c.beta,
    labelSmoothing: c.label_smoothing,
    rpoAlpha: c.rpo_alpha,
    referenceFree: c.reference_free,
  };
}

/** A preference split whose row k (pair k>>1, side k&1) has next-token targets `targets[k]`. */
function splitOf(targets: number[][], padId = 0): Split {
  const rows: ShardRow[] = targets.map((ys, index) => {
    const L = ys.length + 1;
    const tokens = new Uint32Array(L);
    const mask = new Uint8Array(L);
    ys.forEach((y, t) => {
      if (y !== -100) {
        tokens[t + 1] = y;
        mask[t + 1] = 1;
      }
    });
    return { index, tokens, mask, bounds: Uint32Array.from([0, L]) };
  });
  return { index: { pad_id: padId } as Split["index"], rows };
}

/** A model whose "forward" is fixed logits [rows, S, V] (S + 1 positions, the last untrained). */
function logitsModel(logits: Float64Array, S: number, V: number) {
  const grads: Float64Array[] = [];
  const scores = (batch: Batch): TokenScores => {
    const T = batch.rows * batch.seqLen;
    const logp = new Float64Array(T);
    const logitSum = new Float64Array(T);
    for (let t = 0; t < T; t++) {
      const [row, s] = [Math.floor(t / batch.seqLen), t % batch.seqLen];
      if (s >= S) continue;
      const z = logits.subarray((row * S + s) * V, (row * S + s + 1) * V);
      const m = Math.max(...z);
      const lse = m + Math.log(z.reduce((a, x) => a + Math.exp(x - m), 0));
      logitSum[t] = z.reduce((a, x) => a + x, 0);
      if (batch.targets[t] !== -100) logp[t] = z[batch.targets[t]] - lse;
    }
    return { logp, logitSum };
  };
  const model = {
    scoreTokens: (batch: Batch) => Promise.resolve(scores(batch)),
    forwardBackwardWeighted(batch: Batch, _seed: number, weigh: TokenWeighting) {
      const s = scores(batch);
      const w = weigh(s);
      // dlogits[row, s, v] = w·(softmax − onehot), rows of this micro-batch.
      const d = new Float64Array(batch.rows * S * V);
      for (let t = 0; t < batch.targets.length; t++) {
        const [row, pos] = [Math.floor(t / batch.seqLen), t % batch.seqLen];
        if (pos >= S || batch.targets[t] === -100) continue;
        const z = logits.subarray((row * S + pos) * V, (row * S + pos + 1) * V);
        const lse = s.logp[t] === 0 ? 0 : z[batch.targets[t]] - s.logp[t];
        for (let v = 0; v < V; v++) {
          d[(row * S + pos) * V + v] = w[t] * (Math.exp(z[v] - lse) - (v === batch.targets[t] ? 1 : 0));
        }
      }
      grads.push(d);
      return Promise.resolve(s);
    },
  };
  return { model: model as unknown as TrainableModel, grads };
}

for (const c of GOLDEN.cases) {
  Deno.test(`DPO objective matches PyTorch autograd: ${c.name} (loss, trl's metrics, d loss / d logits)`, async () => {
    const rows = 2 * c.pairs;
    const targets = Array.from({ length: rows }, (_, k) => c.targets.slice(k * c.S, (k + 1) * c.S));
    const split = splitOf(targets);
    const { model, grads } = logitsModel(Float64Array.from(c.logits), c.S, c.V);
    const objective = dpoObjective(split, null, settingsOf(c), tableReference({ train: c.ref }), c.V);
    const r = await objective.step(model, Uint32Array.from({ length: c.pairs }, (_, i) => i), c.pairs, [0]);
    assertClose([r.loss], [c.loss], { atol: 1e-13, rtol: 1e-12, name: "loss" });
    for (const name of DPO_METRICS) {
      assertClose([r.metrics[name]], [c.metrics[name]], { atol: 1e-13, rtol: 1e-12, name });
    }
    assertClose(grads[0], c.dlogits, { atol: 1e-15, rtol: 1e-10, name: "dlogits" });
  });
}

Deno.test("pair losses: ∂ℓ/∂h matches central differences for every loss_type", () => {
  for (const lossType of DPO_LOSS_TYPES) {
    for (const h of [-7.3, -0.4, 0.05, 2.2, 15]) {
      const s: DpoSettings = {
        lossType,
        beta: 0.3,
        labelSmoothing: lossType === "robust" ? 0.1 : 0.05,
        referenceFree: false,
        rpoAlpha: null,
      };
      const e = 1e-6;
      const fd = (pairLoss(h + e, s).loss - pairLoss(h - e, s).loss) / (2 * e);
      assert.ok(
        Math.abs(fd - pairLoss(h, s).dh) < 1e-7,
        `${lossType} at h=${h}: ${fd} vs ${pairLoss(h, s).dh}`,
      );
    }
  }
  // h = 0: sigmoid is ln 2, whatever β.
  assert.equal(
    pairLoss(0, { lossType: "sigmoid", beta: 0.1, labelSmoothing: 0, referenceFree: false, rpoAlpha: null })
      .loss,
    Math.LN2,
  );
});

/** A tiny preference split: `pairs` pairs sharing a prompt, answers of different lengths. */
function tinySplit(pairs: number, V: number, seed: number): Split {
  const next = rng(seed);
  const rows: ShardRow[] = [];
  for (let p = 0; p < pairs; p++) {
    const prompt = Array.from({ length: 3 + (p % 3) }, () => Math.floor(next() * V));
    for (let side = 0; side < 2; side++) {
      const answer = Array.from({ length: 3 + ((p + side) % 4) }, () => Math.floor(next() * V));
      const tokens = Uint32Array.from([...prompt, ...answer]);
      const mask = Uint8Array.from(tokens, (_, i) => (i >= prompt.length ? 1 : 0));
      rows.push({ index: rows.length, tokens, mask, bounds: Uint32Array.from([0, tokens.length]) });
    }
  }
  return { index: { pad_id: 0 } as Split["index"], rows };
}

function perturbed(
  weights: LoraWeights[],
  layer: number,
  module: string,
  which: "A" | "B",
  i: number,
  d: number,
) {
  return weights.map((w) =>
    w.layer === layer && w.module === module
      ? { ...w, [which]: Float32Array.from(w[which], (v, k) => (k === i ? v + d : v)) }
      : w
  );
}

const ARCHS: TinyArch[] = ["llama", "mistral", "qwen2"];

for (const arch of ARCHS) {
  Deno.test(`DPO on the tiny ${arch} (CPU reference): gradients match central differences for every loss_type, bs 2 × GA 2 = bs 4, ln 2 at the reference`, async () => {
    const ckpt = await tinyCheckpoint(arch);
    try {
      const lora = { r: 4, alpha: 8, dropout: 0, targets: [...PROJECTIONS], useRslora: false };
      const { initialAdapters } = await import("../../../kernels/models/trainable.ts");
      const init = initialAdapters(ckpt.config, lora, 3).map((p) => ({
        layer: p.layer,
        module: p.module,
        A: p.a,
        B: p.b,
      }));
      const start = withRandomB(init, 4, 0.2);
      using model = await referenceModel(ckpt, lora, 3, start);
      const split = tinySplit(4, ckpt.config.vocabSize, 9);
      const all = Uint32Array.from([0, 1, 2, 3]);
      // The reference is the policy before its first step: h = 0, loss ln 2, rewards 0.
      const refLogps = await scoreSplit(model, split, 2);
      const sigmoid: DpoSettings = {
        lossType: "sigmoid",
        beta: 0.1,
        labelSmoothing: 0,
        referenceFree: false,
        rpoAlpha: null,
      };
      const first = await dpoObjective(
        split,
        null,
        sigmoid,
        tableReference({ train: refLogps }),
        ckpt.config.vocabSize,
      )
        .step(model, all, 4, [0]);
      assertClose([first.loss], [Math.LN2], { atol: 1e-12, rtol: 0, name: "first loss" });
      for (const name of ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]) {
        assert.equal(Math.abs(first.metrics[name]), 0, name);
      }
      await model.zeroGrad();
      // Off the reference (a shifted one), every loss type's gradient against central differences.
      const ref = tableReference({
        train: refLogps.map((x, i) => x + (i % 2 === 0 ? -0.7 : 0.4) * (1 + (i % 3))),
      });
      const cases: DpoSettings[] = [
        sigmoid,
        { ...sigmoid, lossType: "ipo" },
        { ...sigmoid, lossType: "hinge", beta: 0.5 },
        { ...sigmoid, lossType: "robust", labelSmoothing: 0.1 },
        { ...sigmoid, labelSmoothing: 0.2, rpoAlpha: 0.5 },
      ];
      for (const s of cases) {
        const objective = dpoObjective(split, null, s, ref, ckpt.config.vocabSize);
        await model.setLora(start);
        await model.zeroGrad();
        await objective.step(model, all, 2, [0, 0]);
        const grads = model.gradients();
        await model.zeroGrad();
        await objective.step(model, all, 4, [0]);
        for (const [name, g] of model.gradients()) {
          assertClose(g, grads.get(name)!, {
            atol: 1e-15,
            rtol: 1e-12,
            name: `${s.lossType}: bs 4 vs 2 × 2 ${name}`,
          });
        }
        await model.zeroGrad();
        const loss = async (w: LoraWeights[]) => {
          await model.setLora(w);
          const r = await objective.step(model, all, 4, [0]);
          await model.zeroGrad();
          return r.loss;
        };
        for (
          const [layer, module, which, i] of [[0, "q_proj", "A", 2], [1, "down_proj", "B", 3], [
            0,
            "v_proj",
            "B",
            1,
          ]] as const
        ) {
          const eps = 1e-3;
          const up = perturbed(start, layer, module, which, i, eps);
          const down = perturbed(start, layer, module, which, i, -eps);
          const pick = (w: LoraWeights[]) =>
            w.find((x) => x.layer === layer && x.module === module)![which][i];
          const fd = ((await loss(up)) - (await loss(down))) / (pick(up) - pick(down));
          const g = grads.get(loraKey(layer, module, which))![i];
          assert.ok(
            Math.abs(fd - g) <= 1e-6 + 1e-4 * Math.abs(g),
            `${arch} ${s.lossType}${
              s.rpoAlpha ? "+rpo" : ""
            } ${layer}.${module}.${which}[${i}]: fd ${fd} vs ${g}`,
          );
        }
      }
    } finally {
      await ckpt.cleanup();
    }
  });
}

/** The GPU's DPO step against the CPU reference's on the checkpoint in `dir` (its config: `ckpt`). */
async function gpuAgainstReference(config: TinyCheckpoint["config"], dir: string): Promise<void> {
  const lora = { r: 4, alpha: 8, dropout: 0, targets: [...PROJECTIONS], useRslora: false };
  using gpu = await createGpuModel(config, dir, lora, 3, { dtype: "f32", gradientCheckpointing: true });
  const start = withRandomB(await gpu.getLora(), 4, 0.2);
  await gpu.setLora(start);
  // The reference backend on the same files (a 4-bit base dequantized on the host).
  using ref = await referenceModel({ dir, config, cleanup: () => Promise.resolve() }, lora, 3, start);
  const split = tinySplit(4, config.vocabSize, 11);
  const refLogps = (await scoreSplit(ref, split, 4)).map((x, i) => x + (i % 2 === 0 ? -0.5 : 0.5));
  const s: DpoSettings = {
    lossType: "sigmoid",
    beta: 0.1,
    labelSmoothing: 0,
    referenceFree: false,
    rpoAlpha: null,
  };
  const all = Uint32Array.from([0, 1, 2, 3]);
  const objective = dpoObjective(split, null, s, tableReference({ train: refLogps }), config.vocabSize);
  const r = await objective.step(ref, all, 2, [0, 0]);
  const g = await objective.step(gpu, all, 2, [0, 0]);
  assertClose([g.loss], [r.loss], { atol: 1e-5, rtol: 1e-5, name: "loss" });
  assertClose([g.metrics["logps/chosen"]], [r.metrics["logps/chosen"]], {
    atol: 1e-3,
    rtol: 1e-5,
    name: "logps/chosen",
  });
  const grads = await gpu.getGradients();
  for (const [name, e] of ref.gradients()) {
    let scale = 0;
    for (const x of e) scale = Math.max(scale, Math.abs(x));
    assertClose(grads.get(name)!, e, { atol: 1e-4 * scale, rtol: 1e-3, name });
  }
}

for (const arch of ARCHS) {
  gpuTest(`DPO on the GPU matches the CPU reference, f32, checkpointed: ${arch}`, async () => {
    const ckpt = await tinyCheckpoint(arch);
    try {
      await gpuAgainstReference(ckpt.config, ckpt.dir);
    } finally {
      await ckpt.cleanup();
    }
  });
  gpuTest(
    `QLoRA DPO on the GPU matches the CPU reference on the dequantized weights: ${arch} (NF4, double quantization)`,
    async () => {
      await quantizedCheckpoint(arch, {}, async (dir) => {
        await gpuAgainstReference(await loadModelConfig(dir), dir);
      });
    },
  );
}
