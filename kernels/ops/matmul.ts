/**
 * Matrix products on the GPU: `matmul` (tiled, register-blocked; f32 and f16 inputs with f32
 * accumulation) and `matmulNaive` (one invocation per output, f32; the readable baseline).
 *
 * M, N, K as in C[M,N] = op(A)[M,K]·op(B)[K,N]; Bt = batch. Layouts:
 *   NN: a[M,K]  · b[K,N]      NT: a[M,K] · b[N,K]ᵀ (x·Wᵀ, W[out,in])      TN: a[K,M]ᵀ · b[K,N] (dYᵀ·X)
 * With a leading batch dimension on `a` (and optionally `b`), each of the Bt products is
 * computed; a rank-2 `b` is shared by all of them. Operands split into row chunks (weights
 * larger than the storage binding limit) are handled by splitting the product: chunks along
 * M or N write disjoint parts of C, chunks along K accumulate.
 * This file is the only place the matmul tile sizes are written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor, type TensorChunk } from "../tensor.ts";
import {
  type FloatDType,
  MATMUL_UNIFORM_BYTES,
  type MatmulDirectTile,
  matmulDirectWgsl,
  type MatmulLayout,
  type MatmulTile,
  type MatmulUniformParams,
  matmulUniforms,
  matmulWgsl,
  SPLITK_UNIFORM_BYTES,
  SPLITK_WORKGROUP,
  type SplitKReduceVariant,
  splitKReduceWgsl,
  tileThreads,
} from "./matmul_wgsl.ts";

export type { FloatDType, MatmulDirectTile, MatmulLayout, MatmulTile };

/**
 * Which kernel runs a product: `tiled` (workgroup-memory tiles; GPUs) or `direct`
 * (per-invocation register blocks, no workgroup memory; CPU adapters).
 */
export type MatmulConfig = { kind: "tiled"; tile: MatmulTile } | { kind: "direct"; tile: MatmulDirectTile };

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
  /** Kernel and tile sizes (default: chosen for the adapter and the problem size). */
  config?: MatmulConfig;
  /**
   * Number of K ranges computed in parallel and summed afterwards (split-K); default: chosen
   * on GPUs for products with few output tiles and a long K, 1 on CPU adapters.
   */
  splitK?: number;
}

/** Tiles of the tiled kernel: with DIRECT_TILES, the only place matmul tile sizes are written. */
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

/** The kernel used for an M×N product on this adapter. */
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
}

/**
 * C = alpha·op(A)·op(B) (+ bias) (+ C), tiled. Inputs f32 or f16 (f16 needs `gpu.f16`),
 * accumulation in f32.
 *
 * @example
 * ```ts
 * // y[T,out] = x[T,in] · W[out,in]ᵀ + b[out]
 * const y = matmul(x, W, { layout: "NT", bias: b });
 * ```
 */
export function matmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
  const p = prepare(a, b, options, "matmul");
  const alpha = options.alpha ?? 1;
  const config = options.config ?? chooseConfig(p.gpu, p.M, p.N);
  checkConfig(p.gpu, config);
  const bias = options.bias;
  for (const cell of cells(p, a, b)) {
    const accumulate = (options.accumulate ?? false) || cell.kIndex > 0;
    const cellBias = cell.kIndex === 0 ? bias : undefined;
    const split = p.batch === 1 ? (options.splitK ?? splitCount(p.gpu, config, cell)) : 1;
    if (split <= 1) {
      launch(p, config, cell, {
        accumulate,
        bias: cellBias,
        alpha,
        batch: p.batch,
        c: p.out.dtype as FloatDType,
      });
    } else {
      splitK(p, config, cell, split, { accumulate, bias: cellBias, alpha });
    }
  }
  return p.out;
}

/**
 * How many K ranges to split a product into on a GPU: a product with few output tiles and a
 * long K leaves most of the device idle, each workgroup walking all of K (e.g. the LoRA
 * shapes x[T,D]·A[r,D]ᵀ and dA = dHᵀ·x, with r = 16 columns or rows). Aim for ~2048
 * workgroups, each range at least 256 long. Measured on an H100 (NT f32): 16×4096×4096
 * 413 → 118 µs, 512×512×4096 329 → 142 µs, 4096×64×11008 899 → 321 µs; products with
 * K < 1024 gain less than the extra reduction costs, and ≥ 256 tiles already fill the device.
 */
function splitCount(gpu: Gpu, config: MatmulConfig, cell: Cell): number {
  if (gpu.software || config.kind !== "tiled" || cell.K < 1024) return 1;
  const tiles = Math.ceil(cell.M / config.tile.BM) * Math.ceil(cell.N / config.tile.BN);
  if (tiles >= 256) return 1;
  const split = Math.min(Math.ceil(2048 / tiles), Math.floor(cell.K / 256), 64);
  // The partial products must stay small: S·M·N f32 within 64 MiB.
  return split >= 2 && split * cell.M * cell.N * 4 <= 64 * 2 ** 20 ? split : 1;
}

/**
 * Split-K: S partial products over K ranges into P[S,M,N] (f32; the first S−1 ranges as one
 * batched dispatch, the shorter last range alone), then one reduction into C.
 */
function splitK(
  p: Problem,
  config: MatmulConfig,
  cell: Cell,
  split: number,
  o: { accumulate: boolean; bias?: Tensor; alpha: number },
): void {
  const { M, N, K } = cell;
  const step = config.kind === "tiled" ? config.tile.BK : 4;
  const kChunk = Math.ceil(K / split / step) * step;
  const S = Math.ceil(K / kChunk);
  // Element distance between k and k + 1 in A and in B.
  const aStep = p.layout === "TN" ? cell.lda : 1;
  const bStep = p.layout === "NT" ? 1 : cell.ldb;
  const partial = Tensor.empty(p.gpu, [S, M, N], "f32", { label: "matmul_splitk_partial" });
  const into = { c: partial.buffer, ldc: N, strideC: M * N, kIndex: 0 };
  if (S > 1) {
    const full = { ...cell, ...into, K: kChunk, cOff: 0, strideA: kChunk * aStep, strideB: kChunk * bStep };
    launch(p, config, full, { accumulate: false, alpha: 1, batch: S - 1, c: "f32" });
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
  launch(p, config, last, { accumulate: false, alpha: 1, batch: 1, c: "f32" });

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
  recorder(p.gpu).dispatch(kernel, buffers, u, [Math.ceil(groups / y), y]);
  partial.destroy(); // back to the pool; the recorded commands run first
}

/** Dispatches the tiled or direct kernel for one cell. */
function launch(
  p: Problem,
  config: MatmulConfig,
  cell: Cell,
  o: { accumulate: boolean; bias?: Tensor; alpha: number; batch: number; c: FloatDType },
): void {
  const bias = o.bias;
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
  const common = { layout: p.layout, ...dtypes, accumulate: o.accumulate, vecA: a4, vecB: b4, vecC: c4 };
  const params = {
    layout: p.layout,
    dtypes: `${dtypes.a}${dtypes.b}${dtypes.c}${bias ? dtypes.bias : ""}`,
    acc: o.accumulate,
    vec: `${+a4}${+b4}${+c4}`,
  };
  let code: () => string;
  let name: string;
  let groups: [number, number, number];
  if (config.kind === "tiled") {
    const tile = config.tile;
    const exact = cell.M % tile.BM === 0 && cell.N % tile.BN === 0 && cell.K % tile.BK === 0;
    name = "matmul";
    Object.assign(params, { exact, tile: `${tile.BM}x${tile.BN}x${tile.BK}/${tile.TM}x${tile.TN}` });
    code = () => matmulWgsl({ ...common, exact, tile });
    groups = [Math.ceil(cell.N / tile.BN), Math.ceil(cell.M / tile.BM), o.batch];
  } else {
    const tile = config.tile;
    const kExact = cell.K % 4 === 0;
    name = "matmul_direct";
    Object.assign(params, { kExact, tile: `${tile.TM}x${tile.TN}/${tile.WG}` });
    code = () => matmulDirectWgsl({ ...common, kExact, tile });
    groups = [Math.ceil(cell.N / (tile.WG * tile.TN)), Math.ceil(cell.M / tile.TM), o.batch];
  }
  const kernel = getKernel(p.gpu, {
    name,
    params,
    code,
    bindings: bias ? ["read", "read", "read", "write"] : ["read", "read", "write"],
    uniformBytes: MATMUL_UNIFORM_BYTES,
  });
  const buffers = bias ? [cell.a, cell.b, bias.buffer, cell.c] : [cell.a, cell.b, cell.c];
  recorder(p.gpu).dispatch(kernel, buffers, matmulUniforms({ ...cell, alpha: o.alpha }), groups);
}

/** Throws when a config breaks the template's rules or this adapter's limits. */
function checkConfig(gpu: Gpu, config: MatmulConfig): void {
  const limits = gpu.limits;
  if (config.kind === "tiled") {
    const { TX, TY } = tileThreads(config.tile);
    if (
      TX * TY > limits.maxComputeInvocationsPerWorkgroup ||
      (config.tile.BM + config.tile.BN) * config.tile.BK * 4 > limits.maxComputeWorkgroupStorageSize
    ) {
      throw new RangeError(
        `Cannot run matmul with tile ${JSON.stringify(config.tile)}: it exceeds this adapter's limits`,
      );
    }
  } else if (
    config.tile.WG > limits.maxComputeInvocationsPerWorkgroup || config.tile.TM % 4 !== 0 ||
    config.tile.TN % 4 !== 0 || config.tile.TM < 4 || config.tile.TN < 4
  ) {
    throw new RangeError(`Cannot run matmul with direct tile ${JSON.stringify(config.tile)}`);
  }
}

/**
 * The naive kernel: same contract as {@link matmul} for f32 tensors without row chunks.
 * Kept as the readable baseline for tests and benchmarks.
 */
export function matmulNaive(a: Tensor, b: Tensor, options: MatmulOptions = {}): Tensor {
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
  const [a0, a1] = a.shape.slice(-2);
  const [b0, b1] = b.shape.slice(-2);
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
  return { gpu, a, b, layout, batch, M, N, K, bBatched, out };
}

/** One sub-product: buffers, its dims, leading dims and element offsets. */
interface Cell extends Omit<MatmulUniformParams, "alpha"> {
  a: GPUBuffer;
  b: GPUBuffer;
  c: GPUBuffer;
  /** Index of the K range: ranges after the first accumulate. */
  kIndex: number;
}

/**
 * Splits the product at every row-chunk boundary of its operands:
 * rows of A are M (NN, NT) or K (TN); rows of B are K (NN, TN) or N (NT); rows of C are M.
 */
function* cells(p: Problem, a: Tensor, b: Tensor): Generator<Cell> {
  const { layout, M, N, K, out } = p;
  const mCuts = new Set([0, M]);
  const nCuts = new Set([0, N]);
  const kCuts = new Set([0, K]);
  // Only rank-2 tensors are ever split (checked in prepare), so chunk rows are matrix rows.
  const addCuts = (set: Set<number>, t: Tensor) => t.chunks.forEach((c) => set.add(c.rowStart));
  addCuts(layout === "TN" ? kCuts : mCuts, a);
  addCuts(layout === "NT" ? nCuts : kCuts, b);
  addCuts(mCuts, out);
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
        const ac = find(a, layout === "TN" ? k0 : m0);
        const bc = find(b, layout === "NT" ? n0 : k0);
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
          aOff: layout === "TN" ? (k0 - ac.rowStart) * aM + m0 : (m0 - ac.rowStart) * aM + k0,
          bOff: layout === "NT" ? (n0 - bc.rowStart) * bN + k0 : (k0 - bc.rowStart) * bN + n0,
          cOff: (m0 - cc.rowStart) * N + n0,
          biasOff: n0,
          strideA: p.batch > 1 ? M * K : 0,
          strideB: p.bBatched ? N * K : 0,
          strideC: p.batch > 1 ? M * N : 0,
          kIndex: ki,
        };
      }
    }
  }
}

function aligned4(...values: number[]): boolean {
  return values.every((v) => v % 4 === 0);
}
