/**
 * The memory planner: the peak GPU memory of one training step of the webgpu backend
 * (`GpuModel` in kernels/models/graph.ts: one micro-batch forward and backward, then AdamW),
 * computed before any weight loads, from the model's `config.json`, the training settings and the
 * adapter's limits, and broken down by what is alive at the peak.
 *
 * B = rows, S = tokens per row, T = B·S, D = hidden, F = ffn, V = vocab, L = layers, H = heads,
 * Hkv = kv heads, hd = head dim, r = LoRA rank, w = bytes per weight and activation (2 in f16, 4 in
 * f32), n = out·in of a projection, bs = 4-bit blocksize, nb = ⌈n/bs⌉.
 *
 * How: the planner replays the step's allocations in the order graph.ts, layer.ts and the ops make
 * them (every `Tensor.empty`, with its shape, dtype and row chunks, and every free), through the
 * pool's own rounding ({@link bucketSize}: 4 sizes per power of two, at least 256 bytes; a bucket
 * past the binding limit is the size padded to 4). The figure is what `memoryStats(gpu).peakBytes`
 * measures after `resetPeakMemory`: the largest sum of the bucket sizes of live buffers, resident
 * weights and adapter state included. Nothing is allocated on a GPU.
 *
 * Resident through the step (bytes before pool rounding):
 *   projections   Σ n·w, or per 4-bit weight (QLoRA, kernels/ops/quant_4bit.ts) three buffers: codes
 *                 ⌈n/8⌉·4, absmax ⌈nb/4⌉·4 (8-bit codes, double quantization) or 4·nb (f32), and
 *                 the f32 tables quant map[16] ‖ nested map[256] ‖ nested absmax[⌈nb/256⌉ or 0]
 *   embeddings    V·D·w, and lm_head V·D·w unless tied; norms 4·D·(2L + 1); biases 4·out
 *   adapters      per adapted projection [out,in]: A[r,in], B[out,r] f32 — 4·r·(in + out) — and as much
 *                 again for dA, dB and twice for AdamW's m, v
 *   RoPE table    4·4·hd/2
 * Per micro-batch (graph.ts): positions, docs, targets 4·T each; the layer inputs h_0..h_L 4·T·D each,
 * kept to the backward; one layer's activations x1, x2 (w·T·D), q, a (w·T·H·hd), k, v (w·T·Hkv·hd),
 * lse (4·T·H), hMid (4·T·D), g, u, m (w·T·F), rstd (4·T each), xa (4·T·r per adapter) alive at once
 * with checkpointing (recomputed before each layer's backward), every layer's without it; the
 * backward's f32 intermediates of one layer (dm, then dg over it, and du [T,F], while m, g and u are
 * freed as soon as read; dx2, dx1 [T,D]; d_attn, dq
 * [T,H·hd]; dk, dv [T,Hkv·hd]; dxa [T,r]; dropout(x) [T,in] with LoRA dropout); attention's stats
 * workspace 8·T·H; the loss's final x 4·T·D, lse 4·T, state 16·T and one vocabulary chunk of logits
 * 4·T·Vc (Vc: at most 64 MiB of them, kernels/ops/cross_entropy.ts) and its dh 4·T·D; on GPUs (never
 * on software adapters) split-K's partial sums 4·S·M·N of a matmul with a long K and few output tiles
 * (at most 64 MiB, kernels/ops/matmul.ts); with a 4-bit base, one dequantized projection [out,in] in
 * the weight dtype while a matmul uses it.
 *
 * Accuracy: equal to the measured peak, to the byte, on every case of
 * tests/models/memory_plan_test.ts (tiny and D 256 models, f16 and f32, with and without
 * checkpointing, LoRA dropout, activations split into row chunks, NF4 and FP4 bases), which allow
 * 10 %; docs/engine.md lists the figures. Split-K (GPUs only) is replayed from matmul.ts's rule but
 * not measured by those tests, which run on a software adapter. The replay follows the engine's code:
 * a change to what graph.ts, layer.ts or an op allocates needs the same change here, and the
 * measured tests catch one that moves the peak by more than their tolerance.
 * @module
 */
import {
  expectedTensors,
  type ModelConfig,
  type Projection,
  projectionPath,
  PROJECTIONS,
  projectionShape,
} from "../../formats/model_config.ts";
import { bnb4bitSettings, isSkippedModule } from "../../formats/bnb4bit_checkpoint.ts";
import type { Gpu } from "../device.ts";
import { bucketSize, type DType, DTYPE_BYTES, SPLIT_ELEMENT_BYTES } from "../tensor.ts";

/** 4-bit quantization of the base's projections (bitsandbytes' layout, as the quantize step writes it). */
export interface QuantizationSettings {
  /** `bnb_4bit_quant_type`. */
  quantType: "nf4" | "fp4";
  /** `bnb_4bit_use_double_quant`: absmax quantized again to 8 bits in blocks of 256. */
  doubleQuant: boolean;
  /** Elements per absmax block (bitsandbytes' default 64). */
  blocksize: number;
  /**
   * `llm_int8_skip_modules`: projections whose module path an entry names stay unquantized (either
   * of transformers' readings, formats/bnb4bit_checkpoint.ts `isSkippedModule`).
   */
  skipModules: readonly string[];
}

/** The training settings the plan depends on (train-sft's names in parentheses). */
export interface TrainingMemorySettings {
  /** B: rows per micro-batch (`per_device_train_batch_size`). */
  batchRows: number;
  /** S: tokens per row (the token shards' `seq_len`). */
  seqLen: number;
  /** Recompute each layer's activations in the backward (`gradient_checkpointing`). */
  gradientCheckpointing: boolean;
  /** With checkpointing: the layer inputs wait in host memory for the backward (`offload_layer_inputs`; default false). */
  offloadLayerInputs?: boolean;
  /** Weights and activations (`dtype`): f16 where the adapter has shader-f16, else f32. */
  dtype: "f16" | "f32";
  /** LoRA rank, target projections and dropout (`lora.r`, `lora.target_modules`, `lora.dropout`). */
  lora: {
    r: number;
    targets: readonly Projection[];
    /** p > 0 adds an f32 copy of a projection's input while its adapter runs (default 0.05, as train-sft). */
    dropout?: number;
  };
  /**
   * The 4-bit base: settings given here (the quantize step's), null for a 16/32-bit base, absent to
   * read `config.quantizationConfig` (see {@link quantizationFromConfig}).
   */
  quantization?: QuantizationSettings | null;
  /**
   * Full fine-tuning (`finetuning: full`): every weight trains, with f32 masters (a second copy when
   * the weights are f16), f32 gradients and AdamW moments; `lora.targets` is then empty. Default false.
   */
  full?: boolean;
}

/** What the plan needs of the adapter ({@link memoryLimits} reads them from a {@link Gpu}). */
export interface MemoryLimits {
  /**
   * Largest storage binding in bytes (`Gpu.maxBindingBytes`: the adapter's
   * `maxStorageBufferBindingSize`, capped by `maxBufferSize` and `LATHE_MAX_BINDING_BYTES`).
   * Tensors above it are split into row chunks; pool buckets never pass it.
   */
  maxBindingBytes: number;
  /** A software (CPU) adapter: matmuls never split K there, so they need no partial sums. */
  software: boolean;
}

/** One line of a plan. */
export interface MemoryPart {
  name: string;
  bytes: number;
  note?: string;
}

/** The plan of one training step; {@link planTrainingMemory} makes it. */
export interface MemoryPlan {
  /** Peak bytes of one step: the largest sum of the pool bucket sizes of live buffers. */
  total: number;
  /** What is alive at the peak, by kind (tensor bytes; the pool's rounding is its own line): sums to `total`. */
  parts: MemoryPart[];
  /** Bytes alive before and after the step (weights, adapters, gradients, moments, RoPE table), rounded. */
  resident: number;
  /** Where in the step the peak falls, e.g. "backward of layer 31: MLP". */
  peakAt: string;
  /** The peak of each phase of the step: forward, loss, backward, optimizer. */
  phases: MemoryPart[];
  /** The largest size of each transient workspace over the step, at the peak or not. */
  workspaces: MemoryPart[];
  /** What was planned. */
  model: ModelConfig;
  settings: Required<Omit<TrainingMemorySettings, "lora" | "quantization">> & {
    lora: { r: number; targets: Projection[]; dropout: number };
    quantization: QuantizationSettings | null;
  };
  limits: MemoryLimits;
}

/** The limits of a device, as {@link planTrainingMemory} takes them. */
export function memoryLimits(gpu: Gpu): MemoryLimits {
  return { maxBindingBytes: gpu.maxBindingBytes, software: gpu.software };
}

function planError(what: string): never {
  throw new RangeError(`Cannot plan the training memory: ${what}`);
}

/**
 * The 4-bit settings of `config.quantization_config` as the loader reads them
 * (formats/bnb4bit_checkpoint.ts `bnb4bitSettings`), or null for an unquantized model. The
 * blocksize is not saved there: bitsandbytes' 64. No skip list means transformers' default, lm_head.
 *
 * @example
 * ```ts
 * quantizationFromConfig(await loadModelConfig("runs/x/quantize/model"));
 * // { quantType: "nf4", doubleQuant: true, blocksize: 64, skipModules: ["lm_head"] }
 * ```
 * @throws {LatheError} for a quantization lathe does not train on (8-bit, GPTQ, AWQ, …).
 */
export function quantizationFromConfig(config: ModelConfig): QuantizationSettings | null {
  const s = bnb4bitSettings(config, "config.json");
  if (s === null) return null;
  return {
    quantType: s.quantType,
    doubleQuant: s.doubleQuant,
    blocksize: 64,
    skipModules: s.skipModules ?? ["lm_head"],
  };
}

/** bitsandbytes' nested blocksize: absmax codes per nested absmax under double quantization. */
const NESTED_BLOCKSIZE = 256;

/**
 * Bytes of the three GPU tensors of one 4-bit projection W[out,in] as kernels/ops/quant_4bit.ts
 * holds it (n = out·in, nb = ⌈n/bs⌉, nn = ⌈nb/256⌉ with double quantization, else 0).
 *
 * @example
 * ```ts
 * quantizedWeightBytes([14336, 4096], { quantType: "nf4", doubleQuant: true, blocksize: 64, skipModules: [] });
 * // { codes: 29360128, absmax: 917504, tables: 15424 }
 * ```
 */
export function quantizedWeightBytes(
  shape: readonly [number, number],
  q: QuantizationSettings,
): { codes: number; absmax: number; tables: number } {
  const n = shape[0] * shape[1];
  const nb = Math.ceil(n / q.blocksize);
  const nn = q.doubleQuant ? Math.ceil(nb / NESTED_BLOCKSIZE) : 0;
  return {
    // codes: two 4-bit codes a byte, ⌈n/8⌉ u32 words.
    codes: Math.ceil(n / 8) * 4,
    // absmax: one a block, an 8-bit code (⌈nb/4⌉ u32 words) with double quantization, else f32.
    absmax: q.doubleQuant ? Math.ceil(nb / 4) * 4 : 4 * nb,
    // tables f32: quant map[16] ‖ nested (dynamic) map[256] ‖ nested absmax[nn].
    tables: 4 * (16 + 256 + nn),
  };
}

// ---------------------------------------------------------------------------------------------
// The replay: tensors with the pool's chunking and rounding, alive from `empty` to their last free.

/** The lines a plan has, in the order it lists them. */
const KINDS = {
  projections: "base projections",
  embeddings: "embeddings and lm_head",
  norms: "norms and biases",
  adapters: "LoRA A, B",
  masters: "f32 master weights (full fine-tuning)",
  gradients: "LoRA gradients dA, dB",
  weightGrads: "weight gradients (full fine-tuning)",
  moments: "AdamW m, v",
  batch: "batch and RoPE table",
  inputs: "layer inputs h",
  activations: "layer activations",
  layerGrads: "layer backward intermediates",
  dropout: "LoRA dropout copies",
  attention: "attention workspace",
  loss: "cross-entropy workspace",
  splitK: "matmul split-K partials",
  dequant: "dequantized projection",
  optimizer: "optimizer workspace",
} as const;
type Kind = keyof typeof KINDS;
const ROUNDING = "pool rounding";

interface SimChunk {
  rowStart: number;
  rows: number;
  /** Bytes asked of the pool, and the bucket it hands out. */
  bytes: number;
  bucket: number;
}

/** A tensor of the replay: its shape, dtype and chunks, and how many holders (views) it has. */
interface SimTensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly kind: Kind;
  readonly chunks: readonly SimChunk[];
  holders: number;
  /** Destroyed early by a tensor that is destroyed again later (Tensor.destroy is idempotent). */
  early?: boolean;
}

const size = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

class Replay {
  readonly limits: MemoryLimits;
  live = 0;
  peak = 0;
  peakAt = "";
  phase = "";
  /** Live tensor bytes and rounding per kind, now and at the peak. */
  #bytes = new Map<Kind, number>();
  #rounding = 0;
  peakBytes = new Map<Kind, number>();
  peakRounding = 0;
  /** The largest live bytes of each kind, and of each phase group. */
  maxBytes = new Map<Kind, { bytes: number; at: string }>();
  phasePeaks = new Map<string, number>();
  #group = "";

  constructor(limits: MemoryLimits) {
    this.limits = limits;
  }

  /** Starts a phase: `group` is one of forward, loss, backward, optimizer. */
  at(group: string, phase: string): void {
    this.#group = group;
    this.phase = phase;
    this.phasePeaks.set(group, Math.max(this.phasePeaks.get(group) ?? 0, this.live));
  }

  /**
   * Tensor.empty: whole rows in chunks of at most the binding limit (rows counted at 4 bytes an
   * element whatever the dtype), one pooled buffer each.
   */
  empty(shape: readonly number[], dtype: DType, kind: Kind, maxChunkBytes?: number): SimTensor {
    const rows = shape.length === 0 ? 1 : shape[0];
    const rowSize = size(shape.slice(1));
    const rowBytes = rowSize * DTYPE_BYTES[dtype];
    const limit = Math.floor((maxChunkBytes ?? this.limits.maxBindingBytes) / 4) * 4;
    const splitRowBytes = rowSize * SPLIT_ELEMENT_BYTES;
    const chunks: SimChunk[] = [];
    if (rows * splitRowBytes <= limit) {
      chunks.push(this.#acquire(0, rows, rows * rowBytes));
    } else {
      const perChunk = Math.floor(limit / splitRowBytes);
      if (perChunk === 0) {
        planError(
          `one row of [${shape}] (${splitRowBytes} bytes) exceeds the binding limit of ${limit} bytes`,
        );
      }
      for (let r = 0; r < rows; r += perChunk) {
        const n = Math.min(perChunk, rows - r);
        chunks.push(this.#acquire(r, n, n * rowBytes));
      }
    }
    const t: SimTensor = { shape: [...shape], dtype, kind, chunks, holders: 1 };
    for (const c of chunks) this.#add(kind, c.bytes, c.bucket - c.bytes);
    if (this.live > this.peak) {
      this.peak = this.live;
      this.peakAt = this.phase;
      this.peakBytes = new Map(this.#bytes);
      this.peakRounding = this.#rounding;
    }
    const now = this.#bytes.get(kind) ?? 0;
    if (now > (this.maxBytes.get(kind)?.bytes ?? 0)) this.maxBytes.set(kind, { bytes: now, at: this.phase });
    this.phasePeaks.set(this.#group, Math.max(this.phasePeaks.get(this.#group) ?? 0, this.live));
    return t;
  }

  /** The pool's acquire: the bucket, or the size padded to 4 where the bucket would pass the binding limit. */
  #acquire(rowStart: number, rows: number, bytes: number): SimChunk {
    let bucket = bucketSize(bytes);
    if (bucket > this.limits.maxBindingBytes) bucket = Math.ceil(bytes / 4) * 4;
    return { rowStart, rows, bytes, bucket };
  }

  #add(kind: Kind, bytes: number, rounding: number): void {
    this.#bytes.set(kind, (this.#bytes.get(kind) ?? 0) + bytes);
    this.#rounding += rounding;
    this.live += bytes + rounding;
  }

  /** Tensor.reshape: one more holder of the same buffers. */
  view(t: SimTensor): SimTensor {
    t.holders++;
    return t;
  }

  /** Tensor.destroy of one holder; the buffers go back with the last. */
  /** A tensor's own `destroy()` before its holder's (layer.ts frees m, g, u once read): later frees skip it. */
  freeEarly(t: SimTensor): void {
    if (t.early) return;
    this.free(t);
    t.early = true;
  }

  free(t: SimTensor | null | undefined): void {
    if (!t || t.early || --t.holders > 0) return;
    if (t.holders < 0) throw new Error("memory plan: a tensor was freed twice");
    for (const c of t.chunks) this.#add(t.kind, -c.bytes, -(c.bucket - c.bytes));
  }
}

// ---------------------------------------------------------------------------------------------
// matmul (kernels/ops/matmul.ts): the output when none is given, and split-K's partial sums.

type Layout = "NN" | "NT" | "TN";

/** K ranges of split-K are multiples of this (matmul.ts SPLITK_STEP). */
const SPLITK_STEP = 32;

/** matmul.ts `splitCount`: K ranges of one cell on a GPU; 1 on a software adapter or a short K. */
function splitCount(limits: MemoryLimits, M: number, N: number, K: number): number {
  if (limits.software || K < 1024) return 1;
  const tiles = Math.ceil(M / 64) * Math.ceil(N / 64);
  if (tiles >= 256) return 1;
  const split = Math.min(Math.ceil(2048 / tiles), Math.floor(K / 256), 64);
  return split >= 2 && split * M * N * 4 <= 64 * 2 ** 20 ? split : 1;
}

/**
 * C[M,N] = op(A)·op(B) as `matmul` allocates it: the output (when `out` is absent), then for each
 * cell of the product (cut at every row-chunk boundary of A, B and C) that splits K, a partial-sum
 * tensor P[S,M,N] f32, all freed once the product is recorded.
 */
function matmul(
  sim: Replay,
  a: SimTensor,
  b: SimTensor,
  layout: Layout,
  o: { out?: SimTensor; outDtype?: DType; kind?: Kind; bRows?: { start: number; count: number } } = {},
): SimTensor {
  const [a0, a1] = a.shape;
  const [b0, b1] = o.bRows ? [o.bRows.count, b.shape[1]] : b.shape;
  const M = layout === "TN" ? a1 : a0;
  const K = layout === "TN" ? a0 : a1;
  const N = layout === "NT" ? b0 : b1;
  const out = o.out ??
    sim.empty([M, N], o.outDtype ?? (a.dtype === "f16" && b.dtype === "f16" ? "f16" : "f32"), o.kind!);
  const bRow0 = o.bRows?.start ?? 0;
  const cuts = (t: SimTensor, row0: number, rows: number, set: Set<number>) => {
    for (const c of t.chunks) {
      if (c.rowStart - row0 > 0 && c.rowStart - row0 < rows) set.add(c.rowStart - row0);
    }
  };
  const mCuts = new Set([0, M]);
  const nCuts = new Set([0, N]);
  const kCuts = new Set([0, K]);
  cuts(a, 0, layout === "TN" ? K : M, layout === "TN" ? kCuts : mCuts);
  cuts(b, bRow0, layout === "NT" ? N : K, layout === "NT" ? nCuts : kCuts);
  cuts(out, 0, M, mCuts);
  const lengths = (set: Set<number>) => {
    const s = [...set].sort((x, y) => x - y);
    return s.slice(1).map((end, i) => end - s[i]).filter((n) => n > 0);
  };
  const partials: SimTensor[] = [];
  for (const m of lengths(mCuts)) {
    for (const n of lengths(nCuts)) {
      for (const k of lengths(kCuts)) {
        const split = splitCount(sim.limits, m, n, k);
        if (split <= 1) continue;
        const kChunk = Math.ceil(k / split / SPLITK_STEP) * SPLITK_STEP;
        partials.push(sim.empty([Math.ceil(k / kChunk), m, n], "f32", "splitK"));
      }
    }
  }
  for (const p of partials) sim.free(p);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The model: resident tensors, then one step as graph.ts runs it.

interface Slot {
  A: SimTensor;
  B: SimTensor;
}

interface Model {
  config: ModelConfig;
  act: DType;
  /** W[out,in] of each 16/32-bit projection, by `${layer}/${proj}`. */
  weights: Map<string, SimTensor>;
  /** [out,in] of each 4-bit projection, by `${layer}/${proj}`. */
  quantized: Map<string, [number, number]>;
  slots: Map<string, Slot>;
  head: SimTensor;
  dropout: number;
  /** Full fine-tuning: the gradient of each trained tensor, by HF-like key (`${layer}/${proj}`, `head`, …). */
  grads: Map<string, SimTensor> | null;
  /** Whether docs[T] is split into row chunks (attention then binds chunks). */
  docsChunked: boolean;
}

/** Loads the resident tensors: base weights (loadGpuWeights order), adapters and their state, RoPE table. */
function loadModel(sim: Replay, config: ModelConfig, s: MemoryPlan["settings"]): Model {
  const { vocabSize: V, hiddenSize: D, numLayers: L, headDim: hd } = config;
  const wd: DType = s.dtype;
  const q = s.quantization;
  const weights = new Map<string, SimTensor>();
  const quantized = new Map<string, [number, number]>();
  const embed = sim.empty([V, D], wd, "embeddings");
  for (let l = 0; l < L; l++) {
    for (const proj of PROJECTIONS) {
      const shape = projectionShape(config, proj);
      const path = projectionPath(l, proj);
      if (q !== null && !isSkippedModule(path, q.skipModules)) {
        quantized.set(`${l}/${proj}`, shape);
        // Quant4bitWeight: codes, absmax and tables, each one pooled buffer of 4-byte words.
        const b = quantizedWeightBytes(shape, q);
        for (const [what, bytes] of Object.entries(b)) {
          const t = sim.empty([bytes / 4], "u32", "projections");
          if (t.chunks.length > 1) {
            planError(
              `the 4-bit ${path} [${shape}] cannot be held: its ${what} (${bytes} bytes) exceed one storage ` +
                `binding of ${sim.limits.maxBindingBytes} bytes`,
            );
          }
        }
      } else {
        weights.set(`${l}/${proj}`, sim.empty(shape, wd, "projections"));
      }
      const hasBias = proj === "q_proj" || proj === "k_proj" || proj === "v_proj"
        ? config.qkvBias
        : proj === "o_proj"
        ? config.oBias
        : config.mlpBias;
      if (hasBias) sim.empty([shape[0]], "f32", "norms");
    }
    sim.empty([D], "f32", "norms");
    sim.empty([D], "f32", "norms");
  }
  sim.empty([D], "f32", "norms");
  const head = config.tieWordEmbeddings ? embed : sim.empty([V, D], wd, "embeddings");

  // FullParams.create: the f32 masters (a second load when the weights are f16), then per tensor
  // its gradient and moments.
  let grads: Map<string, SimTensor> | null = null;
  if (s.full) {
    grads = new Map();
    const shapes = expectedTensors(config);
    if (wd === "f16") { for (const shape of shapes.values()) sim.empty(shape, "f32", "masters"); }
    for (const [name, shape] of shapes) {
      const pm = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.(weight|bias)$/.exec(name);
      const key = pm ? `${pm[1]}/${pm[2]}${pm[3] === "bias" ? "/bias" : ""}` : name;
      grads.set(key, sim.empty(shape, "f32", "weightGrads"));
      sim.empty(shape, "f32", "moments");
      sim.empty(shape, "f32", "moments");
    }
  }

  // GpuAdapters.init: per layer, per target: A[r,in], B[out,r], their AdamW m, v, then dA, dB.
  const slots = new Map<string, Slot>();
  for (let l = 0; l < L; l++) {
    for (const proj of s.lora.targets) {
      const [N, K] = projectionShape(config, proj);
      const A = sim.empty([s.lora.r, K], "f32", "adapters");
      const B = sim.empty([N, s.lora.r], "f32", "adapters");
      for (const t of [A, B]) {
        sim.empty(t.shape, "f32", "moments");
        sim.empty(t.shape, "f32", "moments");
      }
      sim.empty(A.shape, "f32", "gradients");
      sim.empty(B.shape, "f32", "gradients");
      slots.set(`${l}/${proj}`, { A, B });
    }
  }
  sim.empty([hd / 2, 4], "f32", "batch"); // ropeTable: the frequencies
  return {
    config,
    act: wd,
    weights,
    quantized,
    slots,
    head,
    dropout: s.lora.dropout,
    grads,
    docsChunked:
      s.batchRows * s.seqLen * SPLIT_ELEMENT_BYTES > Math.floor(sim.limits.maxBindingBytes / 4) * 4,
  };
}

/**
 * The frozen W[out,in] of a projection. A 4-bit one is dequantized into a pooled temporary in the
 * weight dtype while its matmul runs (one at a time), freed by `done`.
 */
function useWeight(
  sim: Replay,
  m: Model,
  layer: number,
  proj: Projection,
): { W: SimTensor; done: () => void } {
  const key = `${layer}/${proj}`;
  const shape = m.quantized.get(key);
  if (shape === undefined) return { W: m.weights.get(key)!, done: () => {} };
  const deq = sim.empty(shape, m.act, "dequant");
  return { W: deq, done: () => sim.free(deq) };
}

/** layer.ts `project`: y = x·Wᵀ (+ LoRA, its xa recorded), into `out` when given. */
function project(
  sim: Replay,
  m: Model,
  layer: number,
  proj: Projection,
  x: SimTensor,
  xa: Map<Projection, SimTensor>,
  dropout: boolean,
  out?: SimTensor,
): SimTensor {
  const { W, done } = useWeight(sim, m, layer, proj);
  const slot = m.slots.get(`${layer}/${proj}`);
  let y: SimTensor;
  if (slot === undefined) {
    y = matmul(sim, x, W, "NT", { out, outDtype: m.act, kind: "activations" });
  } else {
    // loraForward: z = dropout(x) f32, xa[T,r] = z·Aᵀ f32, then y = x·Wᵀ + s·xa·Bᵀ.
    const z = dropout ? sim.empty(x.shape, "f32", "dropout") : x;
    const a = matmul(sim, z, slot.A, "NT", { outDtype: "f32", kind: "activations" });
    if (z !== x) sim.free(z);
    y = matmul(sim, x, W, "NT", { out, outDtype: m.act, kind: "activations" });
    xa.set(proj, a);
  }
  done();
  return y;
}

/** layer.ts `projectBackward`: dx (+)= dy·W (+ the adapter's term), dA, dB into the gradients. */
function projectBackward(
  sim: Replay,
  m: Model,
  layer: number,
  proj: Projection,
  dy: SimTensor,
  x: SimTensor | null,
  xa: SimTensor | undefined,
  dx: SimTensor | null,
  dropout: boolean,
): void {
  const g = m.grads?.get(`${layer}/${proj}`);
  if (g !== undefined) {
    // layer.ts weightGrads: dW += dyᵀ·x; db += 1[1,T]·dy with a ones[1,T] f32 row.
    if (x === null) throw new Error(`memory plan: the input of layer ${layer}'s ${proj} was not kept`);
    matmul(sim, dy, x, "TN", { out: g });
    const gb = m.grads!.get(`${layer}/${proj}/bias`);
    if (gb !== undefined) {
      const ones = sim.empty([1, dy.shape[0]], "f32", "layerGrads");
      sim.free(ones);
    }
  }
  const slot = m.slots.get(`${layer}/${proj}`);
  if (slot === undefined) {
    if (dx === null) return;
    const { W, done } = useWeight(sim, m, layer, proj);
    matmul(sim, dy, W, "NN", { out: dx });
    done();
    return;
  }
  if (x === null) throw new Error(`memory plan: the input of layer ${layer}'s ${proj} was not kept`);
  const { W, done } = dx === null ? { W: null, done: () => {} } : useWeight(sim, m, layer, proj);
  // loraBackward: dB += s·dyᵀ·xa; dxa = s·dy·B; z = dropout(x); dA += dxaᵀ·z; dx (+)= dy·W + dxa·A.
  matmul(sim, dy, xa!, "TN", { out: slot.B }); // dB has B's shape and chunks
  const dxa = matmul(sim, dy, slot.B, "NN", { outDtype: "f32", kind: "layerGrads" });
  const z = dropout ? sim.empty(x.shape, "f32", "dropout") : x;
  matmul(sim, dxa, z, "TN", { out: slot.A }); // dA likewise
  if (W !== null && dx !== null) matmul(sim, dy, W, "NN", { out: dx });
  // dz = dxa·A (K = r: never split) goes into z's scratch with dropout, or into dx.
  if (z !== x) sim.free(z);
  sim.free(dxa);
  done();
}

/** layer.ts `normed`: rmsnorm of the f32 stream, cast to the activation dtype. */
function normed(sim: Replay, m: Model, h: SimTensor): { x: SimTensor; rstd: SimTensor } {
  const T = h.shape[0];
  const y = sim.empty(h.shape, "f32", "activations");
  const rstd = sim.empty([T], "f32", "activations");
  if (m.act === "f32") return { x: y, rstd };
  const x = sim.empty(h.shape, m.act, "activations");
  sim.free(y);
  return { x, rstd };
}

interface Acts {
  all: SimTensor[];
  x1: SimTensor;
  x2: SimTensor;
  q: SimTensor;
  k: SimTensor;
  v: SimTensor;
  attn: SimTensor;
  lse: SimTensor;
  hMid: SimTensor;
  g: SimTensor;
  u: SimTensor;
  m: SimTensor | null;
  xa: Map<Projection, SimTensor>;
}

/** layer.ts `layerForward` in mode "output", "keep" or "recompute". */
function layerForward(
  sim: Replay,
  m: Model,
  layer: number,
  hIn: SimTensor,
  mode: "output" | "keep" | "recompute",
  dropout: boolean,
): { hOut: SimTensor | null; acts: Acts | null } {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd } = m.config;
  const T = hIn.shape[0];
  const xa = new Map<Projection, SimTensor>();
  const n1 = normed(sim, m, hIn);
  const qLin = project(sim, m, layer, "q_proj", n1.x, xa, dropout);
  const kLin = project(sim, m, layer, "k_proj", n1.x, xa, dropout);
  const vLin = project(sim, m, layer, "v_proj", n1.x, xa, dropout);
  const q = sim.empty([T, H, hd], m.act, "activations"); // rope
  const k = sim.empty([T, Hkv, hd], m.act, "activations");
  const v = sim.view(vLin);
  sim.free(qLin);
  sim.free(kLin);
  sim.free(vLin);
  const attn = sim.empty([T, H, hd], m.act, "activations");
  const lse = sim.empty([T, H], "f32", "activations");
  const attn2 = sim.view(attn);
  const hMid = sim.empty(hIn.shape, "f32", "activations"); // copy of hIn
  project(sim, m, layer, "o_proj", { ...attn2, shape: [T, H * hd] }, xa, dropout, hMid);
  sim.free(attn2);
  const n2 = normed(sim, m, hMid);
  const g = project(sim, m, layer, "gate_proj", n2.x, xa, dropout);
  const u = project(sim, m, layer, "up_proj", n2.x, xa, dropout);
  // m is kept only for down_proj's adapter (or its dW); a recompute without one does not compute it.
  const slot = m.slots.get(`${layer}/down_proj`);
  const keepM = slot !== undefined || m.grads !== null;
  let mm: SimTensor | null = mode === "recompute" && !keepM ? null : sim.empty(g.shape, m.act, "activations"); // swiglu
  let hOut: SimTensor | null = null;
  if (mode === "recompute") {
    if (slot !== undefined) {
      // adapterInput: xa = dropout(m)·Aᵀ alone; the frozen product is not needed.
      const z = dropout ? sim.empty(mm!.shape, "f32", "dropout") : mm!;
      xa.set("down_proj", matmul(sim, z, slot.A, "NT", { outDtype: "f32", kind: "activations" }));
      if (z !== mm) sim.free(z);
    }
  } else {
    hOut = sim.empty(hMid.shape, "f32", "inputs"); // copy of hMid
    project(sim, m, layer, "down_proj", mm!, xa, dropout, hOut);
    if (!keepM) {
      sim.free(mm);
      mm = null;
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
    ...(mm ? [mm] : []),
    ...xa.values(),
  ];
  if (mode === "output") {
    all.forEach((t) => sim.free(t));
    return { hOut, acts: null };
  }
  return { hOut, acts: { all, x1: n1.x, x2: n2.x, q, k, v, attn, lse, hMid, g, u, m: mm, xa } };
}

/** layer.ts `layerBackward`: dh at hOut becomes dh at hIn (in place); dA, dB added. */
function layerBackward(
  sim: Replay,
  m: Model,
  layer: number,
  a: Acts,
  dh: SimTensor,
  inputGrad: boolean,
  dropout: boolean,
): void {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd, hiddenSize: D, intermediateSize: F } = m.config;
  const T = a.x1.shape[0];
  const f32 = (shape: number[]) => sim.empty(shape, "f32", "layerGrads");

  sim.at("backward", `backward of layer ${layer}: MLP`);
  const dm = f32([T, F]);
  projectBackward(sim, m, layer, "down_proj", dh, a.m, a.xa.get("down_proj"), dm, dropout);
  if (a.m) sim.freeEarly(a.m);
  // swigluBackward writes dg over dm and reads g, u in the activation dtype: only du is new.
  const dg = dm;
  const du = f32([T, F]);
  sim.freeEarly(a.g);
  sim.freeEarly(a.u);
  const dx2 = f32([T, D]);
  projectBackward(sim, m, layer, "gate_proj", dg, a.x2, a.xa.get("gate_proj"), dx2, dropout);
  projectBackward(sim, m, layer, "up_proj", du, a.x2, a.xa.get("up_proj"), dx2, dropout);
  sim.free(dg);
  sim.free(du);
  sim.free(dx2);

  sim.at("backward", `backward of layer ${layer}: attention`);
  const dAttn = f32([T, H * hd]);
  projectBackward(
    sim,
    m,
    layer,
    "o_proj",
    dh,
    { ...a.attn, shape: [T, H * hd] },
    a.xa.get("o_proj"),
    dAttn,
    dropout,
  );
  // attentionBackward: dq, dk, dv f32, then stats[T,H,2] f32 (chunked as q when anything is split).
  const dq = f32([T, H, hd]);
  const dk = f32([T, Hkv, hd]);
  const dv = f32([T, Hkv, hd]);
  const anyChunked = m.docsChunked ||
    [dAttn, a.q, a.k, a.v, a.attn, a.lse, dq, dk, dv].some((t) => t.chunks.length > 1);
  const stats = sim.empty(
    [T, H, 2],
    "f32",
    "attention",
    anyChunked && a.q.chunks.length > 1 ? a.q.chunks[0].rows * H * 8 : undefined,
  );
  sim.free(stats);
  sim.free(dAttn);
  const dqLin = f32([T, H * hd]); // rope backward
  const dkLin = f32([T, Hkv * hd]);
  const dvLin = sim.view(dv);
  sim.free(dq);
  sim.free(dk);
  sim.free(dv);
  const dx1 = inputGrad ? f32([T, D]) : null;
  projectBackward(sim, m, layer, "q_proj", dqLin, a.x1, a.xa.get("q_proj"), dx1, dropout);
  projectBackward(sim, m, layer, "k_proj", dkLin, a.x1, a.xa.get("k_proj"), dx1, dropout);
  projectBackward(
    sim,
    m,
    layer,
    "v_proj",
    { ...dvLin, shape: [T, Hkv * hd] },
    a.x1,
    a.xa.get("v_proj"),
    dx1,
    dropout,
  );
  sim.free(dqLin);
  sim.free(dkLin);
  sim.free(dvLin);
  sim.free(dx1);
}

/** cross_entropy.ts `crossEntropyChunk` with the default 64 MiB of logits. */
function vocabularyChunk(limits: MemoryLimits, T: number, V: number): number {
  const t = Math.max(1, T);
  const bindRows = Math.floor(limits.maxBindingBytes / (4 * t));
  const budget = 64 * 1024 * 1024;
  let chunk: number;
  if (4 * t * V <= budget) chunk = V;
  else {
    chunk = Math.min(Math.floor(budget / (4 * t)), 32768);
    chunk = Math.max(256, Math.floor(chunk / 256) * 256);
  }
  return Math.min(chunk, V, bindRows);
}

/** Vocabulary chunks [v0, v0 + C), cut at W's row chunks. */
function* vocabularyChunks(W: SimTensor, chunk: number): Generator<{ v0: number; C: number }> {
  for (const c of W.chunks) {
    const end = c.rowStart + c.rows;
    for (let v0 = c.rowStart; v0 < end; v0 += chunk) yield { v0, C: Math.min(chunk, end - v0) };
  }
}

/** graph.ts `#run` with training, then `optimizerStep`. */
function trainingStep(
  sim: Replay,
  m: Model,
  B: number,
  S: number,
  checkpointing: boolean,
  offload: boolean,
): void {
  const { hiddenSize: D, numLayers: L, vocabSize: V } = m.config;
  const T = B * S;
  const dropout = m.dropout > 0;
  sim.at("forward", "forward: embedding");
  const positions = sim.empty([T], "u32", "batch");
  const docs = sim.empty([T], "u32", "batch");
  const targets = sim.empty([T], "i32", "batch");
  const ids = sim.empty([T], "u32", "batch");
  const hs: SimTensor[] = [sim.empty([T, D], "f32", "inputs")];
  sim.free(ids);
  const saved: (Acts | null)[] = [];
  for (let l = 0; l < L; l++) {
    sim.at("forward", `forward of layer ${l}`);
    const r = layerForward(sim, m, l, hs[l], checkpointing ? "output" : "keep", dropout);
    hs.push(r.hOut!);
    saved.push(r.acts);
    if (offload) sim.free(hs[l]); // copied to host memory, written back before its backward
  }

  // The loss: x = rmsnorm(h_L), then cross-entropy a vocabulary chunk of f32 logits at a time.
  sim.at("loss", "loss forward");
  const x = sim.empty([T, D], "f32", "loss");
  const rstd = sim.empty([T], "f32", "loss");
  const loss = sim.empty([1], "f32", "loss");
  const lse = sim.empty([T], "f32", "loss");
  const correct = sim.empty([1], "u32", "loss");
  const state = sim.empty([T, 4], "f32", "loss");
  const chunk = vocabularyChunk(sim.limits, T, V);
  for (const { v0, C } of vocabularyChunks(m.head, chunk)) {
    const z = sim.empty([T, C], "f32", "loss");
    matmul(sim, x, m.head, "NT", { out: z, bRows: { start: v0, count: C } });
    sim.free(z);
  }
  sim.free(state);
  sim.at("loss", "loss backward");
  const ceDh = sim.empty([T, D], "f32", "loss");
  if (m.grads === null) {
    for (const { v0, C } of vocabularyChunks(m.head, chunk)) {
      const z = sim.empty([T, C], "f32", "loss");
      matmul(sim, x, m.head, "NT", { out: z, bRows: { start: v0, count: C } });
      matmul(sim, z, m.head, "NN", { out: ceDh, bRows: { start: v0, count: C } });
      sim.free(z);
    }
  } else {
    // ops/lm_head_grad.ts with dh: per chunk the logit gradient dz[T,C], dh += dz·W, part[C,D] = dzᵀ·x
    // added into lm_head's (or the tied table's) gradient rows.
    const fullChunk = lmHeadChunk(sim.limits, T, D, m.head.shape[0]);
    for (const { v0, C } of vocabularyChunks(m.head, fullChunk)) {
      const z = sim.empty([T, C], "f32", "loss");
      matmul(sim, x, m.head, "NT", { out: z, bRows: { start: v0, count: C } });
      matmul(sim, z, m.head, "NN", { out: ceDh, bRows: { start: v0, count: C } });
      const part = matmul(sim, z, x, "TN", { outDtype: "f32", kind: "loss" });
      sim.free(part);
      sim.free(z);
    }
  }
  const dh = sim.empty([T, D], "f32", "layerGrads"); // the final norm's input gradient
  sim.free(ceDh);
  sim.free(hs[L]);
  sim.freeEarly(x); // graph.ts frees the loss's input and rstd before the layers' backward
  sim.freeEarly(rstd);

  for (let l = L - 1; l >= 0; l--) {
    if (offload) hs[l] = sim.empty([T, D], "f32", "inputs");
    let acts = saved[l];
    if (acts === null) {
      sim.at("backward", `recompute of layer ${l}`);
      acts = layerForward(sim, m, l, hs[l], "recompute", dropout).acts!;
    }
    layerBackward(sim, m, l, acts, dh, l > 0 || m.grads !== null, dropout);
    acts.all.forEach((t) => sim.free(t));
    saved[l] = null;
    sim.free(hs[l]);
  }
  sim.free(dh);
  for (const t of [x, rstd, lse, loss, correct, positions, docs, targets]) sim.free(t);

  // optimizerStep: the gradient norm's [2] and its per-block partials (4096 elements a block), AdamW in place.
  sim.at("optimizer", "optimizer step");
  let blocks = 0;
  const width = (t: SimTensor) => t.shape.slice(1).reduce((a, b) => a * b, 1);
  for (const s of m.slots.values()) {
    for (const t of [s.A, s.B]) for (const c of t.chunks) blocks += Math.ceil((c.rows * width(t)) / 4096);
  }
  for (const t of m.grads?.values() ?? []) {
    for (const c of t.chunks) blocks += Math.ceil((c.rows * width(t)) / 4096);
  }
  const norm = sim.empty([2], "f32", "optimizer");
  sim.free(sim.empty([Math.max(1, blocks)], "f32", "optimizer"));
  sim.free(norm);
}

function resolveSettings(config: ModelConfig, s: TrainingMemorySettings): MemoryPlan["settings"] {
  for (const [name, v] of [["batchRows", s.batchRows], ["seqLen", s.seqLen], ["lora.r", s.lora.r]] as const) {
    if (!Number.isInteger(v) || v <= 0) planError(`${name} "${v}" must be a positive integer`);
  }
  if (s.dtype !== "f16" && s.dtype !== "f32") planError(`dtype "${s.dtype}" is not "f16" or "f32"`);
  const dropout = s.lora.dropout ?? 0.05;
  if (!(dropout >= 0 && dropout < 1)) planError(`lora.dropout "${dropout}" is not in [0, 1)`);
  for (const t of s.lora.targets) {
    if (!(PROJECTIONS as readonly string[]).includes(t)) planError(`LoRA target "${t}" is not a projection`);
  }
  const targets = PROJECTIONS.filter((p) => s.lora.targets.includes(p));
  const full = s.full ?? false;
  if (targets.length === 0 && !full) planError("LoRA targets are empty");
  if (targets.length > 0 && full) planError("full fine-tuning takes no LoRA targets");
  const quantization = s.quantization === undefined ? quantizationFromConfig(config) : s.quantization;
  if (quantization !== null) {
    const bs = quantization.blocksize;
    if (!Number.isInteger(bs) || bs <= 0) planError(`blocksize "${bs}" must be a positive integer`);
  }
  return {
    batchRows: s.batchRows,
    seqLen: s.seqLen,
    gradientCheckpointing: s.gradientCheckpointing,
    offloadLayerInputs: s.gradientCheckpointing && (s.offloadLayerInputs ?? false),
    dtype: s.dtype,
    lora: { r: s.lora.r, targets, dropout },
    quantization,
    full,
  };
}

/**
 * The peak GPU memory of one training step of the webgpu backend, broken down by what is alive at
 * the peak. See the module documentation for what it counts and how.
 *
 * @param config the model's config.json (`loadModelConfig`); its `quantizationConfig` gives the
 *   4-bit settings unless `settings.quantization` says otherwise
 * @param limits the adapter's binding limit and kind ({@link memoryLimits} of a `Gpu`)
 * @example
 * ```ts
 * const plan = planTrainingMemory(config, {
 *   batchRows: 1, seqLen: 2048, gradientCheckpointing: true, dtype: "f16",
 *   lora: { r: 16, targets: ["q_proj", "v_proj"], dropout: 0.05 },
 * }, memoryLimits(await getGpu()));
 * console.log(formatMemoryPlan(plan));
 * ```
 * @throws {RangeError} for settings that cannot run (sizes, targets, a quantization lathe does not train on).
 */
export function planTrainingMemory(
  config: ModelConfig,
  settings: TrainingMemorySettings,
  limits: MemoryLimits,
): MemoryPlan {
  const s = resolveSettings(config, settings);
  if (!(limits.maxBindingBytes >= 4)) planError(`maxBindingBytes "${limits.maxBindingBytes}" is below 4`);
  const sim = new Replay(limits);
  sim.at("resident", "loading");
  const model = loadModel(sim, config, s);
  const resident = sim.live;
  trainingStep(sim, model, s.batchRows, s.seqLen, s.gradientCheckpointing, s.offloadLayerInputs);
  if (sim.live !== resident) {
    throw new Error(`memory plan: the step leaves ${sim.live - resident} bytes alive`);
  }

  const peak = sim.peakBytes;
  const parts: MemoryPart[] = [];
  const maxNote = (kind: Kind): string | undefined => {
    const m = sim.maxBytes.get(kind);
    return m && m.bytes > (peak.get(kind) ?? 0)
      ? `largest ${formatBytes(m.bytes)}, in the ${m.at}`
      : undefined;
  };
  const notes = partNotes(config, s, model);
  for (const kind of Object.keys(KINDS) as Kind[]) {
    const bytes = peak.get(kind) ?? 0;
    const extra = maxNote(kind);
    if (bytes === 0 && extra === undefined && !(kind in notes)) continue;
    const note = [notes[kind], extra].filter((n) => n !== undefined).join("; ");
    parts.push({ name: KINDS[kind], bytes, ...(note ? { note } : {}) });
  }
  parts.push({
    name: ROUNDING,
    bytes: sim.peakRounding,
    note: "bucket sizes over tensor sizes (kernels/tensor.ts bucketSize)",
  });
  const phases = ["forward", "loss", "backward", "optimizer"].map((name) => ({
    name,
    bytes: sim.phasePeaks.get(name) ?? 0,
  }));
  const workspaces =
    (["activations", "layerGrads", "dropout", "attention", "loss", "splitK", "dequant"] as Kind[])
      .map((kind) => ({
        name: KINDS[kind],
        bytes: sim.maxBytes.get(kind)?.bytes ?? 0,
        ...(sim.maxBytes.has(kind) ? { note: `in the ${sim.maxBytes.get(kind)!.at}` } : {}),
      }));
  return {
    total: sim.peak,
    parts,
    resident,
    peakAt: sim.peakAt,
    phases,
    workspaces,
    model: config,
    settings: s,
    limits: { ...limits },
  };
}

/**
 * ops/lm_head_grad.ts `lmHeadWeightGradChunk` with its defaults: all of V when dz[T,C] and part[C,D]
 * fit 32 MiB together, else the largest multiple of 256 (256 to 32768) that does, within a binding.
 */
function lmHeadChunk(limits: MemoryLimits, T: number, D: number, V: number): number {
  const bindRows = Math.min(
    Math.floor(limits.maxBindingBytes / (4 * T)),
    Math.floor(limits.maxBindingBytes / (4 * D)),
  );
  const budget = 32 * 2 ** 20, rowBytes = 4 * (T + D);
  let chunk = V;
  if (rowBytes * V > budget) {
    chunk = Math.min(Math.floor(budget / rowBytes), 32768);
    chunk = Math.max(256, Math.floor(chunk / 256) * 256);
  }
  return Math.min(chunk, V, bindRows);
}

/** Shapes and formulas of the resident lines. */
function partNotes(config: ModelConfig, s: MemoryPlan["settings"], m: Model): Partial<Record<Kind, string>> {
  const { numLayers: L } = config;
  const q = s.quantization;
  const nq = m.quantized.size;
  const total = L * PROJECTIONS.length;
  const proj = q === null || nq === 0
    ? `${total} ${s.dtype} matrices`
    : `${nq} ${q.quantType.toUpperCase()} (codes n/2, absmax ${
      q.doubleQuant ? "1 byte + nested" : "4 bytes"
    } per ${q.blocksize})` + (nq < total ? `, ${total - nq} skipped ones in ${s.dtype}` : "");
  const adapters = s.lora.targets.length * L;
  return {
    projections: proj,
    embeddings: `[${config.vocabSize},${config.hiddenSize}] ${s.dtype}${
      config.tieWordEmbeddings ? ", tied" : " ×2"
    }`,
    adapters: `${adapters} adapters, r ${s.lora.r}, f32`,
    ...(s.full
      ? {
        masters: s.dtype === "f16"
          ? "every weight in f32, beside its f16 compute copy"
          : "the f32 weights themselves",
        weightGrads: "every weight's, f32",
        moments: "every weight's exp_avg and exp_avg_sq, f32",
      }
      : {}),
    inputs: `h_0..h_L f32 [T,D], h_l freed after layer l's backward`,
    activations: s.gradientCheckpointing
      ? "one layer's, recomputed before its backward"
      : "every layer's, kept",
  };
}

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/** Bytes as GiB (≥ 1 GiB), MiB (≥ 1 MiB), KiB or B, with 2 decimals. */
export function formatBytes(bytes: number): string {
  if (bytes >= GiB) return `${(bytes / GiB).toFixed(2)} GiB`;
  if (bytes >= MiB) return `${(bytes / MiB).toFixed(2)} MiB`;
  if (bytes >= 1024) return `${(bytes / 1024).toFixed(2)} KiB`;
  return `${bytes} B`;
}

/**
 * A plan as a table: the settings, one line per part alive at the peak, the total, and the peak of
 * each phase.
 *
 * @example
 * ```ts
 * console.log(formatMemoryPlan(planTrainingMemory(config, settings, limits)));
 * ```
 */
export function formatMemoryPlan(plan: MemoryPlan): string {
  const s = plan.settings;
  const q = s.quantization;
  const c = plan.model;
  const head = [
    `Peak GPU memory of one training step: ${formatBytes(plan.total)} (at the ${plan.peakAt})`,
    `  ${c.architecture} D ${c.hiddenSize}, L ${c.numLayers}, F ${c.intermediateSize}, V ${c.vocabSize}; ` +
    `T = ${s.batchRows}·${s.seqLen}, ${s.dtype}, checkpointing ${
      s.gradientCheckpointing ? (s.offloadLayerInputs ? "on, layer inputs in host memory" : "on") : "off"
    }, ` +
    `LoRA r ${s.lora.r} on ${s.lora.targets.join(", ")}, dropout ${s.lora.dropout}` +
    (q
      ? `; ${q.quantType.toUpperCase()}${q.doubleQuant ? " double quant" : ""}, blocksize ${q.blocksize}`
      : ""),
    `  binding limit ${formatBytes(plan.limits.maxBindingBytes)}, ${
      plan.limits.software ? "software" : "GPU"
    } adapter`,
  ];
  const width = Math.max(...plan.parts.map((p) => p.name.length), 10);
  const line = (name: string, bytes: number, note = "") =>
    `  ${name.padEnd(width)}  ${formatBytes(bytes).padStart(11)}${note ? `  ${note}` : ""}`;
  return [
    ...head,
    ...plan.parts.map((p) => line(p.name, p.bytes, p.note)),
    line("total", plan.total),
    `  resident between steps ${formatBytes(plan.resident)}; phase peaks: ` +
    plan.phases.map((p) => `${p.name} ${formatBytes(p.bytes)}`).join(", "),
  ].join("\n");
}

/**
 * What would make the step fit `availableBytes`: each change alone with its planned peak, then all
 * of them together; an empty list when the plan fits already. Changes: gradient checkpointing on,
 * fewer rows per micro-batch (the largest that fits; raise gradient_accumulation_steps to keep the
 * step's tokens), a shorter sequence (halvings), f16, a 4-bit base (NF4, double quantization), a
 * lower rank.
 *
 * @param settings the plan's settings (default: those the plan was made with)
 * @example
 * ```ts
 * for (const line of fitAdvice(plan, 8 * 2 ** 30)) console.log(line);
 * ```
 */
export function fitAdvice(
  plan: MemoryPlan,
  availableBytes: number,
  settings: TrainingMemorySettings = plan.settings,
): string[] {
  if (plan.total <= availableBytes) return [];
  const base = {
    ...settings,
    quantization: settings.quantization === undefined ? plan.settings.quantization : settings.quantization,
  };
  const planWith = (change: Partial<TrainingMemorySettings>) =>
    planTrainingMemory(plan.model, { ...base, ...change }, plan.limits).total;
  const verdict = (bytes: number) =>
    `${formatBytes(bytes)} (${
      bytes <= availableBytes ? "fits" : `still ${formatBytes(bytes - availableBytes)} over`
    })`;
  const out: string[] = [
    `The step needs ${formatBytes(plan.total)}, ${formatBytes(plan.total - availableBytes)} more than the ` +
    `${formatBytes(availableBytes)} available.`,
  ];
  if (plan.resident > availableBytes) {
    out.push(
      `The weights and adapter state alone take ${formatBytes(plan.resident)}: no micro-batch size helps ` +
        "without a smaller base.",
    );
  }
  // Every change that helps, applied together at the end.
  const all: Partial<TrainingMemorySettings> = {};
  const allNames: string[] = [];
  if (!base.gradientCheckpointing) {
    out.push(`gradient_checkpointing: true -> ${verdict(planWith({ gradientCheckpointing: true }))}`);
    all.gradientCheckpointing = true;
    allNames.push("gradient_checkpointing");
  }
  if (base.gradientCheckpointing && !base.offloadLayerInputs) {
    out.push(`offload_layer_inputs: true -> ${verdict(planWith({ offloadLayerInputs: true }))}`);
    all.offloadLayerInputs = true;
    allNames.push("offload_layer_inputs");
  }
  if (base.dtype === "f32") {
    out.push(`dtype f16 (needs shader-f16) -> ${verdict(planWith({ dtype: "f16" }))}`);
    all.dtype = "f16";
    allNames.push("f16");
  }
  if (base.quantization === null) {
    const nf4 = { quantType: "nf4", doubleQuant: true, blocksize: 64, skipModules: ["lm_head"] } as const;
    out.push(
      `a 4-bit base (the quantize step: NF4, double quant) -> ${verdict(planWith({ quantization: nf4 }))}`,
    );
    all.quantization = nf4;
    allNames.push("a 4-bit base");
  }
  if (base.batchRows > 1) {
    let rows = base.batchRows - 1;
    while (rows > 1 && planWith({ batchRows: rows }) > availableBytes) rows--;
    const bytes = planWith({ batchRows: rows });
    const factor = base.batchRows / rows;
    out.push(
      `per_device_train_batch_size: ${rows} -> ${verdict(bytes)}` +
        (bytes > availableBytes
          ? ""
          : Number.isInteger(factor)
          ? `; gradient_accumulation_steps ×${factor} keeps the step's rows`
          : "; raise gradient_accumulation_steps to keep the step's rows"),
    );
    all.batchRows = 1;
    allNames.push("per_device_train_batch_size 1");
  }
  for (let seq = Math.floor(base.seqLen / 2); seq >= 64; seq = Math.floor(seq / 2)) {
    const bytes = planWith({ seqLen: seq });
    if (bytes <= availableBytes || seq < 128) {
      out.push(`seq_len: ${seq} -> ${verdict(bytes)}`);
      break;
    }
  }
  if (base.lora.r > 1) {
    const r = Math.max(1, Math.floor(base.lora.r / 2));
    out.push(`lora.r: ${r} -> ${verdict(planWith({ lora: { ...base.lora, r } }))}`);
  }
  if (allNames.length > 1) out.push(`${allNames.join(" + ")} -> ${verdict(planWith(all))}`);
  return out;
}
