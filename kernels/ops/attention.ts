/**
 * Causal grouped-query attention on the GPU, flash-style: forward (out and the log-sum-exp per
 * query) and backward (dq, dk, dv), with an optional sliding window and per-document masks for
 * packed rows. Memory is linear in the sequence length: scores live only as tiles in workgroup
 * memory. The kernels are described in attention_wgsl.ts; this file is the only place their
 * tile sizes are chosen.
 *
 * B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads (divides H),
 * hd = head dim (a multiple of 4), W = sliding window.
 * Tensors: q[T,H,hd], k[T,Hkv,hd], v[T,Hkv,hd], out[T,H,hd], lse[T,H] (f32), docs[T] (u32/i32).
 * Query i of a row attends key j of the same row iff j <= i, j > i − W (when W is set) and
 * docs[i] == docs[j] (when docs are given); head h reads kv head ⌊h·Hkv / H⌋.
 *
 * Any of the tensors may be split into row chunks (tensors beyond the storage binding limit). Tokens are
 * then cut into spans at every chunk boundary of the tensors read per query (q, out, lse, dout, dq,
 * docs) and per key (k, v, dk, dv, docs), and each kernel runs once per (query span, key span) pair
 * that holds an allowed pair, binding only the chunks holding the two spans; attention_wgsl.ts has the
 * math that carries the forward's softmax state and the gradient sums across dispatches. With no tensor
 * split, each kernel runs once over whole buffers, as the variant without chunks.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel, type Kernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor, type TensorChunk } from "../tensor.ts";
import {
  ATTENTION_STATS_WORKGROUP,
  ATTENTION_UNIFORM_BYTES,
  attentionBindingNames,
  type AttentionChunks,
  attentionChunkUniformBytes,
  attentionChunkUniforms,
  attentionDkdvWgsl,
  attentionDqWgsl,
  type AttentionFloat,
  attentionForwardWgsl,
  type AttentionKernel,
  attentionRegisters,
  attentionSharedBytes,
  attentionStatsWgsl,
  attentionThreads,
  type AttentionTile,
  type AttentionTileFloats,
  attentionUniforms,
  type BackwardVariant,
  checkAttentionTile,
  type ChunkDispatch,
  type DocDType,
  type ForwardVariant,
} from "./attention_wgsl.ts";

export type { AttentionFloat, AttentionKernel, AttentionTile, AttentionTileFloats };

/** Masks and sizes shared by the forward and the backward. */
export interface AttentionMaskOptions {
  /** Tokens per row S (T = B·S); default T (one row). */
  S?: number;
  /** Sliding window W: key j is allowed for query i iff j > i − W; null or absent: none. */
  window?: number | null;
  /** docs[T]: document id per token (u32 or i32); a query attends keys of its own document only. */
  docs?: Tensor | null;
  /** Score scale (default 1/sqrt(hd)). */
  scale?: number;
  /** Tile overrides per kernel (default: {@link chooseAttentionTile} for this adapter). */
  tiles?: Partial<Record<AttentionKernel, AttentionTile>>;
}

/** Options of {@link attentionForward}. */
export interface AttentionForwardOptions extends AttentionMaskOptions {
  /** Output out[T,H,hd] (written `=`); created when absent. */
  out?: Tensor;
  /** Output lse[T,H] f32 (written `=`); created when absent. */
  lse?: Tensor;
  /** dtype of a created `out` (default: q's dtype). */
  outDtype?: AttentionFloat;
}

/** Options of {@link attentionBackward}. */
export interface AttentionBackwardOptions extends AttentionMaskOptions {
  /** Outputs (written `=`); created when absent. */
  dq?: Tensor;
  dk?: Tensor;
  dv?: Tensor;
  /** dtype of created gradients (default f32). */
  gradDtype?: AttentionFloat;
}

/** Tile sides tried: powers of two. */
const TILE_SIZES = [64, 32, 16, 8, 4, 2] as const;
/** Threads per row group tried: powers of two up to 16 (they must divide hd/4). */
const TPRS = [16, 8, 4, 2, 1] as const;
/** Rows per thread tried. */
const RPTS = [8, 4, 2, 1] as const;
/** Invocations per workgroup at most (WebGPU's default limit). */
const MAX_THREADS = 256;

/**
 * Workgroup memory the GL backend is first asked to fit, in bytes. Naga's GLSL output
 * zero-initialises workgroup memory, and llvmpipe's GL compile time grows about quadratically
 * with its size (measured: 1 K words ≈ 5 s, 4 K words ≈ 2 min per kernel), so GL gets small tiles.
 */
const GL_STORAGE_BYTES = 2048;

/**
 * Per adapter kind: the fewest invocations a workgroup should have (a GPU needs several warps per
 * workgroup; a CPU adapter one SIMD vector of 8 lanes), the most f32 values a thread keeps live
 * ({@link attentionRegisters}: a GPU's register file, a CPU adapter's stack), the largest score block
 * RPT × Bc/TPR (unrolled code: a CPU adapter's LLVM compile time grows steeply with it), and what one
 * barrier costs per invocation, in units of one workgroup-memory load (a CPU adapter switches
 * coroutines). The CPU figures were measured on lavapipe (bench/attention.ts, `--tiles`); the GPU ones
 * are the register and occupancy budget of the matmul's tiles, not yet measured for attention.
 */
const ADAPTER_RULES = {
  gpu: { minThreads: 128, maxRegisters: 128, maxBlock: 32, barrier: 2 },
  cpu: { minThreads: 8, maxRegisters: 160, maxBlock: 16, barrier: 16 },
} as const;

/**
 * Estimated cost of a tile per (query, key) pair, in workgroup-memory loads of one f32: the score
 * block's loads (hd·(TPR/cols + 1/RPT) per product), the accumulation's (TPR + hd/RPT per product),
 * the global-to-workgroup copies, the p / ds and row-max traffic, and the barriers.
 */
export function attentionTileCost(
  kernel: AttentionKernel,
  hd: number,
  tile: Required<AttentionTile>,
  barrier: number,
): number {
  const { BR, BC, TPR, RPT } = tile;
  const threads = attentionThreads(kernel, tile);
  switch (kernel) {
    case "forward":
      return hd * TPR / BC + hd / RPT + (TPR + hd / RPT) + 4 * hd / BR + TPR * (1 + TPR) / BC + 2 +
        4 * barrier * threads / (BR * BC);
    case "dq":
      return 2 * (hd * TPR / BC + hd / RPT) + (TPR + hd / RPT) + 4 * hd / BR + 1 +
        3 * barrier * threads / (BR * BC);
    case "dkdv":
      return 2 * (hd * TPR / BR + hd / RPT) + 2 * (TPR + hd / RPT) + 4 * hd / BC + 2 +
        3 * barrier * threads / (BR * BC);
  }
}

/**
 * The tile of one attention kernel for head dim `hd` on this adapter: among the tiles whose sides are
 * powers of two ≤ 64, TPR ≤ 16 and RPT ≤ 8 that satisfy the template's rules, the adapter's invocation
 * limit (at most 256) and the workgroup memory budget, and keep a thread's live values and invocation
 * count within the adapter kind's rules ({@link ADAPTER_RULES}), the one of least
 * {@link attentionTileCost}. The budget is the adapter's limit, or on the GL backend
 * {@link GL_STORAGE_BYTES}, doubled until a tile fits. `floats` are the workgroup storage types of the
 * q, k, v, dout tiles (an f16 tile takes half the bytes; a string sets all four); `software` overrides the
 * adapter kind.
 *
 * @example
 * ```ts
 * chooseAttentionTile(gpu, "forward", 128, { storageBytes: 16384, floats: "f16" });
 * ```
 * @throws {RangeError} when hd is not a multiple of 4 or no tile fits the adapter's limits.
 */
export function chooseAttentionTile(
  gpu: Gpu,
  kernel: AttentionKernel,
  hd: number,
  limits: {
    storageBytes?: number;
    threads?: number;
    floats?: AttentionFloat | AttentionTileFloats;
    software?: boolean;
  } = {},
): Required<AttentionTile> {
  if (!Number.isInteger(hd) || hd <= 0 || hd % 4 !== 0) {
    throw new RangeError(`Cannot run attention with head dim ${hd}: it must be a positive multiple of 4`);
  }
  const storage = limits.storageBytes ?? gpu.limits.maxComputeWorkgroupStorageSize;
  const threads = Math.min(
    limits.threads ?? MAX_THREADS,
    gpu.limits.maxComputeInvocationsPerWorkgroup,
    gpu.limits.maxComputeWorkgroupSizeX,
  );
  const rules = ADAPTER_RULES[(limits.software ?? gpu.software) ? "cpu" : "gpu"];
  const floats = limits.floats ?? "f32";
  const tiles: Required<AttentionTile>[] = [];
  for (const BR of TILE_SIZES) {
    for (const BC of TILE_SIZES) {
      for (const TPR of TPRS) {
        for (const RPT of RPTS) {
          const tile = { BR, BC, TPR, RPT };
          const [rows, cols] = kernel === "dkdv" ? [BC, BR] : [BR, BC];
          if ((hd / 4) % TPR !== 0 || cols % TPR !== 0 || rows % RPT !== 0) continue;
          if (attentionThreads(kernel, tile) > threads) continue;
          tiles.push(tile);
        }
      }
    }
  }
  // The rules on invocations and live values are relaxed (in that order) where no tile meets them.
  const best = (budget: number): Required<AttentionTile> | null => {
    for (const strict of [2, 1, 0]) {
      let found: Required<AttentionTile> | null = null;
      let least = Infinity;
      for (const tile of tiles) {
        if (attentionSharedBytes(kernel, hd, tile, floats) > budget) continue;
        if (strict >= 1 && attentionRegisters(kernel, hd, tile) > rules.maxRegisters) continue;
        if (strict >= 1 && tile.RPT * scoreColumns(kernel, tile) > rules.maxBlock) continue;
        if (strict >= 2 && attentionThreads(kernel, tile) < Math.min(rules.minThreads, threads)) continue;
        const cost = attentionTileCost(kernel, hd, tile, rules.barrier);
        if (cost < least) [found, least] = [tile, cost];
      }
      if (found !== null) return found;
    }
    return null;
  };
  const gl = limits.storageBytes === undefined && gpu.info.backend.split(",")[0] === "gl";
  for (let budget = gl ? Math.min(GL_STORAGE_BYTES, storage) : storage; budget <= storage; budget *= 2) {
    const tile = best(budget);
    if (tile !== null) return tile;
    if (budget === storage) break;
    if (budget * 2 > storage) budget = storage / 2;
  }
  throw new RangeError(
    `Cannot run attention ${kernel} with head dim ${hd}: no tile fits ${storage} bytes of workgroup memory`,
  );
}

/** Score-block entries per thread on the TPR-split side: Bc/TPR (forward, dq) or Br/TPR (dkdv). */
function scoreColumns(kernel: AttentionKernel, t: Required<AttentionTile>): number {
  return (kernel === "dkdv" ? t.BR : t.BC) / t.TPR;
}

/** `BRxBC/TPR/RPT`: a tile as kernel labels and benchmarks name it. */
export function attentionTileName(tile: AttentionTile): string {
  return `${tile.BR}x${tile.BC}/${tile.TPR}/${tile.RPT ?? 1}`;
}

/** Shapes and masks of one call, validated. */
interface Problem {
  gpu: Gpu;
  B: number;
  S: number;
  T: number;
  H: number;
  Hkv: number;
  hd: number;
  /** 0: no window. */
  window: number;
  scale: number;
  docs: Tensor | null;
}

function fail(what: string, why: string): never {
  throw new RangeError(`Cannot run ${what}: ${why}`);
}

function floatOf(what: string, t: Tensor, gpu: Gpu): AttentionFloat {
  if (t.gpu !== gpu) fail(what, `"${t.label}" belongs to a different device`);
  if (t.dtype !== "f32" && t.dtype !== "f16") {
    fail(what, `"${t.label}" has dtype ${t.dtype}; f32 or f16 expected`);
  }
  if (t.dtype === "f16" && !gpu.f16) fail(what, `"${t.label}" is f16 but this adapter has no shader-f16`);
  return t.dtype;
}

function expectShape(what: string, t: Tensor, shape: number[]): void {
  if (t.shape.join() !== shape.join()) fail(what, `"${t.label}" has shape [${t.shape}], expected [${shape}]`);
}

function problem(what: string, q: Tensor, k: Tensor, v: Tensor, options: AttentionMaskOptions): Problem {
  const gpu = q.gpu;
  if (q.shape.length !== 3) fail(what, `q "${q.label}" must be [T,H,hd], got [${q.shape}]`);
  const [T, H, hd] = q.shape;
  if (k.shape.length !== 3) fail(what, `k "${k.label}" must be [T,Hkv,hd], got [${k.shape}]`);
  const Hkv = k.shape[1];
  expectShape(what, k, [T, Hkv, hd]);
  expectShape(what, v, [T, Hkv, hd]);
  if (Hkv === 0 || H % Hkv !== 0) fail(what, `H "${H}" is not a multiple of Hkv "${Hkv}"`);
  if (hd % 4 !== 0) fail(what, `head dim "${hd}" is not a multiple of 4`);
  const S = options.S ?? T;
  if (!Number.isInteger(S) || S <= 0 || T % S !== 0) fail(what, `S "${S}" does not divide T "${T}"`);
  const window = options.window ?? null;
  if (window !== null && (!Number.isInteger(window) || window <= 0)) {
    fail(what, `window "${window}" must be a positive integer`);
  }
  const docs = options.docs ?? null;
  if (docs !== null) {
    if (docs.dtype !== "u32" && docs.dtype !== "i32") fail(what, `docs "${docs.label}" must be u32 or i32`);
    expectShape(what, docs, [T]);
  }
  const B = T / S;
  const maxGroups = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (B > maxGroups || H > maxGroups) fail(what, `B "${B}" or H "${H}" exceeds ${maxGroups} workgroups`);
  return {
    gpu,
    B,
    S,
    T,
    H,
    Hkv,
    hd,
    // A window of S or more masks nothing: dropping it keeps j + W within u32.
    window: window === null || window >= S ? 0 : window,
    scale: options.scale ?? 1 / Math.sqrt(hd),
    docs,
  };
}

function tileFor(
  p: Problem,
  kernel: AttentionKernel,
  options: AttentionMaskOptions,
  floats: AttentionTileFloats,
): Required<AttentionTile> {
  const given = options.tiles?.[kernel];
  const tile = given === undefined
    ? chooseAttentionTile(p.gpu, kernel, p.hd, { floats })
    : { ...given, RPT: given.RPT ?? 1 };
  checkAttentionTile(kernel, p.hd, tile);
  const limits = p.gpu.limits;
  if (
    attentionThreads(kernel, tile) >
      Math.min(limits.maxComputeInvocationsPerWorkgroup, limits.maxComputeWorkgroupSizeX) ||
    attentionSharedBytes(kernel, p.hd, tile, floats) > limits.maxComputeWorkgroupStorageSize
  ) {
    throw new RangeError(
      `Cannot run attention ${kernel} with tile ${JSON.stringify(tile)}: it exceeds this adapter's limits`,
    );
  }
  return tile;
}

function output(
  what: string,
  gpu: Gpu,
  given: Tensor | undefined,
  shape: number[],
  dtype: AttentionFloat,
  label: string,
): Tensor {
  if (given === undefined) return Tensor.empty(gpu, shape, dtype, { label });
  expectShape(what, given, shape);
  floatOf(what, given, gpu);
  return given;
}

function uniforms(p: Problem, n = 0): Uint32Array {
  return attentionUniforms({ S: p.S, H: p.H, Hkv: p.Hkv, window: p.window, scale: p.scale, n });
}

/** The chunking of a call: null when no tensor of it is split (whole-tensor kernels), else how docs is bound. */
function chunkingOf(tensors: readonly Tensor[], docs: Tensor | null): AttentionChunks | null {
  if (!tensors.some((t) => t.chunked) && !docs?.chunked) return null;
  return { splitDocs: docs?.chunked ?? false };
}

/**
 * Whether this adapter's kernels keep their inner loops rolled: on CPU adapters, where that halves
 * compile time at the same speed (see `attentionLoopBound` in attention_wgsl.ts).
 */
function rolledLoops(gpu: Gpu): boolean {
  return gpu.software;
}

/** Kernel parameters naming a chunked variant (none for whole tensors, so their labels stay as they are). */
function chunkParams(chunks: AttentionChunks | null): Record<string, string> {
  return chunks === null ? {} : { chunks: chunks.splitDocs ? "rows+docs" : "rows" };
}

/** Storage access of each binding of a kernel (its outputs are the `write` ones). */
function accesses(names: readonly string[], outputs: readonly string[]): ("read" | "write")[] {
  return names.map((n) => (outputs.includes(n) ? "write" : "read"));
}

/** Tokens [lo, hi) lying in one chunk of each tensor a span was cut for. */
interface Span {
  lo: number;
  hi: number;
  /** The chunk of each tensor that holds the span. */
  chunk: Map<Tensor, TensorChunk>;
}

/** Cuts tokens [0, T) at every chunk boundary of `tensors` (nulls skipped). */
function spans(T: number, tensors: readonly (Tensor | null)[]): Span[] {
  const list = tensors.filter((t): t is Tensor => t !== null);
  const cuts = new Set([0, T]);
  for (const t of list) for (const c of t.chunks) cuts.add(c.rowStart);
  const sorted = [...cuts].sort((a, b) => a - b);
  const out: Span[] = [];
  for (let i = 0; i + 1 < sorted.length; i++) {
    const lo = sorted[i];
    const chunk = new Map(
      list.map((t) => [t, t.chunks.find((c) => lo >= c.rowStart && lo < c.rowStart + c.rows)!]),
    );
    out.push({ lo, hi: sorted[i + 1], chunk });
  }
  return out;
}

/**
 * Queries of span qs that may attend a key of span ks. Query τ of row b attends keys
 * [max(bS, τ + 1 − W), τ]; they meet [ka, kb) iff τ ≥ ka, b ≤ ⌊(kb − 1)/S⌋ and (with a window)
 * τ < kb + W − 1: one token range.
 */
function queriesSeeing(p: Problem, qs: Span, ks: Span): [number, number] {
  let hi = Math.min(qs.hi, (Math.floor((ks.hi - 1) / p.S) + 1) * p.S);
  if (p.window !== 0) hi = Math.min(hi, ks.hi + p.window - 1);
  return [Math.max(qs.lo, ks.lo), hi];
}

/**
 * Keys of span ks that a query of span qs may attend. Key κ of row b is attended by queries
 * [κ, min((b + 1)S − 1, κ + W − 1)]; they meet [qa, qb) iff κ < qb, b ≥ ⌊qa/S⌋ and (with a
 * window) κ > qa − W.
 */
function keysSeen(p: Problem, ks: Span, qs: Span): [number, number] {
  let lo = Math.max(ks.lo, Math.floor(qs.lo / p.S) * p.S);
  if (p.window !== 0) lo = Math.max(lo, qs.lo - p.window + 1);
  return [lo, Math.min(ks.hi, qs.hi)];
}

/**
 * Grid of the row-aligned tiles of `size` tokens that hold tokens [lo, hi): rows row0.. on z, tiles
 * tile0.. of each row on x (all tiles of a row when the range spans rows; the kernel skips the others).
 */
function tileGrid(
  S: number,
  lo: number,
  hi: number,
  size: number,
): { row0: number; tile0: number; x: number; z: number } {
  const row0 = Math.floor(lo / S);
  const row1 = Math.floor((hi - 1) / S);
  if (row0 !== row1) return { row0, tile0: 0, x: Math.ceil(S / size), z: row1 - row0 + 1 };
  const tile0 = Math.floor((lo - row0 * S) / size);
  return { row0, tile0, x: Math.floor((hi - 1 - row0 * S) / size) - tile0 + 1, z: 1 };
}

/** Binds the named chunks in binding order and records one dispatch of a chunked variant. */
function dispatchChunks(
  p: Problem,
  kernel: Kernel,
  names: readonly string[],
  bound: Record<string, TensorChunk | undefined>,
  d: ChunkDispatch,
  workgroups: [number, number, number?],
  n = 0,
): void {
  const chunks = names.map((name) => bound[name]!);
  const u = attentionChunkUniforms(
    { S: p.S, H: p.H, Hkv: p.Hkv, window: p.window, scale: p.scale, n },
    d,
    chunks.map((c) => c.rowStart),
  );
  recorder(p.gpu).dispatch(kernel, chunks.map((c) => c.buffer), u, workgroups);
}

/** Bound chunks of the document ids: DOC (one chunk of an unsplit docs) or DOCQ and DOCK. */
function docChunks(p: Problem, qs: Span, ks: Span): Record<string, TensorChunk | undefined> {
  if (p.docs === null) return {};
  return { DOC: qs.chunk.get(p.docs), DOCQ: qs.chunk.get(p.docs), DOCK: ks.chunk.get(p.docs) };
}

/** A chunked kernel must fit the adapter's storage buffers per shader stage (dkdv with split docs binds 9). */
function checkBindings(what: string, p: Problem, kernel: string, names: readonly string[]): void {
  const max = p.gpu.limits.maxStorageBuffersPerShaderStage;
  if (names.length > max) {
    fail(
      what,
      `its ${kernel} kernel on row chunks binds ${names.length} storage buffers and this adapter allows ${max} ` +
        `per shader stage (docs split into chunks adds one; keep docs in one buffer)`,
    );
  }
}

/**
 * out = softmax(scale·q·kᵀ + mask)·v per head, and lse = log Σ_j exp(scale·q·k_j) over the allowed
 * keys, both per query. Inputs f32 or f16 (f16 needs shader-f16); accumulation f32. Any tensor may
 * be split into row chunks (see the module documentation).
 *
 * @example
 * ```ts
 * // 2 packed rows of 128 tokens, 8 query heads sharing 2 kv heads, Mistral-style window
 * const { out, lse } = attentionForward(q, k, v, { S: 128, window: 4096, docs });
 * ```
 */
export function attentionForward(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  options: AttentionForwardOptions = {},
): { out: Tensor; lse: Tensor } {
  const what = "attention forward";
  const p = problem(what, q, k, v, options);
  const { gpu, T, H, hd } = p;
  const inputs = { q: floatOf(what, q, gpu), k: floatOf(what, k, gpu), v: floatOf(what, v, gpu) };
  const variant: ForwardVariant = {
    hd,
    tile: tileFor(p, "forward", options, inputs),
    ...inputs,
    out: options.out?.dtype as AttentionFloat | undefined ?? options.outDtype ?? (q.dtype as AttentionFloat),
    docs: p.docs?.dtype as DocDType | undefined ?? null,
    rolled: rolledLoops(gpu),
  };
  const out = output(what, gpu, options.out, [T, H, hd], variant.out, "attention_out");
  const lse = options.lse ?? Tensor.empty(gpu, [T, H], "f32", { label: "attention_lse" });
  expectShape(what, lse, [T, H]);
  if (lse.dtype !== "f32") fail(what, `lse "${lse.label}" must be f32`);
  const chunks = chunkingOf([q, k, v, out, lse], p.docs);
  variant.chunks = chunks;
  const names = attentionBindingNames("forward", p.docs !== null, chunks);
  if (chunks !== null) checkBindings(what, p, "forward", names);
  const { BR } = variant.tile;
  const kernel = getKernel(gpu, {
    name: "attention_forward",
    params: {
      hd,
      tile: attentionTileName(variant.tile),
      dtypes: `${variant.q}${variant.k}${variant.v}${variant.out}`,
      docs: variant.docs ?? "none",
      ...chunkParams(chunks),
      ...(variant.rolled ? { loops: "rolled" } : {}),
    },
    code: () => attentionForwardWgsl(variant),
    bindings: accesses(names, ["O", "LSE"]),
    uniformBytes: chunks === null ? ATTENTION_UNIFORM_BYTES : attentionChunkUniformBytes(names.length),
  });
  if (chunks === null) {
    const buffers = [
      q.buffer,
      k.buffer,
      v.buffer,
      ...(p.docs ? [p.docs.buffer] : []),
      out.buffer,
      lse.buffer,
    ];
    recorder(gpu).dispatch(kernel, buffers, uniforms(p), [Math.ceil(p.S / BR), H, p.B]);
    return { out, lse };
  }
  // Per query span, key spans in increasing order: each query starts fresh in the span holding the
  // first key its position allows, max(row start, τ + 1 − W), and continues from (out, lse) in later ones.
  for (const qs of spans(T, [q, out, lse, p.docs])) {
    for (const ks of spans(T, [k, v, p.docs])) {
      const [lo, hi] = queriesSeeing(p, qs, ks);
      if (lo >= hi) continue;
      const g = tileGrid(p.S, lo, hi, BR);
      const bound = {
        Q: qs.chunk.get(q),
        K: ks.chunk.get(k),
        V: ks.chunk.get(v),
        O: qs.chunk.get(out),
        LSE: qs.chunk.get(lse),
        ...docChunks(p, qs, ks),
      };
      const d = { row0: g.row0, tile0: g.tile0, qLo: lo, qHi: hi, kLo: ks.lo, kHi: ks.hi };
      dispatchChunks(p, kernel, names, bound, d, [g.x, H, g.z]);
    }
  }
  return { out, lse };
}

/**
 * Gradients of {@link attentionForward}, FlashAttention-2 style: D = rowsum(dout ⊙ out), then dq
 * (one workgroup per query tile) and dk, dv (one workgroup per key tile and kv head, summing the
 * query heads that share it). `out` and `lse` are the forward's; the masks must be the same. Any
 * tensor may be split into row chunks: dq then sums over key spans and dk, dv over query spans.
 *
 * @example
 * ```ts
 * const { out, lse } = attentionForward(q, k, v, { S });
 * const { dq, dk, dv } = attentionBackward(dout, q, k, v, out, lse, { S });
 * ```
 */
export function attentionBackward(
  dout: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  options: AttentionBackwardOptions = {},
): { dq: Tensor; dk: Tensor; dv: Tensor } {
  const what = "attention backward";
  const p = problem(what, q, k, v, options);
  const { gpu, T, H, Hkv, hd } = p;
  expectShape(what, dout, [T, H, hd]);
  expectShape(what, out, [T, H, hd]);
  expectShape(what, lse, [T, H]);
  if (lse.dtype !== "f32") fail(what, `lse "${lse.label}" must be f32`);
  const grad = options.gradDtype ?? "f32";
  const dtypes = {
    q: floatOf(what, q, gpu),
    k: floatOf(what, k, gpu),
    v: floatOf(what, v, gpu),
    dout: floatOf(what, dout, gpu),
  };
  const outDtype = floatOf(what, out, gpu);
  const dq = output(
    what,
    gpu,
    options.dq,
    [T, H, hd],
    options.dq?.dtype as AttentionFloat ?? grad,
    "attention_dq",
  );
  const dk = output(
    what,
    gpu,
    options.dk,
    [T, Hkv, hd],
    options.dk?.dtype as AttentionFloat ?? grad,
    "attention_dk",
  );
  const dv = output(
    what,
    gpu,
    options.dv,
    [T, Hkv, hd],
    options.dv?.dtype as AttentionFloat ?? grad,
    "attention_dv",
  );
  if (dk.dtype !== dv.dtype) fail(what, `dk "${dk.label}" and dv "${dv.label}" must have the same dtype`);
  const docs = p.docs?.dtype as DocDType | undefined ?? null;
  const chunks = chunkingOf([dout, q, k, v, out, lse, dq, dk, dv], p.docs);
  const rec = recorder(gpu);
  const u = uniforms(p, T * H);

  // stats[T,H] = (lse, D): one f32 pair per query row, read by both gradient kernels. With q split,
  // its chunks hold the same tokens as q's (8·H bytes a token against q's 2·H·hd or more).
  const stats = Tensor.empty(gpu, [T, H, 2], "f32", {
    label: "attention_stats",
    ...(chunks !== null && q.chunked ? { maxChunkBytes: q.chunks[0].rows * H * 8 } : {}),
  });
  const statsNames = attentionBindingNames("stats", false);
  const statsKernel = getKernel(gpu, {
    name: "attention_stats",
    params: { hd, dtypes: `${dtypes.dout}${outDtype}`, ...chunkParams(chunks) },
    code: () => attentionStatsWgsl({ hd, dout: dtypes.dout, out: outDtype, chunked: chunks !== null }),
    bindings: accesses(statsNames, ["STATS"]),
    uniformBytes: chunks === null ? ATTENTION_UNIFORM_BYTES : attentionChunkUniformBytes(statsNames.length),
  });
  if (chunks === null) {
    rec.dispatch(statsKernel, [dout.buffer, out.buffer, lse.buffer, stats.buffer], u, groups(gpu, T * H));
  } else {
    for (const s of spans(T, [dout, out, lse, stats])) {
      const n = (s.hi - s.lo) * H;
      const bound = {
        DO: s.chunk.get(dout),
        O: s.chunk.get(out),
        LSE: s.chunk.get(lse),
        STATS: s.chunk.get(stats),
      };
      const d = { row0: 0, tile0: 0, qLo: s.lo, qHi: s.hi, kLo: 0, kHi: 0 };
      dispatchChunks(p, statsKernel, statsNames, bound, d, groups(gpu, n), n);
    }
  }

  const base = `${dtypes.q}${dtypes.k}${dtypes.v}${dtypes.dout}`;
  // One backward kernel: its variant (tile by kind, gradient dtype) and its compiled pipeline.
  const backwardKernel = (
    kind: "dq" | "dkdv",
    grad: Tensor,
    code: (v: BackwardVariant) => string,
    outputs: string[],
  ) => {
    const variant: BackwardVariant = {
      hd,
      tile: tileFor(p, kind, options, dtypes),
      ...dtypes,
      grad: grad.dtype as AttentionFloat,
      docs,
      chunks,
      rolled: rolledLoops(gpu),
    };
    const names = attentionBindingNames(kind, docs !== null, chunks);
    if (chunks !== null) checkBindings(what, p, kind, names);
    const kernel = getKernel(gpu, {
      name: `attention_${kind}`,
      params: {
        hd,
        tile: attentionTileName(variant.tile),
        dtypes: `${base}${variant.grad}`,
        docs: docs ?? "none",
        ...chunkParams(chunks),
        ...(variant.rolled ? { loops: "rolled" } : {}),
      },
      code: () => code(variant),
      bindings: accesses(names, outputs),
      uniformBytes: chunks === null ? ATTENTION_UNIFORM_BYTES : attentionChunkUniformBytes(names.length),
    });
    return { kernel, tile: variant.tile, names };
  };
  const dqPass = backwardKernel("dq", dq, attentionDqWgsl, ["DQ"]);
  const kvPass = backwardKernel("dkdv", dk, attentionDkdvWgsl, ["DK", "DV"]);
  if (chunks === null) {
    const inputs = [
      q.buffer,
      k.buffer,
      v.buffer,
      dout.buffer,
      stats.buffer,
      ...(p.docs ? [p.docs.buffer] : []),
    ];
    rec.dispatch(dqPass.kernel, [...inputs, dq.buffer], u, [Math.ceil(p.S / dqPass.tile.BR), H, p.B]);
    rec.dispatch(kvPass.kernel, [...inputs, dk.buffer, dv.buffer], u, [
      Math.ceil(p.S / kvPass.tile.BC),
      Hkv,
      p.B,
    ]);
  } else {
    const querySide = [q, dout, stats, p.docs];
    const keySide = [k, v, p.docs];
    const bind = (qs: Span, ks: Span) => ({
      Q: qs.chunk.get(q),
      K: ks.chunk.get(k),
      V: ks.chunk.get(v),
      DO: qs.chunk.get(dout),
      STATS: qs.chunk.get(stats),
      DQ: qs.chunk.get(dq),
      DK: ks.chunk.get(dk),
      DV: ks.chunk.get(dv),
      ...docChunks(p, qs, ks),
    });
    // dq = Σ over key spans (increasing): `=` in the span where the forward starts fresh, then `+=`.
    const keySpans = spans(T, keySide);
    for (const qs of spans(T, [...querySide, dq])) {
      for (const ks of keySpans) {
        const [lo, hi] = queriesSeeing(p, qs, ks);
        if (lo >= hi) continue;
        const g = tileGrid(p.S, lo, hi, dqPass.tile.BR);
        const d = { row0: g.row0, tile0: g.tile0, qLo: lo, qHi: hi, kLo: ks.lo, kHi: ks.hi };
        dispatchChunks(p, dqPass.kernel, dqPass.names, bind(qs, ks), d, [g.x, H, g.z]);
      }
    }
    // dk, dv = Σ over query spans (increasing): `=` in the span holding the key itself, then `+=`.
    const querySpans = spans(T, querySide);
    for (const ks of spans(T, [...keySide, dk, dv])) {
      for (const qs of querySpans) {
        const [lo, hi] = keysSeen(p, ks, qs);
        if (lo >= hi) continue;
        const g = tileGrid(p.S, lo, hi, kvPass.tile.BC);
        const d = { row0: g.row0, tile0: g.tile0, qLo: qs.lo, qHi: qs.hi, kLo: lo, kHi: hi };
        dispatchChunks(p, kvPass.kernel, kvPass.names, bind(qs, ks), d, [g.x, Hkv, g.z]);
      }
    }
  }
  stats.destroy(); // back to the pool; the recorded dispatches still use it
  return { dq, dk, dv };
}

/** Workgroups of the stats kernel for `rows` = T·H: x up to the per-dimension limit, then y. */
function groups(gpu: Gpu, rows: number): [number, number] {
  const total = Math.ceil(rows / ATTENTION_STATS_WORKGROUP);
  const max = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (total <= max) return [total, 1];
  const y = Math.ceil(total / max);
  return [Math.ceil(total / y), y];
}
