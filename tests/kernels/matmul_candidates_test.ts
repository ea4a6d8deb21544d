// The tile candidates of the matmul tuner: which ones an adapter's limits admit, and that every
// candidate of a kernel family gives the same bits. M, N, K as in C[M,N] = op(A)[M,K]·op(B)[K,N].
// Bit identity is exact equality of the stored words (f32 or f16 outputs); one candidate per case
// is also compared with the f64 reference (|gpu − ref| ≤ 1e-6·K + 1e-5·|ref|; inputs rounded to
// f16 on the host for f16 cases), so identical results are also right ones.
import assert from "node:assert/strict";
import type { Gpu } from "../../kernels/device.ts";
import {
  configFits,
  configName,
  DIRECT_SPACE,
  matmul,
  matmulCandidates,
  type MatmulConfig,
  type MatmulLayout,
  planMatmul,
  TILE_SPACE,
} from "../../kernels/ops/matmul.ts";
import { tileStorageBytes, tileThreads } from "../../kernels/ops/matmul_wgsl.ts";
import { matmul_forward } from "../../kernels/reference/matmul.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, randn, roundF16 } from "./_harness.ts";

const LAYOUTS: MatmulLayout[] = ["NN", "NT", "TN"];

/** A stand-in adapter with chosen limits (candidate generation reads only these fields). */
function fakeGpu(
  o: {
    software?: boolean;
    f16?: boolean;
    storage?: number;
    invocations?: number;
    sizeX?: number;
    sizeY?: number;
  },
): Gpu {
  return {
    software: o.software ?? false,
    f16: o.f16 ?? true,
    limits: {
      maxComputeWorkgroupStorageSize: o.storage ?? 16384,
      maxComputeInvocationsPerWorkgroup: o.invocations ?? 256,
      maxComputeWorkgroupSizeX: o.sizeX ?? 256,
      maxComputeWorkgroupSizeY: o.sizeY ?? 256,
    },
  } as unknown as Gpu;
}

Deno.test("matmulCandidates() keeps only tiles within the adapter's workgroup memory and invocations", () => {
  const names = (gpu: Gpu, a: "f32" | "f16", b: "f32" | "f16") =>
    matmulCandidates(gpu, { a, b }).map(configName);
  // WebGPU's default limits: 16 KiB of workgroup memory, 256 invocations.
  const small = fakeGpu({});
  const f32 = matmulCandidates(small, { a: "f32", b: "f32" });
  assert.ok(f32.length > 20, `${f32.length} candidates`);
  for (const c of f32) {
    assert.equal(c.kind, "tiled");
    if (c.kind !== "tiled") continue;
    const { TX, TY } = tileThreads(c.tile);
    assert.ok(TX * TY >= TILE_SPACE.minThreads && TX * TY <= 256, configName(c));
    assert.ok(tileStorageBytes(c.tile, "f32", "f32") <= 16384, configName(c));
    assert.ok(!c.tile.f16Tiles, "no f16 tiles for f32 operands");
  }
  // 128×128×32 f32 needs 32 KiB: only with f16 tiles (16 KiB) does it fit the default limit.
  assert.ok(!names(small, "f32", "f32").includes("tiled 128x128x32/8x8"));
  assert.ok(names(small, "f16", "f16").includes("tiled 128x128x32/8x8h"));
  assert.ok(!names(small, "f16", "f16").includes("tiled 128x128x32/8x8"));
  // Mixed operands: only the f16 operand's tile halves (128·32·4 + 128·32·2 = 24 KiB > 16 KiB).
  assert.ok(!names(small, "f32", "f16").includes("tiled 128x128x32/8x8h"));
  assert.ok(names(fakeGpu({ storage: 32768 }), "f32", "f32").includes("tiled 128x128x32/8x8"));
  // No shader-f16: no f16 tiles.
  assert.ok(!names(fakeGpu({ f16: false }), "f16", "f16").some((n) => n.endsWith("h")));
  // Fewer invocations or a narrow workgroup: every survivor fits.
  const narrow = fakeGpu({ invocations: 128, sizeY: 16 });
  const kept = matmulCandidates(narrow, { a: "f32", b: "f32" });
  assert.ok(kept.length > 0 && kept.length < f32.length);
  for (const c of kept) {
    if (c.kind !== "tiled") continue;
    const { TX, TY } = tileThreads(c.tile);
    assert.ok(TX * TY <= 128 && TY <= 16, configName(c));
  }
  // Every candidate passes the same check matmul applies; a tile over the limit fails it by name.
  for (const c of kept) assert.equal(configFits(narrow, c, { a: "f32", b: "f32" }), null);
  const big: MatmulConfig = { kind: "tiled", tile: { BM: 128, BN: 128, BK: 32, TM: 4, TN: 4 } };
  assert.match(configFits(small, big, { a: "f32", b: "f32" })!, /1024 invocations exceed this adapter's 256/);
  const wide: MatmulConfig = { kind: "tiled", tile: { BM: 128, BN: 128, BK: 32, TM: 8, TN: 8 } };
  assert.match(configFits(small, wide, { a: "f32", b: "f32" })!, /32768 bytes of workgroup memory exceed/);
});

Deno.test("matmulCandidates() offers direct register blocks on CPU adapters", () => {
  const configs = matmulCandidates(fakeGpu({ software: true }), { a: "f32", b: "f32" });
  assert.equal(configs.length, DIRECT_SPACE.TM.length * DIRECT_SPACE.TN.length * DIRECT_SPACE.WG.length);
  assert.ok(configs.every((c) => c.kind === "direct"));
});

gpuTest("matmul refuses a tile that exceeds this adapter's limits, naming it", (gpu) => {
  using a = Tensor.empty(gpu, [8, 8], "f32", { label: "a" });
  const config: MatmulConfig = { kind: "tiled", tile: { BM: 128, BN: 128, BK: 64, TM: 4, TN: 4 } };
  assert.throws(() => planMatmul(a, a, { config }), /Cannot run matmul with tiled 128x128x64\/4x4 .*exceed/);
});

/**
 * Tiled candidates that differ in every tile dimension (BM 32/128, BN 32/128, BK 8/16/32, TM and
 * TN 4/8, f16 tiles): few and with at most 128 threads, as the software adapters compile the
 * unrolled loops slowly (llvmpipe GL takes seconds per kernel).
 */
const TILED: MatmulConfig[] = [
  { kind: "tiled", tile: { BM: 32, BN: 32, BK: 32, TM: 4, TN: 4 } },
  { kind: "tiled", tile: { BM: 128, BN: 32, BK: 8, TM: 8, TN: 4 } },
  { kind: "tiled", tile: { BM: 32, BN: 128, BK: 16, TM: 4, TN: 8, f16Tiles: true } },
];
const DIRECT: MatmulConfig[] = [
  { kind: "direct", tile: { TM: 4, TN: 8, WG: 4 } },
  { kind: "direct", tile: { TM: 8, TN: 8, WG: 8 } },
];

interface Case {
  M: number;
  N: number;
  K: number;
  batch: number;
  bBatched: boolean;
  accumulate: boolean;
  bias: boolean;
  alpha: number;
  /** Rank of a low-rank term C += scale·A2[M,r]·op(B2) (NN, NT; unbatched), or none. */
  r?: number;
  scale?: number;
}

/**
 * M, N multiples of no tile; K = 72 a multiple of BK 8 but not of 16 or 32, so one tile has
 * no short last K step and the others have one; vec4 loads along K (NN's A, NT's A and B) and scalar
 * loads along M and N = 67, 130 (TN, NN's B); two batch entries with their own b; bias,
 * accumulation into C and alpha.
 */
const CASE: Case = {
  M: 67,
  N: 130,
  K: 72,
  batch: 2,
  bBatched: true,
  accumulate: true,
  bias: true,
  alpha: 0.75,
};

/**
 * Low-rank terms (the fused LoRA products): r = 6 reads one value of q per step, r = 8 four;
 * ragged M, N and a K with a short last step for BK 16 and 32, bias, accumulation and alpha.
 */
const LOW_RANK_CASES: Case[] = [6, 8].map((r) => ({
  M: 67,
  N: 130,
  K: 72,
  batch: 1,
  bBatched: false,
  accumulate: true,
  bias: true,
  alpha: 0.75,
  r,
  scale: 2.5,
}));

/** Runs every config on one case and returns the raw output words per config. */
async function runAll(
  gpu: Gpu,
  configs: MatmulConfig[],
  layout: MatmulLayout,
  dtype: "f32" | "f16",
  c: Case,
  seed: number,
): Promise<Uint32Array[] | Uint16Array[]> {
  const { M, N, K, batch } = c;
  const round = dtype === "f16" ? roundF16 : (x: Float32Array) => x;
  const a = round(randn(batch * M * K, seed));
  const b = round(randn((c.bBatched ? batch : 1) * K * N, seed + 1));
  const bias = c.bias ? round(randn(N, seed + 2)) : undefined;
  const c0 = c.accumulate ? round(randn(batch * M * N, seed + 3)) : undefined;
  using A = Tensor.from(gpu, a, [batch, ...(layout === "TN" ? [K, M] : [M, K])], dtype, { label: "A" });
  const bShape = layout === "NT" ? [N, K] : [K, N];
  using B = Tensor.from(gpu, b, c.bBatched ? [batch, ...bShape] : bShape, dtype, { label: "B" });
  using BIAS = bias ? Tensor.from(gpu, bias, [N], dtype, { label: "bias" }) : undefined;
  const r = c.r ?? 0;
  const a2 = randn(M * r, seed + 4);
  const b2 = randn(r * N, seed + 5);
  using A2 = Tensor.from(gpu, a2, [M, r], "f32", { label: "A2" });
  using B2 = Tensor.from(gpu, b2, layout === "NT" ? [N, r] : [r, N], "f32", { label: "B2" });
  const lowRank = c.r === undefined ? undefined : { a: A2, b: B2, scale: c.scale ?? 1 };
  const outs: (Uint32Array | Uint16Array)[] = [];
  for (const config of configs) {
    using C = Tensor.from(gpu, c0 ?? new Float32Array(batch * M * N).fill(NaN), [batch, M, N], dtype);
    matmul(A, B, { layout, config, bias: BIAS, accumulate: c.accumulate, alpha: c.alpha, out: C, lowRank });
    const host = await C.read();
    outs.push(host instanceof Float32Array ? new Uint32Array(host.buffer) : host as Uint16Array);
    if (outs.length === 1) {
      // The first config against the reference; the others must then match it bit for bit.
      const got = await C.readF32();
      let want = matmul_forward(a, b, {
        layout,
        M,
        N,
        K,
        batch,
        bBatched: c.bBatched,
        alpha: c.alpha,
        bias,
        c0,
      });
      if (lowRank) want = matmul_forward(a2, b2, { layout, M, N, K: r, alpha: lowRank.scale, c0: want });
      const rtol = dtype === "f16" ? 2 ** -10 : 1e-5;
      assertClose(got, want, {
        atol: 1e-6 * K + (dtype === "f16" ? 1e-3 : 0),
        rtol,
        name: configName(config),
      });
    }
  }
  return outs as Uint32Array[] | Uint16Array[];
}

function assertBitIdentical(
  outs: (Uint32Array | Uint16Array)[],
  configs: MatmulConfig[],
  what: string,
): void {
  for (let i = 1; i < outs.length; i++) {
    const differ = outs[i].findIndex((w, j) => w !== outs[0][j]);
    assert.equal(
      differ,
      -1,
      `${what}: ${configName(configs[i])} differs from ${configName(configs[0])} at element ${differ}`,
    );
  }
}

async function checkFamily(gpu: Gpu, configs: MatmulConfig[], dtype: "f32" | "f16"): Promise<void> {
  for (const [i, layout] of LAYOUTS.entries()) {
    const outs = await runAll(gpu, configs, layout, dtype, CASE, 10 + i);
    assertBitIdentical(outs, configs, `${layout} ${dtype} ${JSON.stringify(CASE)}`);
  }
}

/**
 * f32: both layouts with both ranks; f16 operands (the low-rank operands stay f32): NT with r 8
 * (the forward of an f16 layer) and NN with r 6.
 */
async function checkLowRankFamily(gpu: Gpu, configs: MatmulConfig[]): Promise<void> {
  const runs: ["NN" | "NT", "f32" | "f16", Case][] = [
    ["NN", "f32", LOW_RANK_CASES[0]],
    ["NN", "f32", LOW_RANK_CASES[1]],
    ["NT", "f32", LOW_RANK_CASES[0]],
    ["NT", "f32", LOW_RANK_CASES[1]],
  ];
  if (gpu.f16) runs.push(["NT", "f16", LOW_RANK_CASES[1]], ["NN", "f16", LOW_RANK_CASES[0]]);
  for (const [i, [layout, dtype, c]] of runs.entries()) {
    const outs = await runAll(gpu, configs, layout, dtype, c, 20 + i);
    assertBitIdentical(outs, configs, `${layout} ${dtype} ${JSON.stringify(c)}`);
  }
}

gpuTest(
  "every tiled candidate gives bit-identical f32 results (ragged, batched, bias, accumulate)",
  async (gpu) => {
    await checkFamily(gpu, TILED, "f32");
  },
);

gpuTest("every tiled candidate gives bit-identical results for f16 inputs, f16 tiles or f32", async (gpu) => {
  // f32 tiles against f16 tiles (widening f16 to f32 is exact) of another shape and BK.
  await checkFamily(gpu, [TILED[0], TILED[2]], "f16");
}, { needsF16: true });

gpuTest("every direct candidate gives bit-identical results in f32 and f16", async (gpu) => {
  await checkFamily(gpu, DIRECT, "f32");
  if (gpu.f16) await checkFamily(gpu, DIRECT, "f16");
});

gpuTest(
  "every tiled candidate gives bit-identical results with a low-rank term, f32 and f16",
  async (gpu) => {
    // The two tiles that differ in every dimension (TM 8 and TN 8; f16 tiles or not).
    await checkLowRankFamily(gpu, [TILED[1], TILED[2]]);
  },
);

gpuTest(
  "every direct candidate gives bit-identical results with a low-rank term, f32 and f16",
  async (gpu) => {
    await checkLowRankFamily(gpu, DIRECT);
  },
);
