// GPU attention (kernels/ops/attention.ts) on tensors split into row chunks (`maxChunkBytes`), against the
// CPU reference (kernels/reference/attention.ts) and against the same call on whole tensors.
// B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads, hd = head dim, W = window.
// Tolerances |gpu − ref| <= atol + rtol·|ref|: against the reference as tests/kernels/attention_test.ts
// (f32 atol 2e-5, rtol 1e-4; f16 inputs 1e-2, 1e-2). Against whole tensors: f32 atol 1e-6, rtol 1e-5, since
// only the order of f32 sums differs (the softmax state and the gradients pass between dispatches as
// f32 or the output dtype); f16 outputs one f16 rounding more: atol 2e-3, rtol 2e-3.
import assert from "node:assert/strict";
import {
  attentionBackward,
  attentionForward,
  type AttentionKernel,
  type AttentionTile,
} from "../../kernels/ops/attention.ts";
import {
  attention_backward,
  attention_forward,
  type AttentionDims,
  doc_ids_from_positions,
} from "../../kernels/reference/attention.ts";
import { recorder } from "../../kernels/recorder.ts";
import { type DType, DTYPE_BYTES, type HostArray, Tensor } from "../../kernels/tensor.ts";
import type { Gpu } from "../../kernels/device.ts";
import { assertClose, gpuTest, randn, rng, roundF16, type Tolerance } from "./_harness.ts";

const F32: Tolerance = { atol: 2e-5, rtol: 1e-4 };
const F16: Tolerance = { atol: 1e-2, rtol: 1e-2 };
const SAME_F32: Tolerance = { atol: 1e-6, rtol: 1e-5 };
const SAME_F16: Tolerance = { atol: 2e-3, rtol: 2e-3 };

/** The tensors of a call that can be split. */
type Name = "q" | "k" | "v" | "docs" | "out" | "lse" | "dout" | "dq" | "dk" | "dv";

interface Case {
  B: number;
  S: number;
  H: number;
  Hkv: number;
  hd: number;
  window?: number;
  /** Documents per row (packing) at random cut points; absent: one per row. */
  docsPerRow?: number;
  tiles?: Partial<Record<AttentionKernel, AttentionTile>>;
  dtype?: "f32" | "f16";
  /** Tokens per chunk of each split tensor; the others stay whole. */
  rows: Partial<Record<Name, number>>;
  seed: number;
}

/** Small tiles, so that short rows span many tiles and chunk boundaries fall inside tiles. */
const SMALL: Partial<Record<AttentionKernel, AttentionTile>> = {
  forward: { BR: 8, BC: 8, TPR: 2 },
  dq: { BR: 8, BC: 4, TPR: 2 },
  dkdv: { BR: 4, BC: 8, TPR: 2 },
};

/** The same with several rows per thread (4 queries, 2 queries, 4 keys): chunk boundaries cut row groups. */
const BLOCKED: Partial<Record<AttentionKernel, AttentionTile>> = {
  forward: { BR: 8, BC: 8, TPR: 2, RPT: 4 },
  dq: { BR: 8, BC: 4, TPR: 2, RPT: 2 },
  dkdv: { BR: 4, BC: 8, TPR: 2, RPT: 4 },
};

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

/** Results of one GPU forward and backward. */
interface Results {
  out: Float32Array;
  lse: Float32Array;
  dq: Float32Array;
  dk: Float32Array;
  dv: Float32Array;
}

/**
 * Runs forward and backward on the GPU with the tensors named in `rows` split into chunks of that many
 * tokens (every one checked to be split); outputs start as NaN, so an element no dispatch wrote fails.
 * The backward gets `out` and `lse` from the host (the reference's), so it is checked on its own.
 */
async function run(
  gpu: Gpu,
  c: Case,
  host: Record<"q" | "k" | "v" | "dout" | "refOut" | "refLse", Float32Array>,
  docIds: Int32Array | null,
  rows: Partial<Record<Name, number>>,
): Promise<Results> {
  const { B, S, H, Hkv, hd } = c;
  const T = B * S;
  const dtype = c.dtype ?? "f32";
  const made: Tensor[] = [];
  const tensor = (name: Name, data: HostArray, shape: number[], dt: DType): Tensor => {
    const n = rows[name];
    const rowBytes = (shape.slice(1).reduce((a, b) => a * b, 1)) * DTYPE_BYTES[dt];
    const t = Tensor.from(gpu, data, shape, dt, {
      label: name,
      ...(n === undefined ? {} : { maxChunkBytes: n * rowBytes }),
    });
    made.push(t);
    if (n !== undefined) assert.ok(t.chunks.length > 1, `${name} is split (${n} of ${T} tokens per chunk)`);
    return t;
  };
  const nan = (name: Name, shape: number[], dt: "f32" | "f16") => {
    const n = shape.reduce((a, b) => a * b, 1);
    return tensor(
      name,
      dt === "f16" ? new Uint16Array(n).fill(0x7e00) : new Float32Array(n).fill(NaN),
      shape,
      dt,
    );
  };
  try {
    const q = tensor("q", host.q, [T, H, hd], dtype);
    const k = tensor("k", host.k, [T, Hkv, hd], dtype);
    const v = tensor("v", host.v, [T, Hkv, hd], dtype);
    const dout = tensor("dout", host.dout, [T, H, hd], dtype);
    const docs = docIds ? tensor("docs", Uint32Array.from(docIds), [T], "u32") : null;
    const mask = { S, window: c.window, docs, tiles: c.tiles };
    const out = nan("out", [T, H, hd], dtype);
    const lse = nan("lse", [T, H], "f32");
    attentionForward(q, k, v, { ...mask, out, lse });
    // The backward's out and lse are other tensors than the forward's outputs, split as those are.
    const refOut = tensor("out", host.refOut, [T, H, hd], dtype);
    const refLse = tensor("lse", host.refLse, [T, H], "f32");
    const dq = nan("dq", [T, H, hd], "f32");
    const dk = nan("dk", [T, Hkv, hd], "f32");
    const dv = nan("dv", [T, Hkv, hd], "f32");
    attentionBackward(dout, q, k, v, refOut, refLse, { ...mask, dq, dk, dv });
    const [o, l, gq, gk, gv] = await Promise.all([out, lse, dq, dk, dv].map((t) => t.readF32()));
    return { out: o, lse: l, dq: gq, dk: gk, dv: gv };
  } finally {
    for (const t of made) t.destroy();
  }
}

/** Compares the split run with the reference and with the same call on whole tensors. */
async function checkCase(gpu: Gpu, c: Case): Promise<void> {
  const { B, S, H, Hkv, hd } = c;
  const T = B * S;
  const dtype = c.dtype ?? "f32";
  const round = (x: Float32Array) => dtype === "f16" ? roundF16(x) : x;
  const q = round(randn(T * H * hd, c.seed));
  const k = round(randn(T * Hkv * hd, c.seed + 1));
  const v = round(randn(T * Hkv * hd, c.seed + 2));
  const dout = round(randn(T * H * hd, c.seed + 3));
  const docIds = c.docsPerRow ? packedDocs(B, S, c.docsPerRow, c.seed + 4) : null;
  const dims: AttentionDims = { B, S, H, Hkv, hd, window: c.window ?? null, docIds };
  const ref = attention_forward(q, k, v, dims);
  const refOut = round(ref.out);
  const grads = attention_backward(dout, q, k, v, refOut, ref.lse, dims);
  const host = { q, k, v, dout, refOut, refLse: ref.lse };

  const split = await run(gpu, c, host, docIds, c.rows);
  const whole = await run(gpu, c, host, docIds, {});
  const name = `B=${B} S=${S} H=${H} Hkv=${Hkv} hd=${hd} W=${c.window ?? "-"} docs=${c.docsPerRow ?? 1} ` +
    `${dtype} rows ${JSON.stringify(c.rows)}`;
  const tol = dtype === "f16" ? F16 : F32;
  const expected: Results = { out: ref.out, lse: ref.lse, dq: grads.dq, dk: grads.dk, dv: grads.dv };
  for (const key of ["out", "lse", "dq", "dk", "dv"] as const) {
    assertClose(split[key], expected[key], { ...tol, name: `${key} vs reference (${name})` });
    const same = dtype === "f16" && key === "out" ? SAME_F16 : SAME_F32;
    assertClose(split[key], whole[key], { ...same, name: `${key} vs whole tensors (${name})` });
  }
}

gpuTest(
  "attention on tensors split into row chunks that cut rows and tiles matches the reference and whole tensors",
  async (gpu) => {
    // Every tensor split at its own token counts: no boundary lines up with S = 37 or with another's.
    const rows = { q: 11, k: 7, v: 13, out: 9, lse: 17, dout: 6, dq: 10, dk: 12, dv: 8 };
    await checkCase(gpu, { B: 2, S: 37, H: 4, Hkv: 2, hd: 16, rows, tiles: SMALL, seed: 1 });
    await checkCase(gpu, { B: 2, S: 37, H: 4, Hkv: 2, hd: 16, rows, seed: 2 });
  },
);

gpuTest(
  "split attention with GQA (H = 4·Hkv) and a sliding window skips out-of-reach key spans",
  async (gpu) => {
    const rows = { q: 5, k: 6, v: 4, out: 7, lse: 9, dout: 5, dq: 6, dk: 3, dv: 11 };
    await checkCase(gpu, { B: 2, S: 41, H: 8, Hkv: 2, hd: 32, window: 6, rows, tiles: SMALL, seed: 3 });
    // A window smaller than a tile: rows of a span see no key of a visited key span.
    await checkCase(gpu, { B: 2, S: 40, H: 2, Hkv: 1, hd: 16, window: 3, rows, tiles: SMALL, seed: 4 });
  },
);

gpuTest(
  "split attention with packed documents, docs split too (query and key ids from two chunks)",
  async (gpu) => {
    await checkCase(gpu, {
      B: 3,
      S: 29,
      H: 4,
      Hkv: 1,
      hd: 16,
      docsPerRow: 3,
      rows: { q: 13, k: 6, v: 6, docs: 10, out: 13, lse: 20, dout: 13, dq: 7, dk: 9, dv: 6 },
      tiles: SMALL,
      seed: 5,
    });
    // Documents and a window together; docs whole, read through one binding by the split kernels.
    await checkCase(gpu, {
      B: 2,
      S: 47,
      H: 4,
      Hkv: 2,
      hd: 16,
      window: 9,
      docsPerRow: 3,
      rows: { q: 20, k: 15, v: 15, out: 20, lse: 33, dout: 20, dq: 20, dk: 15, dv: 15 },
      tiles: BLOCKED,
      seed: 6,
    });
  },
);

gpuTest(
  "split attention when only some tensors are split: outputs only, inputs only, chunks spanning rows",
  async (gpu) => {
    await checkCase(gpu, {
      B: 2,
      S: 33,
      H: 2,
      Hkv: 1,
      hd: 16,
      rows: { out: 10, lse: 7, dq: 12, dk: 5 },
      seed: 7,
    });
    await checkCase(gpu, { B: 2, S: 33, H: 2, Hkv: 1, hd: 16, rows: { q: 14, k: 9, dout: 30 }, seed: 8 });
    // Chunks of 19 tokens over rows of 8: one chunk holds parts of three rows.
    const rows = { q: 19, k: 19, v: 19, out: 19, lse: 19, dout: 19, dq: 19, dk: 19, dv: 19 };
    await checkCase(gpu, { B: 5, S: 8, H: 2, Hkv: 2, hd: 16, window: 5, rows, tiles: SMALL, seed: 9 });
  },
);

gpuTest("split attention with f16 q, k, v, dout and out stays within f16 tolerance", async (gpu) => {
  await checkCase(gpu, {
    B: 2,
    S: 37,
    H: 4,
    Hkv: 1,
    hd: 32,
    docsPerRow: 2,
    dtype: "f16",
    rows: { q: 9, k: 11, v: 7, out: 13, lse: 10, dout: 8, dq: 6, dk: 10, dv: 12 },
    seed: 10,
  });
}, { needsF16: true });

gpuTest("split attention dispatches only the (query span, key span) pairs that can interact", async (gpu) => {
  const count = async (B: number, S: number, window: number | undefined, chunkRows: number | null) => {
    const T = B * S, H = 2, Hkv = 1, hd = 16;
    const opts = (rowBytes: number) => chunkRows === null ? {} : { maxChunkBytes: chunkRows * rowBytes };
    using q = Tensor.from(gpu, randn(T * H * hd, 1), [T, H, hd], "f32", opts(H * hd * 4));
    using k = Tensor.from(gpu, randn(T * Hkv * hd, 2), [T, Hkv, hd], "f32", opts(Hkv * hd * 4));
    using v = Tensor.from(gpu, randn(T * Hkv * hd, 3), [T, Hkv, hd], "f32", opts(Hkv * hd * 4));
    using dout = Tensor.from(gpu, randn(T * H * hd, 4), [T, H, hd], "f32", opts(H * hd * 4));
    using out = Tensor.empty(gpu, [T, H, hd], "f32", opts(H * hd * 4));
    using lse = Tensor.empty(gpu, [T, H], "f32", opts(H * 4));
    using dq = Tensor.empty(gpu, [T, H, hd], "f32", opts(H * hd * 4));
    using dk = Tensor.empty(gpu, [T, Hkv, hd], "f32", opts(Hkv * hd * 4));
    using dv = Tensor.empty(gpu, [T, Hkv, hd], "f32", opts(Hkv * hd * 4));
    const rec = recorder(gpu);
    const start = rec.dispatchCount;
    attentionForward(q, k, v, { S, window, out, lse });
    const forward = rec.dispatchCount - start;
    attentionBackward(dout, q, k, v, out, lse, { S, window, dq, dk, dv });
    const backward = rec.dispatchCount - start - forward;
    // The results are right too: the same call on whole tensors gives the same values.
    const [o, l, gq] = await Promise.all([out, lse, dq].map((t) => t.readF32()));
    return { forward, backward, o, l, gq };
  };
  // 64 tokens in 4 spans of 16: causal pairs 4 + 3 + 2 + 1; with W = 8 each span also reaches one back.
  const causal = await count(1, 64, undefined, 16);
  assert.equal(causal.forward, 10);
  assert.equal(causal.backward, 4 + 10 + 10, "stats per span, dq and dkdv per interacting pair");
  const windowed = await count(1, 64, 8, 16);
  assert.equal(windowed.forward, 4 + 3);
  assert.equal(windowed.backward, 4 + 7 + 7);
  assert.equal((await count(1, 64, 1, 16)).forward, 4);
  // Spans that are whole rows: rows never see each other.
  const rows = await count(4, 16, undefined, 16);
  assert.equal(rows.forward, 4);
  assert.equal(rows.backward, 4 + 4 + 4);
  // Whole tensors: one dispatch per kernel, as before chunking existed.
  const whole = await count(1, 64, undefined, null);
  assert.equal(whole.forward, 1);
  assert.equal(whole.backward, 3);
  assertClose(causal.o, whole.o, { ...SAME_F32, name: "out" });
  assertClose(causal.l, whole.l, { ...SAME_F32, name: "lse" });
  assertClose(causal.gq, whole.gq, { ...SAME_F32, name: "dq" });
});
