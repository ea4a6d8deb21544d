/**
 * One decoder layer of the Llama family (Llama 2/3, Mistral, Qwen2) on the GPU: the forward,
 * with the activations its backward needs kept or dropped, and the backward for the input path
 * and the LoRA gradients; the base weights are frozen (no dW) unless the context carries full
 * fine-tuning's parameters, whose gradients the backward then adds (dW, db, the norms' dw).
 *
 * B = rows, S = tokens per row, T = B·S, D = hidden, F = ffn, H = heads, Hkv = kv heads,
 * hd = head dim, r = LoRA rank. Every projection is y = x·Wᵀ (+ b) (+ s·dropout(x)·Aᵀ·Bᵀ when
 * it carries an adapter; kernels/ops/lora.ts).
 *
 *   x1 = rmsnorm(h, input_layernorm)                          x1[T,D]
 *   q = rope(q_proj(x1)), k = rope(k_proj(x1)), v = v_proj(x1)  q[T,H,hd], k, v[T,Hkv,hd]
 *   a = attention(q, k, v)   causal, GQA, window, documents    a[T,H,hd], lse[T,H]
 *   hMid = h + o_proj(a)                                       hMid[T,D]
 *   x2 = rmsnorm(hMid, post_attention_layernorm)               x2[T,D]
 *   m = silu(gate_proj(x2)) ⊙ up_proj(x2)                      g, u, m[T,F]
 *   hOut = hMid + down_proj(m)
 *
 * Precisions: the residual stream (h, hMid, hOut) and every gradient are f32; the activations
 * that feed matmuls and attention (x1, q, k, v, a, x2, g, u, m) are in the model's activation
 * dtype (f16 with shader-f16, else f32); LoRA's xa[T,r] is f32; every sum accumulates in f32.
 * SwiGLU's backward reads f16 g and u as they are and writes f32 gradients (dg over dm), so no
 * gradient is ever rounded to f16. The backward frees m, g and u as soon as their last reader
 * has run.
 *
 * The attention kernels take [T,heads,hd] tensors and the matmuls [T,heads·hd]; the four
 * tensors that change between the two (v, a, da, dv) are zero-copy views (`Tensor.reshape`)
 * of the same buffer, which returns to the pool when both views are destroyed.
 * @module
 */
import type { Gpu } from "../device.ts";
import { attentionBackward, attentionForward } from "../ops/attention.ts";
import { cast } from "../ops/elementwise.ts";
import { loraBackward, loraDropout, loraForward, type LoraWeights as LoraTensors } from "../ops/lora.ts";
import { matmul } from "../ops/matmul.ts";
import { rmsnormBackward, rmsnormForward } from "../ops/rmsnorm.ts";
import { ropeBackward, ropeForward, type RopeTable } from "../ops/rope.ts";
import { swigluBackward, swigluForward } from "../ops/swiglu.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import type { AdapterSlot, GpuAdapters } from "./adapters.ts";
import { type ModelConfig, type Projection, projectionPath } from "../../formats/model_config.ts";
import type { GpuWeights, WeightMatrix } from "./gpu_weights.ts";
import type { FullParams } from "./full_params.ts";
import { loraDropoutSeed } from "./reference_backend.ts";

/** Float dtype of the activations that feed matmuls and attention. */
export type ActivationDType = "f16" | "f32";

/** What every layer of one model shares. */
export interface LayerContext {
  readonly gpu: Gpu;
  readonly config: ModelConfig;
  readonly weights: GpuWeights;
  readonly adapters: GpuAdapters;
  /** s = lora_alpha / r (or / √r with rsLoRA). */
  readonly scaling: number;
  /** dtype of x1, q, k, v, a, x2, g, u, m. */
  readonly act: ActivationDType;
  /** RoPE frequencies of the model. */
  readonly rope: RopeTable;
  /**
   * Full fine-tuning: the gradient buffers of every base weight (kernels/models/full_params.ts);
   * the backward adds dW = dyᵀ·x, db = Σ_t dy and the norms' dw into them. Absent: the base is frozen.
   */
  readonly full?: FullParams | null;
}

/** The micro-batch as the layers see it. */
export interface LayerBatch {
  /** Rows B and tokens per row S (T = B·S). */
  readonly rows: number;
  readonly seqLen: number;
  /** position[T] u32 (restarting at 0 per packed document). */
  readonly positions: Tensor;
  /** doc[T] u32: attention never crosses documents. */
  readonly docs: Tensor;
  /** LoRA dropout of this micro-batch (p > 0 and a seed), or null (evaluation, p = 0). */
  readonly dropout: { readonly p: number; readonly seed: number } | null;
}

/** The activations of one layer that its backward reads; `destroy()` frees them. */
export interface LayerActivations extends Disposable {
  /** rstd[T] of the two norms. */
  readonly rstd1: Tensor;
  readonly rstd2: Tensor;
  /** x1[T,D], x2[T,D]: the normed inputs of the attention and MLP projections. */
  readonly x1: Tensor;
  readonly x2: Tensor;
  /** q[T,H,hd] and k[T,Hkv,hd] after RoPE; v[T,Hkv,hd]. */
  readonly q: Tensor;
  readonly k: Tensor;
  readonly v: Tensor;
  /** Attention output a[T,H,hd] and its lse[T,H]. */
  readonly attn: Tensor;
  readonly lse: Tensor;
  /** hMid[T,D] f32: the residual stream between the two blocks. */
  readonly hMid: Tensor;
  /** g, u, m[T,F]: gate and up outputs and the SwiGLU output (m: null unless down_proj has an adapter). */
  readonly g: Tensor;
  readonly u: Tensor;
  readonly m: Tensor | null;
  /** xa[T,r] f32 of every adapted projection of the layer. */
  readonly xa: ReadonlyMap<Projection, Tensor>;
  destroy(): void;
}

/** How {@link layerForward} runs. */
export type LayerMode =
  /** Compute hOut, keep nothing (evaluation; checkpointed training's first pass). */
  | "output"
  /** Compute hOut and keep the activations (training without checkpointing). */
  | "keep"
  /** Keep the activations, skip hOut (recomputation before a checkpointed backward). */
  | "recompute";

/** What {@link layerForward} returns. */
export interface LayerForwardResult {
  /** hOut[T,D] f32, or null in "recompute" mode. */
  hOut: Tensor | null;
  /** The activations, or null in "output" mode. */
  saved: LayerActivations | null;
}

/**
 * The projection's weight for one product (a 4-bit weight's dequantized copy lives until the
 * handle is disposed, right after the product is recorded) and its bias.
 */
function weight(
  ctx: LayerContext,
  layer: number,
  proj: Projection,
): { W: WeightMatrix; bias: Tensor | undefined } {
  const path = projectionPath(layer, proj);
  return { W: ctx.weights.matrix(`${path}.weight`), bias: ctx.weights.find(`${path}.bias`) ?? undefined };
}

function loraOf(ctx: LayerContext, batch: LayerBatch, slot: AdapterSlot): LoraTensors {
  const d = batch.dropout;
  if (d === null || d.p === 0) return { A: slot.A, B: slot.B, scaling: ctx.scaling };
  return {
    A: slot.A,
    B: slot.B,
    scaling: ctx.scaling,
    dropout: d.p,
    seed: loraDropoutSeed(d.seed, slot.layer, slot.module),
  };
}

/**
 * y = x·Wᵀ (+ b) (+ LoRA); into `out` (+=) when given. Records xa of an adapted projection.
 * Exported for the inference engine (kernels/models/decode.ts), which runs the same projections.
 */
export function project(
  ctx: LayerContext,
  batch: LayerBatch,
  layer: number,
  proj: Projection,
  x: Tensor,
  xa: Map<Projection, Tensor>,
  out?: Tensor,
): Tensor {
  const { W, bias } = weight(ctx, layer, proj);
  using _lent = W;
  const slot = ctx.adapters.find(layer, proj);
  const label = `${projectionPath(layer, proj)}.out`;
  const accumulate = out !== undefined;
  if (slot === null) {
    return matmul(x, W.tensor, { layout: "NT", bias, out, accumulate, outDtype: ctx.act, label });
  }
  const r = loraForward(x, W.tensor, loraOf(ctx, batch, slot), {
    bias,
    out,
    accumulate,
    outDtype: ctx.act,
    label,
  });
  xa.set(proj, r.xa);
  return r.y;
}

/** xa[T,r] = dropout(x)·Aᵀ alone: what a checkpointed backward needs of the last projection. */
function adapterInput(ctx: LayerContext, batch: LayerBatch, slot: AdapterSlot, x: Tensor): Tensor {
  const lora = loraOf(ctx, batch, slot);
  const z = lora.dropout ? loraDropout(x, lora.dropout, lora.seed!) : x;
  const xa = matmul(z, slot.A, { layout: "NT", outDtype: "f32", label: "lora_xa" });
  if (z !== x) z.destroy();
  return xa;
}

/**
 * dx (+)= dy·W (+ the adapter's term), and dA, dB of an adapted projection added into its
 * gradients. With `dx` null the input gradient is skipped (the first layer's q, k, v).
 */
function projectBackward(
  ctx: LayerContext,
  batch: LayerBatch,
  layer: number,
  proj: Projection,
  dy: Tensor,
  x: Tensor | null,
  saved: LayerActivations,
  dx: Tensor | null,
  accumulate: boolean,
): void {
  weightGrads(ctx, batch, layer, proj, dy, x);
  const slot = ctx.adapters.find(layer, proj);
  if (slot === null) {
    if (dx === null) return;
    using W = weight(ctx, layer, proj).W;
    matmul(dy, W.tensor, { layout: "NN", out: dx, accumulate });
    return;
  }
  // The weight is read only for dx: a 4-bit weight is not dequantized when dx is skipped.
  using W = dx === null ? null : weight(ctx, layer, proj).W;
  if (x === null) {
    throw new Error(`Cannot run the backward of ${projectionPath(layer, proj)}: its input was not kept`);
  }
  loraBackward(dy, x, W?.tensor ?? null, loraOf(ctx, batch, slot), saved.xa.get(proj)!, {
    dA: slot.dA,
    dB: slot.dB,
    dx: dx ?? undefined,
    accumulateDx: dx !== null && accumulate,
    skipDx: dx === null,
  });
}

/**
 * Full fine-tuning's gradients of a projection, added into their buffers:
 *   dW[N,K] += dy[T,N]ᵀ · x[T,K]      db[N] += 1[1,T] · dy[T,N]
 */
function weightGrads(
  ctx: LayerContext,
  batch: LayerBatch,
  layer: number,
  proj: Projection,
  dy: Tensor,
  x: Tensor | null,
): void {
  const full = ctx.full;
  if (!full) return;
  const path = projectionPath(layer, proj);
  const dW = full.grad(`${path}.weight`);
  if (dW === null) return; // LoRA with modules_to_save: the projection is frozen
  if (x === null) throw new Error(`Cannot run the backward of ${path}: its input was not kept`);
  matmul(dy, x, { layout: "TN", out: dW, accumulate: true });
  const db = full.grad(`${path}.bias`);
  if (db !== null) {
    const T = batch.rows * batch.seqLen;
    const ones = Tensor.from(ctx.gpu, new Float32Array(T).fill(1), [1, T], "f32", { label: "ones" });
    const row = db.reshape([1, db.size]);
    matmul(ones, dy, { layout: "NN", out: row, accumulate: true });
    row.destroy();
    ones.destroy();
  }
}

/** rmsnormBackward's options for norm `name`'s dw under full fine-tuning (none otherwise). */
export function normGrad(ctx: LayerContext, name: string): { dw?: Tensor; accumulateDw?: boolean } {
  const dw = ctx.full?.grad(name) ?? null;
  return dw === null ? {} : { dw, accumulateDw: true };
}

/** The normed input in the activation dtype (RMSNorm writes its input's dtype, f32 here). */
export function normed(ctx: LayerContext, h: Tensor, w: Tensor, label: string): { x: Tensor; rstd: Tensor } {
  const { y, rstd } = rmsnormForward(h, w, { eps: ctx.config.rmsNormEps, label });
  if (ctx.act === "f32") return { x: y, rstd };
  const x = cast(y, "f16", { label });
  y.destroy();
  return { x, rstd };
}

/** A copy of `t` (a residual stream the next block adds into). */
export function copyOf(t: Tensor, label: string): Tensor {
  const out = Tensor.empty(t.gpu, t.shape, t.dtype, { label });
  const rec = recorder(t.gpu);
  t.chunks.forEach((c, i) =>
    rec.copyBuffer(c.buffer, 0, out.chunks[i].buffer, 0, Math.ceil(c.byteLength / 4) * 4)
  );
  return out;
}

/**
 * The forward of layer `layer` on hIn[T,D] f32 (not consumed).
 *
 * @example
 * ```ts
 * const { hOut, saved } = layerForward(ctx, batch, 0, h0, "keep");
 * ```
 */
export function layerForward(
  ctx: LayerContext,
  batch: LayerBatch,
  layer: number,
  hIn: Tensor,
  mode: LayerMode,
): LayerForwardResult {
  const { config } = ctx;
  const T = batch.rows * batch.seqLen;
  const { numHeads: H, numKvHeads: Hkv, headDim: hd } = config;
  const p = `model.layers.${layer}`;
  const xa = new Map<Projection, Tensor>();

  const n1 = normed(ctx, hIn, ctx.weights.get(`${p}.input_layernorm.weight`), `${p}.x1`);
  const qLin = project(ctx, batch, layer, "q_proj", n1.x, xa);
  const kLin = project(ctx, batch, layer, "k_proj", n1.x, xa);
  const vLin = project(ctx, batch, layer, "v_proj", n1.x, xa);
  const q = ropeForward(qLin, batch.positions, ctx.rope, { label: `${p}.q` });
  const k = ropeForward(kLin, batch.positions, ctx.rope, { label: `${p}.k` });
  const v = vLin.reshape([T, Hkv, hd], `${p}.v`);
  qLin.destroy();
  kLin.destroy();
  vLin.destroy();
  const { out: attn, lse } = attentionForward(q, k, v, {
    S: batch.seqLen,
    window: config.layerWindows[layer],
    docs: batch.docs,
  });
  const attn2 = attn.reshape([T, H * hd]);
  const hMid = copyOf(hIn, `${p}.h_mid`);
  project(ctx, batch, layer, "o_proj", attn2, xa, hMid);
  attn2.destroy();

  const n2 = normed(ctx, hMid, ctx.weights.get(`${p}.post_attention_layernorm.weight`), `${p}.x2`);
  const g = project(ctx, batch, layer, "gate_proj", n2.x, xa);
  const u = project(ctx, batch, layer, "up_proj", n2.x, xa);
  // m's only reader after the forward is down_proj's adapter (dA): without one it is not kept,
  // and a recompute, which skips the frozen down product, does not compute it at all.
  const downSlot = ctx.adapters.find(layer, "down_proj");
  // Full fine-tuning reads m for down_proj's dW.
  const keepM = downSlot !== null || !!ctx.full;
  let m: Tensor | null = mode === "recompute" && !keepM ? null : swigluForward(g, u, { label: `${p}.m` });
  let hOut: Tensor | null = null;
  if (mode === "recompute") {
    if (downSlot !== null) xa.set("down_proj", adapterInput(ctx, batch, downSlot, m!));
  } else {
    hOut = copyOf(hMid, `${p}.h_out`);
    project(ctx, batch, layer, "down_proj", m!, xa, hOut);
    if (!keepM) {
      m!.destroy();
      m = null;
    }
  }

  const all = [
    n1.rstd,
    n2.rstd,
    n1.x,
    n2.x,
    q,
    k,
    v,
    attn,
    lse,
    hMid,
    g,
    u,
    ...(m ? [m] : []),
    ...xa.values(),
  ];
  const destroy = () => all.forEach((t) => t.destroy());
  if (mode === "output") {
    destroy();
    return { hOut, saved: null };
  }
  const saved: LayerActivations = {
    rstd1: n1.rstd,
    rstd2: n2.rstd,
    x1: n1.x,
    x2: n2.x,
    q,
    k,
    v,
    attn,
    lse,
    hMid,
    g,
    u,
    m,
    xa,
    destroy,
    [Symbol.dispose]: destroy,
  };
  return { hOut, saved };
}

/**
 * The backward of layer `layer`: turns dh (the gradient at hOut, f32 [T,D]) into the gradient
 * at hIn, in place, and adds the layer's LoRA gradients into their buffers. With `inputGrad`
 * false (the first layer, whose input is a frozen embedding) dh is left at the gradient of
 * hMid and the q, k, v input gradients are skipped.
 *
 * @param hIn the layer's input, as given to the forward
 * @param saved the forward's activations ("keep" or "recompute")
 */
export function layerBackward(
  ctx: LayerContext,
  batch: LayerBatch,
  layer: number,
  hIn: Tensor,
  saved: LayerActivations,
  dh: Tensor,
  inputGrad: boolean,
): void {
  const { config, gpu } = ctx;
  const T = batch.rows * batch.seqLen;
  const { numHeads: H, numKvHeads: Hkv, headDim: hd, hiddenSize: D, intermediateSize: F } = config;
  const p = `model.layers.${layer}`;
  const f32 = (shape: number[], label: string) => Tensor.empty(gpu, shape, "f32", { label });

  // MLP block: hOut = hMid + down(silu(gate(x2)) ⊙ up(x2)).
  const dm = f32([T, F], `${p}.dm`);
  projectBackward(ctx, batch, layer, "down_proj", dh, saved.m, saved, dm, false);
  saved.m?.destroy(); // its last reader was down_proj's adapter (destroying again is harmless)
  // dg is written over dm, and f16 g, u are read as they are: two [T,F] f32 buffers, not five.
  const { dg, du } = swigluBackward(dm, saved.g, saved.u, { dg: dm });
  saved.g.destroy();
  saved.u.destroy();
  const dx2 = f32([T, D], `${p}.dx2`);
  projectBackward(ctx, batch, layer, "gate_proj", dg, saved.x2, saved, dx2, false);
  projectBackward(ctx, batch, layer, "up_proj", du, saved.x2, saved, dx2, true);
  dg.destroy();
  du.destroy();
  const w2 = ctx.weights.get(`${p}.post_attention_layernorm.weight`);
  const n2 = normGrad(ctx, `${p}.post_attention_layernorm.weight`);
  rmsnormBackward(dx2, saved.hMid, w2, saved.rstd2, { dx: dh, accumulate: true, ...n2 }); // dh = d hMid
  dx2.destroy();

  // Attention block: hMid = hIn + o(attention(rope(q(x1)), rope(k(x1)), v(x1))).
  const attn2 = saved.attn.reshape([T, H * hd]);
  const dAttn2 = f32([T, H * hd], `${p}.d_attn`);
  projectBackward(ctx, batch, layer, "o_proj", dh, attn2, saved, dAttn2, false);
  attn2.destroy();
  const dAttn = dAttn2.reshape([T, H, hd]);
  dAttn2.destroy();
  const { dq, dk, dv } = attentionBackward(dAttn, saved.q, saved.k, saved.v, saved.attn, saved.lse, {
    S: batch.seqLen,
    window: config.layerWindows[layer],
    docs: batch.docs,
  });
  dAttn.destroy();
  const dqLin = ropeBackward(dq, batch.positions, ctx.rope, { out: f32([T, H * hd], `${p}.dq`) });
  const dkLin = ropeBackward(dk, batch.positions, ctx.rope, { out: f32([T, Hkv * hd], `${p}.dk`) });
  const dvLin = dv.reshape([T, Hkv * hd]);
  dq.destroy();
  dk.destroy();
  dv.destroy();
  const dx1 = inputGrad ? f32([T, D], `${p}.dx1`) : null;
  projectBackward(ctx, batch, layer, "q_proj", dqLin, saved.x1, saved, dx1, false);
  projectBackward(ctx, batch, layer, "k_proj", dkLin, saved.x1, saved, dx1, true);
  projectBackward(ctx, batch, layer, "v_proj", dvLin, saved.x1, saved, dx1, true);
  dqLin.destroy();
  dkLin.destroy();
  dvLin.destroy();
  if (dx1 !== null) {
    const w1 = ctx.weights.get(`${p}.input_layernorm.weight`);
    const n1 = normGrad(ctx, `${p}.input_layernorm.weight`);
    rmsnormBackward(dx1, hIn, w1, saved.rstd1, { dx: dh, accumulate: true, ...n1 }); // dh = d hIn
    dx1.destroy();
  }
}
