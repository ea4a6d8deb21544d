/**
 * The FLOP model of one LoRA training step (forward, backward, and the recomputed forward of
 * gradient checkpointing), from which the training benchmark reports achieved TFLOP/s, and the
 * peak figures it divides by.
 *
 * B = rows, S = tokens per row, T = B·S, D = hidden, V = vocab, L = layers, H = heads,
 * Hkv = kv heads, hd = head dim, F = ffn, r = LoRA rank; one multiply-add counts 2 FLOPs.
 * @module
 */
import { type ModelConfig, type Projection, PROJECTIONS, projectionShape } from "../formats/model_config.ts";

/** The formula {@link trainingFlops} computes, printed beside the figures. */
export const FLOP_FORMULA = [
  "P_l = Σ_proj N·K  (frozen q,k,v,o,gate,up,down of one layer: N out, K in features)",
  "R_l = Σ_targets r·(K + N)  (LoRA A[r,K], B[N,r])",
  "A_l = Σ_rows Σ_query |{keys j ≤ i in the query's document (and window)}|  (= S(S+1)/2 for one causal row)",
  "layers fwd = Σ_l 2·P_l·T + 2·R_l·T + 4·H·hd·A_l   (QKᵀ and P·V: 2·hd each per pair and head)",
  "head fwd   = 2·V·D·T",
  "layers bwd = Σ_l 2·P_l·T (dx only: frozen) + 4·R_l·T (dx, dA, dB) + 8·H·hd·A_l (dQ, dK, dV, dP)",
  "head bwd   = 2·V·D·T (dx only: frozen)",
  "step = layers fwd·(1 + checkpointing) + head fwd + layers bwd + head bwd",
  "model FLOPs = step without the recomputed forward (the MFU convention)",
].join("\n");

/** FLOPs of one training step by part; {@link FLOP_FORMULA} defines them. */
export interface StepFlops {
  layersForward: number;
  headForward: number;
  layersBackward: number;
  headBackward: number;
  /** The layers' forward again under gradient checkpointing, else 0. */
  recompute: number;
  /** Everything the step computes. */
  total: number;
  /** `total − recompute`. */
  model: number;
}

/** Shape of a micro-batch as the FLOP model needs it. */
export interface BatchShape {
  rows: number;
  seqLen: number;
  /** Document id per token [B·S]; documents are contiguous runs within a row, as packing makes them. */
  docs: ArrayLike<number>;
}

/** Query–key pairs one causal document of `n` tokens attends, with window `w` (null: none). */
export function documentPairs(n: number, w: number | null): number {
  if (w === null || n <= w) return n * (n + 1) / 2;
  return w * (w + 1) / 2 + (n - w) * w;
}

/** A_l: attended query–key pairs of the batch for window `w`, summed over rows and documents. */
export function attentionPairs(batch: BatchShape, w: number | null): number {
  let pairs = 0;
  for (let b = 0; b < batch.rows; b++) {
    let start = 0;
    for (let i = 1; i <= batch.seqLen; i++) {
      const t = b * batch.seqLen + i;
      if (i === batch.seqLen || batch.docs[t] !== batch.docs[t - 1]) {
        pairs += documentPairs(i - start, w);
        start = i;
      }
    }
  }
  return pairs;
}

/** The frozen matmul parameters of one layer (P_l) and the model's total including the head. */
export function frozenMatmulParams(config: ModelConfig): { perLayer: number; total: number } {
  let perLayer = 0;
  for (const p of PROJECTIONS) {
    const [N, K] = projectionShape(config, p);
    perLayer += N * K;
  }
  return { perLayer, total: config.numLayers * perLayer + config.vocabSize * config.hiddenSize };
}

/** LoRA parameters of one layer (R_l / r·r = Σ r·(K+N)) and of the model. */
export function loraParams(config: ModelConfig, r: number, targets: readonly Projection[]): {
  perLayer: number;
  total: number;
} {
  let perLayer = 0;
  for (const p of targets) {
    const [N, K] = projectionShape(config, p);
    perLayer += r * (K + N);
  }
  return { perLayer, total: config.numLayers * perLayer };
}

/** FLOPs of one training step on `batch`; see {@link FLOP_FORMULA}. */
export function trainingFlops(
  config: ModelConfig,
  lora: { r: number; targets: readonly Projection[] },
  batch: BatchShape,
  checkpointing: boolean,
): StepFlops {
  const T = batch.rows * batch.seqLen;
  const P = frozenMatmulParams(config).perLayer;
  const R = loraParams(config, lora.r, lora.targets).perLayer;
  const attnWidth = config.numHeads * config.headDim;
  const pairsByWindow = new Map<number | null, number>();
  let layersForward = 0;
  let layersBackward = 0;
  for (let l = 0; l < config.numLayers; l++) {
    const w = config.layerWindows[l] ?? null;
    let A = pairsByWindow.get(w);
    if (A === undefined) pairsByWindow.set(w, A = attentionPairs(batch, w));
    layersForward += 2 * P * T + 2 * R * T + 4 * attnWidth * A;
    layersBackward += 2 * P * T + 4 * R * T + 8 * attnWidth * A;
  }
  const headForward = 2 * config.vocabSize * config.hiddenSize * T;
  const headBackward = headForward;
  const recompute = checkpointing ? layersForward : 0;
  const total = layersForward + headForward + layersBackward + headBackward + recompute;
  return {
    layersForward,
    headForward,
    layersBackward,
    headBackward,
    recompute,
    total,
    model: total - recompute,
  };
}

/**
 * Non-tensor-core peak TFLOP/s (what WGSL arithmetic can reach) of known datacenter GPUs, by
 * adapter description and dtype, or null when unknown: H100 SXM and H200 133.8 (f16) / 66.9
 * (f32), H100 PCIe 102.4 / 51.2 (NVIDIA's data sheets).
 */
export function knownPeakTflops(description: string, dtype: "f16" | "f32"): number | null {
  const f16 = dtype === "f16";
  if (/H100/i.test(description) && /PCIe/i.test(description)) return f16 ? 102.4 : 51.2;
  if (/H100|H200/i.test(description)) return f16 ? 133.8 : 66.9;
  return null;
}
