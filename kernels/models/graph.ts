/**
 * The WebGPU model backend of {@link TrainableModel}: a frozen Llama / Mistral / Qwen2 base on
 * the GPU with LoRA adapters, forward to the loss, backward to the adapters' gradients, AdamW.
 *
 * B = rows, S = tokens per row, T = B·S, D = hidden, V = vocab, L = layers.
 *
 *   h₀ = embed_tokens[tokens]                           h[T,D] f32 (the residual stream)
 *   h_{l+1} = layer_l(h_l)                              kernels/models/layer.ts
 *   x = rmsnorm(h_L, norm)                              x[T,D] f32
 *   lossSum = Σ_{t: target ≠ −100} (lse_t − x_t·W_{target})   W = lm_head (or embed_tokens, tied),
 *                                                       chunked over V (kernels/ops/cross_entropy.ts)
 *   correct = Σ_{t: target ≠ −100} [argmax_v x_t·W_v = target]   counted in the same pass
 * The backward starts from d(lossSum / normaliser) and runs the layers in reverse
 * (kernels/models/layer.ts `layerBackward`); the embedding is frozen, so the first layer stops
 * at its q, k, v adapters.
 *
 * Memory: the layer inputs h_0..h_L are always kept (T·D f32 each). Without gradient
 * checkpointing every layer also keeps its activations (layer.ts `LayerActivations`) from the
 * forward to its backward; with it, the forward keeps nothing else and the backward recomputes
 * one layer's activations from h_l just before that layer's backward, so at most one layer's
 * activations are alive. See docs/engine.md for the sizes.
 *
 * One readback per micro-batch (the loss and the correct count together), one per optimizer step
 * (the gradient norm).
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { Gpu } from "../device.ts";
import { getGpu } from "../device.ts";
import { adamwStep } from "../ops/adamw.ts";
import { crossEntropyBackward, crossEntropyForward, IGNORE_INDEX } from "../ops/cross_entropy.ts";
import { embeddingForward } from "../ops/embedding.ts";
import { gradNorm } from "../ops/grad_norm.ts";
import { loraScaling } from "../ops/lora.ts";
import { rmsnormBackward, rmsnormForward } from "../ops/rmsnorm.ts";
import { type RopeConfig, ropeTable } from "../ops/rope.ts";
import { rope_check_positions } from "../rope_frequencies.ts";
import { readTensors, Tensor } from "../tensor.ts";
import { recorder } from "../recorder.ts";
import { GpuAdapters } from "./adapters.ts";
import { checkSequenceLength, type ModelConfig } from "../../formats/model_config.ts";
import { type GpuWeights, loadGpuWeights, type WeightDType } from "./gpu_weights.ts";
import {
  type LayerActivations,
  layerBackward,
  type LayerBatch,
  type LayerContext,
  layerForward,
} from "./layer.ts";
import type {
  AdamWStep,
  Batch,
  LoraSpec,
  LoraWeights,
  MicroBatchResult,
  OptimizerState,
  TrainableModel,
} from "./trainable.ts";

/** Options of {@link createGpuModel}. */
export interface GpuModelOptions {
  /** Recompute each layer's activations in the backward instead of keeping them (default false). */
  gradientCheckpointing?: boolean;
  /**
   * With gradient checkpointing: keep the layer inputs h_0..h_{L−1} in host memory between the
   * forward and the backward instead of on the GPU (default false). Each is copied out as soon
   * as its layer's forward is recorded and written back just before that layer's backward; the
   * gradients are the same bits. Saves (L − 1)·4·T·D bytes of GPU memory (1 GiB for a 7B model
   * at T = 2048) for two copies of them over the bus per micro-batch.
   */
  offloadLayerInputs?: boolean;
  /** Weights and activations: f16 (default where the adapter has shader-f16) or f32. */
  dtype?: WeightDType;
  /** Called after each uploaded weight tensor with bytes read so far and the total. */
  onLoadProgress?: (readBytes: number, totalBytes: number) => void;
}

function modelError(what: string): never {
  throw new RangeError(`Cannot use the webgpu model: ${what}`);
}

/** Host checks of a micro-batch; returns its trained-token count. */
function checkBatch(config: ModelConfig, batch: Batch): number {
  const { rows, seqLen } = batch;
  if (!Number.isInteger(rows) || rows <= 0 || !Number.isInteger(seqLen) || seqLen <= 0) {
    modelError(`batch rows ${rows} and seqLen ${seqLen} must be positive integers`);
  }
  const T = rows * seqLen;
  for (
    const [name, a] of [
      ["tokens", batch.tokens],
      ["targets", batch.targets],
      ["positions", batch.positions],
      ["docs", batch.docs],
    ] as const
  ) {
    if (a.length !== T) modelError(`batch.${name} holds ${a.length} values, expected rows·seqLen = ${T}`);
  }
  let tokens = 0;
  const V = config.vocabSize;
  for (let t = 0; t < T; t++) {
    const y = batch.targets[t];
    if (y === IGNORE_INDEX) continue;
    if (!(y >= 0 && y < V)) {
      modelError(`batch.targets[${t}] is ${y}; expected a token id in [0, ${V}) or ${IGNORE_INDEX}`);
    }
    tokens++;
  }
  return tokens;
}

/** The GPU model; see the module documentation. Made by {@link createGpuModel}. */
export class GpuModel implements TrainableModel {
  readonly config: ModelConfig;
  readonly lora: LoraSpec;
  readonly backend: string;
  /** dtype of the frozen weights and of the activations that feed matmuls. */
  readonly dtype: WeightDType;
  /** Whether the backward recomputes each layer's activations. */
  readonly gradientCheckpointing: boolean;
  /** Whether the layer inputs wait in host memory for the backward (with checkpointing only). */
  readonly offloadLayerInputs: boolean;
  readonly #gpu: Gpu;
  readonly #ctx: LayerContext;
  readonly #ropeConfig: RopeConfig;
  #step = 0;
  #disposed = false;

  constructor(
    gpu: Gpu,
    config: ModelConfig,
    weights: GpuWeights,
    lora: LoraSpec,
    seed: number,
    gradientCheckpointing: boolean,
    offloadLayerInputs = false,
  ) {
    this.#gpu = gpu;
    this.offloadLayerInputs = gradientCheckpointing && offloadLayerInputs;
    this.config = config;
    this.lora = { ...lora, targets: [...lora.targets] };
    this.backend = `webgpu: ${gpu.info.description}`;
    this.dtype = weights.dtype;
    this.gradientCheckpointing = gradientCheckpointing;
    if (!(lora.dropout >= 0 && lora.dropout < 1)) modelError(`LoRA dropout ${lora.dropout} is not in [0, 1)`);
    this.#ropeConfig = {
      headDim: config.headDim,
      theta: config.ropeTheta,
      scaling: config.ropeScaling,
      maxPositionEmbeddings: config.maxPositionEmbeddings,
    };
    const adapters = GpuAdapters.init(gpu, config, lora, seed);
    this.#ctx = {
      gpu,
      config,
      weights,
      adapters,
      scaling: loraScaling(lora.alpha, lora.r, lora.useRslora),
      act: weights.dtype,
      rope: ropeTable(gpu, this.#ropeConfig),
    };
  }

  #alive(): void {
    if (this.#disposed) throw new Error("Cannot use the webgpu model: it was disposed");
  }

  /** Runs the forward (and, with `train`, the backward); returns the summed loss and correct count. */
  async #run(
    batch: Batch,
    train: { normaliser: number; dropoutSeed: number } | null,
  ): Promise<MicroBatchResult> {
    this.#alive();
    const tokens = checkBatch(this.config, batch);
    // No trained token: zero loss and zero gradient, nothing to run.
    if (tokens === 0) return { lossSum: 0, tokens: 0, correct: 0 };
    checkSequenceLength(this.config, batch.seqLen);
    rope_check_positions(this.#ropeConfig, batch.positions);
    const ctx = this.#ctx;
    const gpu = this.#gpu;
    const L = this.config.numLayers;
    const T = batch.rows * batch.seqLen;
    const w = this.#ctx.weights;
    const head = w.get(this.config.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    const normW = w.get("model.norm.weight");

    const positions = Tensor.from(gpu, batch.positions, [T], "u32", { label: "positions" });
    const docs = Tensor.from(gpu, batch.docs, [T], "u32", { label: "docs" });
    const targets = Tensor.from(gpu, batch.targets, [T], "i32", { label: "targets" });
    const p = this.lora.dropout;
    const lb: LayerBatch = {
      rows: batch.rows,
      seqLen: batch.seqLen,
      positions,
      docs,
      dropout: train !== null && p > 0 ? { p, seed: train.dropoutSeed >>> 0 } : null,
    };
    const keepActs = train !== null && !this.gradientCheckpointing;
    const hs: Tensor[] = [
      embeddingForward(w.get("model.embed_tokens.weight"), batch.tokens, { label: "h0" }),
    ];
    const saved: (LayerActivations | null)[] = [];
    // Offloaded layer inputs: the host copy of h_l, read back once the GPU has reached it.
    const offload = train !== null && this.offloadLayerInputs;
    const onHost: Promise<Float32Array>[] = [];
    try {
      for (let l = 0; l < L; l++) {
        const r = layerForward(ctx, lb, l, hs[l], keepActs ? "keep" : "output");
        hs.push(r.hOut!);
        saved.push(r.saved);
        if (train === null) hs[l].destroy();
        else if (offload) {
          onHost[l] = copyToHost(hs[l]);
          onHost[l].catch(() => {}); // awaited in the backward; an error is thrown there
          hs[l].destroy(); // the copy is recorded first, so a reuse of the buffer comes after it
        }
      }
      const { y: x, rstd } = rmsnormForward(hs[L], normW, { eps: this.config.rmsNormEps, label: "x_final" });
      const { loss, lse, correct } = crossEntropyForward(x, head, targets, { n: 1 });
      if (train !== null) {
        const dx = crossEntropyBackward(x, head, targets, lse, { n: train.normaliser });
        const dh = rmsnormBackward(dx, hs[L], normW, rstd).dx;
        dx.destroy();
        hs[L].destroy();
        // The loss's last readers have run: its [T,D] input need not wait through the layers.
        x.destroy();
        rstd.destroy();
        for (let l = L - 1; l >= 0; l--) {
          if (offload) {
            hs[l] = Tensor.from(gpu, await onHost[l], [T, this.config.hiddenSize], "f32", { label: `h${l}` });
          }
          const acts = saved[l] ?? layerForward(ctx, lb, l, hs[l], "recompute").saved!;
          layerBackward(ctx, lb, l, hs[l], acts, dh, l > 0);
          acts.destroy();
          saved[l] = null;
          hs[l].destroy();
        }
        dh.destroy();
      }
      for (const t of [x, rstd, lse]) t.destroy();
      const [lossRead, correctRead] = await readTensors([loss, correct]);
      loss.destroy();
      correct.destroy();
      return { lossSum: lossRead[0], tokens, correct: correctRead[0] };
    } finally {
      for (const s of saved) s?.destroy();
      for (const h of hs) h.destroy();
      for (const t of [positions, docs, targets]) t.destroy();
    }
  }

  async forwardBackward(batch: Batch, normaliser: number, dropoutSeed: number): Promise<MicroBatchResult> {
    if (!(normaliser > 0)) modelError(`normaliser ${normaliser} must be positive`);
    if (!Number.isInteger(dropoutSeed)) modelError(`dropoutSeed ${dropoutSeed} must be an integer`);
    return await this.#run(batch, { normaliser, dropoutSeed });
  }

  async evaluate(batch: Batch): Promise<MicroBatchResult> {
    return await this.#run(batch, null);
  }

  async optimizerStep(hp: AdamWStep): Promise<{ gradNorm: number }> {
    this.#alive();
    const adapters = this.#ctx.adapters;
    const clip = gradNorm(adapters.gradients(), { maxNorm: hp.maxGradNorm > 0 ? hp.maxGradNorm : undefined });
    adamwStep(adapters.optimizerTensors(), {
      lr: hp.lr,
      beta1: hp.beta1,
      beta2: hp.beta2,
      eps: hp.eps,
      weightDecay: hp.weightDecay,
      step: this.#step + 1,
      clip,
      zeroGrad: true,
    });
    this.#step++;
    const [norm] = (await readTensors([clip]))[0] as Float32Array;
    clip.destroy();
    return { gradNorm: norm };
  }

  // deno-lint-ignore require-await
  async zeroGrad(): Promise<void> {
    this.#alive();
    this.#ctx.adapters.zeroGrad();
  }

  async getLora(): Promise<LoraWeights[]> {
    this.#alive();
    return await this.#ctx.adapters.read();
  }

  // deno-lint-ignore require-await
  async setLora(weights: LoraWeights[]): Promise<void> {
    this.#alive();
    this.#ctx.adapters.write(weights);
  }

  /**
   * The accumulated LoRA gradients by PEFT tensor name (`base_model.model.….lora_A.weight`),
   * as the CPU reference's `gradients()` gives them. Beyond the contract: for tests and
   * diagnostics.
   */
  async getGradients(): Promise<Map<string, Float32Array>> {
    this.#alive();
    return await this.#ctx.adapters.readGradients();
  }

  async getOptimizerState(): Promise<OptimizerState> {
    this.#alive();
    const { m, v } = await this.#ctx.adapters.readMoments();
    return { step: this.#step, m, v };
  }

  // deno-lint-ignore require-await
  async setOptimizerState(state: OptimizerState): Promise<void> {
    this.#alive();
    if (!Number.isInteger(state.step) || state.step < 0) {
      modelError(`optimizer step ${state.step} is invalid`);
    }
    this.#ctx.adapters.writeMoments(state);
    this.#step = state.step;
  }

  /** Frees every GPU buffer of the model (weights, adapters, gradients, moments, tables). */
  [Symbol.dispose](): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#ctx.adapters.destroy();
    this.#ctx.rope.destroy();
    this.#ctx.weights.destroy();
  }
}

/**
 * The f32 values of `t` on the host, once the GPU reaches the copy recorded now: `t` may be
 * destroyed right after the call (the copy comes first in stream order).
 */
function copyToHost(t: Tensor): Promise<Float32Array> {
  const ranges = t.chunks.map((c) => ({ buffer: c.buffer, size: c.byteLength }));
  return recorder(t.gpu).read(ranges).then((parts) => {
    const out = new Float32Array(t.size);
    let at = 0;
    for (const part of parts) {
      out.set(new Float32Array(part.buffer, part.byteOffset, part.byteLength / 4), at);
      at += part.byteLength / 4;
    }
    return out;
  });
}

/**
 * Loads `modelDir`'s weights onto the GPU (streamed tensor by tensor; f16 where the adapter
 * has shader-f16 unless `dtype` says otherwise) and attaches fresh LoRA adapters, initialised
 * as PEFT does from `seed` exactly as the CPU reference backend does.
 *
 * @example
 * ```ts
 * const config = await loadModelConfig(dir);
 * using model = await createGpuModel(config, dir, { r: 8, alpha: 16, dropout: 0.05, targets: ["q_proj", "v_proj"], useRslora: false }, 42, { gradientCheckpointing: true });
 * const { lossSum, tokens } = await model.forwardBackward(batch, trainedTokens, 1);
 * ```
 * @throws {LatheError} when there is no WebGPU adapter or the weights do not match `config`.
 */
export async function createGpuModel(
  config: ModelConfig,
  modelDir: string,
  lora: LoraSpec,
  seed: number,
  opts: GpuModelOptions = {},
): Promise<GpuModel> {
  const gpu = await getGpu();
  if (opts.dtype === "f16" && !gpu.f16) {
    throw new LatheError(`Cannot train in f16 on "${gpu.info.description}": the adapter has no shader-f16`, {
      hint: "Use dtype f32 (the default on this adapter).",
    });
  }
  const weights = await loadGpuWeights(gpu, config, modelDir, {
    dtype: opts.dtype,
    onProgress: opts.onLoadProgress,
  });
  try {
    return new GpuModel(
      gpu,
      config,
      weights,
      lora,
      seed,
      opts.gradientCheckpointing ?? false,
      opts.offloadLayerInputs ?? false,
    );
  } catch (error) {
    weights.destroy();
    throw error;
  }
}
