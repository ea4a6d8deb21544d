// GPU RoPE against kernels/reference/rope.ts on seeded random data.
// T = tokens, nH = heads, hd = head dim, h2 = hd/2. Tolerance |gpu − ref| ≤ atol + rtol·|ref| with
// scale = max|ref|: f32: atol 1e-5·scale, rtol 1e-4; f16 storage: atol 1e-3·scale, rtol 1e-2.
import assert from "node:assert/strict";
import {
  rope_backward,
  rope_forward,
  rope_inv_freq,
  rope_tables,
  type RopeConfig,
} from "../../kernels/reference/rope.ts";
import { ropeBackward, ropeForward, ropeFreqWords, ropeTable } from "../../kernels/ops/rope.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, nanTensor, randn, roundF16, type Tolerance } from "./_harness.ts";

function tol(dtype: "f32" | "f16", ref: ArrayLike<number>, name: string): Tolerance {
  let scale = 0;
  for (let i = 0; i < ref.length; i++) scale = Math.max(scale, Math.abs(ref[i]));
  return dtype === "f32"
    ? { atol: 1e-5 * scale, rtol: 1e-4, name }
    : { atol: 1e-3 * scale, rtol: 1e-2, name };
}

// Three packed documents: positions restart at 0 mid-row; the last one sits far out, where f32
// angles would have lost their low bits without the kernel's exact range reduction.
const POSITIONS = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 70000, 70001, 123457];
const T = POSITIONS.length;

const CONFIGS: Record<string, RopeConfig> = {
  default: { headDim: 18, theta: 10000, scaling: null },
  linear: { headDim: 18, theta: 10000, scaling: { type: "linear", factor: 4 } },
  llama3: {
    headDim: 16,
    theta: 500000,
    scaling: {
      type: "llama3",
      factor: 8,
      lowFreqFactor: 1,
      highFreqFactor: 4,
      originalMaxPositionEmbeddings: 8192,
    },
  },
  yarn: {
    headDim: 20,
    theta: 10000,
    scaling: { type: "yarn", factor: 4, originalMaxPositionEmbeddings: 64 },
  },
};

for (const [name, config] of Object.entries(CONFIGS)) {
  gpuTest(`ropeForward and ropeBackward match the reference with ${name} scaling`, async (gpu) => {
    const hd = config.headDim, nH = 3;
    const freqs = rope_inv_freq(config);
    const { cos, sin } = rope_tables(freqs, POSITIONS);
    const dims = { T, heads: nH, headDim: hd };
    const x = randn(T * nH * hd, 100 + hd);
    const dy = randn(T * nH * hd, 200 + hd);
    const wantY = rope_forward(x, cos, sin, dims);
    const wantDx = rope_backward(dy, cos, sin, dims);
    using table = ropeTable(gpu, config);
    assert.equal(table.attentionFactor, freqs.attentionFactor);
    const positions = Tensor.from(gpu, Uint32Array.from(POSITIONS), [T], "u32");
    const y = ropeForward(Tensor.from(gpu, x, [T, nH, hd]), positions, table, {
      out: nanTensor(gpu, [T, nH, hd]),
    });
    const dx = ropeBackward(Tensor.from(gpu, dy, [T, nH, hd]), positions, table);
    assertClose(await y.readF32(), wantY, tol("f32", wantY, "y"));
    assertClose(await dx.readF32(), wantDx, tol("f32", wantDx, "dx"));
  });
}

gpuTest("yarn's attention factor scales cos and sin on the GPU", async (gpu) => {
  const config = CONFIGS.yarn;
  const freqs = rope_inv_freq(config);
  assert.ok(freqs.attentionFactor > 1.1, "yarn with factor 4 has mscale 0.1·ln 4 + 1");
  // At position 0 the rotation is the identity, so y = af·x exactly where the factor applies.
  const x = randn(config.headDim, 7);
  using table = ropeTable(gpu, freqs);
  const y = ropeForward(
    Tensor.from(gpu, x, [1, 1, config.headDim]),
    Tensor.from(gpu, [0], [1], "u32"),
    table,
  );
  const want = x.map((v) => v * freqs.attentionFactor);
  assertClose(await y.readF32(), want, tol("f32", want, "y"));
});

gpuTest("dynamic scaling rotates as default below the original length", async (gpu) => {
  const config: RopeConfig = {
    headDim: 8,
    theta: 10000,
    scaling: { type: "dynamic", factor: 2, originalMaxPositionEmbeddings: 32 },
  };
  const positions = [0, 5, 31, 0, 17];
  const x = randn(positions.length * 2 * 8, 8);
  const { cos, sin } = rope_tables(rope_inv_freq({ ...config, scaling: null }), positions);
  const want = rope_forward(x, cos, sin, { T: positions.length, heads: 2, headDim: 8 });
  using table = ropeTable(gpu, config);
  const pt = Tensor.from(gpu, Uint32Array.from(positions), [positions.length], "u32");
  const y = ropeForward(Tensor.from(gpu, x, [positions.length, 2, 8]), pt, table);
  assertClose(await y.readF32(), want, tol("f32", want, "y"));
});

gpuTest("ropeForward rotates in place and backward undoes it", async (gpu) => {
  const config = CONFIGS.llama3, hd = config.headDim, nH = 2;
  const x = randn(T * nH * hd, 300);
  const { cos, sin } = rope_tables(rope_inv_freq(config), POSITIONS);
  const want = rope_forward(x, cos, sin, { T, heads: nH, headDim: hd });
  using table = ropeTable(gpu, config);
  const positions = Tensor.from(gpu, Uint32Array.from(POSITIONS), [T], "u32");
  const xt = Tensor.from(gpu, x, [T, nH, hd]);
  assert.equal(ropeForward(xt, positions, table, { out: xt }), xt);
  assertClose(await xt.readF32(), want, tol("f32", want, "y"));
  ropeBackward(xt, positions, table, { out: xt });
  assertClose(await xt.readF32(), x, tol("f32", x, "x after forward then backward"));
});

gpuTest("ropeForward rotates a head range of fused qkv rows and leaves v alone", async (gpu) => {
  // qkv rows: H = 3 q heads, Hkv = 1 k head, 1 v head. Rotate k in place, q into a new tensor.
  const config = CONFIGS.default, hd = config.headDim, H = 3, Hkv = 1;
  const heads = H + 2 * Hkv;
  const qkv = randn(T * heads * hd, 400);
  const { cos, sin } = rope_tables(rope_inv_freq(config), POSITIONS);
  const slice = (h0: number, n: number) => {
    const out = new Float32Array(T * n * hd);
    for (let t = 0; t < T; t++) {
      out.set(qkv.subarray((t * heads + h0) * hd, (t * heads + h0 + n) * hd), t * n * hd);
    }
    return out;
  };
  const wantQ = rope_forward(slice(0, H), cos, sin, { T, heads: H, headDim: hd });
  const wantK = rope_forward(slice(H, Hkv), cos, sin, { T, heads: Hkv, headDim: hd });
  using table = ropeTable(gpu, config);
  const positions = Tensor.from(gpu, Uint32Array.from(POSITIONS), [T], "u32");
  const t = Tensor.from(gpu, qkv, [T, heads * hd]);
  const q = ropeForward(t, positions, table, { heads: H });
  assert.deepEqual(q.shape, [T, H, hd]);
  ropeForward(t, positions, table, { out: t, headStart: H, heads: Hkv });
  const after = await t.readF32();
  const k = new Float32Array(T * hd);
  for (let r = 0; r < T; r++) {
    k.set(after.subarray((r * heads + H) * hd, (r * heads + H + 1) * hd), r * hd);
    const v = (r * heads + H + Hkv) * hd;
    assert.deepEqual(after.subarray(v, v + hd), qkv.subarray(v, v + hd), `v head of row ${r} is untouched`);
    assert.deepEqual(
      after.subarray(r * heads * hd, (r * heads + H) * hd),
      qkv.subarray(r * heads * hd, (r * heads + H) * hd),
    );
  }
  assertClose(await q.readF32(), wantQ, tol("f32", wantQ, "q"));
  assertClose(k, wantK, tol("f32", wantK, "k"));
});

gpuTest("rope handles x and its output split into differently placed row chunks", async (gpu) => {
  const config = CONFIGS.linear, hd = config.headDim, nH = 2;
  const rowBytes = nH * hd * 4;
  const x = randn(T * nH * hd, 500);
  const { cos, sin } = rope_tables(rope_inv_freq(config), POSITIONS);
  const want = rope_forward(x, cos, sin, { T, heads: nH, headDim: hd });
  using table = ropeTable(gpu, config);
  const positions = Tensor.from(gpu, Uint32Array.from(POSITIONS), [T], "u32", { maxChunkBytes: 24 });
  const xt = Tensor.from(gpu, x, [T, nH, hd], "f32", { maxChunkBytes: 4 * rowBytes });
  const out = Tensor.empty(gpu, [T, nH, hd], "f32", { maxChunkBytes: 7 * rowBytes });
  assert.ok(positions.chunked && xt.chunked && out.chunked);
  ropeForward(xt, positions, table, { out });
  assertClose(await out.readF32(), want, tol("f32", want, "y"));
});

gpuTest("rope with f16 activations matches the reference within f16 rounding", async (gpu) => {
  const config = CONFIGS.yarn, hd = config.headDim, nH = 2;
  const x = roundF16(randn(T * nH * hd, 600));
  const { cos, sin } = rope_tables(rope_inv_freq(config), POSITIONS);
  const dims = { T, heads: nH, headDim: hd };
  const wantY = rope_forward(x, cos, sin, dims);
  const wantDx = rope_backward(x, cos, sin, dims);
  using table = ropeTable(gpu, config);
  const positions = Tensor.from(gpu, Uint32Array.from(POSITIONS), [T], "u32");
  const xt = Tensor.from(gpu, x, [T, nH, hd], "f16");
  const y = ropeForward(xt, positions, table);
  assert.equal(y.dtype, "f16");
  const dx = ropeBackward(xt, positions, table, { out: xt });
  assertClose(await y.readF32(), wantY, tol("f16", wantY, "y"));
  assertClose(await dx.readF32(), wantDx, tol("f16", wantDx, "dx"));
}, { needsF16: true });

gpuTest("rope refuses a head dim that does not divide the rows and non-u32 positions", (gpu) => {
  using table = ropeTable(gpu, CONFIGS.default);
  const x = Tensor.zeros(gpu, [4, 20], "f32", { label: "q" });
  const pos = Tensor.zeros(gpu, [4], "u32");
  assert.throws(() => ropeForward(x, pos, table), /"q" has shape \[4,20\], expected \[T, heads, 18\]/);
  const x18 = Tensor.zeros(gpu, [4, 2, 18], "f32");
  assert.throws(
    () => ropeForward(x18, Tensor.zeros(gpu, [4], "i32", { label: "p" }), table),
    /"p" has dtype i32/,
  );
  assert.throws(
    () => ropeForward(x18, Tensor.zeros(gpu, [3], "u32", { label: "p" }), table),
    /has shape \[3\]/,
  );
  assert.throws(() => ropeForward(x18, pos, table, { headStart: 1, heads: 2 }), /heads 1\.\.3 are outside/);
});

Deno.test("ropeFreqWords splits turns per position into exact 12-bit parts", () => {
  const { invFreq } = rope_inv_freq({ headDim: 128, theta: 500000, scaling: null });
  const words = ropeFreqWords(invFreq);
  const bits = new Uint32Array(words.buffer);
  for (let i = 0; i < invFreq.length; i++) {
    const q = invFreq[i] / (2 * Math.PI);
    const [q1, q2, q3, zero] = words.subarray(4 * i, 4 * i + 4);
    assert.equal(zero, 0);
    assert.equal(bits[4 * i] & 0xfff, 0, `q1 of ${i} has 12 significant bits`);
    assert.equal(bits[4 * i + 1] & 0xfff, 0, `q2 of ${i} has 12 significant bits`);
    assert.ok(Math.abs(q1 + q2 + q3 - q) <= q * 2 ** -45, `q1 + q2 + q3 = q for ${i}`);
  }
});
