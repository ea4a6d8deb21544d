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
 *
 * Sequence objectives (DPO; `scoreTokens`, `forwardBackwardWeighted`): the loss's pass keeps its
 * per-token state, and one readback between the forward and the backward brings
 *   logp[t]     = z[t, y[t]] − lse[t]           (trained tokens; from the state, on the host in f64)
 *   logitSum[t] = x_t · (Σ_v W_v)               ([T,1] = x[T,D] · headSum[1,D]ᵀ; headSum = 1ᵀ·W,
 *                                               computed once, as lm_head is frozen)
 * to the host; the objective turns them into per-token weights w[T], and the backward starts from
 * dz = w[t]·(softmax − onehot(y)) (crossEntropyBackward's `weights`) through the same layers.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import { f32ArrayToF16 } from "../half.ts";
import type { Gpu } from "../device.ts";
import { getGpu } from "../device.ts";
import { adamwStep } from "../ops/adamw.ts";
import { crossEntropyBackward, crossEntropyForward, IGNORE_INDEX } from "../ops/cross_entropy.ts";
import { embeddingBackward, embeddingForward } from "../ops/embedding.ts";
import { lmHeadWeightGrad } from "../ops/lm_head_grad.ts";
import { FullParams, type TrainedSubset } from "./full_params.ts";
import { gradNorm } from "../ops/grad_norm.ts";
import { loraScaling } from "../ops/lora.ts";
import { rmsnormBackward, rmsnormForward } from "../ops/rmsnorm.ts";
import { type RopeConfig, ropeTable } from "../ops/rope.ts";
import { rope_check_positions } from "../rope_frequencies.ts";
import { matmul } from "../ops/matmul.ts";
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
  normGrad,
} from "./layer.ts";
import type {
  AdamWStep,
  Batch,
  LoraSpec,
  LoraWeights,
  MicroBatchResult,
  OptimizerState,
  TokenScores,
  TokenWeighting,
  TrainableModel,
} from "./trainable.ts";

/**
 * What one run of the graph does: evaluate (forward to the loss), train (backward of the mean
 * loss Σ CE / normaliser), score (forward to the per-token scores) or weighted (scores, then the
 * backward of Σ_t w[t]·CE_t with w from `weigh`).
 */
type RunMode =
  | { kind: "evaluate" }
  | { kind: "train"; normaliser: number; dropoutSeed: number }
  | { kind: "score" }
  | { kind: "weighted"; dropoutSeed: number; weigh: TokenWeighting };

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
  /**
   * Full fine-tuning: every base weight trains (f32 masters, gradients and AdamW moments;
   * kernels/models/full_params.ts) and `lora.targets` must be empty. Default false.
   */
  full?: boolean;
  /**
   * With LoRA: base weights trained beside the adapters (peft's `modules_to_save`: whole
   * `embed_tokens` / `lm_head`; `trainable_token_indices`: only some embedding rows). Default none.
   */
  trainedSubset?: TrainedSubset | null;
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
  /** headSum[1,D] = Σ_v W_v of the frozen lm_head (for logitSum), made on first use. */
  #headSum: Tensor | null = null;

  constructor(
    gpu: Gpu,
    config: ModelConfig,
    weights: GpuWeights,
    lora: LoraSpec,
    seed: number,
    gradientCheckpointing: boolean,
    offloadLayerInputs = false,
    full: FullParams | null = null,
  ) {
    this.#gpu = gpu;
    if (!full?.all && lora.targets.length === 0) modelError("LoRA targets are empty");
    if (full?.all && lora.targets.length > 0) modelError("full fine-tuning takes no LoRA targets");
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
      full,
    };
  }

  /** Whether every base weight trains (full fine-tuning). */
  get full(): boolean {
    return !!this.#ctx.full?.all;
  }

  /**
   * What the layers share (config, weights, adapters, RoPE table, activation dtype): for the
   * inference engine (kernels/models/decode.ts), which runs the same layers with a KV cache.
   */
  get layers(): LayerContext {
    this.#alive();
    return this.#ctx;
  }

  #alive(): void {
    if (this.#disposed) throw new Error("Cannot use the webgpu model: it was disposed");
  }

  /** Σ_v W_v of the lm_head, [1,D] f32: 1[1,C] · W[v0:v0+C, D] over W's row chunks. */
  #headRowSum(head: Tensor): Tensor {
    if (this.#headSum) return this.#headSum;
    const sum = Tensor.empty(this.#gpu, [1, this.config.hiddenSize], "f32", { label: "head_sum" });
    head.chunks.forEach((c, i) => {
      const ones = Tensor.from(this.#gpu, new Float32Array(c.rows).fill(1), [1, c.rows], "f32");
      matmul(ones, head, {
        layout: "NN",
        bRows: { start: c.rowStart, count: c.rows },
        out: sum,
        accumulate: i > 0,
      });
      ones.destroy();
    });
    this.#headSum = sum;
    return sum;
  }

  /** Runs the forward (and, when training, the backward); see {@link RunMode}. */
  async #run(batch: Batch, mode: RunMode): Promise<MicroBatchResult & { scores: TokenScores | null }> {
    this.#alive();
    const tokens = checkBatch(this.config, batch);
    const scoring = mode.kind === "score" || mode.kind === "weighted";
    // No trained token: zero loss and zero gradient, nothing to run.
    if (tokens === 0) {
      if (scoring) modelError("the batch has no trained token to score");
      return { lossSum: 0, tokens: 0, correct: 0, scores: null };
    }
    const train = mode.kind === "train" || mode.kind === "weighted" ? mode : null;
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
      const { loss, lse, correct, state } = crossEntropyForward(x, head, targets, {
        n: 1,
        keepState: scoring,
      });
      let scores: TokenScores | null = null;
      let weights: Tensor | null = null;
      if (scoring) {
        const logitSum = matmul(x, this.#headRowSum(head), { layout: "NT", label: "logit_sum" });
        const [st, ls] = await Promise.all([copyToHost(state!), copyToHost(logitSum)]);
        state!.destroy();
        logitSum.destroy();
        scores = tokenScores(st, ls, batch.targets);
        if (mode.kind === "weighted") {
          const w = mode.weigh(scores);
          if (w.length !== T) modelError(`the token weights hold ${w.length} values, expected ${T}`);
          weights = Tensor.from(gpu, Float32Array.from(w), [T], "f32", { label: "token_weights" });
        }
      }
      if (train !== null) {
        const full = ctx.full ?? null;
        const n = mode.kind === "train" ? mode.normaliser : 1;
        const headName = this.config.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight";
        const headGrad = full?.grad(headName) ?? null;
        let dx: Tensor;
        if (headGrad === null) {
          dx = crossEntropyBackward(x, head, targets, lse, { n, weights: weights ?? undefined });
        } else {
          // One pass over the vocabulary for both: dx (as crossEntropyBackward computes it) and
          // lm_head's dW (or the tied table's head part) += Σ_t w_t·(softmax − onehot)ᵀ·x_t.
          dx = Tensor.empty(gpu, [T, this.config.hiddenSize], "f32", { label: "d_x_final" });
          lmHeadWeightGrad(x, head, targets, lse, {
            dW: headGrad,
            n,
            weights: weights ?? undefined,
            dh: dx,
          });
        }
        weights?.destroy();
        const dh = rmsnormBackward(dx, hs[L], normW, rstd, normGrad(ctx, "model.norm.weight")).dx;
        dx.destroy();
        hs[L].destroy();
        // The loss's last readers have run: its [T,D] input need not wait through the layers.
        x.destroy();
        rstd.destroy();
        const embedGrad = full?.grad("model.embed_tokens.weight") ?? null;
        for (let l = L - 1; l >= 0; l--) {
          if (offload) {
            hs[l] = Tensor.from(gpu, await onHost[l], [T, this.config.hiddenSize], "f32", { label: `h${l}` });
          }
          const acts = saved[l] ?? layerForward(ctx, lb, l, hs[l], "recompute").saved!;
          // The first layer's input gradient feeds only a trained embedding.
          layerBackward(ctx, lb, l, hs[l], acts, dh, l > 0 || embedGrad !== null);
          acts.destroy();
          saved[l] = null;
          hs[l].destroy();
        }
        if (embedGrad !== null) {
          embeddingBackward(dh, batch.tokens, this.config.vocabSize, { dE: embedGrad, accumulate: true });
        }
        dh.destroy();
      }
      for (const t of [x, rstd, lse]) t.destroy();
      const [lossRead, correctRead] = await readTensors([loss, correct]);
      loss.destroy();
      correct.destroy();
      return { lossSum: lossRead[0], tokens, correct: correctRead[0], scores };
    } finally {
      for (const s of saved) s?.destroy();
      for (const h of hs) h.destroy();
      for (const t of [positions, docs, targets]) t.destroy();
    }
  }

  async forwardBackward(batch: Batch, normaliser: number, dropoutSeed: number): Promise<MicroBatchResult> {
    if (!(normaliser > 0)) modelError(`normaliser ${normaliser} must be positive`);
    if (!Number.isInteger(dropoutSeed)) modelError(`dropoutSeed ${dropoutSeed} must be an integer`);
    const { lossSum, tokens, correct } = await this.#run(batch, { kind: "train", normaliser, dropoutSeed });
    return { lossSum, tokens, correct };
  }

  async evaluate(batch: Batch): Promise<MicroBatchResult> {
    const { lossSum, tokens, correct } = await this.#run(batch, { kind: "evaluate" });
    return { lossSum, tokens, correct };
  }

  async scoreTokens(batch: Batch): Promise<TokenScores> {
    return (await this.#run(batch, { kind: "score" })).scores!;
  }

  async forwardBackwardWeighted(
    batch: Batch,
    dropoutSeed: number,
    weigh: TokenWeighting,
  ): Promise<TokenScores> {
    if (!Number.isInteger(dropoutSeed)) modelError(`dropoutSeed ${dropoutSeed} must be an integer`);
    return (await this.#run(batch, { kind: "weighted", dropoutSeed, weigh })).scores!;
  }

  async optimizerStep(hp: AdamWStep): Promise<{ gradNorm: number }> {
    this.#alive();
    const adapters = this.#ctx.adapters;
    const full = this.#ctx.full ?? null;
    full?.maskGradients(); // rows outside trainable_token_indices stay as they are
    const grads = [...adapters.gradients(), ...(full?.gradients() ?? [])];
    const clip = gradNorm(grads, { maxNorm: hp.maxGradNorm > 0 ? hp.maxGradNorm : undefined });
    const update = {
      lr: hp.lr,
      beta1: hp.beta1,
      beta2: hp.beta2,
      eps: hp.eps,
      weightDecay: hp.weightDecay,
      step: this.#step + 1,
      clip,
      zeroGrad: true,
    };
    adamwStep([...adapters.optimizerTensors(), ...(full?.optimizerTensors(false) ?? [])], update);
    // A table of which only some rows train takes no decay (it would move the others).
    adamwStep(full?.optimizerTensors(true) ?? [], { ...update, weightDecay: 0 });
    if (full) {
      full.refresh();
      // lm_head moved: the cached row sum is stale.
      this.#headSum?.destroy();
      this.#headSum = null;
    }
    this.#step++;
    const [norm] = (await readTensors([clip]))[0] as Float32Array;
    clip.destroy();
    return { gradNorm: norm };
  }

  // deno-lint-ignore require-await
  async zeroGrad(): Promise<void> {
    this.#alive();
    this.#ctx.adapters.zeroGrad();
    this.#ctx.full?.zeroGrad();
  }

  /** Full fine-tuning: the f32 master weights by HF name. */
  async getWeights(): Promise<Map<string, Float32Array>> {
    this.#alive();
    if (!this.#ctx.full) modelError("only a fully fine-tuned model has trained weights to read");
    return await this.#ctx.full.read();
  }

  /** Full fine-tuning: overwrites every master weight (and its compute copy). */
  // deno-lint-ignore require-await
  async setWeights(weights: ReadonlyMap<string, Float32Array>): Promise<void> {
    this.#alive();
    if (!this.#ctx.full) modelError("only a fully fine-tuned model takes weights");
    this.#ctx.full.write(weights);
    this.#headSum?.destroy();
    this.#headSum = null;
  }

  /**
   * Overwrites base weights in place (e.g. an adapter's modules_to_save for inference): each value
   * array is converted to its tensor's dtype (f16 rounded once). Not for a trained parameter.
   */
  // deno-lint-ignore require-await
  async overwriteWeights(weights: ReadonlyMap<string, Float32Array>): Promise<void> {
    this.#alive();
    recorder(this.#gpu).flush();
    for (const [name, values] of weights) {
      const t = this.#ctx.weights.get(name);
      if (values.length !== t.size) modelError(`"${name}" takes ${t.size} values, not ${values.length}`);
      const host = t.dtype === "f16" ? f32ArrayToF16(values) : t.dtype === "f32" ? values : null;
      if (host === null) modelError(`"${name}" is ${t.dtype}: only f32 and f16 weights are overwritten`);
      const rowSize = t.rowSize;
      for (const c of t.chunks) {
        const part = host.subarray(c.rowStart * rowSize, (c.rowStart + c.rows) * rowSize);
        this.#gpu.device.queue.writeBuffer(c.buffer, 0, part as unknown as ArrayBuffer);
      }
    }
    this.#headSum?.destroy();
    this.#headSum = null;
  }

  /** Full fine-tuning: the accumulated gradients of every weight by HF name (tests, diagnostics). */
  async getWeightGradients(): Promise<Map<string, Float32Array>> {
    this.#alive();
    if (!this.#ctx.full) modelError("only a fully fine-tuned model has weight gradients");
    return await this.#ctx.full.readGradients();
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

  /**
   * LoRA with a trained subset: the values peft saves beside the adapters (whole modules by HF
   * weight name; the trained embedding rows, in the order of their indices, under "tokens").
   */
  async getExtras(): Promise<Map<string, Float32Array>> {
    this.#alive();
    const full = this.#ctx.full;
    if (!full || full.all) return new Map();
    const out = await full.read();
    const rows = full.rowsOf("model.embed_tokens.weight");
    if (rows !== null) {
      const E = out.get("model.embed_tokens.weight")!;
      const D = this.config.hiddenSize;
      const tokens = new Float32Array(rows.length * D);
      rows.forEach((r, i) => tokens.set(E.subarray(r * D, r * D + D), i * D));
      out.delete("model.embed_tokens.weight");
      out.set("tokens", tokens);
    }
    return out;
  }

  /** Sets what {@link getExtras} reads (a checkpoint's, or the best evaluation's). */
  async setExtras(extras: ReadonlyMap<string, Float32Array>): Promise<void> {
    this.#alive();
    const full = this.#ctx.full;
    if (!full || full.all) return;
    const now = await full.read();
    const rows = full.rowsOf("model.embed_tokens.weight");
    const D = this.config.hiddenSize;
    for (const [name, values] of extras) {
      if (name !== "tokens") now.set(name, values);
      else {
        const E = now.get("model.embed_tokens.weight")!;
        rows!.forEach((r, i) => E.set(values.subarray(i * D, i * D + D), r * D));
      }
    }
    full.write(now);
    this.#headSum?.destroy();
    this.#headSum = null;
  }

  async getOptimizerState(): Promise<OptimizerState> {
    this.#alive();
    if (this.#ctx.full && !this.#ctx.full.all) {
      const a = await this.#ctx.adapters.readMoments();
      const f = await this.#ctx.full.readMoments();
      return { step: this.#step, m: new Map([...a.m, ...f.m]), v: new Map([...a.v, ...f.v]) };
    }
    const { m, v } = await (this.#ctx.full ?? this.#ctx.adapters).readMoments();
    return { step: this.#step, m, v };
  }

  // deno-lint-ignore require-await
  async setOptimizerState(state: OptimizerState): Promise<void> {
    this.#alive();
    if (!Number.isInteger(state.step) || state.step < 0) {
      modelError(`optimizer step ${state.step} is invalid`);
    }
    const full = this.#ctx.full ?? null;
    if (full === null) this.#ctx.adapters.writeMoments(state);
    else if (full.all) full.writeMoments(state.m, state.v);
    else {
      // Adapters beside a trained subset: each takes its own keys.
      const names = new Set(full.names());
      const mine = (map: Map<string, Float32Array>, ofFull: boolean) =>
        new Map([...map].filter(([k]) => names.has(k) === ofFull));
      this.#ctx.adapters.writeMoments({ ...state, m: mine(state.m, false), v: mine(state.v, false) });
      full.writeMoments(mine(state.m, true), mine(state.v, true));
    }
    this.#step = state.step;
  }

  /** Frees every GPU buffer of the model (weights, adapters, gradients, moments, tables). */
  [Symbol.dispose](): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#ctx.adapters.destroy();
    this.#ctx.full?.destroy();
    this.#headSum?.destroy();
    this.#ctx.rope.destroy();
    this.#ctx.weights.destroy();
  }
}

/**
 * Scores from the loss's state rows (m, s, z_target, argmax) and the logit sums:
 * logp[t] = z_target − (m + log s) in f64 for trained tokens, 0 elsewhere.
 */
function tokenScores(state: Float32Array, logitSum: Float32Array, targets: Int32Array): TokenScores {
  const T = targets.length;
  const logp = new Float64Array(T);
  for (let t = 0; t < T; t++) {
    if (targets[t] === IGNORE_INDEX) continue;
    logp[t] = state[4 * t + 2] - (state[4 * t] + Math.log(state[4 * t + 1]));
  }
  return { logp, logitSum: Float64Array.from(logitSum) };
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
  let full: FullParams | null = null;
  try {
    if (opts.full) full = await FullParams.create(gpu, config, weights, modelDir);
    else if (opts.trainedSubset) {
      full = await FullParams.create(gpu, config, weights, modelDir, opts.trainedSubset);
    }
    return new GpuModel(
      gpu,
      config,
      weights,
      lora,
      seed,
      opts.gradientCheckpointing ?? false,
      opts.offloadLayerInputs ?? false,
      full,
    );
  } catch (error) {
    full?.destroy();
    weights.destroy();
    throw error;
  }
}
