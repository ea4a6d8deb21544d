/**
 * Several LoRA adapters applied together (an SFT adapter, then a DPO adapter trained on top) as
 * one adapter of the summed rank, exactly as peft's `add_weighted_adapter(combination_type="cat")`
 * builds it:
 *   y = x·Wᵀ + Σ_i s_i·(x·A_iᵀ)·B_iᵀ = x·Wᵀ + 1·(x·Aᵀ)·Bᵀ
 *   A = [A_1; A_2; …] (rows stacked, r = Σ r_i),  B = [s_1·B_1, s_2·B_2, …] (columns), scaling 1
 * A module that an adapter does not target contributes zero rows and columns. The sum is the same
 * in exact arithmetic; in f32 the only change is the rounding of s_i·B_i.
 * @module
 */
import { type ModelConfig, PROJECTIONS, projectionShape } from "../../formats/model_config.ts";
import type { LoraSpec, LoraWeights } from "./trainable.ts";

/** One adapter: its spec and weights. */
export interface Adapter {
  spec: LoraSpec;
  weights: LoraWeights[];
}

/** The adapters as one (see the module documentation); one adapter is returned as it is. */
export function stackAdapters(config: ModelConfig, adapters: readonly Adapter[]): Adapter {
  if (adapters.length === 0) throw new RangeError("Cannot stack no adapters");
  if (adapters.length === 1) return adapters[0];
  const targets = PROJECTIONS.filter((p) => adapters.some((a) => a.spec.targets.includes(p)));
  const r = adapters.reduce((n, a) => n + a.spec.r, 0);
  const scalings = adapters.map((a) =>
    a.spec.useRslora ? a.spec.alpha / Math.sqrt(a.spec.r) : a.spec.alpha / a.spec.r
  );
  const weights: LoraWeights[] = [];
  for (let layer = 0; layer < config.numLayers; layer++) {
    for (const module of targets) {
      const [N, K] = projectionShape(config, module);
      const A = new Float32Array(r * K);
      const B = new Float32Array(N * r);
      let offset = 0;
      adapters.forEach((a, i) => {
        const w = a.weights.find((x) => x.layer === layer && x.module === module);
        const ri = a.spec.r;
        if (w) {
          A.set(w.A, offset * K);
          for (let n = 0; n < N; n++) {
            for (let k = 0; k < ri; k++) B[n * r + offset + k] = scalings[i] * w.B[n * ri + k];
          }
        }
        offset += ri;
      });
      weights.push({ layer, module, A, B });
    }
  }
  return { spec: { r, alpha: r, dropout: 0, targets, useRslora: false }, weights };
}
