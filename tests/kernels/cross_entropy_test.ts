/**
 * GPU cross-entropy (chunked over the vocabulary) against the CPU reference.
 *
 * T = tokens, D = hidden, V = vocab. Tolerances, |gpu − ref| ≤ atol + rtol·|ref| with
 * scale = max |ref| of the compared array: f32 atol 1e-5·scale, rtol 1e-4; f16 weights and
 * hidden states atol 1e-3·scale, rtol 1e-2 (the reference sees the same f16-rounded inputs,
 * the GPU keeps its logits in f32, so only summation order differs; the looser bound covers
 * the f16 products of the matmul). The count of correctly predicted tokens is compared
 * exactly: the cases keep every non-tied maximum far from its runner-up (checked), and tied
 * maxima come from identical W rows, whose logits are the same bits in f32 and in f64.
 */
import assert from "node:assert/strict";
import {
  crossEntropyBackward,
  crossEntropyChunk,
  crossEntropyForward,
} from "../../kernels/ops/cross_entropy.ts";
import {
  count_trained,
  IGNORE_INDEX,
  lm_head_argmax,
  lm_head_cross_entropy_backward,
  lm_head_cross_entropy_forward,
} from "../../kernels/reference/cross_entropy.ts";
import { type Gpu, requestGpu } from "../../kernels/device.ts";
import {
  bucketSize,
  type DType,
  memoryStats,
  readTensors,
  resetPeakMemory,
  Tensor,
} from "../../kernels/tensor.ts";
import { recorder } from "../../kernels/recorder.ts";
import { assertClose, gpuTest, nanTensor, randn, rng, roundF16, type Tolerance } from "./_harness.ts";

interface Case {
  T: number;
  D: number;
  V: number;
  /** Fraction of tokens whose target is -100. */
  ignored: number;
  seed: number;
}

function makeCase({ T, D, V, ignored, seed }: Case) {
  const h = randn(T * D, seed, 1);
  const W = randn(V * D, seed + 1, 0.5);
  const next = rng(seed + 2);
  const targets = Int32Array.from(
    { length: T },
    () => next() < ignored ? IGNORE_INDEX : Math.floor(next() * V),
  );
  return { h, W, targets };
}

function tolerance(ref: ArrayLike<number>, f16: boolean, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
  return f16 ? { atol: 1e-3 * scale, rtol: 1e-2, name } : { atol: 1e-5 * scale, rtol: 1e-4, name };
}

interface RunOptions {
  chunk?: number;
  wDtype?: DType;
  hDtype?: DType;
  /** Rows of W per buffer (splits W into row chunks). */
  wChunkRows?: number;
}

/** Runs forward and backward on the GPU and returns loss, lse, dh and the correct count. */
async function runGpu(
  gpu: Gpu,
  c: Case,
  data: ReturnType<typeof makeCase>,
  n: number,
  options: RunOptions = {},
) {
  const { T, D, V } = c;
  const wDtype = options.wDtype ?? "f32";
  const maxChunkBytes = options.wChunkRows === undefined
    ? undefined
    : options.wChunkRows * D * (wDtype === "f16" ? 2 : 4);
  using h = Tensor.from(gpu, data.h, [T, D], options.hDtype ?? "f32", { label: "h" });
  using W = Tensor.from(gpu, data.W, [V, D], wDtype, { label: "W", maxChunkBytes });
  using targets = Tensor.from(gpu, data.targets, [T], "i32", { label: "targets" });
  if (options.wChunkRows !== undefined) assert.ok(W.chunked, "W is split into row chunks");
  using loss = nanTensor(gpu, [1], "f32", "loss");
  // Garbage in the count buffer: the forward must overwrite it.
  using correct = Tensor.from(gpu, [0xdeadbeef], [1], "u32", { label: "correct" });
  const { lse } = crossEntropyForward(h, W, targets, { n, chunk: options.chunk, loss, correct });
  using _lse = lse;
  using dh = crossEntropyBackward(h, W, targets, lse, { n, chunk: options.chunk });
  const [l, hits] = await readTensors([loss, correct]);
  return { loss: l[0], lse: await lse.readF32(), dh: await dh.readF32(), correct: hits[0] };
}

function reference(c: Case, data: ReturnType<typeof makeCase>, n: number, f16 = false) {
  const h = f16 ? roundF16(data.h) : data.h;
  const W = f16 ? roundF16(data.W) : data.W;
  const dims = { T: c.T, V: c.V, D: c.D, n, chunk: 64 };
  const fwd = lm_head_cross_entropy_forward(h, W, data.targets, dims);
  const bwd = lm_head_cross_entropy_backward(h, W, data.targets, fwd.lse, dims);
  return { loss: fwd.loss, lse: fwd.lse, dh: bwd.dhidden, correct: fwd.correct };
}

function compare(
  got: Awaited<ReturnType<typeof runGpu>>,
  ref: ReturnType<typeof reference>,
  f16 = false,
): void {
  assertClose([got.loss], [ref.loss], tolerance([ref.loss], f16, "loss"));
  assertClose(got.lse, ref.lse, tolerance(ref.lse, f16, "lse"));
  assertClose(got.dh, ref.dh, tolerance(ref.dh, f16, "dh"));
  assert.equal(got.correct, ref.correct, "correctly predicted tokens");
}

const BASE: Case = { T: 13, D: 24, V: 300, ignored: 0.3, seed: 11 };

gpuTest(
  "crossEntropy matches the reference when V is not a multiple of the chunk and tokens are ignored",
  async (gpu) => {
    const data = makeCase(BASE);
    const n = count_trained(data.targets);
    assert.ok(n > 0 && n < BASE.T, "the case has trained and ignored tokens");
    const got = await runGpu(gpu, BASE, data, n, { chunk: 64 });
    compare(got, reference(BASE, data, n));
  },
);

gpuTest("crossEntropy gives the same loss and dh for every vocabulary chunk size", async (gpu) => {
  const data = makeCase(BASE);
  const n = count_trained(data.targets);
  const ref = reference(BASE, data, n);
  const results = [];
  for (const chunk of [37, 128, 300, 1000]) {
    const got = await runGpu(gpu, BASE, data, n, { chunk });
    compare(got, ref);
    results.push(got);
  }
  for (const got of results.slice(1)) {
    assertClose([got.loss], [results[0].loss], { atol: 1e-6, rtol: 1e-5, name: "loss across chunks" });
    assertClose(got.dh, results[0].dh, tolerance(results[0].dh, false, "dh across chunks"));
  }
});

gpuTest("crossEntropy divides by the normaliser N of the whole accumulated batch", async (gpu) => {
  const c = { ...BASE, ignored: 0 };
  const data = makeCase(c);
  // N = 3·T: this micro-batch is a third of the step's tokens.
  const n = 3 * c.T;
  const got = await runGpu(gpu, c, data, n, { chunk: 128 });
  compare(got, reference(c, data, n));
  const own = await runGpu(gpu, c, data, c.T, { chunk: 128 });
  assertClose([got.loss * 3], [own.loss], { atol: 1e-6, rtol: 1e-5, name: "loss·3 vs loss over N = T" });
});

gpuTest("crossEntropy accumulates the losses of micro-batches into one step loss", async (gpu) => {
  const c = { T: 10, D: 16, V: 70, ignored: 0.2, seed: 5 };
  const data = makeCase(c);
  const n = count_trained(data.targets);
  using W = Tensor.from(gpu, data.W, [c.V, c.D], "f32", { label: "W" });
  using loss = Tensor.from(gpu, [123], [1], "f32", { label: "loss" });
  const half = c.T / 2;
  for (let part = 0; part < 2; part++) {
    using h = Tensor.from(
      gpu,
      data.h.subarray(part * half * c.D, (part + 1) * half * c.D),
      [half, c.D],
      "f32",
    );
    using targets = Tensor.from(gpu, data.targets.subarray(part * half, (part + 1) * half), [half], "i32");
    const { lse } = crossEntropyForward(h, W, targets, { n, chunk: 32, loss, accumulateLoss: part > 0 });
    lse.destroy();
  }
  const ref = reference(c, data, n);
  assertClose(await loss.readF32(), [ref.loss], tolerance([ref.loss], false, "accumulated loss"));
});

/**
 * A case whose maxima tie: W's V rows are copies of P distinct random rows (most appearing at
 * several scattered indices), so a token's largest logit is mostly shared by several vocabulary
 * rows, exactly, in f32 as in f64. Targets cycle through five kinds: ignored, the lowest index
 * of the maximum (correct), a higher index of the same maximum (a tie that is not the argmax),
 * a random row, and the lowest index again.
 */
function tiedCase(T: number, D: number, V: number, P: number, seed: number) {
  const pool = randn(P * D, seed, 0.5);
  const h = randn(T * D, seed + 1, 1);
  const next = rng(seed + 2);
  const rowOf = Array.from({ length: V }, () => Math.floor(next() * P));
  const W = new Float32Array(V * D);
  for (let v = 0; v < V; v++) W.set(pool.subarray(rowOf[v] * D, (rowOf[v] + 1) * D), v * D);
  const { argmax } = lm_head_argmax(h, W, { T, V, D });
  // The first maximum is the lowest index holding the pool row of the maximum; margins over
  // the other pool rows stay far above f32 rounding, so the GPU cannot pick another pool row.
  const distinct = lm_head_argmax(h, pool, { T, V: P, D }).margin;
  for (let t = 0; t < T; t++) {
    assert.ok(distinct[t] > 1e-3, `token ${t}: the top two pool rows are ${distinct[t]} apart`);
  }
  const targets = new Int32Array(T);
  let expected = 0;
  let laterTies = 0;
  for (let t = 0; t < T; t++) {
    const a = argmax[t];
    const copies = rowOf.flatMap((r, v) => (r === rowOf[a] ? [v] : []));
    switch (t % 5) {
      case 0:
        targets[t] = IGNORE_INDEX;
        break;
      case 2:
        targets[t] = copies.at(-1)!;
        if (targets[t] !== a) laterTies++;
        break;
      case 3:
        targets[t] = Math.floor(next() * V);
        break;
      default:
        targets[t] = a;
    }
    if (targets[t] === a) expected++;
  }
  assert.ok(laterTies >= T / 10, `only ${laterTies} targets are a tied maximum above the lowest index`);
  return { data: { h, W, targets }, expected, argmax };
}

gpuTest(
  "crossEntropy counts tokens whose argmax is the target, ties to the lowest index, for every chunking of V and W",
  async (gpu) => {
    const c = { T: 40, D: 24, V: 300, ignored: 0, seed: 61 };
    const { data, expected, argmax } = tiedCase(c.T, c.D, c.V, 40, c.seed);
    assert.ok(argmax.some((a) => a >= 64), "some first maxima lie beyond the first vocabulary chunk");
    const n = count_trained(data.targets);
    const ref = reference(c, data, n);
    assert.equal(ref.correct, expected, "the reference counts the constructed hits");
    // Vocabulary chunks of 16 to all of V (ties inside one invocation, between invocations, and
    // between chunks), and W split into row chunks of 50 that vocabulary chunks straddle.
    for (const chunk of [16, 37, 64, 300, 1000]) {
      for (const wChunkRows of [undefined, 50]) {
        const got = await runGpu(gpu, c, data, n, { chunk, wChunkRows });
        assert.equal(got.correct, expected, `chunk ${chunk}, W rows per chunk ${wChunkRows ?? c.V}`);
        compare(got, ref);
      }
    }
  },
);

gpuTest(
  "crossEntropy adds the correct counts of micro-batches with the loss, and a fresh count starts at zero",
  async (gpu) => {
    const c = { T: 30, D: 16, V: 120, ignored: 0, seed: 71 };
    const { data, expected } = tiedCase(c.T, c.D, c.V, 25, c.seed);
    const n = count_trained(data.targets);
    using W = Tensor.from(gpu, data.W, [c.V, c.D], "f32", { label: "W" });
    using loss = Tensor.from(gpu, [0], [1], "f32", { label: "loss" });
    using correct = Tensor.from(gpu, [0], [1], "u32", { label: "correct" });
    const parts = [[0, 7], [7, 20], [20, 30]];
    const own: number[] = [];
    for (const [i, [a, b]] of parts.entries()) {
      using h = Tensor.from(gpu, data.h.subarray(a * c.D, b * c.D), [b - a, c.D], "f32");
      using targets = Tensor.from(gpu, data.targets.subarray(a, b), [b - a], "i32");
      const accumulateLoss = i > 0;
      const r = crossEntropyForward(h, W, targets, { n, chunk: 32, loss, correct, accumulateLoss });
      r.lse.destroy();
      // Accumulating into the loss alone: the count created for this call holds this part only.
      using scratch = Tensor.from(gpu, [5], [1], "f32", { label: "scratch_loss" });
      const alone = crossEntropyForward(h, W, targets, { n, chunk: 32, loss: scratch, accumulateLoss: true });
      alone.lse.destroy();
      using aloneCorrect = alone.correct;
      own.push((await aloneCorrect.read())[0]);
    }
    const [[total]] = await readTensors([correct]);
    assert.equal(total, expected);
    const refParts = parts.map(([a, b]) => {
      const sub = { h: data.h.subarray(a * c.D, b * c.D), W: data.W, targets: data.targets.subarray(a, b) };
      return reference({ ...c, T: b - a }, sub, n).correct;
    });
    assert.deepEqual(own, refParts);
    assert.ok(own.every((k) => k > 0) && own.reduce((s, k) => s + k, 0) === expected, JSON.stringify(own));
  },
);

gpuTest(
  "crossEntropy splits its running state into row chunks past the binding limit: same loss, lse, dh and count",
  async (shared) => {
    // A 1 KiB binding cap: state[T,4] (1600 bytes) takes two chunks, h, dh and W several, the
    // logits two vocabulary rows per chunk; targets and lse (400 bytes) stay whole.
    const gpu = await requestGpu({ maxBindingBytes: 1024, f16: false });
    try {
      const c = { T: 100, D: 16, V: 60, ignored: 0, seed: 81 };
      const { data, expected } = tiedCase(c.T, c.D, c.V, 15, c.seed);
      const n = count_trained(data.targets);
      using hProbe = Tensor.empty(gpu, [c.T, c.D], "f32");
      using wProbe = Tensor.empty(gpu, [c.V, c.D], "f32");
      const chunk = crossEntropyChunk(hProbe, wProbe);
      assert.equal(chunk, 2, "[T,Vc] f32 logits within 1 KiB");
      const got = await runGpu(gpu, c, data, n);
      compare(got, reference(c, data, n));
      assert.equal(got.correct, expected);
      // Uncapped, with the same vocabulary chunks: every token's state is computed alike, so lse
      // is the same bits; the loss adds the two state chunks' sums in another order.
      const whole = await runGpu(shared, c, data, n, { chunk });
      assertClose([got.loss], [whole.loss], { atol: 1e-6, rtol: 1e-5, name: "loss capped vs uncapped" });
      assert.deepEqual(got.lse, whole.lse);
      assert.equal(got.correct, whole.correct);
    } finally {
      gpu.device.destroy();
    }
  },
);

gpuTest("crossEntropy handles an lm_head split into row chunks", async (gpu) => {
  const c = { T: 9, D: 20, V: 203, ignored: 0.25, seed: 21 };
  const data = makeCase(c);
  const n = count_trained(data.targets);
  const ref = reference(c, data, n);
  // Row chunks of 50 rows; vocabulary chunks of 64 and 128 straddle them, 203 covers all.
  for (const chunk of [64, 128, 203]) compare(await runGpu(gpu, c, data, n, { chunk, wChunkRows: 50 }), ref);
});

gpuTest(
  "crossEntropy reads an lm_head split into row chunks in place, with chunk boundaries off the vocabulary chunks",
  async (gpu) => {
    // D = 21: a vocabulary chunk of 37 rows starts at an element offset that is not a multiple of 4.
    const c = { T: 7, D: 21, V: 211, ignored: 0.2, seed: 41 };
    const data = makeCase(c);
    const n = count_trained(data.targets);
    const ref = reference(c, data, n);
    // W chunks of 70 rows ([0,70), [70,140), [140,210), [210,211)); vocabulary chunks of 32 and 37
    // end inside them and are cut at their boundaries.
    for (const chunk of [32, 37]) compare(await runGpu(gpu, c, data, n, { chunk, wChunkRows: 70 }), ref);
    // Where the W chunks hold whole vocabulary chunks, the vocabulary is cut exactly as for an
    // unsplit W, so the results are the same bits: reading rows in place is exact.
    const whole = await runGpu(gpu, c, data, n, { chunk: 35 });
    const split = await runGpu(gpu, c, data, n, { chunk: 35, wChunkRows: 70 });
    assert.equal(split.loss, whole.loss);
    assert.deepEqual(split.lse, whole.lse);
    assert.deepEqual(split.dh, whole.dh);
  },
);

gpuTest("crossEntropy holds only the logits chunk, never a copy of W's rows or all of [T,V]", async (gpu) => {
  const c = { T: 8, D: 64, V: 1000, ignored: 0.1, seed: 51 };
  const chunk = 64;
  const data = makeCase(c);
  const n = count_trained(data.targets);
  using h = Tensor.from(gpu, data.h, [c.T, c.D], "f32", { label: "h" });
  using targets = Tensor.from(gpu, data.targets, [c.T], "i32", { label: "targets" });
  for (const maxChunkBytes of [undefined, 300 * c.D * 4]) {
    using W = Tensor.from(gpu, data.W, [c.V, c.D], "f32", { label: "W", maxChunkBytes });
    await recorder(gpu).sync();
    resetPeakMemory(gpu);
    const base = memoryStats(gpu).liveBytes;
    const { loss, lse, correct } = crossEntropyForward(h, W, targets, { n, chunk });
    const dh = crossEntropyBackward(h, W, targets, lse, { n, chunk });
    const peak = memoryStats(gpu).peakBytes - base;
    // Everything the two calls allocate, alive at once: the outputs (loss, correct count, lse, dh),
    // the forward's running state[T,4] and one [T,Vc] f32 logits chunk. A copy of W's rows alone
    // would be Vc·D·4 bytes.
    const [T, D] = [c.T, c.D];
    const bound = 2 * bucketSize(4) + bucketSize(4 * T) + bucketSize(16 * T) + bucketSize(4 * T * D) +
      bucketSize(4 * T * chunk);
    assert.ok(peak <= bound, `peak ${peak} bytes exceeds ${bound} (W ${W.chunks.length} chunks)`);
    assert.ok(bound < chunk * D * 4 && bound < 4 * T * c.V, "the bound excludes a copy and the full logits");
    compare(
      {
        loss: (await loss.readF32())[0],
        lse: await lse.readF32(),
        dh: await dh.readF32(),
        correct: (await correct.read())[0],
      },
      reference(c, data, n),
    );
    for (const t of [loss, lse, dh, correct]) t.destroy();
  }
});

gpuTest("crossEntropy gives ignored tokens zero gradient and an all-ignored batch zero loss", async (gpu) => {
  const c = { T: 6, D: 8, V: 40, ignored: 0, seed: 3 };
  const data = makeCase(c);
  data.targets.set([IGNORE_INDEX, IGNORE_INDEX], 2);
  const got = await runGpu(gpu, c, data, 4, { chunk: 16 });
  for (let i = 2 * c.D; i < 4 * c.D; i++) assert.equal(got.dh[i], 0, `dh[${i}] of an ignored token`);
  compare(got, reference(c, data, 4));
  data.targets.fill(IGNORE_INDEX);
  const none = await runGpu(gpu, c, data, 1, { chunk: 16 });
  assert.equal(none.loss, 0);
  assert.equal(none.correct, 0);
  assert.ok(none.dh.every((v) => v === 0), "dh is zero");
});

gpuTest("crossEntropy reports NaN for a target outside the vocabulary", async (gpu) => {
  const c = { T: 4, D: 8, V: 30, ignored: 0, seed: 9 };
  const data = makeCase(c);
  data.targets[1] = c.V;
  const got = await runGpu(gpu, c, data, 4, { chunk: 16 });
  assert.ok(Number.isNaN(got.loss), `loss ${got.loss} is NaN`);
});

gpuTest(
  "crossEntropy with f16 lm_head and hidden states matches the reference on the rounded inputs",
  async (gpu) => {
    const c = { T: 11, D: 32, V: 250, ignored: 0.2, seed: 31 };
    const data = makeCase(c);
    const n = count_trained(data.targets);
    const ref = reference(c, data, n, true);
    for (const chunk of [64, 250]) {
      const got = await runGpu(gpu, c, data, n, { chunk, wDtype: "f16", hDtype: "f16", wChunkRows: 90 });
      compare(got, ref, true);
    }
  },
  { needsF16: true },
);

gpuTest("crossEntropyChunk keeps the scratch within its budget and one binding", (gpu) => {
  using h = Tensor.empty(gpu, [256, 64], "f32");
  using W = Tensor.empty(gpu, [50000, 64], "f32");
  assert.equal(crossEntropyChunk(h, W, { scratchBytes: 256 * 50000 * 4 }), 50000, "all of V fits");
  // The budget holds the [T,Vc] f32 logits alone (W's rows are read in place): 8 MiB / (4·256 B).
  assert.equal(crossEntropyChunk(h, W, { scratchBytes: 8 * 1024 * 1024 }), 8192);
  assert.equal(crossEntropyChunk(h, W, { scratchBytes: 8 * 1024 * 1024 - 1 }), 7936, "a multiple of 256");
  assert.equal(crossEntropyChunk(h, W, { chunk: 77 }), 77);
  assert.throws(() => crossEntropyChunk(h, W, { chunk: 0 }), /positive integer/);
  // However large the budget, [T,Vc] f32 logits stay within one storage binding.
  using many = Tensor.empty(gpu, [8192, 64], "f32");
  const wide = crossEntropyChunk(many, W, { scratchBytes: 2 ** 40 });
  assert.ok(wide * 8192 * 4 <= gpu.maxBindingBytes, `chunk ${wide} fits one binding`);
});

gpuTest("crossEntropyForward refuses mismatched shapes and a non-positive N", (gpu) => {
  using h = Tensor.empty(gpu, [4, 8], "f32", { label: "h" });
  using W = Tensor.empty(gpu, [10, 6], "f32", { label: "W" });
  using targets = Tensor.empty(gpu, [4], "i32", { label: "targets" });
  assert.throws(() => crossEntropyForward(h, W, targets, { n: 4 }), /hidden sizes differ/);
  using W8 = Tensor.empty(gpu, [10, 8], "f32", { label: "W" });
  assert.throws(() => crossEntropyForward(h, W8, targets, { n: 0 }), /normaliser N "0"/);
  using f = Tensor.empty(gpu, [4], "f32", { label: "targets_f32" });
  assert.throws(() => crossEntropyForward(h, W8, f, { n: 4 }), /i32 \[4\] expected/);
});

gpuTest(
  "crossEntropy for sequence objectives: the kept state gives logp, and per-token weights give the reference's weighted dh (W in row chunks)",
  async (gpu) => {
    const c = { ...BASE, seed: 19 };
    const data = makeCase(c);
    const next = rng(23);
    const weights = Float32Array.from(data.targets, (y) => (y === IGNORE_INDEX ? 0 : next() - 0.5));
    const dims = { T: c.T, V: c.V, D: c.D, n: 1, chunk: 64 };
    const fwd = lm_head_cross_entropy_forward(data.h, data.W, data.targets, dims);
    const bwd = lm_head_cross_entropy_backward(
      data.h,
      data.W,
      data.targets,
      fwd.lse,
      dims,
      1,
      false,
      weights,
    );
    using h = Tensor.from(gpu, data.h, [c.T, c.D], "f32", { label: "h" });
    using W = Tensor.from(gpu, data.W, [c.V, c.D], "f32", { label: "W", maxChunkBytes: 100 * c.D * 4 });
    using targets = Tensor.from(gpu, data.targets, [c.T], "i32", { label: "targets" });
    using w = Tensor.from(gpu, weights, [c.T], "f32", { label: "weights" });
    const { loss, lse, correct, state } = crossEntropyForward(h, W, targets, {
      n: 1,
      chunk: 37,
      keepState: true,
    });
    using _l = loss;
    using _c = correct;
    using _lse = lse;
    using st = state!;
    using dh = crossEntropyBackward(h, W, targets, lse, { n: 1, chunk: 37, weights: w });
    const rows = await st.readF32();
    const logp = Float64Array.from(
      data.targets,
      (y, t) => (y === IGNORE_INDEX ? 0 : rows[4 * t + 2] - (rows[4 * t] + Math.log(rows[4 * t + 1]))),
    );
    assertClose(logp, fwd.logp, { atol: 1e-5, rtol: 1e-5, name: "logp" });
    assertClose(await dh.readF32(), bwd.dhidden, tolerance(bwd.dhidden, false, "weighted dh"));
    assert.throws(
      () => crossEntropyBackward(h, W, targets, lse, { n: 1, weights: targets }),
      /weights "targets" i32\[13\] is not f32 \[13\]/,
    );
  },
);
