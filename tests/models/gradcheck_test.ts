// Finite-difference check of the whole WebGPU model graph (kernels/models/graph.ts), independent of
// the CPU reference: d loss / d θ for single LoRA entries θ, from GPU forward losses (f32 weights
// and activations), against the GPU backward's gradients.
//   loss(θ) = evaluate(batch).lossSum / N
//   c(e) = (loss(θ + e) − loss(θ − e)) / 2e,  fd = (4·c(ε/2) − c(ε)) / 3  (Richardson), ε = 2e-2
// Entries of layer 0 exercise the whole input path back through the frozen layer 1 (its norms,
// attention, MLP and residuals), the final norm and the lm_head; entries of layer 1 the path from
// the loss alone. For each adapter tensor checked, the entry with the largest gradient and one
// seeded random entry are perturbed.
// Tolerance |fd − g| ≤ 2e-4 + 1e-2·|g|. The f32 loss sum (≈ 130 over ≈ 20 tokens) is exact to about
// its ulp, 1.5e-5, which is up to ≈ 1e-4 in fd after the divisions by e; Richardson cancels the
// O(ε²) truncation, leaving O(ε⁴) terms below 3e-3·|g| here (measured: worst 0.5 of the tolerance).
import assert from "node:assert/strict";
import { loraKey } from "../../formats/peft.ts";
import type { Projection } from "../../formats/model_config.ts";
import { createGpuModel } from "../../kernels/models/graph.ts";
import type { TinyArch } from "../../kernels/models/tiny.ts";
import type { LoraWeights } from "../../kernels/models/trainable.ts";
import { gpuTest, rng } from "../kernels/_harness.ts";
import { allTargets, packedBatch, tinyCheckpoint, trainedTokens, withRandomB } from "./_model_fixture.ts";

const EPS = 2e-2;
const ATOL = 2e-4;
const RTOL = 1e-2;

/** The adapter tensors whose entries are perturbed: [layer, module, which]. */
const CHECKED: [number, Projection, "A" | "B"][] = [
  [0, "q_proj", "A"],
  [0, "k_proj", "B"],
  [0, "v_proj", "A"],
  [0, "o_proj", "B"],
  [0, "gate_proj", "A"],
  [0, "up_proj", "B"],
  [0, "down_proj", "A"],
  [1, "q_proj", "B"],
  [1, "o_proj", "A"],
  [1, "down_proj", "B"],
];

const CASES: [TinyArch, boolean][] = [["llama", false], ["mistral", true], ["qwen2", false]];

for (const [arch, checkpointing] of CASES) {
  gpuTest(
    `central differences of GPU f32 losses match the GPU backward for LoRA entries in both layers: ${arch}` +
      (checkpointing ? " (checkpointed)" : ""),
    async () => {
      const ckpt = await tinyCheckpoint(arch);
      try {
        using model = await createGpuModel(ckpt.config, ckpt.dir, allTargets(), 5, {
          dtype: "f32",
          gradientCheckpointing: checkpointing,
        });
        const weights = withRandomB(await model.getLora(), 17, 0.3);
        await model.setLora(weights);
        const batch = packedBatch(ckpt.config.vocabSize, 2, 16, 23);
        const n = trainedTokens(batch);
        await model.forwardBackward(batch, n, 1);
        const grads = await model.getGradients();
        const loss = async (w: LoraWeights[]) => {
          await model.setLora(w);
          return (await model.evaluate(batch)).lossSum / n;
        };
        const next = rng(29);
        const failures: string[] = [];
        for (const [layer, module, which] of CHECKED) {
          const g = grads.get(loraKey(layer, module, which))!;
          let top = 0;
          for (let i = 1; i < g.length; i++) if (Math.abs(g[i]) > Math.abs(g[top])) top = i;
          for (const index of [top, Math.floor(next() * g.length)]) {
            const at = (delta: number) =>
              weights.map((w) => {
                if (w.layer !== layer || w.module !== module) return w;
                const copy = { ...w, A: w.A.slice(), B: w.B.slice() };
                copy[which][index] += delta;
                return copy;
              });
            const central = async (e: number) => (await loss(at(e)) - await loss(at(-e))) / (2 * e);
            // Richardson: the O(ε²) terms of the two central differences cancel.
            const fd = (4 * await central(EPS / 2) - await central(EPS)) / 3;
            const allowed = ATOL + RTOL * Math.abs(g[index]);
            if (!(Math.abs(fd - g[index]) <= allowed)) {
              failures.push(
                `layer ${layer} ${module} ${which}[${index}]: fd ${fd}, backward ${
                  g[index]
                }, allowed ${allowed}`,
              );
            }
          }
        }
        assert.ok(Math.max(...[...grads.values()].map((g) => Math.max(...g.map(Math.abs)))) > 20 * ATOL);
        assert.deepEqual(failures, []);
      } finally {
        await ckpt.cleanup();
      }
    },
  );
}
