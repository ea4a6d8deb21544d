/**
 * Inference on the GPU model: a prefill of B prompts of different lengths, then KV-cache decoding
 * one token per sequence per step, with the model's LoRA adapters applied unmerged.
 *
 * B = sequences, S = longest prompt, T = B·S (prefill) or B (a step), D = hidden, V = vocab,
 * n_b = tokens of sequence b so far.
 *
 * Prefill: the prompts right-padded to S (padding is a document of its own, as in training) run
 * through the training forward (kernels/models/layer.ts), layer by layer; each layer's K (after
 * RoPE) and V rows of sequence b, positions 0 .. n_b − 1, are copied into the cache
 * (kernels/ops/attention_decode.ts `KvCache`). Logits come only for each sequence's last token:
 *   x_last[B,D] = rmsnorm(h_L)[b·S + n_b − 1]     (a gather of B rows)
 *   logits[B,V] = x_last · W_headᵀ                 (f32)
 * Step: tokens[B] at positions n_b:
 *   h = embed(tokens); per layer: x1 = rmsnorm(h), q, k, v = proj(x1) (+LoRA), RoPE at n_b,
 *   K, V written at slot n_b, a = attention_decode(q, K[..n_b], V[..n_b]), h += o_proj(a),
 *   h += down(swiglu(gate(x2), up(x2)));  logits as above.
 * The projections, norms, RoPE and SwiGLU are the training kernels; only the attention differs.
 * So the logits of every step equal those of the full sequence's forward within the kernels'
 * tolerances (tests/models/decode_test.ts).
 * @module
 */
import { attentionDecode, KvCache } from "../ops/attention_decode.ts";
import { embeddingForward } from "../ops/embedding.ts";
import { matmul } from "../ops/matmul.ts";
import { rmsnormForward } from "../ops/rmsnorm.ts";
import { ropeForward } from "../ops/rope.ts";
import { swigluForward } from "../ops/swiglu.ts";
import { rope_check_positions } from "../rope_frequencies.ts";
import { readTensors, Tensor } from "../tensor.ts";
import type { GpuModel } from "./graph.ts";
import { copyOf, type LayerBatch, type LayerContext, layerForward, normed, project } from "./layer.ts";
import type { Projection } from "../../formats/model_config.ts";

/** A KV-cache decoder of up to `batch` sequences of up to `maxTokens` tokens on a GPU model. */
export class Decoder implements Disposable {
  readonly model: GpuModel;
  readonly ctx: LayerContext;
  readonly cache: KvCache;
  /** Tokens of each sequence so far (n_b). */
  readonly lengths: number[];
  #active = 0;

  constructor(model: GpuModel, batch: number, maxTokens: number) {
    this.model = model;
    this.ctx = model.layers;
    const c = this.ctx.config;
    if (maxTokens > c.maxPositionEmbeddings) {
      throw new RangeError(
        `Cannot decode ${maxTokens} tokens: the model's context is ${c.maxPositionEmbeddings} (max_position_embeddings)`,
      );
    }
    this.cache = new KvCache(
      this.ctx.gpu,
      c.numLayers,
      batch,
      maxTokens,
      c.numKvHeads,
      c.headDim,
      this.ctx.act,
    );
    this.lengths = new Array(batch).fill(0);
  }

  /** The sequences of the last prefill. */
  get active(): number {
    return this.#active;
  }

  #head(): Tensor {
    const w = this.ctx.weights;
    return w.get(this.ctx.config.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  }

  /** logits[rows, V] f32 of the rows `last` of the final hidden state h[T,D] (consumed). */
  async #logits(h: Tensor, last: number[]): Promise<Float32Array[]> {
    const { y: x, rstd } = rmsnormForward(h, this.ctx.weights.get("model.norm.weight"), {
      eps: this.ctx.config.rmsNormEps,
      label: "x_final",
    });
    h.destroy();
    rstd.destroy();
    const picked = embeddingForward(x, Uint32Array.from(last), { label: "x_last" });
    x.destroy();
    const logits = matmul(picked, this.#head(), { layout: "NT", outDtype: "f32", label: "logits" });
    picked.destroy();
    const [all] = await readTensors([logits]);
    logits.destroy();
    const V = this.ctx.config.vocabSize;
    return last.map((_, b) => Float32Array.from((all as Float32Array).subarray(b * V, (b + 1) * V)));
  }

  /**
   * Runs the prompts (at most `batch`, each at least one token) and fills the cache; returns the
   * logits of each prompt's last token.
   */
  async prefill(prompts: readonly (readonly number[])[]): Promise<Float32Array[]> {
    const gpu = this.ctx.gpu;
    const B = prompts.length;
    if (B === 0 || B > this.cache.B) {
      throw new RangeError(`Cannot prefill ${B} prompts: the decoder holds 1 to ${this.cache.B}`);
    }
    const S = Math.max(...prompts.map((p) => p.length));
    if (prompts.some((p) => p.length === 0)) throw new RangeError("Cannot prefill an empty prompt");
    if (S > this.cache.L) {
      throw new RangeError(`Cannot prefill a prompt of ${S} tokens into a cache of ${this.cache.L}`);
    }
    const T = B * S;
    const tokens = new Uint32Array(T);
    const positions = new Uint32Array(T);
    const docs = new Uint32Array(T);
    prompts.forEach((p, b) => {
      for (let i = 0; i < S; i++) {
        const t = b * S + i;
        tokens[t] = i < p.length ? p[i] : 0;
        docs[t] = i < p.length ? 0 : 1;
        positions[t] = i < p.length ? i : i - p.length;
      }
    });
    rope_check_positions(this.#ropeConfig(), positions);
    using pos = Tensor.from(gpu, positions, [T], "u32", { label: "positions" });
    using docT = Tensor.from(gpu, docs, [T], "u32", { label: "docs" });
    const lb: LayerBatch = { rows: B, seqLen: S, positions: pos, docs: docT, dropout: null };
    let h = embeddingForward(this.ctx.weights.get("model.embed_tokens.weight"), tokens, { label: "h0" });
    const spans = prompts.map((p) => ({ at: 0, count: p.length }));
    for (let l = 0; l < this.ctx.config.numLayers; l++) {
      const { hOut, saved } = layerForward(this.ctx, lb, l, h, "keep");
      this.cache.write(l, saved!.k, saved!.v, S, spans);
      saved!.destroy();
      h.destroy();
      h = hOut!;
    }
    this.#active = B;
    prompts.forEach((p, b) => (this.lengths[b] = p.length));
    return await this.#logits(h, prompts.map((p, b) => b * S + p.length - 1));
  }

  #ropeConfig() {
    const c = this.ctx.config;
    return {
      headDim: c.headDim,
      theta: c.ropeTheta,
      scaling: c.ropeScaling,
      maxPositionEmbeddings: c.maxPositionEmbeddings,
    };
  }

  /** Appends one token to each active sequence; returns the logits of the next token of each. */
  async step(tokens: readonly number[]): Promise<Float32Array[]> {
    const { gpu, config } = this.ctx;
    const B = this.#active;
    if (tokens.length !== B) throw new RangeError(`Cannot decode ${tokens.length} tokens for ${B} sequences`);
    if (this.lengths.slice(0, B).some((n) => n >= this.cache.L)) {
      throw new RangeError(`Cannot decode past the ${this.cache.L} tokens the KV cache holds`);
    }
    const positions = Uint32Array.from(this.lengths.slice(0, B));
    rope_check_positions(this.#ropeConfig(), positions);
    using pos = Tensor.from(gpu, positions, [B], "u32", { label: "positions" });
    using lens = Tensor.from(gpu, positions.map((p) => p + 1), [B], "u32", { label: "lens" });
    using docs = Tensor.from(gpu, new Uint32Array(B), [B], "u32", { label: "docs" });
    const lb: LayerBatch = { rows: B, seqLen: 1, positions: pos, docs, dropout: null };
    const spans = Array.from(positions, (p) => ({ at: p, count: 1 }));
    const { numHeads: H, numKvHeads: Hkv, headDim: hd } = config;
    let h = embeddingForward(this.ctx.weights.get("model.embed_tokens.weight"), Uint32Array.from(tokens), {
      label: "h",
    });
    for (let l = 0; l < config.numLayers; l++) {
      const p = `model.layers.${l}`;
      const xa = new Map<Projection, Tensor>();
      const n1 = normed(this.ctx, h, this.ctx.weights.get(`${p}.input_layernorm.weight`), `${p}.x1`);
      const qLin = project(this.ctx, lb, l, "q_proj", n1.x, xa);
      const kLin = project(this.ctx, lb, l, "k_proj", n1.x, xa);
      const vLin = project(this.ctx, lb, l, "v_proj", n1.x, xa);
      const q = ropeForward(qLin, pos, this.ctx.rope, { label: `${p}.q` });
      const k = ropeForward(kLin, pos, this.ctx.rope, { label: `${p}.k` });
      const v = vLin.reshape([B, Hkv, hd], `${p}.v`);
      this.cache.write(l, k, v, 1, spans);
      const attn = attentionDecode(q, this.cache.k[l], this.cache.v[l], lens, {
        window: config.layerWindows[l],
        label: `${p}.attn`,
      });
      const attn2 = attn.reshape([B, H * hd]);
      const hMid = copyOf(h, `${p}.h_mid`);
      project(this.ctx, lb, l, "o_proj", attn2, xa, hMid);
      const n2 = normed(
        this.ctx,
        hMid,
        this.ctx.weights.get(`${p}.post_attention_layernorm.weight`),
        `${p}.x2`,
      );
      const g = project(this.ctx, lb, l, "gate_proj", n2.x, xa);
      const u = project(this.ctx, lb, l, "up_proj", n2.x, xa);
      const m = swigluForward(g, u, { label: `${p}.m` });
      const hOut = copyOf(hMid, `${p}.h_out`);
      project(this.ctx, lb, l, "down_proj", m, xa, hOut);
      for (
        const t of [
          n1.x,
          n1.rstd,
          qLin,
          kLin,
          vLin,
          q,
          k,
          v,
          attn,
          attn2,
          hMid,
          n2.x,
          n2.rstd,
          g,
          u,
          m,
          ...xa.values(),
        ]
      ) {
        t.destroy();
      }
      h.destroy();
      h = hOut;
    }
    for (let b = 0; b < B; b++) this.lengths[b]++;
    return await this.#logits(h, Array.from({ length: B }, (_, b) => b));
  }

  [Symbol.dispose](): void {
    this.cache[Symbol.dispose]();
  }
}
