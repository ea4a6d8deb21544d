/**
 * GPU LoRA linear layer (forward and backward, dropout, rslora) against the CPU reference.
 *
 * T = tokens, K = in features, N = out features, r = LoRA rank. Tolerance,
 * |gpu − ref| ≤ atol + rtol·|ref| with scale = max |ref| of the compared array: f32 atol
 * 1e-5·scale, rtol 1e-4; f16 W and x atol 1e-3·scale, rtol 1e-2 (the reference sees the same
 * f16-rounded inputs; the looser bound covers the f16 products). The same bounds hold for the
 * fused path (the adapter's term inside the projection's matmul) and the unfused one, which
 * differ from each other in the order of the sum only. The dropout mask is compared bit for bit.
 */
import assert from "node:assert/strict";
import {
  loraBackward,
  loraDropout,
  loraForward,
  loraScaling,
  type LoraWeights,
} from "../../kernels/ops/lora.ts";
import {
  dropout_mask,
  linear_lora_backward,
  linear_lora_forward,
  type LoraAdapter,
} from "../../kernels/reference/linear_lora.ts";
import type { Gpu } from "../../kernels/device.ts";
import { recorder } from "../../kernels/recorder.ts";
import { type DType, Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, roundF16, type Tolerance } from "./_harness.ts";

interface Case {
  T: number;
  K: number;
  N: number;
  r: number;
  alpha: number;
  rslora: boolean;
  p: number;
  seed: number;
  bias: boolean;
}

const BASE: Case = { T: 10, K: 24, N: 20, r: 4, alpha: 8, rslora: false, p: 0, seed: 0x9e3779b9, bias: true };

function makeData(c: Case) {
  return {
    x: randn(c.T * c.K, 1),
    W: randn(c.N * c.K, 2, 0.3),
    bias: randn(c.N, 3, 0.1),
    // B is random (PEFT starts it at zero) so every term of the forward is exercised.
    A: randn(c.r * c.K, 4, 0.3),
    B: randn(c.N * c.r, 5, 0.3),
    dy: randn(c.T * c.N, 6),
  };
}

function tolerance(ref: ArrayLike<number>, f16: boolean, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
  return f16 ? { atol: 1e-3 * scale, rtol: 1e-2, name } : { atol: 1e-5 * scale, rtol: 1e-4, name };
}

function reference(c: Case, d: ReturnType<typeof makeData>, f16 = false) {
  const x = f16 ? roundF16(d.x) : d.x;
  const W = f16 ? roundF16(d.W) : d.W;
  const lora: LoraAdapter = {
    A: d.A,
    B: d.B,
    r: c.r,
    scaling: loraScaling(c.alpha, c.r, c.rslora),
    dropout: c.p > 0 ? { p: c.p, keep: dropout_mask(c.seed, c.T * c.K, c.p) } : null,
  };
  const dims = { T: c.T, inFeatures: c.K, outFeatures: c.N };
  const { y, xa } = linear_lora_forward(x, W, c.bias ? d.bias : null, lora, dims);
  const { dx, dA, dB } = linear_lora_backward(d.dy, x, W, lora, xa, dims);
  return { y, xa: xa!, dx, dA: dA!, dB: dB! };
}

interface RunOptions {
  dtype?: DType;
  /** Rows of W per buffer (splits W into row chunks). */
  wChunkRows?: number;
  /** The forward's and backward's `fuse` (default: their rule). */
  fuse?: boolean;
}

async function runGpu(gpu: Gpu, c: Case, d: ReturnType<typeof makeData>, options: RunOptions = {}) {
  const dtype = options.dtype ?? "f32";
  const bytes = dtype === "f16" ? 2 : 4;
  const maxChunkBytes = options.wChunkRows === undefined ? undefined : options.wChunkRows * c.K * bytes;
  using x = Tensor.from(gpu, d.x, [c.T, c.K], dtype, { label: "x" });
  using W = Tensor.from(gpu, d.W, [c.N, c.K], dtype, { label: "W", maxChunkBytes });
  if (options.wChunkRows !== undefined) assert.ok(W.chunked, "W is split into row chunks");
  using bias = Tensor.from(gpu, d.bias, [c.N], "f32", { label: "bias" });
  using A = Tensor.from(gpu, d.A, [c.r, c.K], "f32", { label: "lora_A" });
  using B = Tensor.from(gpu, d.B, [c.N, c.r], "f32", { label: "lora_B" });
  using dy = Tensor.from(gpu, d.dy, [c.T, c.N], "f32", { label: "dy" });
  const lora: LoraWeights = {
    A,
    B,
    scaling: loraScaling(c.alpha, c.r, c.rslora),
    dropout: c.p,
    seed: c.seed,
  };
  const fuse = options.fuse;
  const { y, xa } = loraForward(x, W, lora, { bias: c.bias ? bias : undefined, outDtype: "f32", fuse });
  using _y = y;
  using _xa = xa;
  // Given dA and dB are added into; a given dx is overwritten (NaN shows an element not written).
  using dA = Tensor.zeros(gpu, [c.r, c.K], "f32", { label: "dA" });
  using dB = Tensor.zeros(gpu, [c.N, c.r], "f32", { label: "dB" });
  using dx = nanTensor(gpu, [c.T, c.K], "f32", "dx");
  loraBackward(dy, x, W, lora, xa, { dA, dB, dx, fuse });
  return {
    y: await y.readF32(),
    xa: await xa.readF32(),
    dx: await dx.readF32(),
    dA: await dA.readF32(),
    dB: await dB.readF32(),
  };
}

function compare(
  got: Awaited<ReturnType<typeof runGpu>>,
  ref: ReturnType<typeof reference>,
  f16 = false,
): void {
  for (const k of ["y", "xa", "dx", "dA", "dB"] as const) {
    assertClose(got[k], ref[k], tolerance(ref[k], f16, k));
  }
}

gpuTest("lora forward and backward match the reference without dropout", async (gpu) => {
  const d = makeData(BASE);
  compare(await runGpu(gpu, BASE, d), reference(BASE, d));
});

gpuTest("lora forward and backward match the reference with rslora scaling", async (gpu) => {
  const c = { ...BASE, rslora: true, r: 16, alpha: 16, bias: false };
  const d = makeData(c);
  compare(await runGpu(gpu, c, d), reference(c, d));
});

gpuTest("lora forward and backward match the reference with dropout 0.1", async (gpu) => {
  for (const rslora of [false, true]) {
    const c = { ...BASE, p: 0.1, rslora };
    const d = makeData(c);
    compare(await runGpu(gpu, c, d), reference(c, d));
  }
});

gpuTest("loraDropout reproduces the reference mask bit for bit, across row chunks", async (gpu) => {
  const T = 37;
  const K = 53;
  for (const [p, seed] of [[0.1, 7], [0.5, 0xffffffff], [0.9, 123456789]]) {
    const keep = dropout_mask(seed, T * K, p);
    // Row chunks of 5 rows: the mask index must continue across buffers.
    using x = Tensor.from(gpu, new Float32Array(T * K).fill(1), [T, K], "f32", { maxChunkBytes: 5 * K * 4 });
    assert.ok(x.chunked);
    using z = loraDropout(x, p, seed);
    const got = await z.readF32();
    const scaled = Math.fround(1 / Math.fround(1 - p));
    let mismatches = 0;
    for (let i = 0; i < T * K; i++) {
      if ((got[i] !== 0) !== (keep[i] === 1)) mismatches++;
      else if (keep[i] && Math.abs(got[i] - scaled) > 1e-6 * scaled) mismatches++;
    }
    assert.equal(
      mismatches,
      0,
      `p ${p}, seed ${seed}: ${mismatches} elements differ from the reference mask`,
    );
    const kept = keep.reduce((a, b) => a + b, 0) / keep.length;
    assert.ok(Math.abs(kept - (1 - p)) < 0.05, `kept fraction ${kept} for p ${p}`);
  }
});

gpuTest("lora backward adds into given dA, dB and dx", async (gpu) => {
  const c = { ...BASE, p: 0.1 };
  const d = makeData(c);
  const ref = reference(c, d);
  using x = Tensor.from(gpu, d.x, [c.T, c.K], "f32");
  using W = Tensor.from(gpu, d.W, [c.N, c.K], "f32");
  using A = Tensor.from(gpu, d.A, [c.r, c.K], "f32");
  using B = Tensor.from(gpu, d.B, [c.N, c.r], "f32");
  using dy = Tensor.from(gpu, d.dy, [c.T, c.N], "f32");
  const lora: LoraWeights = { A, B, scaling: loraScaling(c.alpha, c.r), dropout: c.p, seed: c.seed };
  const { y, xa } = loraForward(x, W, lora);
  y.destroy();
  using _xa = xa;
  // Two micro-batches with the same data: the gradients double.
  const first = loraBackward(dy, x, W, lora, xa);
  using dA = first.dA;
  using dB = first.dB;
  using dx = first.dx!;
  loraBackward(dy, x, W, lora, xa, { dA, dB, dx, accumulateDx: true });
  const twice = (a: Float32Array) => a.map((v) => 2 * v);
  assertClose(await dA.readF32(), twice(ref.dA), tolerance(ref.dA, false, "dA twice"));
  assertClose(await dB.readF32(), twice(ref.dB), tolerance(ref.dB, false, "dB twice"));
  assertClose(await dx.readF32(), twice(ref.dx), tolerance(ref.dx, false, "dx twice"));
});

gpuTest("lora without W adds only the adapter's terms to y and dx", async (gpu) => {
  const c = { ...BASE, p: 0.1, bias: false };
  const d = makeData(c);
  const ref = reference(c, d);
  const refBase = reference(c, { ...d, A: new Float32Array(d.A.length), B: new Float32Array(d.B.length) });
  using x = Tensor.from(gpu, d.x, [c.T, c.K], "f32");
  using A = Tensor.from(gpu, d.A, [c.r, c.K], "f32");
  using B = Tensor.from(gpu, d.B, [c.N, c.r], "f32");
  using dy = Tensor.from(gpu, d.dy, [c.T, c.N], "f32");
  // y and dx start at the frozen layer's terms, as a separate kernel would leave them.
  using y = Tensor.from(gpu, refBase.y, [c.T, c.N], "f32");
  using dx = Tensor.from(gpu, refBase.dx, [c.T, c.K], "f32");
  const lora: LoraWeights = { A, B, scaling: loraScaling(c.alpha, c.r), dropout: c.p, seed: c.seed };
  const { xa } = loraForward(x, null, lora, { out: y });
  using _xa = xa;
  const grads = loraBackward(dy, x, null, lora, xa, { dx, accumulateDx: true, skipDx: false });
  using _dA = grads.dA;
  using _dB = grads.dB;
  assertClose(await y.readF32(), ref.y, tolerance(ref.y, false, "y"));
  assertClose(await dx.readF32(), ref.dx, tolerance(ref.dx, false, "dx"));
  assertClose(await grads.dA.readF32(), ref.dA, tolerance(ref.dA, false, "dA"));
});

gpuTest("lora with an f16 W split into row chunks and f16 x matches the reference", async (gpu) => {
  for (const p of [0, 0.1]) {
    const c = { ...BASE, T: 12, K: 32, N: 40, r: 8, p };
    const d = makeData(c);
    for (const fuse of [true, false]) {
      compare(await runGpu(gpu, c, d, { dtype: "f16", wChunkRows: 12, fuse }), reference(c, d, true), true);
    }
  }
}, { needsF16: true });

gpuTest("lora fused and unfused both match the reference, with W whole or in row chunks", async (gpu) => {
  for (const p of [0, 0.1]) {
    // r 6 reads one value of the rank per step inside the fused matmul, r 8 four.
    for (const r of [6, 8]) {
      const c = { ...BASE, T: 13, K: 24, N: 36, r, p };
      const d = makeData(c);
      const ref = reference(c, d);
      for (const wChunkRows of [undefined, 10]) {
        const fused = await runGpu(gpu, c, d, { fuse: true, wChunkRows });
        const unfused = await runGpu(gpu, c, d, { fuse: false, wChunkRows });
        compare(fused, ref);
        compare(unfused, ref);
        // dA, dB and xa come from the same products either way.
        for (const k of ["xa", "dA", "dB"] as const) assert.deepEqual(fused[k], unfused[k], k);
      }
    }
  }
});

gpuTest("lora fused records one dispatch fewer per pass, and gives the same bits every run", async (gpu) => {
  const c = { ...BASE, T: 9, K: 16, N: 20, r: 4 };
  const d = makeData(c);
  using x = Tensor.from(gpu, d.x, [c.T, c.K], "f32");
  using W = Tensor.from(gpu, d.W, [c.N, c.K], "f32");
  using A = Tensor.from(gpu, d.A, [c.r, c.K], "f32");
  using B = Tensor.from(gpu, d.B, [c.N, c.r], "f32");
  using dy = Tensor.from(gpu, d.dy, [c.T, c.N], "f32");
  const rec = recorder(gpu);
  const run = async (fuse: boolean, p: number) => {
    const lora: LoraWeights = { A, B, scaling: 2, dropout: p, seed: c.seed };
    const d0 = rec.dispatchCount;
    const { y, xa } = loraForward(x, W, lora, { fuse });
    const d1 = rec.dispatchCount;
    const g = loraBackward(dy, x, W, lora, xa, { fuse });
    const d2 = rec.dispatchCount;
    const [yh, dx] = [await y.readF32(), await g.dx!.readF32()];
    [y, xa, g.dx!, g.dA, g.dB].forEach((t) => t.destroy());
    return { forward: d1 - d0, backward: d2 - d1, y: yh, dx };
  };
  const unfused = await run(false, 0);
  const fused = await run(true, 0);
  assert.equal(fused.forward, unfused.forward - 1, "forward: y·Bᵀ's own matmul is gone");
  assert.equal(fused.backward, unfused.backward - 1, "backward: dxa·A's own matmul is gone");
  const again = await run(true, 0);
  assert.deepEqual(again.y, fused.y, "y: same bits on a second run");
  assert.deepEqual(again.dx, fused.dx, "dx: same bits on a second run");
  // With dropout the mask stands between dxa·A and dx: only the forward fuses.
  const unfusedDrop = await run(false, 0.1);
  const fusedDrop = await run(true, 0.1);
  assert.equal(fusedDrop.forward, unfusedDrop.forward - 1);
  assert.equal(fusedDrop.backward, unfusedDrop.backward);
});

gpuTest("lora refuses mismatched shapes, a bad dropout and a missing seed", (gpu) => {
  using x = Tensor.zeros(gpu, [4, 6], "f32", { label: "x" });
  using W = Tensor.zeros(gpu, [5, 6], "f32");
  using A = Tensor.zeros(gpu, [2, 6], "f32");
  using A7 = Tensor.zeros(gpu, [2, 7], "f32");
  using B = Tensor.zeros(gpu, [5, 2], "f32");
  assert.throws(() => loraForward(x, W, { A: A7, B, scaling: 1 }), /lora_A has 7 in features, x has 6/);
  assert.throws(
    () => loraForward(x, W, { A, B, scaling: 1, dropout: 1, seed: 1 }),
    /p "1" is not in \[0, 1\)/,
  );
  assert.throws(() => loraForward(x, W, { A, B, scaling: 1, dropout: 0.1 }), /seed "undefined"/);
  assert.throws(() => loraForward(x, null, { A, B, scaling: 1 }), /`out` is needed/);
  assert.throws(() => loraScaling(8, 0), /rank r "0"/);
});
