// GPU attention (kernels/ops/attention.ts) against the CPU reference (kernels/reference/attention.ts).
// B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads, hd = head dim, W = window.
// Tolerances |gpu − ref| <= atol + rtol·|ref|: f32 atol 2e-5, rtol 1e-4 (f32 sums in another order than
// the reference's f64); f16 inputs atol 1e-2, rtol 1e-2 against a reference fed the f16-rounded inputs.
// Tiles: the adapter's choice, SMALL (one row per thread) and BLOCKED (register blocks of 2 and 4 rows per
// thread, p tiles read as vec4), small enough that short rows span many tiles.
import assert from "node:assert/strict";
import {
  attentionBackward,
  attentionForward,
  type AttentionKernel,
  type AttentionTile,
  attentionTileCost,
  chooseAttentionTile,
} from "../../kernels/ops/attention.ts";
import { attentionSharedBytes, attentionThreads } from "../../kernels/ops/attention_wgsl.ts";
import {
  attention_backward,
  attention_forward,
  type AttentionDims,
  doc_ids_from_positions,
} from "../../kernels/reference/attention.ts";
import { memoryStats, readTensors, resetPeakMemory, Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpu, gpuTest, nanTensor, randn, rng, roundF16, type Tolerance } from "./_harness.ts";
import type { Gpu } from "../../kernels/device.ts";

const F32: Tolerance = { atol: 2e-5, rtol: 1e-4 };
const F16: Tolerance = { atol: 1e-2, rtol: 1e-2 };

interface Case {
  B: number;
  S: number;
  H: number;
  Hkv: number;
  hd: number;
  window?: number;
  /** Documents per row (packing), drawn at random cut points; absent: one per row. */
  docsPerRow?: number;
  tiles?: Partial<Record<AttentionKernel, AttentionTile>>;
  /** dtype of q, k, v (and out); dout too unless `doutDtype` says otherwise. */
  dtype?: "f32" | "f16";
  doutDtype?: "f32" | "f16";
  seed: number;
}

/** doc[T] for `n` documents per row with random lengths, via position ids as packing writes them. */
function packedDocs(B: number, S: number, n: number, seed: number): Int32Array {
  const next = rng(seed);
  const positions = new Int32Array(B * S);
  for (let b = 0; b < B; b++) {
    const cuts = new Set<number>();
    while (cuts.size < n - 1) cuts.add(1 + Math.floor(next() * (S - 1)));
    let pos = 0;
    for (let i = 0; i < S; i++) {
      if (cuts.has(i)) pos = 0;
      positions[b * S + i] = pos++;
    }
  }
  return doc_ids_from_positions(positions, B, S);
}

/** Runs forward and backward on the GPU and the reference, and compares all five results. */
async function checkCase(gpu: Gpu, c: Case): Promise<void> {
  const { B, S, H, Hkv, hd } = c;
  const T = B * S;
  const dtype = c.dtype ?? "f32";
  const tol = dtype === "f16" ? F16 : F32;
  const round = (x: Float32Array) => dtype === "f16" ? roundF16(x) : x;
  const q = round(randn(T * H * hd, c.seed));
  const k = round(randn(T * Hkv * hd, c.seed + 1));
  const v = round(randn(T * Hkv * hd, c.seed + 2));
  const doutDtype = c.doutDtype ?? dtype;
  const dout = doutDtype === "f16" ? roundF16(randn(T * H * hd, c.seed + 3)) : randn(T * H * hd, c.seed + 3);
  const docIds = c.docsPerRow ? packedDocs(B, S, c.docsPerRow, c.seed + 4) : null;
  const dims: AttentionDims = { B, S, H, Hkv, hd, window: c.window ?? null, docIds };
  const ref = attention_forward(q, k, v, dims);
  // The backward gets the reference's out (rounded like the GPU's) and lse, so it is checked on its own.
  const refOut = round(ref.out);
  const grads = attention_backward(dout, q, k, v, refOut, ref.lse, dims);

  using tq = Tensor.from(gpu, q, [T, H, hd], dtype, { label: "q" });
  using tk = Tensor.from(gpu, k, [T, Hkv, hd], dtype, { label: "k" });
  using tv = Tensor.from(gpu, v, [T, Hkv, hd], dtype, { label: "v" });
  using tdout = Tensor.from(gpu, dout, [T, H, hd], doutDtype, { label: "dout" });
  using docs = docIds ? Tensor.from(gpu, Uint32Array.from(docIds), [T], "u32", { label: "docs" }) : null;
  const mask = { S, window: c.window, docs, tiles: c.tiles };
  using out = nanTensor(gpu, [T, H, hd], dtype, "out");
  using lse = nanTensor(gpu, [T, H], "f32", "lse");
  attentionForward(tq, tk, tv, { ...mask, out, lse });
  using refOutT = Tensor.from(gpu, refOut, [T, H, hd], dtype, { label: "ref_out" });
  using refLse = Tensor.from(gpu, ref.lse, [T, H], "f32", { label: "ref_lse" });
  using dq = nanTensor(gpu, [T, H, hd], "f32", "dq");
  using dk = nanTensor(gpu, [T, Hkv, hd], "f32", "dk");
  using dv = nanTensor(gpu, [T, Hkv, hd], "f32", "dv");
  attentionBackward(tdout, tq, tk, tv, refOutT, refLse, { ...mask, dq, dk, dv });

  const [gOut, gLse, gDq, gDk, gDv] = await Promise.all([out, lse, dq, dk, dv].map((t) => t.readF32()));
  const name = `B=${B} S=${S} H=${H} Hkv=${Hkv} hd=${hd} W=${c.window ?? "-"} docs=${
    c.docsPerRow ?? 1
  } ${dtype} dout ${doutDtype} tiles ${JSON.stringify(c.tiles ?? "chosen")}`;
  assertClose(gOut, ref.out, { ...tol, name: `out (${name})` });
  assertClose(gLse, ref.lse, { ...tol, name: `lse (${name})` });
  assertClose(gDq, grads.dq, { ...tol, name: `dq (${name})` });
  assertClose(gDk, grads.dk, { ...tol, name: `dk (${name})` });
  assertClose(gDv, grads.dv, { ...tol, name: `dv (${name})` });
}

/** Small tiles, so that short test rows span many tiles (edges, skipped and partly masked tiles). */
const SMALL: Partial<Record<AttentionKernel, AttentionTile>> = {
  forward: { BR: 8, BC: 8, TPR: 2 },
  dq: { BR: 8, BC: 4, TPR: 2 },
  dkdv: { BR: 4, BC: 8, TPR: 2 },
};

/**
 * Small register-blocked tiles: 4 query rows (forward), 2 (dq) or 4 keys (dkdv) per thread, so row groups
 * straddle the end of a row, the causal diagonal and document edges; RPT 4 reads p and ds as vec4.
 */
const BLOCKED: Partial<Record<AttentionKernel, AttentionTile>> = {
  forward: { BR: 8, BC: 8, TPR: 2, RPT: 4 },
  dq: { BR: 8, BC: 4, TPR: 2, RPT: 2 },
  dkdv: { BR: 4, BC: 8, TPR: 2, RPT: 4 },
};

gpuTest(
  "attention matches the reference: causal only, H = Hkv, hd 16, S not a multiple of the tile",
  async (gpu) => {
    await checkCase(gpu, { B: 2, S: 37, H: 2, Hkv: 2, hd: 16, seed: 1 });
    await checkCase(gpu, { B: 2, S: 37, H: 2, Hkv: 2, hd: 16, tiles: SMALL, seed: 2 });
  },
);

gpuTest("attention matches the reference: GQA with H = 4·Hkv, hd 32", async (gpu) => {
  await checkCase(gpu, { B: 2, S: 45, H: 4, Hkv: 1, hd: 32, seed: 3 });
  await checkCase(gpu, { B: 2, S: 29, H: 8, Hkv: 2, hd: 32, tiles: SMALL, seed: 4 });
});

gpuTest("attention matches the reference with hd 64 (GQA, causal)", async (gpu) => {
  await checkCase(gpu, { B: 2, S: 33, H: 4, Hkv: 1, hd: 64, seed: 5 });
});

gpuTest("attention matches the reference with a sliding window", async (gpu) => {
  await checkCase(gpu, { B: 2, S: 41, H: 4, Hkv: 1, hd: 16, window: 12, seed: 6 });
  await checkCase(gpu, { B: 2, S: 41, H: 4, Hkv: 2, hd: 32, window: 12, tiles: SMALL, seed: 7 });
});

gpuTest(
  "attention is correct when the window is smaller than a tile (fully masked rows and tiles)",
  async (gpu) => {
    // W = 3 < Br, Bc: whole key tiles are out of some rows' reach, and rows of a visited tile see no key of it.
    await checkCase(gpu, { B: 2, S: 40, H: 2, Hkv: 1, hd: 16, window: 3, tiles: SMALL, seed: 8 });
    await checkCase(gpu, { B: 2, S: 40, H: 2, Hkv: 1, hd: 16, window: 3, seed: 9 });
    await checkCase(gpu, { B: 2, S: 19, H: 2, Hkv: 2, hd: 16, window: 1, tiles: SMALL, seed: 10 });
  },
);

gpuTest("attention matches the reference with packed documents (2 and 3 per row)", async (gpu) => {
  await checkCase(gpu, { B: 2, S: 43, H: 4, Hkv: 1, hd: 32, docsPerRow: 2, seed: 11 });
  await checkCase(gpu, { B: 2, S: 43, H: 4, Hkv: 1, hd: 16, docsPerRow: 3, tiles: SMALL, seed: 12 });
  await checkCase(gpu, { B: 2, S: 35, H: 2, Hkv: 2, hd: 64, docsPerRow: 3, seed: 13 });
});

gpuTest("attention matches the reference with documents and a window together", async (gpu) => {
  await checkCase(gpu, {
    B: 2,
    S: 47,
    H: 4,
    Hkv: 1,
    hd: 16,
    window: 6,
    docsPerRow: 3,
    tiles: SMALL,
    seed: 14,
  });
});

gpuTest(
  "attention with several rows per thread (register blocks of 2 and 4) matches the reference under every mask",
  async (gpu) => {
    await checkCase(gpu, { B: 2, S: 37, H: 4, Hkv: 2, hd: 16, tiles: BLOCKED, seed: 31 });
    await checkCase(gpu, { B: 2, S: 41, H: 4, Hkv: 1, hd: 16, window: 5, tiles: BLOCKED, seed: 32 });
    await checkCase(gpu, { B: 2, S: 43, H: 4, Hkv: 1, hd: 16, docsPerRow: 3, tiles: BLOCKED, seed: 33 });
    await checkCase(gpu, { B: 2, S: 24, H: 2, Hkv: 1, hd: 16, docsPerRow: 24, tiles: BLOCKED, seed: 34 });
  },
);

gpuTest("attention gives the same bits when run twice on the same inputs", async (gpu) => {
  const B = 2, S = 29, H = 4, Hkv = 2, hd = 32, T = B * S;
  using q = Tensor.from(gpu, randn(T * H * hd, 41), [T, H, hd]);
  using k = Tensor.from(gpu, randn(T * Hkv * hd, 42), [T, Hkv, hd]);
  using v = Tensor.from(gpu, randn(T * Hkv * hd, 43), [T, Hkv, hd]);
  using dout = Tensor.from(gpu, randn(T * H * hd, 44), [T, H, hd]);
  using docs = Tensor.from(gpu, Uint32Array.from(packedDocs(B, S, 2, 45)), [T], "u32");
  const once = async () => {
    const { out, lse } = attentionForward(q, k, v, { S, window: 11, docs });
    const { dq, dk, dv } = attentionBackward(dout, q, k, v, out, lse, { S, window: 11, docs });
    const all = [out, lse, dq, dk, dv];
    const values = await readTensors(all);
    for (const t of all) t.destroy();
    return values.map((x) => new Uint32Array(x.buffer, x.byteOffset, x.length));
  };
  const [first, second] = [await once(), await once()];
  ["out", "lse", "dq", "dk", "dv"].forEach((name, i) => assert.deepEqual(second[i], first[i], name));
});

gpuTest("attention skips key tiles of other documents and stays exact (one-token documents)", async (gpu) => {
  // Every token its own document: each query sees only itself, out = v of its kv head, lse = scale·q·k.
  await checkCase(gpu, { B: 2, S: 24, H: 2, Hkv: 1, hd: 16, docsPerRow: 24, tiles: SMALL, seed: 15 });
});

gpuTest(
  "attention runs hd 128 with this adapter's tiles and with those for WebGPU's default 16 KiB",
  async (gpu) => {
    await checkCase(gpu, { B: 2, S: 21, H: 2, Hkv: 1, hd: 128, window: 9, seed: 16 });
    // GL compiles workgroup memory of this size for minutes (see GL_STORAGE_BYTES in attention.ts).
    if (gpu.info.backend === "gl") return;
    const tiles: Partial<Record<AttentionKernel, AttentionTile>> = {};
    for (const kernel of ["forward", "dq", "dkdv"] as const) {
      tiles[kernel] = chooseAttentionTile(gpu, kernel, 128, { storageBytes: 16384 });
    }
    await checkCase(gpu, { B: 2, S: 21, H: 2, Hkv: 1, hd: 128, window: 9, tiles, seed: 17 });
  },
);

gpuTest("attention with f16 q, k, v, dout matches the reference within f16 tolerance", async (gpu) => {
  await checkCase(gpu, { B: 2, S: 37, H: 4, Hkv: 1, hd: 32, docsPerRow: 2, dtype: "f16", seed: 18 });
  await checkCase(gpu, {
    B: 2,
    S: 30,
    H: 2,
    Hkv: 2,
    hd: 16,
    window: 5,
    tiles: SMALL,
    dtype: "f16",
    seed: 19,
  });
  // f16 tiles with several rows per thread.
  await checkCase(gpu, {
    B: 2,
    S: 29,
    H: 4,
    Hkv: 2,
    hd: 16,
    docsPerRow: 2,
    tiles: BLOCKED,
    dtype: "f16",
    seed: 20,
  });
}, { needsF16: true });

gpuTest(
  "attention with f16 q, k, v and f32 dout (training's dtypes: f16 and f32 tiles together, GPU tiles) matches the reference",
  async (gpu) => {
    await checkCase(gpu, {
      B: 2,
      S: 33,
      H: 4,
      Hkv: 2,
      hd: 32,
      window: 13,
      dtype: "f16",
      doutDtype: "f32",
      seed: 22,
    });
    // The tiles a GPU gets for these dtypes (at most 32 KiB here): 128 or more threads, blocks of 4 rows.
    const floats = { q: "f16", k: "f16", v: "f16", dout: "f32" } as const;
    const storageBytes = Math.min(32768, gpu.limits.maxComputeWorkgroupStorageSize);
    const tiles: Partial<Record<AttentionKernel, AttentionTile>> = {};
    for (const kernel of ["forward", "dq", "dkdv"] as const) {
      tiles[kernel] = chooseAttentionTile(gpu, kernel, 128, { storageBytes, software: false, floats });
    }
    await checkCase(gpu, {
      B: 1,
      S: 70,
      H: 4,
      Hkv: 1,
      hd: 128,
      docsPerRow: 2,
      tiles,
      dtype: "f16",
      doutDtype: "f32",
      seed: 23,
    });
  },
  { needsF16: true },
);

gpuTest("attention's scale override equals scaling q (out, lse and dq·scale)", async (gpu) => {
  const B = 1, S = 19, H = 2, Hkv = 1, hd = 16, T = B * S;
  const scale = 0.4;
  const q = randn(T * H * hd, 21);
  const k = randn(T * Hkv * hd, 22);
  const v = randn(T * Hkv * hd, 23);
  const dout = randn(T * H * hd, 24);
  // scale·q·k = (1/sqrt(hd))·q'·k with q' = q·scale·sqrt(hd)
  const factor = scale * Math.sqrt(hd);
  const qScaled = q.map((x) => x * factor);
  const dims: AttentionDims = { B, S, H, Hkv, hd };
  const ref = attention_forward(qScaled, k, v, dims);
  const grads = attention_backward(dout, qScaled, k, v, ref.out, ref.lse, dims);
  using tq = Tensor.from(gpu, q, [T, H, hd]);
  using tk = Tensor.from(gpu, k, [T, Hkv, hd]);
  using tv = Tensor.from(gpu, v, [T, Hkv, hd]);
  using tdout = Tensor.from(gpu, dout, [T, H, hd]);
  const fwd = attentionForward(tq, tk, tv, { S, scale });
  const bwd = attentionBackward(tdout, tq, tk, tv, fwd.out, fwd.lse, { S, scale });
  const [out, lse, dq, dk, dv] = await readTensors([fwd.out, fwd.lse, bwd.dq, bwd.dk, bwd.dv]);
  for (const t of [fwd.out, fwd.lse, bwd.dq, bwd.dk, bwd.dv]) t.destroy();
  assertClose(out, ref.out, { ...F32, name: "out" });
  assertClose(lse, ref.lse, { ...F32, name: "lse" });
  // dL/dq = dL/dq' · factor
  assertClose(dq, grads.dq.map((x) => x * factor), { ...F32, name: "dq" });
  assertClose(dk, grads.dk, { ...F32, name: "dk" });
  assertClose(dv, grads.dv, { ...F32, name: "dv" });
});

gpuTest("attention's backward holds memory linear in T (no [S,S] buffer)", async (gpu) => {
  const B = 1, S = 256, H = 2, Hkv = 1, hd = 16, T = B * S;
  using q = Tensor.from(gpu, randn(T * H * hd, 31), [T, H, hd]);
  using k = Tensor.from(gpu, randn(T * Hkv * hd, 32), [T, Hkv, hd]);
  using v = Tensor.from(gpu, randn(T * Hkv * hd, 33), [T, Hkv, hd]);
  using dout = Tensor.from(gpu, randn(T * H * hd, 34), [T, H, hd]);
  const before = memoryStats(gpu).liveBytes;
  resetPeakMemory(gpu);
  const { out, lse } = attentionForward(q, k, v, { S });
  const { dq, dk, dv } = attentionBackward(dout, q, k, v, out, lse, { S });
  const peak = memoryStats(gpu).peakBytes - before;
  // outputs + stats[T,H,2]; pool buckets round each up by at most 25%
  const linear = 4 * (2 * T * H * hd + T * H + 2 * T * Hkv * hd + 2 * T * H);
  assert.ok(peak <= 1.25 * linear + 6 * 256, `peak ${peak} bytes > ${1.25 * linear} (linear in T)`);
  assert.ok(S * S * H * 4 > 1.25 * linear, "the check would not see an [S,S] score buffer");
  await readTensors([dq]);
  for (const t of [out, lse, dq, dk, dv]) t.destroy();
});

Deno.test(
  "chooseAttentionTile fits WebGPU's default limits for hd 16, 32, 64, 128 (and small memory on GL)",
  { ignore: gpu === null },
  () => {
    for (const hd of [16, 32, 64, 128]) {
      for (const kernel of ["forward", "dq", "dkdv"] as const) {
        for (const floats of ["f32", "f16"] as const) {
          const tile = chooseAttentionTile(gpu!, kernel, hd, { storageBytes: 16384, threads: 256, floats });
          const what = `${kernel} hd ${hd} ${floats}: ${JSON.stringify(tile)}`;
          assert.ok(attentionSharedBytes(kernel, hd, tile, floats) <= 16384, what);
          assert.ok(attentionThreads(kernel, tile) <= 256, what);
          assert.equal((hd / 4) % tile.TPR, 0, what);
          assert.ok(tile.BR >= 4 && tile.BC >= 4, `${what} is needlessly small`);
        }
        if (gpu!.info.backend === "gl" && hd <= 32) {
          const chosen = chooseAttentionTile(gpu!, kernel, hd);
          assert.ok(
            attentionSharedBytes(kernel, hd, chosen) <= 2048,
            `GL ${kernel} hd ${hd}: ${JSON.stringify(chosen)}`,
          );
        }
      }
    }
  },
);

Deno.test(
  "chooseAttentionTile blocks several rows per thread on a GPU with 48 KiB (Llama-3-8B's hd 128, f16 tiles)",
  { ignore: gpu === null },
  () => {
    const floats = { q: "f16", k: "f16", v: "f16", dout: "f32" } as const;
    for (const kernel of ["forward", "dq", "dkdv"] as const) {
      const tile = chooseAttentionTile(gpu!, kernel, 128, { storageBytes: 49152, software: false, floats });
      const what = `${kernel}: ${JSON.stringify(tile)}`;
      assert.ok(attentionSharedBytes(kernel, 128, tile, floats) <= 49152, what);
      assert.ok(attentionThreads(kernel, tile) >= 128 && attentionThreads(kernel, tile) <= 256, what);
      assert.ok(tile.RPT >= 2, `${what}: one row per thread`);
      // Each loaded vec4 of the score block serves at least 2 dot products on both sides.
      assert.ok((kernel === "dkdv" ? tile.BR : tile.BC) / tile.TPR >= 2, what);
    }
    // Per pair, the estimated workgroup-memory loads fall with more rows per thread.
    const base = { BR: 64, BC: 32, TPR: 8 };
    assert.ok(
      attentionTileCost("forward", 128, { ...base, RPT: 4 }, 2) <
        attentionTileCost("forward", 128, { ...base, RPT: 1 }, 2),
    );
  },
);

gpuTest("attention rejects mismatched shapes, a bad S, hd not a multiple of 4 and bad docs", (gpu) => {
  using q = Tensor.empty(gpu, [8, 4, 16]);
  using k = Tensor.empty(gpu, [8, 2, 16]);
  using k3 = Tensor.empty(gpu, [8, 3, 16]);
  using q6 = Tensor.empty(gpu, [8, 1, 6]);
  using docs = Tensor.empty(gpu, [7], "u32");
  using fdocs = Tensor.empty(gpu, [8], "f32");
  assert.throws(
    () => attentionForward(q, k3, k3),
    /Cannot run attention forward: H "4" is not a multiple of Hkv "3"/,
  );
  assert.throws(() => attentionForward(q, k, q), /"tensor" has shape \[8,4,16\], expected \[8,2,16\]/);
  assert.throws(() => attentionForward(q, k, k, { S: 3 }), /S "3" does not divide T "8"/);
  assert.throws(() => attentionForward(q6, q6, q6), /head dim "6" is not a multiple of 4/);
  assert.throws(() => attentionForward(q, k, k, { docs }), /expected \[8\]/);
  assert.throws(() => attentionForward(q, k, k, { docs: fdocs }), /must be u32 or i32/);
  assert.throws(() => attentionForward(q, k, k, { window: 0 }), /window "0" must be a positive integer/);
  assert.throws(
    () => attentionForward(q, k, k, { tiles: { forward: { BR: 8, BC: 6, TPR: 4 } } }),
    /Cannot build attention forward tile .* Bc multiples of TPR/,
  );
  assert.throws(
    () => attentionForward(q, k, k, { tiles: { forward: { BR: 6, BC: 8, TPR: 2, RPT: 4 } } }),
    /Br a multiple of RPT/,
  );
});
