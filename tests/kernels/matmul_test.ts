// matmul (tiled and direct kernels) and matmul_naive against the f64 CPU reference.
// M, N, K as in C[M,N] = op(A)[M,K]·op(B)[K,N]. Tolerances: |gpu − ref| <= atol + rtol·|ref|
// with inputs ~N(0,1): f32 accumulation error grows with K, so atol = 1e-6·K, rtol = 1e-5;
// f16 inputs are rounded on the host first, so the reference sees the GPU's inputs and the
// same f32 tolerance holds; an f16 output adds one rounding: rtol = 2⁻¹⁰.
import assert from "node:assert/strict";
import type { Gpu } from "../../kernels/device.ts";
import {
  chooseConfig,
  DIRECT_TILES,
  matmul,
  MATMUL_TILES,
  type MatmulConfig,
  type MatmulLayout,
  matmulNaive,
  type MatmulOptions,
  type RowRange,
} from "../../kernels/ops/matmul.ts";
import { matmul_forward } from "../../kernels/reference/matmul.ts";
import { readTensors, Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, roundF16 } from "./_harness.ts";

const LAYOUTS: MatmulLayout[] = ["NN", "NT", "TN"];
const TILED: MatmulConfig = { kind: "tiled", tile: { BM: 32, BN: 32, BK: 16, TM: 4, TN: 4 } };
const DIRECT: MatmulConfig = { kind: "direct", tile: { TM: 4, TN: 8, WG: 4 } };

interface Case {
  layout: MatmulLayout;
  M: number;
  N: number;
  K: number;
  dtype?: "f32" | "f16";
  outDtype?: "f32" | "f16";
  alpha?: number;
  accumulate?: boolean;
  bias?: boolean;
  batch?: number;
  bBatched?: boolean;
  config?: MatmulConfig;
  /** Chunk limits (bytes) for a, b and out, to split them into row chunks. */
  chunkA?: number;
  chunkB?: number;
  chunkC?: number;
  splitK?: number;
  naive?: boolean;
}

/** Runs one product on the GPU and compares it with the reference. */
async function check(gpu: Gpu, c: Case, seed = 1): Promise<void> {
  const { layout, M, N, K } = c;
  const dtype = c.dtype ?? "f32";
  const batch = c.batch ?? 1;
  const round = dtype === "f16" ? roundF16 : (x: Float32Array) => x;
  const a = round(randn(batch * M * K, seed));
  const bCount = c.bBatched ? batch : 1;
  const b = round(randn(bCount * K * N, seed + 1));
  const bias = c.bias ? round(randn(N, seed + 2)) : undefined;
  const c0 = c.accumulate ? randn(batch * M * N, seed + 3) : undefined;
  const outDtype = c.outDtype ?? "f32";
  const lead = c.batch !== undefined ? [batch] : [];
  const aShape = [...lead, ...(layout === "TN" ? [K, M] : [M, K])];
  const bShape = [...(c.bBatched ? [batch] : []), ...(layout === "NT" ? [N, K] : [K, N])];
  using A = Tensor.from(gpu, a, aShape, dtype, { label: "A", maxChunkBytes: c.chunkA });
  using B = Tensor.from(gpu, b, bShape, dtype, { label: "B", maxChunkBytes: c.chunkB });
  using BIAS = bias ? Tensor.from(gpu, bias, [N], dtype, { label: "bias" }) : undefined;
  const cShape = [...lead, M, N];
  using C = c0
    ? Tensor.from(gpu, c0, cShape, outDtype, { label: "C", maxChunkBytes: c.chunkC })
    : nanTensor(gpu, cShape, outDtype, "C");
  if (c.chunkA) assert.ok(A.chunked, "A is split");
  if (c.chunkB) assert.ok(B.chunked, "B is split");
  const options: MatmulOptions = {
    layout,
    alpha: c.alpha,
    accumulate: c.accumulate,
    bias: BIAS,
    out: C,
    config: c.config,
    splitK: c.splitK,
  };
  (c.naive ? matmulNaive : matmul)(A, B, options);
  const want = matmul_forward(a, b, {
    layout,
    M,
    N,
    K,
    batch,
    bBatched: c.bBatched,
    alpha: c.alpha,
    bias,
    c0: c0 && outDtype === "f16" ? roundF16(c0) : c0,
  });
  const name = `${c.naive ? "matmul_naive" : "matmul"} ${JSON.stringify(c)}`;
  const tol = { atol: 1e-6 * Math.max(K, 16), rtol: outDtype === "f16" ? 2 ** -10 : 1e-5, name };
  assertClose(await C.readF32(), want, tol);
}

gpuTest("matmul matches the reference in every layout at odd and aligned sizes (f32)", async (gpu) => {
  for (const layout of LAYOUTS) {
    for (const [M, N, K] of [[1, 1, 1], [3, 17, 5], [17, 65, 31], [64, 64, 64], [65, 127, 33]]) {
      await check(gpu, { layout, M, N, K });
    }
  }
});

gpuTest("matmul applies alpha, bias and accumulation in every layout", async (gpu) => {
  for (const layout of LAYOUTS) {
    await check(gpu, { layout, M: 17, N: 65, K: 31, alpha: 0.5, bias: true, accumulate: true });
    await check(gpu, { layout, M: 64, N: 64, K: 64, alpha: -2, accumulate: true });
  }
  await check(gpu, { layout: "NT", M: 64, N: 64, K: 64, bias: true });
});

gpuTest("matmul takes f16 inputs with f32 accumulation, to f32 or f16 outputs", async (gpu) => {
  for (const layout of LAYOUTS) {
    await check(gpu, { layout, M: 17, N: 65, K: 31, dtype: "f16" });
    await check(gpu, { layout, M: 64, N: 64, K: 64, dtype: "f16", outDtype: "f16" });
  }
  await check(gpu, {
    layout: "NT",
    M: 65,
    N: 127,
    K: 33,
    dtype: "f16",
    outDtype: "f16",
    bias: true,
    accumulate: true,
  });
}, { needsF16: true });

gpuTest("the tiled and the direct kernel both match the reference on any adapter", async (gpu) => {
  for (const config of [TILED, DIRECT]) {
    for (const layout of LAYOUTS) {
      await check(gpu, { layout, M: 3, N: 17, K: 5, config });
      await check(gpu, { layout, M: 65, N: 127, K: 33, config, bias: true, accumulate: true, alpha: 0.25 });
      await check(gpu, { layout, M: 64, N: 64, K: 64, config });
    }
  }
});

gpuTest("every named tile computes the right product at sizes spanning several tiles", async (gpu) => {
  const configs: MatmulConfig[] = [
    ...Object.values(MATMUL_TILES).map((tile) => ({ kind: "tiled" as const, tile })),
    ...Object.values(DIRECT_TILES).map((tile) => ({ kind: "direct" as const, tile })),
  ];
  const cases: Case[] = [];
  configs.forEach((config, i) => {
    const layout = LAYOUTS[i % 3];
    const big = config.kind === "tiled" ? config.tile.BM : config.tile.TM;
    const wide = config.kind === "tiled" ? config.tile.BN : config.tile.TN * config.tile.WG;
    // Edges in M and N; K and N multiples of 4 (vec4 loads), as in most model shapes.
    cases.push({
      layout,
      M: big + 3,
      N: 2 * wide + 4,
      K: 36,
      config,
      bias: true,
      accumulate: true,
      alpha: 1.5,
    });
  });
  for (const c of cases) await check(gpu, c);
});

gpuTest("batched matmul computes one product per batch entry, b shared or batched", async (gpu) => {
  await check(gpu, { layout: "NT", M: 5, N: 7, K: 8, batch: 3, bBatched: true });
  await check(gpu, { layout: "NT", M: 5, N: 7, K: 8, batch: 3 });
  await check(gpu, { layout: "NN", M: 9, N: 4, K: 12, batch: 2, bBatched: true, alpha: 0.5 });
  await check(gpu, { layout: "TN", M: 6, N: 5, K: 3, batch: 2, bBatched: true, config: TILED });
});

gpuTest("matmul splits products over row-chunked operands", async (gpu) => {
  // NT: W[N,K] in row chunks along N (each chunk writes its own columns of C), with bias.
  await check(gpu, { layout: "NT", M: 9, N: 50, K: 12, chunkB: 12 * 4 * 16, bias: true });
  // NN: B[K,N] in chunks along K: the partial products accumulate, the bias is added once.
  await check(gpu, { layout: "NN", M: 9, N: 20, K: 50, chunkB: 20 * 4 * 13, bias: true });
  await check(gpu, { layout: "NN", M: 9, N: 20, K: 50, chunkB: 20 * 4 * 13, accumulate: true, alpha: 2 });
  // TN: A[K,M] in chunks along K; NN with A[M,K] in chunks along M; C in chunks along M.
  await check(gpu, { layout: "TN", M: 11, N: 7, K: 40, chunkA: 11 * 4 * 9 });
  await check(gpu, { layout: "NN", M: 30, N: 7, K: 6, chunkA: 6 * 4 * 7 });
  await check(gpu, {
    layout: "NT",
    M: 30,
    N: 7,
    K: 6,
    chunkC: 7 * 4 * 8,
    chunkB: 6 * 4 * 3,
    accumulate: true,
  });
});

gpuTest(
  "split-K sums K ranges computed apart, then applies alpha, bias and accumulation once",
  async (gpu) => {
    for (const layout of LAYOUTS) {
      await check(gpu, { layout, M: 5, N: 7, K: 100, splitK: 3, alpha: 0.5, bias: true, accumulate: true });
      await check(gpu, { layout, M: 16, N: 64, K: 256, splitK: 4, config: TILED });
    }
    await check(gpu, { layout: "NT", M: 9, N: 33, K: 70, splitK: 5, config: DIRECT, bias: true });
    // More ranges than K allows: the range length rounds up and fewer ranges remain.
    await check(gpu, { layout: "NN", M: 3, N: 5, K: 9, splitK: 8, config: TILED });
    if (gpu.f16) {
      await check(gpu, {
        layout: "NT",
        M: 6,
        N: 12,
        K: 96,
        splitK: 2,
        dtype: "f16",
        outDtype: "f16",
        bias: true,
      });
    }
  },
);

/** A product that reads row ranges of its operands in place (`aRows`/`bRows`). */
interface RowsCase {
  layout: MatmulLayout;
  /** Shapes of the whole operands (the ranges are taken from their first dimension). */
  aShape: number[];
  bShape: number[];
  aRows?: RowRange;
  bRows?: RowRange;
  dtype?: "f32" | "f16";
  outDtype?: "f32" | "f16";
  /** Rows per chunk of A and B (splits them). */
  aChunkRows?: number;
  bChunkRows?: number;
  alpha?: number;
  accumulate?: boolean;
  bias?: boolean;
  config?: MatmulConfig;
  splitK?: number;
}

/**
 * Runs a product on row ranges read in place and the same product on copies of those rows,
 * and asserts that both outputs hold the same bits.
 */
async function checkRows(gpu: Gpu, c: RowsCase, seed = 1): Promise<void> {
  const dtype = c.dtype ?? "f32";
  const outDtype = c.outDtype ?? "f32";
  const count = (shape: number[]) => shape.reduce((x, y) => x * y, 1);
  const a = randn(count(c.aShape), seed);
  const b = randn(count(c.bShape), seed + 1);
  // Row-chunk limits in bytes: boundaries are placed at 4 bytes per element whatever the dtype.
  const limit = (shape: number[], rows?: number) =>
    rows === undefined ? undefined : rows * count(shape.slice(1)) * 4;
  using A = Tensor.from(gpu, a, c.aShape, dtype, {
    label: "A",
    maxChunkBytes: limit(c.aShape, c.aChunkRows),
  });
  using B = Tensor.from(gpu, b, c.bShape, dtype, {
    label: "B",
    maxChunkBytes: limit(c.bShape, c.bChunkRows),
  });
  if (c.aChunkRows !== undefined) assert.ok(A.chunked, "A is split");
  if (c.bChunkRows !== undefined) assert.ok(B.chunked, "B is split");
  const copy = (data: Float32Array, shape: number[], range: RowRange | undefined, label: string) => {
    if (range === undefined) return Tensor.from(gpu, data, shape, dtype, { label });
    const row = count(shape.slice(1));
    const rows = data.subarray(range.start * row, (range.start + range.count) * row);
    return Tensor.from(gpu, rows, [range.count, ...shape.slice(1)], dtype, { label });
  };
  using aCopy = copy(a, c.aShape, c.aRows, "A_copy");
  using bCopy = copy(b, c.bShape, c.bRows, "B_copy");
  assert.ok(!aCopy.chunked && !bCopy.chunked, "the copies are whole");
  const M = c.layout === "TN" ? aCopy.shape.at(-1)! : aCopy.shape.at(-2)!;
  const N = c.layout === "NT" ? bCopy.shape.at(-2)! : bCopy.shape.at(-1)!;
  const outShape = c.aShape.length === 3 ? [c.aShape[0], M, N] : [M, N];
  using BIAS = c.bias ? Tensor.from(gpu, randn(N, seed + 2), [N], dtype, { label: "bias" }) : undefined;
  const c0 = randn(count(outShape), seed + 3);
  using inPlace = c.accumulate
    ? Tensor.from(gpu, c0, outShape, outDtype, { label: "C" })
    : nanTensor(gpu, outShape, outDtype, "C");
  using copied = c.accumulate
    ? Tensor.from(gpu, c0, outShape, outDtype, { label: "C_copy" })
    : nanTensor(gpu, outShape, outDtype, "C_copy");
  const options: MatmulOptions = {
    layout: c.layout,
    alpha: c.alpha,
    accumulate: c.accumulate,
    bias: BIAS,
    config: c.config,
    splitK: c.splitK,
  };
  matmul(A, B, { ...options, out: inPlace, aRows: c.aRows, bRows: c.bRows });
  matmul(aCopy, bCopy, { ...options, out: copied });
  const [got, want] = await readTensors([inPlace, copied]);
  const bytes = (x: ArrayBufferView) => new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
  assert.deepEqual(bytes(got), bytes(want), `rows read in place vs copied: ${JSON.stringify(c)}`);
  // The copied product is itself right (not two equal wrong answers).
  const round = dtype === "f16" ? roundF16 : (x: Float32Array) => x;
  assert.ok((await copied.readF32()).every(Number.isFinite), "every output element is written");
  const ref = matmul_forward(round(await aCopy.readF32()), round(await bCopy.readF32()), {
    layout: c.layout,
    M,
    N,
    K: c.layout === "NT" ? bCopy.shape.at(-1)! : bCopy.shape.at(-2)!,
    batch: c.aShape.length === 3 ? c.aShape[0] : 1,
    alpha: c.alpha,
    bias: BIAS ? await BIAS.readF32() : undefined,
    c0: c.accumulate ? (outDtype === "f16" ? roundF16(c0) : c0) : undefined,
  });
  const K = c.layout === "NT" ? bCopy.shape.at(-1)! : bCopy.shape.at(-2)!;
  const tol = { atol: 1e-6 * Math.max(K, 16), rtol: outDtype === "f16" ? 2 ** -10 : 1e-5, name: "copy" };
  assertClose(await copied.readF32(), ref, tol);
}

gpuTest(
  "matmul reads a row range of B in place: the bits of the product on a copy of those rows",
  async (gpu) => {
    // NT: W[50,12] in row chunks of 16; ranges of N: a whole chunk, inside one, the first rows, the
    // short last chunk; with bias, alpha and accumulation.
    for (const [start, count] of [[16, 16], [18, 11], [0, 5], [48, 2]]) {
      await checkRows(gpu, {
        layout: "NT",
        aShape: [9, 12],
        bShape: [50, 12],
        bRows: { start, count },
        bChunkRows: 16,
        bias: true,
        alpha: 0.5,
        accumulate: true,
      });
    }
    // NN: B[50,20] in row chunks of 13; ranges of K, the partial sums of a chunked K avoided.
    for (const [start, count] of [[13, 13], [40, 9], [1, 11]]) {
      await checkRows(gpu, {
        layout: "NN",
        aShape: [9, count],
        bShape: [50, 20],
        bRows: { start, count },
        bChunkRows: 13,
        bias: true,
        accumulate: true,
        alpha: -2,
      });
    }
    // Odd row lengths: offsets that are not multiples of 4 (scalar loads), both kernels.
    for (const config of [TILED, DIRECT]) {
      await checkRows(gpu, {
        layout: "NT",
        aShape: [7, 21],
        bShape: [40, 21],
        bRows: { start: 5, count: 30 },
        config,
      });
      await checkRows(gpu, {
        layout: "NN",
        aShape: [7, 17],
        bShape: [40, 23],
        bRows: { start: 3, count: 17 },
        config,
      });
      await checkRows(gpu, {
        layout: "NT",
        aShape: [65, 36],
        bShape: [300, 36],
        bRows: { start: 151, count: 131 },
        bChunkRows: 150,
        config,
      });
    }
    // An unsplit B, a range covering all of it, and a batched A sharing the range of B.
    await checkRows(gpu, { layout: "NT", aShape: [5, 8], bShape: [30, 8], bRows: { start: 0, count: 30 } });
    await checkRows(gpu, {
      layout: "NT",
      aShape: [3, 5, 8],
      bShape: [30, 8],
      bRows: { start: 9, count: 12 },
    });
  },
);

gpuTest("matmul reads a row range of A in place, alone or with one of B (TN: both along K)", async (gpu) => {
  await checkRows(gpu, {
    layout: "NN",
    aShape: [40, 6],
    bShape: [6, 9],
    aRows: { start: 14, count: 11 },
    aChunkRows: 13,
  });
  await checkRows(gpu, {
    layout: "NT",
    aShape: [40, 10],
    bShape: [7, 10],
    aRows: { start: 26, count: 13 },
    aChunkRows: 13,
    bias: true,
    accumulate: true,
  });
  await checkRows(gpu, {
    layout: "TN",
    aShape: [50, 9],
    bShape: [60, 11],
    aRows: { start: 3, count: 20 },
    bRows: { start: 31, count: 20 },
    aChunkRows: 25,
    bChunkRows: 30,
    alpha: 0.25,
  });
});

gpuTest("split-K over a row range of B gives the bits of split-K over a copy", async (gpu) => {
  for (const config of [TILED, DIRECT]) {
    await checkRows(gpu, {
      layout: "NN",
      aShape: [5, 100],
      bShape: [230, 12],
      bRows: { start: 101, count: 100 },
      bChunkRows: 101,
      splitK: 3,
      config,
      bias: true,
      accumulate: true,
    });
    await checkRows(gpu, {
      layout: "NT",
      aShape: [6, 70],
      bShape: [20, 70],
      bRows: { start: 7, count: 9 },
      splitK: 2,
      config,
    });
  }
});

gpuTest("matmul reads row ranges of f16 operands in place, to f32 and f16 outputs", async (gpu) => {
  for (const outDtype of ["f32", "f16"] as const) {
    await checkRows(gpu, {
      layout: "NT",
      aShape: [11, 21],
      bShape: [90, 21],
      bRows: { start: 33, count: 37 },
      bChunkRows: 70,
      dtype: "f16",
      outDtype,
      bias: true,
      accumulate: true,
    });
    await checkRows(gpu, {
      layout: "NN",
      aShape: [11, 29],
      bShape: [90, 24],
      bRows: { start: 45, count: 29 },
      bChunkRows: 45,
      dtype: "f16",
      outDtype,
      alpha: 0.5,
    });
  }
}, { needsF16: true });

gpuTest(
  "matmul refuses a row range outside its operand, across a row-chunk boundary or of a batch",
  (gpu) => {
    using x = Tensor.empty(gpu, [4, 8], "f32", { label: "x" });
    using W = Tensor.empty(gpu, [50, 8], "f32", { label: "W", maxChunkBytes: 16 * 8 * 4 });
    assert.equal(W.chunks.length, 4);
    assert.throws(
      () => matmul(x, W, { layout: "NT", bRows: { start: 10, count: 10 } }),
      (e: unknown) =>
        e instanceof RangeError &&
        /Cannot run matmul NT on "x" \[4,8\] and "W" \[50,8\]: bRows \[10,20\) crosses the row-chunk boundary at row 16 of "W" \(chunks \[0,16\), \[16,32\), \[32,48\), \[48,50\)\)/
          .test(e.message),
    );
    assert.throws(
      () => matmul(x, W, { layout: "NT", bRows: { start: 45, count: 6 } }),
      /bRows \[45,51\) exceeds the 50 rows of "W"/,
    );
    assert.throws(
      () => matmul(x, W, { layout: "NT", bRows: { start: -1, count: 2 } }),
      /bRows start "-1" and count "2" must be non-negative integers/,
    );
    assert.throws(
      () => matmul(x, W, { layout: "NT", bRows: { start: 0, count: 1.5 } }),
      /must be non-negative integers/,
    );
    // NN: the range is K, which must match A's columns.
    assert.throws(
      () => matmul(x, W, { layout: "NN", bRows: { start: 16, count: 7 } }),
      /inner dimensions differ \(8 vs 7\)/,
    );
    assert.throws(
      () => matmul(x, W, { layout: "NT", aRows: { start: 1, count: 4 } }),
      /aRows \[1,5\) exceeds the 4 rows of "x"/,
    );
    using batched = Tensor.empty(gpu, [2, 4, 8], "f32", { label: "xb" });
    assert.throws(
      () => matmul(batched, W, { layout: "NT", aRows: { start: 0, count: 1 } }),
      /aRows \[0,1\) needs a rank-2 operand, "xb" has rank 3/,
    );
  },
);

/** A product with a low-rank term: C = alpha·op(A)·op(B) + scale·A2·op(B2) (+ bias) (+ C). */
interface LowRankCase {
  layout: "NN" | "NT";
  M: number;
  N: number;
  K: number;
  r: number;
  scale: number;
  dtype?: "f32" | "f16";
  outDtype?: "f32" | "f16";
  alpha?: number;
  accumulate?: boolean;
  bias?: boolean;
  config?: MatmulConfig;
  splitK?: number;
  /** Rows per chunk of A, B and C (splits them). */
  aChunkRows?: number;
  bChunkRows?: number;
  cChunkRows?: number;
}

/**
 * Runs a product with a low-rank term and compares it with the f64 reference
 * alpha·Σ_k op(A)(m,k)·op(B)(k,n) + scale·Σ_q A2(m,q)·op(B2)(q,n) + bias(n) + C0(m,n); the term's
 * r products add to the sum's length, so atol = 1e-6·(K + r).
 */
async function checkLowRank(gpu: Gpu, c: LowRankCase, seed = 1): Promise<void> {
  const { layout, M, N, K, r } = c;
  const dtype = c.dtype ?? "f32";
  const outDtype = c.outDtype ?? "f32";
  const round = dtype === "f16" ? roundF16 : (x: Float32Array) => x;
  const a = round(randn(M * K, seed));
  const b = round(randn(K * N, seed + 1));
  const a2 = randn(M * r, seed + 2);
  const b2 = randn(r * N, seed + 3);
  const bias = c.bias ? round(randn(N, seed + 4)) : undefined;
  const c0 = c.accumulate ? randn(M * N, seed + 5) : undefined;
  const chunk = (rows: number | undefined, rowLength: number) =>
    rows === undefined ? undefined : rows * rowLength * 4;
  using A = Tensor.from(gpu, a, [M, K], dtype, { label: "A", maxChunkBytes: chunk(c.aChunkRows, K) });
  const bShape = layout === "NT" ? [N, K] : [K, N];
  using B = Tensor.from(gpu, b, bShape, dtype, { label: "B", maxChunkBytes: chunk(c.bChunkRows, bShape[1]) });
  using A2 = Tensor.from(gpu, a2, [M, r], "f32", { label: "A2" });
  using B2 = Tensor.from(gpu, b2, layout === "NT" ? [N, r] : [r, N], "f32", { label: "B2" });
  using BIAS = bias ? Tensor.from(gpu, bias, [N], dtype, { label: "bias" }) : undefined;
  const cChunk = chunk(c.cChunkRows, N);
  using C = c0
    ? Tensor.from(gpu, c0, [M, N], outDtype, { label: "C", maxChunkBytes: cChunk })
    : Tensor.from(gpu, new Float32Array(M * N).fill(NaN), [M, N], outDtype, {
      label: "C",
      maxChunkBytes: cChunk,
    });
  if (c.aChunkRows !== undefined) assert.ok(A.chunked, "A is split");
  if (c.bChunkRows !== undefined) assert.ok(B.chunked, "B is split");
  if (c.cChunkRows !== undefined) assert.ok(C.chunked, "C is split");
  matmul(A, B, {
    layout,
    alpha: c.alpha,
    accumulate: c.accumulate,
    bias: BIAS,
    out: C,
    config: c.config,
    splitK: c.splitK,
    lowRank: { a: A2, b: B2, scale: c.scale },
  });
  const alpha = c.alpha ?? 1;
  const c0Seen = c0 && outDtype === "f16" ? roundF16(c0) : c0;
  const want = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let main = 0;
      for (let k = 0; k < K; k++) main += a[m * K + k] * (layout === "NT" ? b[n * K + k] : b[k * N + n]);
      let term = 0;
      for (let q = 0; q < r; q++) term += a2[m * r + q] * (layout === "NT" ? b2[n * r + q] : b2[q * N + n]);
      want[m * N + n] = alpha * main + c.scale * term + (bias ? bias[n] : 0) +
        (c0Seen ? c0Seen[m * N + n] : 0);
    }
  }
  const name = `matmul with lowRank ${JSON.stringify(c)}`;
  const tol = { atol: 1e-6 * Math.max(K + r, 16), rtol: outDtype === "f16" ? 2 ** -10 : 1e-5, name };
  assertClose(await C.readF32(), want, tol);
}

gpuTest("matmul adds a low-rank term in the same accumulator, NN and NT, in both kernels", async (gpu) => {
  for (const config of [TILED, DIRECT]) {
    for (const layout of ["NN", "NT"] as const) {
      // r 1 and 6 read one value of q per step, r 16 four; ragged sizes, and multiples of the
      // tiled kernel's tile (its variant without bounds checks).
      await checkLowRank(gpu, { layout, M: 3, N: 17, K: 5, r: 1, scale: 2, config });
      await checkLowRank(gpu, {
        layout,
        M: 65,
        N: 127,
        K: 33,
        r: 6,
        scale: 0.5,
        alpha: 0.25,
        bias: true,
        accumulate: true,
        config,
      });
      await checkLowRank(gpu, {
        layout,
        M: 64,
        N: 64,
        K: 64,
        r: 16,
        scale: -1.5,
        alpha: 3,
        bias: true,
        config,
      });
    }
  }
});

gpuTest(
  "matmul adds a low-rank term once across row chunks of A, B and C and with split-K",
  async (gpu) => {
    // The adapter's own kernel family: what is checked here is where the term goes, not how.
    // NT: W[N,K] in row chunks along N: each chunk's columns read their own rows of B2[N,r].
    await checkLowRank(gpu, { layout: "NT", M: 9, N: 50, K: 12, r: 4, scale: 2, bChunkRows: 16, bias: true });
    // NN: W[K,N] in row chunks along K: the K ranges accumulate, the term comes with the first.
    await checkLowRank(gpu, {
      layout: "NN",
      M: 9,
      N: 20,
      K: 50,
      r: 3,
      scale: 0.5,
      bChunkRows: 13,
      bias: true,
      accumulate: true,
    });
    // A and C in row chunks along M: each chunk's rows read their own rows of A2[M,r].
    await checkLowRank(gpu, {
      layout: "NT",
      M: 30,
      N: 12,
      K: 8,
      r: 4,
      scale: 2,
      aChunkRows: 7,
      cChunkRows: 8,
    });
    // Split-K: the term rides with the last K range, alpha applies once in the reduction.
    for (const layout of ["NN", "NT"] as const) {
      await checkLowRank(gpu, {
        layout,
        M: 5,
        N: 7,
        K: 100,
        r: 5,
        scale: 2,
        alpha: 0.5,
        splitK: 3,
        bias: true,
        accumulate: true,
      });
    }
  },
);

gpuTest("matmul adds a low-rank term to f16 operands, to f32 and f16 outputs", async (gpu) => {
  for (const config of [TILED, DIRECT]) {
    for (const layout of ["NN", "NT"] as const) {
      await checkLowRank(gpu, {
        layout,
        M: 17,
        N: 36,
        K: 24,
        r: 8,
        scale: 2,
        dtype: "f16",
        outDtype: "f16",
        bias: true,
        accumulate: true,
        config,
      });
      await checkLowRank(gpu, {
        layout,
        M: 12,
        N: 40,
        K: 32,
        r: 7,
        scale: 0.5,
        dtype: "f16",
        bChunkRows: 12,
        config,
      });
    }
  }
}, { needsF16: true });

gpuTest("matmul refuses a low-rank term of the wrong layout, shape, dtype or alpha", (gpu) => {
  using x = Tensor.empty(gpu, [4, 8], "f32", { label: "x" });
  using W = Tensor.empty(gpu, [6, 8], "f32", { label: "W" });
  using xa = Tensor.empty(gpu, [4, 2], "f32", { label: "xa" });
  using B = Tensor.empty(gpu, [6, 2], "f32", { label: "B" });
  using i32 = Tensor.empty(gpu, [6, 2], "i32", { label: "B_i32" });
  using split = Tensor.empty(gpu, [6, 2], "f32", { label: "B_split", maxChunkBytes: 16 });
  const lowRank = { a: xa, b: B, scale: 2 };
  assert.ok(split.chunked);
  assert.throws(
    () => matmul(x, W, { layout: "NT", lowRank: { a: xa, b: xa, scale: 1 } }),
    /Cannot run matmul NT on "x" \[4,8\] and "W" \[6,8\]: low-rank b "xa" \[4,2\] must be \[6,2\] for NT/,
  );
  assert.throws(() => matmul(x, W, { layout: "NN", lowRank }), /inner dimensions differ/);
  using dy = Tensor.empty(gpu, [4, 6], "f32", { label: "dy" });
  assert.throws(
    () => matmul(dy, W, { layout: "NN", lowRank }),
    /low-rank b "B" \[6,2\] must be \[2,8\] for NN/,
  );
  assert.throws(() => matmul(dy, x, { layout: "TN", lowRank }), /a low-rank term needs layout NN or NT/);
  assert.throws(
    () => matmul(x, W, { layout: "NT", lowRank: { ...lowRank, a: W } }),
    /low-rank a "W" \[6,8\] must be \[4,r\]/,
  );
  assert.throws(
    () => matmul(x, W, { layout: "NT", lowRank: { ...lowRank, b: i32 } }),
    /"B_i32" has dtype i32; f32 expected/,
  );
  assert.throws(
    () => matmul(x, W, { layout: "NT", lowRank: { ...lowRank, b: split } }),
    /"B_split" is split into row chunks/,
  );
  assert.throws(() => matmul(x, W, { layout: "NT", alpha: 0, lowRank }), /finite, nonzero alpha \(got "0"\)/);
  assert.throws(
    () => matmul(x, W, { layout: "NT", lowRank: { ...lowRank, scale: NaN } }),
    /scale "NaN" must be finite/,
  );
  using xb = Tensor.empty(gpu, [2, 4, 8], "f32", { label: "xb" });
  assert.throws(() => matmul(xb, W, { layout: "NT", lowRank }), /needs an unbatched product/);
  assert.throws(() => matmulNaive(x, W, { layout: "NT", lowRank }), /`lowRank` needs `matmul`/);
});

gpuTest("matmul_naive matches the reference in every layout", async (gpu) => {
  for (const layout of LAYOUTS) {
    await check(gpu, { layout, M: 17, N: 65, K: 31, naive: true });
    await check(gpu, {
      layout,
      M: 5,
      N: 3,
      K: 7,
      naive: true,
      bias: true,
      accumulate: true,
      alpha: 3,
      batch: 2,
    });
  }
});

gpuTest("matmul names the operands of a shape or dtype mistake", (gpu) => {
  using a = Tensor.empty(gpu, [4, 5], "f32", { label: "x" });
  using w = Tensor.empty(gpu, [6, 4], "f32", { label: "W" });
  assert.throws(
    () => matmul(a, w, { layout: "NT" }),
    /Cannot run matmul NT on "x" \[4,5\] and "W" \[6,4\]: inner dimensions differ \(5 vs 4\)/,
  );
  assert.throws(() => matmul(a, a, { layout: "TN", accumulate: true }), /accumulate needs an `out` tensor/);
  using out = Tensor.empty(gpu, [4, 4]);
  assert.throws(() => matmul(w, w, { layout: "NT", out }), /out has shape \[4,4\], expected \[6,6\]/);
  using i = Tensor.empty(gpu, [5, 4], "i32", { label: "ids" });
  assert.throws(() => matmul(a, i), /"ids" has dtype i32/);
  if (!gpu.f16) {
    using h = Tensor.empty(gpu, [5, 4], "f16", { label: "h" });
    assert.throws(() => matmul(a, h), /"h" is f16 but this adapter has no shader-f16/);
  }
});

gpuTest("chooseConfig() picks the direct kernel on CPU adapters and tiles elsewhere", (gpu) => {
  const config = chooseConfig(gpu, 512, 512);
  assert.equal(config.kind, gpu.software ? "direct" : "tiled");
});
