/**
 * A whole decoder-only model (Llama 2/3, Mistral, Qwen2) in plain f64 loops, built from the other
 * references: forward to the loss, and a full backward giving the gradient of every LoRA adapter
 * and of the input embeddings. It is what the GPU model graphs and the whole-model gradient checks
 * are validated against.
 *
 * B = rows, S = tokens per row, T = B·S, D = hidden, F = intermediate, V = vocab, L = layers,
 * H = heads, Hkv = kv heads, hd = head dim, r = LoRA rank.
 *
 *   h = embed_tokens[ids]                                          h[T,D] (or given inputs_embeds)
 *   for each layer:
 *     x = rmsnorm(h, input_layernorm)                              x[T,D]
 *     q = x·Wqᵀ (+bq), k = x·Wkᵀ (+bk), v = x·Wvᵀ (+bv)            q[T,H,hd], k,v[T,Hkv,hd] (qkvBias)
 *     q, k = rope(q), rope(k) at per-token positions
 *     a = attention(q, k, v)  causal, GQA, per-layer sliding window, per-document   a[T,H·hd]
 *     h = h + a·Woᵀ (+bo with oBias)
 *     x = rmsnorm(h, post_attention_layernorm)
 *     h = h + (silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ  (+ biases with mlpBias)     gate/up [T,F]
 *   loss = cross_entropy(rmsnorm(h, norm) · Wheadᵀ, targets) / N   Whead = lm_head or embed_tokens (tied)
 *   correct = Σ_{t trained} [argmax_v logits[t,v] = target[t]]   (lowest v on ties; in the loss's pass)
 * Every projection may carry a LoRA adapter (y += s · dropout(x)·Aᵀ·Bᵀ). The backward runs the same
 * graph in reverse; the base weights are frozen.
 * @module
 */
import { type Floats, mul_tn } from "./_dense.ts";
import { attention_backward, attention_forward, doc_ids_from_positions } from "./attention.ts";
import {
  count_trained,
  lm_head_cross_entropy_backward,
  lm_head_cross_entropy_forward,
} from "./cross_entropy.ts";
import { embedding_backward, embedding_forward } from "./embedding.ts";
import { linear_lora_backward, linear_lora_forward, type LoraAdapter } from "./linear_lora.ts";
import { rmsnorm_backward, rmsnorm_forward } from "./rmsnorm.ts";
import {
  rope_backward,
  rope_check_positions,
  rope_forward,
  rope_inv_freq,
  rope_tables,
  type RopeScaling,
} from "./rope.ts";
import { swiglu_backward, swiglu_forward } from "./swiglu.ts";

/**
 * The model hyper-parameters the reference needs: a structural subset of formats/model_config.ts
 * `ModelConfig` (same field names), so a parsed config.json can be passed as is.
 */
export interface DecoderConfig {
  /** V (vocab_size). */
  readonly vocabSize: number;
  /** D (hidden_size). */
  readonly hiddenSize: number;
  /** F (intermediate_size). */
  readonly intermediateSize: number;
  /** L (num_hidden_layers). */
  readonly numLayers: number;
  /** H (num_attention_heads). */
  readonly numHeads: number;
  /** Hkv (num_key_value_heads). */
  readonly numKvHeads: number;
  /** hd (head_dim, or hidden_size / num_attention_heads). */
  readonly headDim: number;
  /** rms_norm_eps. */
  readonly rmsNormEps: number;
  /** rope_theta. */
  readonly ropeTheta: number;
  /** rope_scaling, or null. */
  readonly ropeScaling: RopeScaling | null;
  /** max_position_embeddings (read by yarn and dynamic scaling without an original length). */
  readonly maxPositionEmbeddings?: number;
  /** q/k/v projections have biases (Qwen2; Llama with attention_bias). */
  readonly qkvBias: boolean;
  /** o_proj has a bias (Llama with attention_bias). */
  readonly oBias?: boolean;
  /** gate/up/down projections have biases (Llama with mlp_bias). */
  readonly mlpBias?: boolean;
  /** lm_head shares embed_tokens.weight (tie_word_embeddings). */
  readonly tieWordEmbeddings: boolean;
  /** Sliding window W per layer, or null for full causal attention (Mistral: W on every layer). */
  readonly layerWindows: readonly (number | null)[];
}

/** Base weights by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`, ...), row-major. */
export type WeightMap = ReadonlyMap<string, Floats> | Readonly<Record<string, Floats>>;

/** LoRA adapters by module name (`model.layers.0.self_attn.q_proj`). */
export type AdapterMap = ReadonlyMap<string, LoraAdapter> | Readonly<Record<string, LoraAdapter>>;

/** The seven projections of a layer that can carry LoRA, as PEFT target_modules paths. */
export const LAYER_PROJECTIONS = [
  "self_attn.q_proj",
  "self_attn.k_proj",
  "self_attn.v_proj",
  "self_attn.o_proj",
  "mlp.gate_proj",
  "mlp.up_proj",
  "mlp.down_proj",
] as const;

/** One of {@link LAYER_PROJECTIONS}. */
export type Projection = typeof LAYER_PROJECTIONS[number];

/** The module name of a projection: `model.layers.<layer>.<projection>`. */
export function projection_name(layer: number, projection: Projection): string {
  return `model.layers.${layer}.${projection}`;
}

/** K (in) and N (out) features of a projection: W[N,K]. */
export function projection_shape(
  config: DecoderConfig,
  projection: Projection,
): { inFeatures: number; outFeatures: number } {
  const { hiddenSize: D, intermediateSize: F, numHeads: H, numKvHeads: Hkv, headDim: hd } = config;
  switch (projection) {
    case "self_attn.q_proj":
      return { inFeatures: D, outFeatures: H * hd };
    case "self_attn.k_proj":
    case "self_attn.v_proj":
      return { inFeatures: D, outFeatures: Hkv * hd };
    case "self_attn.o_proj":
      return { inFeatures: H * hd, outFeatures: D };
    case "mlp.gate_proj":
    case "mlp.up_proj":
      return { inFeatures: D, outFeatures: F };
    case "mlp.down_proj":
      return { inFeatures: F, outFeatures: D };
  }
}

/** One training micro-batch. */
export interface DecoderInput {
  /** Rows. */
  B: number;
  /** Tokens per row. */
  S: number;
  /** ids[T]; exactly one of ids and inputsEmbeds. */
  ids?: ArrayLike<number> | null;
  /** inputs_embeds[T,D], in place of ids. */
  inputsEmbeds?: Floats | null;
  /** target[T], already shifted (the next token); -100 is not trained. */
  targets: ArrayLike<number>;
  /** position[T]; default 0..S−1 in every row. Packed documents restart at 0. */
  positions?: ArrayLike<number> | null;
  /** doc[T]; default from positions: a document starts at each row and wherever position is 0. */
  docIds?: ArrayLike<number> | null;
  /** N, the loss normaliser; default the number of trained targets. */
  numItems?: number;
  /** Vocabulary rows per cross-entropy chunk (default 1024). */
  vocabChunk?: number;
}

interface ProjCache {
  /** The projection input x[T,K]. */
  x: Float64Array;
  /** Whether the projection has a bias b[N]. */
  hasBias?: boolean;
  /** dropout(x)·Aᵀ [T,r] or null. */
  xa: Float64Array | null;
  W: Floats;
  lora: LoraAdapter | null;
  name: string;
  K: number;
  N: number;
}

interface LayerCache {
  hIn: Float64Array; // [T,D]
  rstd1: Float64Array; // [T]
  q: ProjCache;
  k: ProjCache;
  v: ProjCache;
  qRoped: Float64Array; // [T,H,hd]
  kRoped: Float64Array; // [T,Hkv,hd]
  vOut: Float64Array; // [T,Hkv,hd]
  attn: Float64Array; // [T,H,hd]
  lse: Float64Array; // [T,H]
  o: ProjCache;
  hMid: Float64Array; // [T,D]
  rstd2: Float64Array; // [T]
  gate: ProjCache;
  up: ProjCache;
  g: Float64Array; // [T,F]
  u: Float64Array; // [T,F]
  down: ProjCache;
}

/** The forward's loss and everything {@link decoder_backward} needs. */
export interface DecoderForward {
  /** Σ over trained tokens of −log p(target) / N. */
  loss: number;
  /** N used. */
  numItems: number;
  /**
   * Trained tokens whose argmax logit (f64, lowest index on ties) is the target: the numerator
   * of the token accuracy, from the loss's own pass over the logits.
   */
  correct: number;
  /** logp[T]: log-softmax of each trained token's target, 0 elsewhere (reference/cross_entropy.ts). */
  logp: Float64Array;
  /** logitSum[T]: Σ_v logits[t,v]. */
  logitSum: Float64Array;
  /** Internal activations, read by the backward. */
  readonly saved: {
    config: DecoderConfig;
    input: DecoderInput;
    T: number;
    layers: LayerCache[];
    hFinal: Float64Array; // [T,D] before the final norm
    rstdF: Float64Array; // [T]
    xF: Float64Array; // [T,D] after the final norm
    lseF: Float64Array; // [T]
    head: Floats; // [V,D]
    cos: Float64Array; // [T,hd/2]
    sin: Float64Array; // [T,hd/2]
    docIds: ArrayLike<number>;
    weight: (name: string, n: number) => Floats;
  };
}

/** Gradients from {@link decoder_backward}. */
export interface DecoderGradients {
  /** dA[r,K] and dB[N,r] for every adapter, by module name. */
  lora: Map<string, { dA: Float64Array; dB: Float64Array }>;
  /** d inputs_embeds[T,D] (the gradient at the embedding output). */
  dInputsEmbeds: Float64Array;
  /**
   * With `full`: the gradient of every base weight by its HF name (`…q_proj.weight` dW[N,K] = dyᵀ·x,
   * `….bias` db[N] = Σ_t dy[t], norms dw[D], `model.embed_tokens.weight` by scatter-add of the
   * embedding output's gradient over the ids, `lm_head.weight` from the fused head; with tied
   * embeddings the head's gradient is added to the embedding's).
   */
  weights?: Map<string, Float64Array>;
}

function lookup<V>(map: ReadonlyMap<string, V> | Readonly<Record<string, V>>, name: string): V | undefined {
  if (map instanceof Map) return map.get(name);
  return Object.hasOwn(map, name) ? (map as Record<string, V>)[name] : undefined;
}

function keysOf<V>(map: ReadonlyMap<string, V> | Readonly<Record<string, V>>): string[] {
  return map instanceof Map ? [...map.keys()] : Object.keys(map);
}

function checkConfig(c: DecoderConfig): void {
  const sizes = [
    "vocabSize",
    "hiddenSize",
    "intermediateSize",
    "numLayers",
    "numHeads",
    "numKvHeads",
    "headDim",
  ];
  for (const key of sizes as (keyof DecoderConfig)[]) {
    const value = c[key] as number;
    if (!Number.isInteger(value) || value <= 0) {
      throw new RangeError(`Cannot build the decoder: config.${key} "${value}" must be a positive integer`);
    }
  }
  if (c.numHeads % c.numKvHeads !== 0) {
    throw new RangeError(
      `Cannot build the decoder: config.numHeads "${c.numHeads}" is not a multiple of config.numKvHeads ` +
        `"${c.numKvHeads}"`,
    );
  }
  if (c.layerWindows.length !== c.numLayers) {
    throw new RangeError(
      `Cannot build the decoder: config.layerWindows has ${c.layerWindows.length} entries ` +
        `for ${c.numLayers} layers`,
    );
  }
}

// Whether projection `proj` has a bias under `config`.
function hasBias(config: DecoderConfig, proj: Projection): boolean {
  if (proj === "self_attn.o_proj") return config.oBias ?? false;
  if (proj.startsWith("self_attn.")) return config.qkvBias;
  return config.mlpBias ?? false;
}

/**
 * Runs the model to the loss, keeping the activations for {@link decoder_backward}.
 *
 * @param weights base weights by HF name (f32 or f64; all arithmetic is f64)
 * @param adapters LoRA adapters by module name; a name that is not one of the 7·L projections throws
 */
export function decoder_forward(
  config: DecoderConfig,
  weights: WeightMap,
  adapters: AdapterMap,
  input: DecoderInput,
): DecoderForward {
  checkConfig(config);
  const { hiddenSize: D, numHeads: H, numKvHeads: Hkv, headDim: hd, vocabSize: V } = config;
  const { B, S } = input;
  const T = B * S;
  const eps = config.rmsNormEps;

  const weight = (name: string, n: number): Floats => {
    const w = lookup(weights, name);
    if (!w) throw new RangeError(`Cannot run the decoder: weight "${name}" is missing`);
    if (w.length !== n) {
      throw new RangeError(
        `Cannot run the decoder: weight "${name}" holds ${w.length} values, expected ${n}`,
      );
    }
    return w;
  };
  const known = new Set<string>();
  for (let l = 0; l < config.numLayers; l++) {
    for (const p of LAYER_PROJECTIONS) known.add(projection_name(l, p));
  }
  for (const name of keysOf(adapters)) {
    if (!known.has(name)) {
      throw new RangeError(
        `Cannot attach LoRA adapter "${name}": it is not a projection of this ` +
          `${config.numLayers}-layer model (expected names like "model.layers.0.self_attn.q_proj")`,
      );
    }
  }
  // y = x·Wᵀ (+b) + LoRA, for projection `proj` of layer l
  const project = (x: Float64Array, l: number, proj: Projection): [Float64Array, ProjCache] => {
    const name = projection_name(l, proj);
    const { inFeatures: K, outFeatures: N } = projection_shape(config, proj);
    const W = weight(`${name}.weight`, N * K);
    const b = hasBias(config, proj) ? weight(`${name}.bias`, N) : null;
    const lora = lookup(adapters, name) ?? null;
    const { y, xa } = linear_lora_forward(x, W, b, lora, { T, inFeatures: K, outFeatures: N });
    return [y, { x, xa, W, lora, name, K, N, hasBias: b !== null }];
  };

  // h[T,D]
  let h: Float64Array;
  if (input.inputsEmbeds) {
    if (input.ids) throw new TypeError("Cannot run the decoder: give ids or inputsEmbeds, not both");
    if (input.inputsEmbeds.length !== T * D) {
      throw new RangeError(
        `Cannot run the decoder: inputsEmbeds holds ${input.inputsEmbeds.length} values, expected ${T * D}`,
      );
    }
    h = Float64Array.from(input.inputsEmbeds);
  } else if (input.ids) {
    h = Float64Array.from(embedding_forward(weight("model.embed_tokens.weight", V * D), input.ids, { V, D }));
  } else {
    throw new TypeError("Cannot run the decoder: neither ids nor inputsEmbeds is given");
  }

  const positions = input.positions ?? Int32Array.from({ length: T }, (_, t) => t % S);
  if (positions.length !== T) {
    throw new RangeError(`Cannot run the decoder: positions holds ${positions.length} values, expected ${T}`);
  }
  const docIds = input.docIds ?? doc_ids_from_positions(positions, B, S);
  const ropeConfig = {
    headDim: hd,
    theta: config.ropeTheta,
    scaling: config.ropeScaling,
    maxPositionEmbeddings: config.maxPositionEmbeddings,
  };
  rope_check_positions(ropeConfig, positions);
  const freqs = rope_inv_freq(ropeConfig);
  const { cos, sin } = rope_tables(freqs, positions);

  const layers: LayerCache[] = [];
  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    const hIn = h;
    const n1 = rmsnorm_forward(hIn, weight(`${p}.input_layernorm.weight`, D), { T, D, eps });
    const [qLin, q] = project(n1.y, l, "self_attn.q_proj");
    const [kLin, k] = project(n1.y, l, "self_attn.k_proj");
    const [vOut, v] = project(n1.y, l, "self_attn.v_proj");
    const qRoped = rope_forward(qLin, cos, sin, { T, heads: H, headDim: hd });
    const kRoped = rope_forward(kLin, cos, sin, { T, heads: Hkv, headDim: hd });
    const window = config.layerWindows[l];
    const { out: attn, lse } = attention_forward(qRoped, kRoped, vOut, { B, S, H, Hkv, hd, window, docIds });
    const [oOut, o] = project(attn, l, "self_attn.o_proj");
    const hMid = hIn.map((x, i) => x + oOut[i]);
    const n2 = rmsnorm_forward(hMid, weight(`${p}.post_attention_layernorm.weight`, D), { T, D, eps });
    const [g, gate] = project(n2.y, l, "mlp.gate_proj");
    const [u, up] = project(n2.y, l, "mlp.up_proj");
    const act = swiglu_forward(g, u);
    const [mOut, down] = project(act, l, "mlp.down_proj");
    h = hMid.map((x, i) => x + mOut[i]);
    layers.push({
      hIn,
      rstd1: n1.rstd,
      q,
      k,
      v,
      qRoped,
      kRoped,
      vOut,
      attn,
      lse,
      o,
      hMid,
      rstd2: n2.rstd,
      gate,
      up,
      g,
      u,
      down,
    });
  }

  const nF = rmsnorm_forward(h, weight("model.norm.weight", D), { T, D, eps });
  const head = config.tieWordEmbeddings
    ? weight("model.embed_tokens.weight", V * D)
    : weight("lm_head.weight", V * D);
  const numItems = input.numItems ?? count_trained(input.targets);
  if (!(numItems > 0)) {
    throw new RangeError(
      "Cannot compute the loss: no target is trained (all are -100) and numItems is not given",
    );
  }
  const ce = lm_head_cross_entropy_forward(nF.y, head, input.targets, {
    T,
    V,
    D,
    n: numItems,
    chunk: input.vocabChunk,
  });
  return {
    loss: ce.loss,
    numItems,
    correct: ce.correct,
    logp: ce.logp,
    logitSum: ce.logitSum,
    saved: {
      config,
      input,
      T,
      layers,
      hFinal: h,
      rstdF: nF.rstd,
      xF: nF.y,
      lseF: ce.lse,
      head,
      cos,
      sin,
      docIds,
      weight,
    },
  };
}

/** The loss alone (for finite differences and evaluation). */
export function decoder_loss(
  config: DecoderConfig,
  weights: WeightMap,
  adapters: AdapterMap,
  input: DecoderInput,
): number {
  return decoder_forward(config, weights, adapters, input).loss;
}

/**
 * Gradients of the loss w.r.t. every LoRA adapter and the input embeddings.
 *
 * @param dloss upstream gradient of the loss (1 for the loss itself)
 * @param tokenWeights w[T]: instead of the loss, the gradient of Σ_t w[t]·(−logp[t]) (a sequence
 *   objective's per-token weights, reference/cross_entropy.ts)
 */
export function decoder_backward(
  forward: DecoderForward,
  dloss = 1,
  tokenWeights: ArrayLike<number> | null = null,
  full = false,
): DecoderGradients {
  const s = forward.saved;
  const { config, input, T, weight, cos, sin } = s;
  const { hiddenSize: D, numHeads: H, numKvHeads: Hkv, headDim: hd, vocabSize: V } = config;
  const eps = config.rmsNormEps;
  const lora = new Map<string, { dA: Float64Array; dB: Float64Array }>();
  const grads = full ? new Map<string, Float64Array>() : undefined;

  const projBack = (dy: Float64Array, c: ProjCache): Float64Array => {
    const { dx, dA, dB } = linear_lora_backward(dy, c.x, c.W, c.lora, c.xa, {
      T,
      inFeatures: c.K,
      outFeatures: c.N,
    });
    if (dA && dB) lora.set(c.name, { dA, dB });
    if (grads) {
      // dW[N,K] = dyᵀ·x; db[N] = Σ_t dy[t,:]
      grads.set(`${c.name}.weight`, mul_tn(dy, c.x, c.N, T, c.K));
      if (c.hasBias) {
        const db = new Float64Array(c.N);
        for (let t = 0; t < T; t++) for (let n = 0; n < c.N; n++) db[n] += dy[t * c.N + n];
        grads.set(`${c.name}.bias`, db);
      }
    }
    return dx;
  };
  const normBack = (dy: Float64Array, x: Float64Array, name: string, rstd: Float64Array): Float64Array => {
    const { dx, dw } = rmsnorm_backward(dy, x, weight(name, D), rstd, { T, D, eps });
    grads?.set(name, Float64Array.from(dw));
    return dx;
  };
  const add = (a: Float64Array, b: Float64Array): Float64Array => a.map((x, i) => x + b[i]);

  const { dhidden, dW: dHead } = lm_head_cross_entropy_backward(
    s.xF,
    s.head,
    input.targets,
    s.lseF,
    {
      T,
      V,
      D,
      n: forward.numItems,
      chunk: input.vocabChunk,
    },
    dloss,
    full,
    tokenWeights,
  );
  // dh[T,D]: gradient at the residual stream
  let dh = normBack(dhidden, s.hFinal, "model.norm.weight", s.rstdF);

  for (let l = config.numLayers - 1; l >= 0; l--) {
    const c = s.layers[l];
    const p = `model.layers.${l}`;
    // MLP block: h = hMid + down(swiglu(gate(x2), up(x2)))
    const dAct = projBack(dh, c.down);
    const { dg, du } = swiglu_backward(dAct, c.g, c.u);
    const dx2 = add(projBack(dg, c.gate), projBack(du, c.up));
    const dhMid = add(dh, normBack(dx2, c.hMid, `${p}.post_attention_layernorm.weight`, c.rstd2));
    // attention block: hMid = hIn + o(attention(rope(q(x1)), rope(k(x1)), v(x1)))
    const dAttn = projBack(dhMid, c.o);
    const attnDims = { B: input.B, S: input.S, H, Hkv, hd, window: config.layerWindows[l], docIds: s.docIds };
    const { dq, dk, dv } = attention_backward(dAttn, c.qRoped, c.kRoped, c.vOut, c.attn, c.lse, attnDims);
    const dqLin = rope_backward(dq, cos, sin, { T, heads: H, headDim: hd });
    const dkLin = rope_backward(dk, cos, sin, { T, heads: Hkv, headDim: hd });
    const dx1 = add(add(projBack(dqLin, c.q), projBack(dkLin, c.k)), projBack(dv, c.v));
    dh = add(dhMid, normBack(dx1, c.hIn, `${p}.input_layernorm.weight`, c.rstd1));
  }
  if (grads) {
    // dE[V,D]: scatter-add of the embedding output's gradient (ids only; inputs_embeds stop here).
    const dE = input.ids
      ? Float64Array.from(embedding_backward(dh, input.ids, { V, D }))
      : new Float64Array(V * D);
    if (config.tieWordEmbeddings) { for (let i = 0; i < dE.length; i++) dE[i] += dHead![i]; }
    else grads.set("lm_head.weight", Float64Array.from(dHead!));
    grads.set("model.embed_tokens.weight", dE);
  }
  return { lora, dInputsEmbeds: dh, weights: grads };
}
