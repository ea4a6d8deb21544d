/**
 * Matrix products on the GPU: `matmul` (tiled, register-blocked; f32 and f16 inputs with f32
 * accumulation) and `matmulNaive` (one invocation per output, f32; the readable baseline).
 *
 * M, N, K as in C[M,N] = op(A)[M,K]·op(B)[K,N]; Bt = batch. Layouts:
 *   NN: a[M,K]  · b[K,N]      NT: a[M,K] · b[N,K]ᵀ (x·Wᵀ, W[out,in])      TN: a[K,M]ᵀ · b[K,N] (dYᵀ·X)
 * With a leading batch dimension on `a` (and optionally `b`), each of the Bt products is
 * computed; a rank-2 `b` is shared by all of them. Operands split into row chunks (weights
 * larger than the storage binding limit) are handled by splitting the product: chunks along
 * M or N write disjoint parts of C, chunks along K accumulate. `aRows`/`bRows` take a range of
 * a rank-2 operand's rows in place of the whole operand (e.g. rows v0..v0+Vc of an lm_head
 * W[V,D]): the range is read where it lies, through the kernels' element offsets, never copied.
 * `lowRank` adds scale·a·op(b) of a second, short operand pair in the same accumulator (NN and
 * NT): the LoRA term of a projection (y = x·Wᵀ + s·xa·Bᵀ, dx = dy·W + dxa·A) without a second
 * pass over C.
 *
 * The kernel and tile of a product come from, in order: `options.config`; the adapter's
 * tuning table (`matmul_table.ts`, written by `deno task bench tune`); the built-in heuristic
 * {@link chooseConfig}. All tiles of a kernel family give the same bits (see
 * `matmul_wgsl.ts`), and split-K depends on the shape and the adapter kind only, never on the
 * tile, so neither the table nor the heuristic changes a result.
 * This file is the only place the matmul tile sizes are written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel, type Kernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor, type TensorChunk } from "../tensor.ts";
import { tunedConfig } from "./matmul_table.ts";
import {
  type FloatDType,
  type LowRankVariant,
  MATMUL_LOWRANK_UNIFORM_BYTES,
  MATMUL_UNIFORM_BYTES,
  type MatmulConfig,
  type MatmulDirectTile,
  matmulDirectWgsl,
  type MatmulLayout,
  type MatmulOperands,
  type MatmulShape,
  type MatmulTile,
  type MatmulUniformParams,
  matmulUniforms,
  matmulWgsl,
  SPLITK_UNIFORM_BYTES,
  SPLITK_WORKGROUP,
  type SplitKReduceVariant,
  splitKReduceWgsl,
  tileStorageBytes,
  tileThreads,
} from "./matmul_wgsl.ts";

export type {
  FloatDType,
  MatmulConfig,
  MatmulDirectTile,
  MatmulLayout,
  MatmulOperands,
  MatmulShape,
  MatmulTile,
};

/** Options of {@link matmul} and {@link matmulNaive}. */
export interface MatmulOptions {
  /** Operand layout (default `"NN"`). */
  layout?: MatmulLayout;
  /** Scale of the product (default 1). */
  alpha?: number;
  /** Add to `out` instead of overwriting it (needs `out`). */
  accumulate?: boolean;
  /** bias[N], added to every row (once, before accumulation into `out`). */
  bias?: Tensor;
  /** Output tensor [M,N] or [Bt,M,N]; created when absent. */
  out?: Tensor;
  /** dtype of a created output (default: f16 when both inputs are f16, else f32). */
  outDtype?: FloatDType;
  /** Label of a created output. */
  label?: string;
  /** Kernel and tile sizes (default: the adapter's tuning table, else {@link chooseConfig}). */
  config?: MatmulConfig;
  /**
   * Number of K ranges computed in parallel and summed afterwards (split-K); default: chosen
   * on GPUs from the shape alone for products with few output tiles and a long K, 1 on CPU
   * adapters. It changes the summation order, so it is never taken from the tuning table.
   */
  splitK?: number;
  /**
   * Rows [start, start + count) of A's first dimension (M for NN and NT, K for TN) stand for A:
   * the product is that of a copy of those rows, read in place. A must have rank 2 and the rows
   * must lie within one of its row chunks.
   */
  aRows?: RowRange;
  /**
   * Rows [start, start + count) of B's first dimension (N for NT, K for NN and TN) stand for B:
   * the product is that of a copy of those rows, read in place. B must have rank 2 and the rows
   * must lie within one of its row chunks.
   */
  bRows?: RowRange;
  /**
   * A low-rank term added in the same accumulator: C = alpha·op(A)·op(B) + scale·a·op(b)
   * (+ bias) (+ C), for layouts NN and NT of unbatched products. Both operands f32, whole (not
   * split into row chunks), with `a` [M,r] and `b` [N,r] for NT (y = x·Wᵀ + s·xa·Bᵀ) or [r,N]
   * for NN (dx = dy·W + dxa·A). The term is summed after op(A)·op(B), once per element of C
   * whatever the row chunks of A, B and C; alpha must not be 0 (the kernel scales a by
   * scale/alpha).
   */
  lowRank?: LowRank;
}

/** The low-rank term of {@link MatmulOptions.lowRank}. */
export interface LowRank {
  /** a[M,r], f32. */
  a: Tensor;
  /** b[N,r] (NT) or b[r,N] (NN), f32. */
  b: Tensor;
  /** The term's scale (s of the LoRA term; 1 for dx). */
  scale: number;
}

/** Rows [start, start + count) of a tensor's first dimension. */
export interface RowRange {
  start: number;
  count: number;
}

/** Tiles of the heuristic: with DIRECT_TILES and the spaces below, the only place tile sizes are written. */
export const MATMUL_TILES = {
  /** 64×64 tile, 4×4 per thread, 256 threads: the default for discrete GPUs. */
  gpu64: { BM: 64, BN: 64, BK: 16, TM: 4, TN: 4 },
  /** 128×128 tile, 8×8 per thread, 256 threads: large products on discrete GPUs. */
  gpu128: { BM: 128, BN: 128, BK: 8, TM: 8, TN: 8 },
  /** 32×32 tile for small products (more workgroups to fill the device). */
  small: { BM: 32, BN: 32, BK: 16, TM: 4, TN: 4 },
} as const satisfies Record<string, MatmulTile>;

/**
 * Register blocks of the direct kernel (CPU adapters). Its speed grows with the block (loads
 * per multiply-add fall as 1/TM + 1/TN) and so does the CPU adapter's compile time: on
 * lavapipe 16×16 runs ~1.3× faster than 8×8 but compiles in 1–5 s instead of 0.2–0.7 s, so
 * it is kept for products large enough to repay that (bench/matmul.ts measures both).
 */
export const DIRECT_TILES = {
  /** Large products: 256 multiply-adds per 8 vec4 loads per K step. */
  large: { TM: 16, TN: 16, WG: 8 },
  /** Everything else: fast to compile. */
  medium: { TM: 8, TN: 8, WG: 8 },
  /** Few rows (M ≤ 4, e.g. one token): 4 rows, wide in N. */
  rows4: { TM: 4, TN: 16, WG: 8 },
} as const satisfies Record<string, MatmulDirectTile>;

/**
 * The tiles the tuner times on GPUs: every combination that fits the template's rules
 * (TM | BM, TN | BN) with TX·TY = (BN/TN)·(BM/TM) threads in [minThreads, maxThreads], within
 * the adapter's limits; with f16 operands each also with `f16Tiles`. The bounds keep the space
 * small: fewer than 64 threads leave too few warps to hide memory latency, and 256 is WebGPU's
 * default invocation limit (the 128×128 tile with 8×8 blocks already uses it).
 */
export const TILE_SPACE = {
  BM: [32, 64, 128],
  BN: [32, 64, 128],
  BK: [8, 16, 32],
  TM: [4, 8],
  TN: [4, 8],
  minThreads: 64,
  maxThreads: 256,
} as const;

/** The register blocks the tuner times on CPU adapters (compile time grows with TM·TN). */
export const DIRECT_SPACE = {
  TM: [4, 8, 16],
  TN: [8, 16],
  WG: [8],
} as const;

/**
 * Every config of this adapter's kernel family that fits its limits for these operand dtypes:
 * tiled tiles of {@link TILE_SPACE} on GPUs, direct blocks of {@link DIRECT_SPACE} on CPU
 * adapters. The order is fixed (BM, BN, TM, TN, BK, then f16Tiles), so ties resolve alike.
 *
 * @example
 * ```ts
 * const configs = matmulCandidates(gpu, { a: "f16", b: "f16" });
 * console.log(configs.length, configs.map(configName));
 * ```
 */
export function matmulCandidates(gpu: Gpu, operands: MatmulOperands): MatmulConfig[] {
  const out: MatmulConfig[] = [];
  if (gpu.software) {
    for (const TM of DIRECT_SPACE.TM) {
      for (const TN of DIRECT_SPACE.TN) {
        for (const WG of DIRECT_SPACE.WG) {
          const config: MatmulConfig = { kind: "direct", tile: { TM, TN, WG } };
          if (configFits(gpu, config, operands) === null) out.push(config);
        }
      }
    }
    return out;
  }
  const halfTiles = gpu.f16 && (operands.a === "f16" || operands.b === "f16") ? [false, true] : [false];
  for (const BM of TILE_SPACE.BM) {
    for (const BN of TILE_SPACE.BN) {
      for (const TM of TILE_SPACE.TM) {
        for (const TN of TILE_SPACE.TN) {
          const threads = (BM / TM) * (BN / TN);
          if (threads < TILE_SPACE.minThreads || threads > TILE_SPACE.maxThreads) continue;
          for (const BK of TILE_SPACE.BK) {
            for (const f16Tiles of halfTiles) {
              const tile: MatmulTile = f16Tiles ? { BM, BN, BK, TM, TN, f16Tiles } : { BM, BN, BK, TM, TN };
              const config: MatmulConfig = { kind: "tiled", tile };
              if (configFits(gpu, config, operands) === null) out.push(config);
            }
          }
        }
      }
    }
  }
  return out;
}

/** A short name of a config: `tiled 128x64x16/8x8` (`h` for f16 tiles), `direct 8x16/8`. */
export function configName(config: MatmulConfig): string {
  if (config.kind === "tiled") {
    const t = config.tile;
    return `tiled ${t.BM}x${t.BN}x${t.BK}/${t.TM}x${t.TN}${t.f16Tiles ? "h" : ""}`;
  }
  const t = config.tile;
  return `direct ${t.TM}x${t.TN}/${t.WG}`;
}

/**
 * Why a config cannot run on this adapter with these operand dtypes (the template's rules,
 * invocations and sizes per workgroup, workgroup storage, f16 tiles without shader-f16), or
 * null when it can.
 */
export function configFits(gpu: Gpu, config: MatmulConfig, operands: MatmulOperands): string | null {
  const limits = gpu.limits;
  if (config.kind === "tiled") {
    const tile = config.tile;
    let grid: { TX: number; TY: number };
    try {
      grid = tileThreads(tile);
    } catch (error) {
      return (error as Error).message;
    }
    if (!(tile.BM > 0 && tile.BN > 0 && tile.BK > 0)) return "tile sizes must be positive";
    const threads = grid.TX * grid.TY;
    if (threads > limits.maxComputeInvocationsPerWorkgroup) {
      return `${threads} invocations exceed this adapter's ${limits.maxComputeInvocationsPerWorkgroup}`;
    }
    if (grid.TX > limits.maxComputeWorkgroupSizeX || grid.TY > limits.maxComputeWorkgroupSizeY) {
      const max = `${limits.maxComputeWorkgroupSizeX}×${limits.maxComputeWorkgroupSizeY}`;
      return `a ${grid.TX}×${grid.TY} workgroup exceeds this adapter's ${max}`;
    }
    if (tile.f16Tiles && !gpu.f16 && (operands.a === "f16" || operands.b === "f16")) {
      return "f16 tiles need shader-f16";
    }
    const bytes = tileStorageBytes(tile, operands.a, operands.b);
    if (bytes > limits.maxComputeWorkgroupStorageSize) {
      const max = limits.maxComputeWorkgroupStorageSize;
      return `${bytes} bytes of workgroup memory exceed this adapter's ${max}`;
    }
    return null;
  }
  const { TM, TN, WG } = config.tile;
  if (![TM, TN, WG].every((x) => Number.isInteger(x) && x > 0) || TM % 4 !== 0 || TN % 4 !== 0) {
    return "TM and TN must be positive multiples of 4";
  }
  if (WG > limits.maxComputeInvocationsPerWorkgroup || WG > limits.maxComputeWorkgroupSizeX) {
    return `${WG} invocations exceed this adapter's limits`;
  }
  return null;
}

/** The heuristic kernel for an M×N product on this adapter (used when no tuned entry exists). */
export function chooseConfig(gpu: Gpu, M: number, N: number): MatmulConfig {
  if (gpu.software) {
    const tile = M <= 4 ? DIRECT_TILES.rows4 : M * N >= 256 * 256 ? DIRECT_TILES.large : DIRECT_TILES.medium;
    return { kind: "direct", tile };
  }
  // 128×128 tiles once there are ≥ 128 of them (H100: 132 SMs; 64×64 tiles win below).
  if (M * N >= 2048 * 1024) return { kind: "tiled", tile: MATMUL_TILES.gpu128 };
  if (M * N <= 256 * 256) return { kind: "tiled", tile: MATMUL_TILES.small };
  return { kind: "tiled", tile: MATMUL_TILES.gpu64 };
}

/** The config {@link matmul} uses for a product, and where it came from. */
export interface MatmulChoice {
  config: MatmulConfig;
  /** `tuned`: the adapter's tuning table; `heuristic`: {@link chooseConfig}. */
  source: "tuned" | "heuristic";
  /** The tuning-table entry used (its shape-class key), when `tuned`. */
  entry?: string;
}

/**
 * The config {@link matmul} uses for a product without `options.config`: the tuning table's
 * entry for its shape class when one exists for this adapter (and fits it, and is of the
 * adapter's kernel family), else the heuristic.
 *
 * @example
 * ```ts
 * const shape = { layout: "NT", a: "f16", b: "f16", M: 2048, N: 4096, K: 4096 } as const;
 * const { config, source } = matmulChoice(gpu, shape);
 * console.log(source, configName(config));
 * ```
 */
export function matmulChoice(gpu: Gpu, shape: MatmulShape): MatmulChoice {
  const heuristic = chooseConfig(gpu, shape.M, shape.N);
  const tuned = tunedConfig(gpu, shape);
  if (
    tuned !== null && tuned.config.kind === heuristic.kind && configFits(gpu, tuned.config, shape) === null
  ) {
    return { config: tuned.config, source: "tuned", entry: tuned.entry };
  }
  return { config: heuristic, source: "heuristic" };
}

interface Problem {
  gpu: Gpu;
  a: Tensor;
  b: Tensor;
  layout: MatmulLayout;
  batch: number;
  M: number;
  N: number;
  K: number;
  bBatched: boolean;
  out: Tensor;
  /** First row of A and of B the product reads (`aRows`/`bRows`; 0 for the whole operand). */
  aRow0: number;
  bRow0: number;
  /** The low-rank term with its rank, checked. */
  lowRank?: LowRank & { r: number };
}

/** The low-rank term as one launch carries it: scale already divided by alpha. */
interface LowRankLaunch {
  a: Tensor;
  b: Tensor;
  r: number;
  scale: number;
}

/** One recorded kernel launch of a product. */
export interface MatmulDispatch {
  kernel: Kernel;
  buffers: GPUBuffer[];
  uniforms: Uint32Array;
  groups: [number, number, number];
}

/**
 * The launches of one product, in order, with the scratch tensors they use (destroy them
 * after the launches are recorded) and the config they run.
 */
export interface MatmulPlan {
  config: MatmulConfig;
  dispatches: MatmulDispatch[];
  scratch: Tensor[];
  out: Tensor;
}

/**
 * C = alpha·op(A)·op(B) (+ bias) (+ C), tiled. Inputs f32 or f16 (f16 needs `gpu.f16`),
 * accumulation in f32.
 *
 * @example
 * ```ts
 * // y[T,out] = x[T,in] · W[out,in]ᵀ + b[out]
 * const y = matmul(x, W, { layout: "NT", bias: b });
 * // z[T,Vc] = h[T,D] · W[v0:v0+Vc, D]ᵀ, W's rows read where they lie
 * const z = matmul(h, W, { layout: "NT", bRows: { start: v0, count: Vc } });
 * ```
 */
export function matmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
  const plan = planMatmul(a, b, options);
  const rec = recorder(a.gpu);
  for (const d of plan.dispatches) rec.dispatch(d.kernel, d.buffers, d.uniforms, d.groups);
  for (const t of plan.scratch) t.destroy(); // back to the pool; the recorded commands run first
  return plan.out;
}

/**
 * The launches {@link matmul} records for a product, without recording them: `matmul` is
 * `planMatmul` followed by recording, and the tuner times the same launches in its own passes.
 * Validates like `matmul` and creates the output when absent.
 */
export function planMatmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): MatmulPlan {
  const p = prepare(a, b, options, "matmul");
  const alpha = options.alpha ?? 1;
  const operands = { a: a.dtype as FloatDType, b: b.dtype as FloatDType };
  const config = options.config ??
    matmulChoice(p.gpu, { layout: p.layout, ...operands, M: p.M, N: p.N, K: p.K }).config;
  const why = configFits(p.gpu, config, operands);
  if (why !== null) {
    throw new RangeError(
      `Cannot run matmul with ${configName(config)} (${JSON.stringify(config.tile)}): ${why}`,
    );
  }
  const plan: MatmulPlan = { config, dispatches: [], scratch: [], out: p.out };
  const bias = options.bias;
  const lowRank: LowRankLaunch | undefined = p.lowRank && { ...p.lowRank, scale: p.lowRank.scale / alpha };
  for (const cell of cells(p, a, b)) {
    const accumulate = (options.accumulate ?? false) || cell.kIndex > 0;
    // The bias and the low-rank term go with the first K range only: added once per element.
    const first = cell.kIndex === 0;
    const cellBias = first ? bias : undefined;
    const cellLowRank = first ? lowRank : undefined;
    const split = p.batch === 1 ? (options.splitK ?? splitCount(p.gpu, cell)) : 1;
    if (split <= 1) {
      plan.dispatches.push(launch(p, config, cell, {
        accumulate,
        bias: cellBias,
        lowRank: cellLowRank,
        alpha,
        batch: p.batch,
        c: p.out.dtype as FloatDType,
      }));
    } else {
      splitK(p, config, cell, split, { accumulate, bias: cellBias, lowRank: cellLowRank, alpha }, plan);
    }
  }
  return plan;
}

/** K ranges of split-K are multiples of this (a multiple of every BK and of 4, for vec4 loads). */
const SPLITK_STEP = 32;

/**
 * How many K ranges to split a product into on a GPU: a product with few output tiles and a
 * long K leaves most of the device idle, each workgroup walking all of K (e.g. the LoRA
 * shapes x[T,D]·A[r,D]ᵀ and dA = dHᵀ·x, with r = 16 columns or rows). Aim for ~2048
 * workgroups of 64×64, each range at least 256 long. Measured on an H100 (NT f32):
 * 16×4096×4096 413 → 118 µs, 512×512×4096 329 → 142 µs, 4096×64×11008 899 → 321 µs; products
 * with K < 1024 gain less than the extra reduction costs, and ≥ 256 tiles already fill the
 * device. The count depends on M, N, K and the adapter kind only: split-K changes the order
 * of the sum, so it must not follow the tile (which the tuning table picks).
 */
function splitCount(gpu: Gpu, cell: Cell): number {
  if (gpu.software || cell.K < 1024) return 1;
  const tiles = Math.ceil(cell.M / 64) * Math.ceil(cell.N / 64);
  if (tiles >= 256) return 1;
  const split = Math.min(Math.ceil(2048 / tiles), Math.floor(cell.K / 256), 64);
  // The partial products must stay small: S·M·N f32 within 64 MiB.
  return split >= 2 && split * cell.M * cell.N * 4 <= 64 * 2 ** 20 ? split : 1;
}

/**
 * Split-K: S partial products over K ranges into P[S,M,N] (f32; the first S−1 ranges as one
 * batched dispatch, the shorter last range alone, with the low-rank term when there is one),
 * then one reduction into C. The ranges are multiples of SPLITK_STEP, the same for every tile.
 */
function splitK(
  p: Problem,
  config: MatmulConfig,
  cell: Cell,
  split: number,
  o: { accumulate: boolean; bias?: Tensor; lowRank?: LowRankLaunch; alpha: number },
  plan: MatmulPlan,
): void {
  const { M, N, K } = cell;
  const kChunk = Math.ceil(K / split / SPLITK_STEP) * SPLITK_STEP;
  const S = Math.ceil(K / kChunk);
  // Element distance between k and k + 1 in A and in B.
  const aStep = p.layout === "TN" ? cell.lda : 1;
  const bStep = p.layout === "NT" ? 1 : cell.ldb;
  const partial = Tensor.empty(p.gpu, [S, M, N], "f32", { label: "matmul_splitk_partial" });
  plan.scratch.push(partial);
  const into = { c: partial.buffer, ldc: N, strideC: M * N, kIndex: 0 };
  if (S > 1) {
    const full = { ...cell, ...into, K: kChunk, cOff: 0, strideA: kChunk * aStep, strideB: kChunk * bStep };
    plan.dispatches.push(launch(p, config, full, { accumulate: false, alpha: 1, batch: S - 1, c: "f32" }));
  }
  const k0 = (S - 1) * kChunk;
  const last = {
    ...cell,
    ...into,
    K: K - k0,
    aOff: cell.aOff + k0 * aStep,
    bOff: cell.bOff + k0 * bStep,
    cOff: (S - 1) * M * N,
  };
  plan.dispatches.push(
    launch(p, config, last, { accumulate: false, lowRank: o.lowRank, alpha: 1, batch: 1, c: "f32" }),
  );

  const variant: SplitKReduceVariant = {
    c: p.out.dtype as FloatDType,
    bias: o.bias ? o.bias.dtype as FloatDType : "none",
    accumulate: o.accumulate,
  };
  const kernel = getKernel(p.gpu, {
    name: "matmul_splitk_reduce",
    params: { c: variant.c, bias: variant.bias, acc: variant.accumulate },
    code: () => splitKReduceWgsl(variant),
    bindings: o.bias ? ["read", "read", "write"] : ["read", "write"],
    uniformBytes: SPLITK_UNIFORM_BYTES,
  });
  const u = new Uint32Array([M, N, S, cell.ldc, cell.cOff, cell.biasOff, 0, 0]);
  new Float32Array(u.buffer)[6] = o.alpha;
  const buffers = o.bias ? [partial.buffer, o.bias.buffer, cell.c] : [partial.buffer, cell.c];
  const groups = Math.ceil((M * N) / SPLITK_WORKGROUP);
  const maxGroups = p.gpu.limits.maxComputeWorkgroupsPerDimension;
  const y = Math.ceil(groups / maxGroups);
  plan.dispatches.push({ kernel, buffers, uniforms: u, groups: [Math.ceil(groups / y), y, 1] });
}

/** The launch of the tiled or direct kernel for one cell. */
function launch(
  p: Problem,
  config: MatmulConfig,
  cell: Cell,
  o: {
    accumulate: boolean;
    bias?: Tensor;
    lowRank?: LowRankLaunch;
    alpha: number;
    batch: number;
    c: FloatDType;
  },
): MatmulDispatch {
  const bias = o.bias;
  const lr = o.lowRank;
  // The low-rank operands, whole tensors: A2[M,r] from row m0, B2 from column (NN) or row (NT) n0.
  const lowRank = lr && {
    r: lr.r,
    scale: lr.scale,
    a2Off: cell.m0 * lr.r,
    b2Off: p.layout === "NT" ? cell.n0 * lr.r : cell.n0,
    ldb2: p.layout === "NT" ? lr.r : p.N,
  };
  const lrVariant: LowRankVariant | undefined = lowRank && {
    vecR: lowRank.r % 4 === 0,
    vecN: p.layout === "NN" && aligned4(p.N, lowRank.b2Off),
  };
  // vec4 access needs the contiguous dimension, leading dimension, offset and batch stride
  // to be multiples of 4.
  const a4 = (p.layout === "TN" ? cell.M : cell.K) % 4 === 0 && aligned4(cell.lda, cell.aOff, cell.strideA);
  const b4 = (p.layout === "NT" ? cell.K : cell.N) % 4 === 0 && aligned4(cell.ldb, cell.bOff, cell.strideB);
  const c4 = cell.N % 4 === 0 && aligned4(cell.ldc, cell.cOff, cell.strideC);
  const dtypes = {
    a: p.a.dtype as FloatDType,
    b: p.b.dtype as FloatDType,
    c: o.c,
    bias: bias ? bias.dtype as FloatDType : "none" as const,
  };
  const common = {
    layout: p.layout,
    ...dtypes,
    accumulate: o.accumulate,
    vecA: a4,
    vecB: b4,
    vecC: c4,
    lowRank: lrVariant,
  };
  const params: Record<string, string | boolean> = {
    layout: p.layout,
    dtypes: `${dtypes.a}${dtypes.b}${dtypes.c}${bias ? dtypes.bias : ""}`,
    acc: o.accumulate,
    vec: `${+a4}${+b4}${+c4}`,
  };
  if (lrVariant) params.lowRank = `${+lrVariant.vecR}${+lrVariant.vecN}`;
  let code: () => string;
  let name: string;
  let groups: [number, number, number];
  if (config.kind === "tiled") {
    // f16 tiles matter only for f16 operands: without one, the f32 variant (one compiled kernel).
    const halves = config.tile.f16Tiles && (dtypes.a === "f16" || dtypes.b === "f16");
    const tile = { ...config.tile, f16Tiles: halves };
    const exact = cell.M % tile.BM === 0 && cell.N % tile.BN === 0 && cell.K % tile.BK === 0;
    const kTail = cell.K % tile.BK !== 0;
    name = "matmul";
    Object.assign(params, {
      exact,
      kTail,
      tile: `${tile.BM}x${tile.BN}x${tile.BK}/${tile.TM}x${tile.TN}${tile.f16Tiles ? "h" : ""}`,
    });
    code = () => matmulWgsl({ ...common, exact, kTail, tile });
    groups = [Math.ceil(cell.N / tile.BN), Math.ceil(cell.M / tile.BM), o.batch];
  } else {
    const tile = config.tile;
    const kExact = cell.K % 4 === 0;
    name = "matmul_direct";
    Object.assign(params, { kExact, tile: `${tile.TM}x${tile.TN}/${tile.WG}` });
    code = () => matmulDirectWgsl({ ...common, kExact, tile });
    groups = [Math.ceil(cell.N / (tile.WG * tile.TN)), Math.ceil(cell.M / tile.TM), o.batch];
  }
  // A, B, BIAS, A2, B2, C: at most 5 storage bindings (GL allows 16 per stage).
  const buffers = [cell.a, cell.b];
  if (bias) buffers.push(bias.buffer);
  if (lr) buffers.push(lr.a.buffer, lr.b.buffer);
  buffers.push(cell.c);
  const kernel = getKernel(p.gpu, {
    name,
    params,
    code,
    bindings: [...buffers.slice(0, -1).map(() => "read" as const), "write"],
    uniformBytes: lowRank ? MATMUL_LOWRANK_UNIFORM_BYTES : MATMUL_UNIFORM_BYTES,
  });
  return { kernel, buffers, uniforms: matmulUniforms({ ...cell, alpha: o.alpha, lowRank }), groups };
}

/**
 * The naive kernel: same contract as {@link matmul} for f32 tensors without row chunks.
 * Kept as the readable baseline for tests and benchmarks.
 */
export function matmulNaive(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
  if (options.lowRank !== undefined) {
    throw new TypeError("Cannot run matmul_naive with a low-rank term: `lowRank` needs `matmul`");
  }
  const p = prepare(a, b, options, "matmul_naive");
  for (const t of [a, b, p.out, options.bias]) {
    if (t === undefined) continue;
    if (t.dtype !== "f32") {
      throw new TypeError(`Cannot run matmul_naive on ${t.dtype} tensor "${t.label}": f32 only`);
    }
    if (t.chunked) {
      throw new RangeError(`Cannot run matmul_naive on "${t.label}": it is split into row chunks`);
    }
  }
  const [cell] = [...cells(p, a, b)];
  if (cell === undefined) return p.out; // M or N is 0
  const kernel = getKernel(p.gpu, {
    name: "matmul_naive",
    code: () => Deno.readTextFileSync(new URL("../wgsl/matmul_naive.wgsl", import.meta.url)),
    bindings: ["read", "read", "read", "write"],
    uniformBytes: MATMUL_UNIFORM_BYTES,
  });
  const u = matmulUniforms({ ...cell, alpha: options.alpha ?? 1 });
  u[14] = { NN: 0, NT: 1, TN: 2 }[p.layout];
  u[15] = (options.accumulate ? 1 : 0) | (options.bias ? 2 : 0);
  // An unused bias binding still needs a buffer: bind A (never read when the flag is off).
  const buffers = [cell.a, cell.b, options.bias?.buffer ?? cell.a, cell.c];
  recorder(p.gpu).dispatch(kernel, buffers, u, [Math.ceil(p.N / 16), Math.ceil(p.M / 16), p.batch]);
  return p.out;
}

/** Validates shapes and dtypes, and creates or checks the output. */
function prepare(a: Tensor, b: Tensor, options: MatmulOptions, name: string): Problem {
  const layout = options.layout ?? "NN";
  const gpu = a.gpu;
  const fail = (why: string): never => {
    throw new RangeError(
      `Cannot run ${name} ${layout} on "${a.label}" [${a.shape}] and "${b.label}" [${b.shape}]: ${why}`,
    );
  };
  if (b.gpu !== gpu) fail("the tensors belong to different devices");
  if (a.shape.length !== 2 && a.shape.length !== 3) fail("a must have rank 2 or 3");
  if (b.shape.length !== 2 && b.shape.length !== a.shape.length) fail("b must have rank 2 or the rank of a");
  const batch = a.shape.length === 3 ? a.shape[0] : 1;
  const bBatched = b.shape.length === 3;
  if (bBatched && b.shape[0] !== batch) fail("batch sizes differ");
  const [a0, a1] = rowsShape(a, options.aRows, "aRows", fail).slice(-2);
  const [b0, b1] = rowsShape(b, options.bRows, "bRows", fail).slice(-2);
  const M = layout === "TN" ? a1 : a0;
  const K = layout === "TN" ? a0 : a1;
  const N = layout === "NT" ? b0 : b1;
  const Kb = layout === "NT" ? b1 : b0;
  if (K !== Kb) fail(`inner dimensions differ (${K} vs ${Kb})`);
  if ((a.shape.length === 3 && a.chunked) || (bBatched && b.chunked)) {
    fail("batched operands cannot be split into row chunks");
  }
  for (const t of [a, b, options.bias]) {
    if (t === undefined) continue;
    if (t.dtype !== "f32" && t.dtype !== "f16") {
      fail(`"${t.label}" has dtype ${t.dtype}; f32 or f16 expected`);
    }
    if (t.dtype === "f16" && !gpu.f16) fail(`"${t.label}" is f16 but this adapter has no shader-f16`);
  }
  const bias = options.bias;
  if (bias !== undefined && (bias.shape.length !== 1 || bias.shape[0] !== N)) {
    fail(`bias must have shape [${N}]`);
  }
  if (bias?.chunked) fail("the bias cannot be split into row chunks");
  const outShape = a.shape.length === 3 ? [batch, M, N] : [M, N];
  let out = options.out;
  if (out === undefined) {
    if (options.accumulate) fail("accumulate needs an `out` tensor");
    const dtype = options.outDtype ?? (a.dtype === "f16" && b.dtype === "f16" ? "f16" : "f32");
    if (dtype === "f16" && !gpu.f16) fail("an f16 output needs shader-f16");
    out = Tensor.empty(gpu, outShape, dtype, { label: options.label ?? `${name}_out` });
  } else {
    if (out.shape.join() !== outShape.join()) fail(`out has shape [${out.shape}], expected [${outShape}]`);
    if (out.dtype !== "f32" && out.dtype !== "f16") fail(`out has dtype ${out.dtype}`);
    if (out.dtype === "f16" && !gpu.f16) fail("an f16 output needs shader-f16");
    if (out.shape.length === 3 && out.chunked) fail("a batched output cannot be split into row chunks");
  }
  const aRow0 = options.aRows?.start ?? 0;
  const bRow0 = options.bRows?.start ?? 0;
  const lowRank = options.lowRank &&
    checkLowRank(options.lowRank, { gpu, layout, batch, M, N, options, fail });
  return { gpu, a, b, layout, batch, M, N, K, bBatched, out, aRow0, bRow0, lowRank };
}

/** Checks a low-rank term against its product and returns it with its rank. */
function checkLowRank(
  lr: LowRank,
  p: {
    gpu: Gpu;
    layout: MatmulLayout;
    batch: number;
    M: number;
    N: number;
    options: MatmulOptions;
    fail: (why: string) => never;
  },
): LowRank & { r: number } {
  const { layout, M, N, fail } = p;
  if (layout === "TN") fail("a low-rank term needs layout NN or NT");
  if (p.batch !== 1) fail("a low-rank term needs an unbatched product");
  const alpha = p.options.alpha ?? 1;
  if (!Number.isFinite(alpha) || alpha === 0) {
    fail(`a low-rank term needs a finite, nonzero alpha (got "${alpha}")`);
  }
  if (!Number.isFinite(lr.scale)) fail(`the low-rank scale "${lr.scale}" must be finite`);
  for (const [name, t] of [["a", lr.a], ["b", lr.b]] as const) {
    const what = `low-rank ${name} "${t.label}"`;
    if (t.gpu !== p.gpu) fail(`${what} belongs to another device`);
    if (t.dtype !== "f32") fail(`${what} has dtype ${t.dtype}; f32 expected`);
    if (t.shape.length !== 2) fail(`${what} [${t.shape}] must have rank 2`);
    if (t.chunked) fail(`${what} is split into row chunks; it must be one buffer`);
  }
  const r = lr.a.shape[1];
  if (lr.a.shape[0] !== M || r < 1) {
    fail(`low-rank a "${lr.a.label}" [${lr.a.shape}] must be [${M},r] with r ≥ 1`);
  }
  const bShape = layout === "NT" ? [N, r] : [r, N];
  if (lr.b.shape.join() !== bShape.join()) {
    fail(`low-rank b "${lr.b.label}" [${lr.b.shape}] must be [${bShape}] for ${layout}`);
  }
  return { ...lr, r };
}

/**
 * The shape of an operand as the product sees it: its own, or `range.count` rows of it. A range
 * needs a rank-2 operand and must lie within its rows and within one of its row chunks, so
 * that one binding at an element offset reads it as a copy of those rows would be read.
 */
function rowsShape(
  t: Tensor,
  range: RowRange | undefined,
  name: string,
  fail: (why: string) => never,
): readonly number[] {
  if (range === undefined) return t.shape;
  const { start, count } = range;
  const rows = `${name} [${start},${start + count})`;
  if (t.shape.length !== 2) fail(`${rows} needs a rank-2 operand, "${t.label}" has rank ${t.shape.length}`);
  if (!Number.isInteger(start) || !Number.isInteger(count) || start < 0 || count < 0) {
    fail(`${name} start "${start}" and count "${count}" must be non-negative integers`);
  }
  if (start + count > t.shape[0]) fail(`${rows} exceeds the ${t.shape[0]} rows of "${t.label}"`);
  const chunk = t.chunks.find((c) => start >= c.rowStart && start < c.rowStart + c.rows);
  if (count > 0 && chunk !== undefined && start + count > chunk.rowStart + chunk.rows) {
    const chunks = t.chunks.map((c) => `[${c.rowStart},${c.rowStart + c.rows})`).join(", ");
    fail(
      `${rows} crosses the row-chunk boundary at row ${chunk.rowStart + chunk.rows} of "${t.label}" ` +
        `(chunks ${chunks}); a row range must lie within one chunk`,
    );
  }
  return [count, t.shape[1]];
}

/** One sub-product: buffers, its dims, leading dims and element offsets. */
interface Cell extends Omit<MatmulUniformParams, "alpha" | "lowRank"> {
  a: GPUBuffer;
  b: GPUBuffer;
  c: GPUBuffer;
  /** Index of the K range: ranges after the first accumulate. */
  kIndex: number;
  /** First row and column of C the cell computes (in the product). */
  m0: number;
  n0: number;
}

/**
 * Splits the product at every row-chunk boundary of its operands:
 * rows of A are M (NN, NT) or K (TN); rows of B are K (NN, TN) or N (NT); rows of C are M.
 */
function* cells(p: Problem, a: Tensor, b: Tensor): Generator<Cell> {
  const { layout, M, N, K, out, aRow0, bRow0 } = p;
  const mCuts = new Set([0, M]);
  const nCuts = new Set([0, N]);
  const kCuts = new Set([0, K]);
  // Only rank-2 tensors are ever split (checked in prepare), so chunk rows are matrix rows. Row
  // r of an operand read from row0 on is row row0 + r of its tensor.
  const addCuts = (set: Set<number>, t: Tensor, row0: number, rows: number) =>
    t.chunks.forEach((c) => {
      if (c.rowStart - row0 > 0 && c.rowStart - row0 < rows) set.add(c.rowStart - row0);
    });
  addCuts(layout === "TN" ? kCuts : mCuts, a, aRow0, layout === "TN" ? K : M);
  addCuts(layout === "NT" ? nCuts : kCuts, b, bRow0, layout === "NT" ? N : K);
  addCuts(mCuts, out, 0, M);
  const ranges = (set: Set<number>) => {
    const s = [...set].sort((x, y) => x - y);
    return s.slice(1).map((end, i) => [s[i], end - s[i]] as const).filter(([, n]) => n > 0);
  };
  const find = (t: Tensor, row: number): TensorChunk =>
    t.chunks.find((c) => row >= c.rowStart && row < c.rowStart + c.rows) ?? t.chunks[t.chunks.length - 1];
  const aM = layout === "TN" ? p.M : p.K; // row length of a
  const bN = layout === "NT" ? p.K : p.N; // row length of b
  for (const [m0, mLen] of ranges(mCuts)) {
    for (const [n0, nLen] of ranges(nCuts)) {
      const kRanges = ranges(kCuts);
      for (let ki = 0; ki < Math.max(1, kRanges.length); ki++) {
        const [k0, kLen] = kRanges[ki] ?? [0, 0];
        const aRow = aRow0 + (layout === "TN" ? k0 : m0);
        const bRow = bRow0 + (layout === "NT" ? n0 : k0);
        const ac = find(a, aRow);
        const bc = find(b, bRow);
        const cc = find(out, m0);
        yield {
          a: ac.buffer,
          b: bc.buffer,
          c: cc.buffer,
          M: mLen,
          N: nLen,
          K: kLen,
          lda: aM,
          ldb: bN,
          ldc: N,
          aOff: (aRow - ac.rowStart) * aM + (layout === "TN" ? m0 : k0),
          bOff: (bRow - bc.rowStart) * bN + (layout === "NT" ? k0 : n0),
          cOff: (m0 - cc.rowStart) * N + n0,
          biasOff: n0,
          strideA: p.batch > 1 ? M * K : 0,
          strideB: p.bBatched ? N * K : 0,
          strideC: p.batch > 1 ? M * N : 0,
          kIndex: ki,
          m0,
          n0,
        };
      }
    }
  }
}

function aligned4(...values: number[]): boolean {
  return values.every((v) => v % 4 === 0);
}
