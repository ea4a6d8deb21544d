// formats/gguf_quants.ts: ggml blocks byte for byte against llama.cpp's own quantizers (the golden
// from scripts/golden/gguf_quants.ts, which ran them through node-llama-cpp's libggml-base.so),
// blocks worked out by hand, quantize → dequantize error bounds per type, f16/bf16 edge values,
// llama-quantize's per-tensor type choice (Q4_K_M / Q5_K_M mixes, fallbacks), and bad input.
import assert from "node:assert/strict";
import { LatheError } from "../../foundation/errors.ts";
import { Pcg32 } from "../../foundation/random.ts";
import {
  bf16BitsToFp32,
  dequantize,
  fp16BitsToFp32,
  fp32ToBf16Bits,
  fp32ToFp16Bits,
  GGML_TYPE,
  ggmlBlock,
  ggmlBytes,
  type GgmlTypeName,
  type GgufFileType,
  LLAMA_FTYPE,
  llamaQuantizeOrder,
  MixCounters,
  type MixModel,
  quantize,
  tensorType,
} from "../../formats/gguf_quants.ts";
import { GOLDEN_TYPES, goldenCases, goldenHalfBits, goldenMixes } from "../../scripts/golden/gguf_quants.ts";

const golden = JSON.parse(
  await Deno.readTextFile(new URL("../fixtures/golden/gguf_quants.json", import.meta.url)),
);

function fromBase64(s: string): Uint8Array {
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}

async function sha256(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function bytesOf(a: Float32Array | Uint32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Asserts equal bytes, naming the first differing byte and its block. */
function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string, typeSize: number): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const i = actual.findIndex((b, k) => b !== expected[k]);
  if (i >= 0) {
    assert.fail(
      `${what}: byte ${i} (block ${Math.floor(i / typeSize)}, offset ${i % typeSize}) is ` +
        `0x${actual[i].toString(16)}, llama.cpp wrote 0x${expected[i].toString(16)}`,
    );
  }
}

/** `n` copies of a byte pattern. */
function repeat(pattern: number[], n: number): number[] {
  return Array.from({ length: n }, () => pattern).flat();
}

// ----------------------------------------------------------------------------------------------
// llama.cpp's own bytes

Deno.test("quantize() writes llama.cpp's bytes for every type (golden from libggml-base.so)", async () => {
  for (const c of goldenCases()) {
    const g = golden.cases[c.name];
    assert.equal(await sha256(bytesOf(c.values)), g.input_sha256, `${c.name}: the golden inputs changed`);
    for (const type of GOLDEN_TYPES) {
      const expected = fromBase64(g.types[type].bytes);
      assertSameBytes(
        quantize(type, c.values, c.rowLength),
        expected,
        `${c.name} ${type}`,
        ggmlBlock(type).typeSize,
      );
    }
  }
});

Deno.test("dequantize() gives ggml's dequantize_row_* values bit for bit", async () => {
  for (const c of goldenCases()) {
    const g = golden.cases[c.name];
    for (const type of GOLDEN_TYPES) {
      const y = dequantize(type, fromBase64(g.types[type].bytes), c.values.length);
      assert.equal(await sha256(bytesOf(y)), g.types[type].dequantized_sha256, `${c.name} ${type}`);
    }
  }
});

Deno.test("f16 and bf16 conversion match ggml on ties, subnormals, overflow, Inf and NaN", async () => {
  const bits = goldenHalfBits();
  assert.equal(await sha256(bytesOf(bits)), golden.half_bits.input_sha256);
  const values = new Float32Array(bits.buffer);
  for (const type of ["F16", "BF16"] as const) {
    const expected = fromBase64(golden.half_bits[type]);
    assertSameBytes(quantize(type, values, 1), expected, type, 2);
    // The scalar conversions agree with the row conversion.
    const scalar = type === "F16" ? fp32ToFp16Bits : fp32ToBf16Bits;
    values.forEach((v, i) =>
      assert.equal(scalar(v), expected[2 * i] | (expected[2 * i + 1] << 8), `${type} ${i}`)
    );
  }
});

Deno.test("quantize() gives the same bytes row by row as for the whole tensor, and into a given buffer", () => {
  const x = new Pcg32(3, 0).fillNormal(new Float32Array(4 * 512), 0, 1);
  for (const type of GOLDEN_TYPES) {
    const whole = quantize(type, x, 512);
    const rowBytes = ggmlBytes(type, 512);
    for (let r = 0; r < 4; r++) {
      const row = quantize(type, x.subarray(512 * r, 512 * (r + 1)), 512);
      assert.deepEqual(row, whole.subarray(rowBytes * r, rowBytes * (r + 1)), `${type} row ${r}`);
    }
    const out = new Uint8Array(whole.length + 2).fill(0xaa);
    assert.equal(quantize(type, x, 512, out.subarray(2)).byteOffset, 2);
    assert.deepEqual(out.subarray(2), whole, type);
  }
});

// ----------------------------------------------------------------------------------------------
// Blocks worked out by hand

Deno.test("Q8_0 of a block with amax 127: d = 1, q = roundf(x) (ties away from zero)", () => {
  const x = new Float32Array(32);
  x.set([127, -127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, 126.5, -126.5, -0.49999997]);
  for (let j = 12; j < 32; j++) x[j] = j - 20;
  const q = quantize("Q8_0", x, 32);
  // d = 127/127 = 1 → f16 0x3c00; qs as int8.
  const qs = [127, -127, 1, -1, 2, -2, 3, -3, 0, 127, -127, 0];
  for (let j = 12; j < 32; j++) qs.push(j - 20);
  assert.deepEqual(q, Uint8Array.from([0x00, 0x3c, ...qs.map((v) => v & 0xff)]));
  assert.deepEqual(dequantize("Q8_0", q, 32), Float32Array.from(qs));
});

Deno.test("Q4_0: d = m/−8 with m the signed value of largest |x|; q = min(15, trunc(x/d + 8.5))", () => {
  // Block 0: m = −8 → d = 1; x = −8 … 7 in the low halves, 8 (clipped to 15), ties at ±0.5.
  // Block 1: m = +16 → d = −2, so x = +16 → q = 0 and x = −16 → 16, clipped to 15.
  const x = new Float32Array(64);
  for (let j = 0; j < 16; j++) x[j] = j - 8;
  x.set([8, 0.5, -0.5, 7.49, 7.5, -7.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 16);
  x.set([16, -16, 2, -2, 1, -1, 3, -3], 32);
  const q = quantize("Q4_0", x, 32);
  const q0 = Array.from({ length: 16 }, (_, j) => j); // x = j − 8 → q = j
  const q0hi = [15, 9, 8, 15, 15, 1, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8];
  // Block 1, id = −0.5: 16 → 0, −16 → 16 → 15, 2 → 7, −2 → 9, 1 → 8 (7.5 + 0.5 → trunc 8), −1 → 9,
  // 3 → 7 (trunc 7), −3 → 10; zeros → 8.
  const q1 = [0, 15, 7, 9, 8, 9, 7, 10, 8, 8, 8, 8, 8, 8, 8, 8];
  const q1hi = repeat([8], 16);
  const pack = (lo: number[], hi: number[]) => lo.map((v, j) => v | (hi[j] << 4));
  assert.deepEqual(
    q,
    Uint8Array.from([0x00, 0x3c, ...pack(q0, q0hi), 0x00, 0xc0, ...pack(q1, q1hi)]),
  );
  // Dequantized: (q − 8)·d (q = 8 gives 0·−2 = −0, as in ggml; + 0 makes it 0 for the comparison).
  assert.deepEqual(Array.from(dequantize("Q4_0", q, 64).subarray(32, 40), (v) => v + 0), [
    16,
    -14,
    2,
    -2,
    0,
    -2,
    2,
    -4,
  ]);
});

Deno.test("Q5_0 and Q5_1: the fifth bit of q[j] is bit j of the little-endian qh", () => {
  // Q5_0: m = −16 → d = 1, q = min(31, trunc(x + 16.5)); x = j − 16 → q = j.
  const x0 = Float32Array.from({ length: 32 }, (_, j) => j - 16);
  const packed = Array.from({ length: 16 }, (_, j) => j | (j << 4)); // (q[j] & 15) | (q[j+16] & 15) << 4
  assert.deepEqual(
    quantize("Q5_0", x0, 32),
    Uint8Array.from([0x00, 0x3c, 0x00, 0x00, 0xff, 0xff, ...packed]), // qh = 0xffff0000
  );
  // Q5_1: min 0, max 31 → d = 1, m = 0, q = trunc(x + 0.5); x = j → q = j.
  const x1 = Float32Array.from({ length: 32 }, (_, j) => j);
  const q = quantize("Q5_1", x1, 32);
  assert.deepEqual(q, Uint8Array.from([0x00, 0x3c, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, ...packed]));
  assert.deepEqual(dequantize("Q5_1", q, 32), x1);
});

Deno.test("Q4_K and Q5_K of exactly representable sub-blocks: scales, mins and their 6-bit packing", () => {
  // Each sub-block of 32 holds 0…15 twice: make_qkx2_quants fits scale 1, min 0 exactly, so
  // ls = 63 everywhere, d = f16(1/63) = 0x2410, dmin = 0; scales[0..3] = 63 | 3 << 6 (the top bits
  // of sub-blocks 4…7), scales[4..7] = 0, scales[8..11] = 63 & 15. qs[32c + l] = q | q << 4.
  const ramp16 = Float32Array.from({ length: 256 }, (_, i) => i % 16);
  const qs = repeat(Array.from({ length: 16 }, (_, l) => 0x11 * l), 8);
  assert.deepEqual(
    quantize("Q4_K", ramp16, 256),
    Uint8Array.from([
      0x10,
      0x24,
      0x00,
      0x00,
      ...repeat([0xff], 4),
      ...repeat([0], 4),
      ...repeat([0x0f], 4),
      ...qs,
    ]),
  );
  // −8…7: min −8 → the_min 8, lm = 63 too, dmin = f16(8/63) = 0x3010; every scale byte is 0xff.
  const centred = ramp16.map((v) => v - 8);
  assert.deepEqual(
    quantize("Q4_K", centred, 256),
    Uint8Array.from([0x10, 0x24, 0x10, 0x30, ...repeat([0xff], 12), ...qs]),
  );
  // d·ls = 0.99975586, dmin·lm = 7.998047: dequantized = 0.99975586·q − 7.998047.
  const y = dequantize("Q4_K", quantize("Q4_K", centred, 256), 256);
  assert.equal(y[0], Math.fround(0 - Math.fround(fp16BitsToFp32(0x3010) * 63)));
  assert.equal(
    y[15],
    Math.fround(Math.fround(fp16BitsToFp32(0x2410) * 63) * 15 - Math.fround(fp16BitsToFp32(0x3010) * 63)),
  );
  // Q5_K, 0…31 per sub-block: same scales; qh[l] has bits 2c and 2c + 1 set for l ≥ 16.
  const ramp32 = Float32Array.from({ length: 256 }, (_, i) => i % 32);
  assert.deepEqual(
    quantize("Q5_K", ramp32, 256),
    Uint8Array.from([
      0x10,
      0x24,
      0x00,
      0x00,
      ...repeat([0xff], 4),
      ...repeat([0], 4),
      ...repeat([0x0f], 4),
      ...repeat([0x00], 16),
      ...repeat([0xff], 16),
      ...qs,
    ]),
  );
});

Deno.test("Q6_K of groups ±(i − 16): scales −128 and +128 clipped to 127, d = −1/256", () => {
  // Group g (16 values): x = (−1)^g (i − 16). make_qx_quants: q = 2x exactly, scale ±0.5; the
  // first largest |scale| is +0.5 → iscale = −256, d = f16(−1/256) = 0x9c00; scales −128 (0x80)
  // and min(127, 128) = 127 (0x7f). Every L = 2i (q + 32): ql = (2i & 15)·0x11, qh = 0x55 for
  // i ≥ 8 (L >> 4 = 1 in all four 2-bit fields).
  const x = Float32Array.from({ length: 256 }, (_, k) => ((k >> 4) & 1 ? -1 : 1) * ((k % 16) - 16));
  const ql = repeat(Array.from({ length: 16 }, (_, i) => ((2 * i) & 15) * 0x11), 8);
  const qh = repeat([...repeat([0], 8), ...repeat([0x55], 8)], 4);
  const q = quantize("Q6_K", x, 256);
  assert.deepEqual(q, Uint8Array.from([...ql, ...qh, ...repeat([0x80, 0x7f], 8), 0x00, 0x9c]));
  // Odd groups dequantize with scale 127: d·127·(L − 32) = −0.49609375·(2i − 32).
  const y = dequantize("Q6_K", q, 256);
  assert.equal(y[0], -16);
  assert.equal(y[16], Math.fround(-0.49609375 * -32));
});

Deno.test("f16 and bf16 by hand: round to nearest even, subnormals, overflow, NaN", () => {
  const f16: [number, number][] = [
    [1, 0x3c00],
    [-2, 0xc000],
    [-0, 0x8000],
    [65504, 0x7bff],
    [65519.99609375, 0x7bff], // just below the tie with Inf
    [65520, 0x7c00], // the tie rounds to even: Inf
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [NaN, 0x7e00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -14 - 2 ** -25, 0x0400], // tie between 0x03ff and 0x0400 → even
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // tie between 0 and 2⁻²⁴ → 0
    [3 * 2 ** -25, 0x0002], // tie → even
    [1 + 2 ** -11, 0x3c00], // tie → even
    [1 + 3 * 2 ** -11, 0x3c02], // tie → even
  ];
  for (const [x, h] of f16) assert.equal(fp32ToFp16Bits(x), h, `f16(${x})`);
  const nan = new Uint32Array([0xffc00000]);
  assert.equal(fp32ToFp16Bits(new Float32Array(nan.buffer)[0]), 0xfe00, "−NaN keeps its sign");
  assert.equal(fp16BitsToFp32(0x0001), 2 ** -24);
  assert.equal(fp16BitsToFp32(0xfbff), -65504);
  assert.ok(Number.isNaN(fp16BitsToFp32(0x7e00)));

  const bf16: [number, number][] = [
    [0x3f800000, 0x3f80], // 1
    [0x3f808000, 0x3f80], // 1 + 2⁻⁸: tie → even
    [0x3f818000, 0x3f82], // tie → even (up)
    [0x3f808001, 0x3f81],
    [0x7f7fffff, 0x7f80], // largest f32 rounds to Inf
    [0x7f800001, 0x7fc0], // signalling NaN → quiet
    [0xff812345, 0xffc1], // NaN keeps sign and top payload bits
    [0x00018000, 0x0002], // f32 subnormal, tie → even
    [0x80000000, 0x8000],
  ];
  const u = new Uint32Array(1);
  const v = new Float32Array(u.buffer);
  for (const [bits, h] of bf16) {
    u[0] = bits;
    assert.equal(fp32ToBf16Bits(v[0]), h, `bf16(0x${bits.toString(16)})`);
  }
  assert.equal(bf16BitsToFp32(0x3f80), 1);
  assert.equal(bf16BitsToFp32(0xc040), -3);
});

// ----------------------------------------------------------------------------------------------
// Error bounds

const N = 64 * 256;
const NORMAL = new Pcg32(11, 0).fillNormal(new Float32Array(N), 0, 1);

Deno.test("Q8_0, Q4_0, Q5_0 round to the nearest step of d except where Q4_0/Q5_0 clip", () => {
  // d = amax/127 (Q8_0) or m/−8, m/−16 (Q4_0, Q5_0; m the signed value of largest |x|), in f32.
  // |x − y| ≤ |d|/2 + qmax·|d − f16(d)|, except that Q4_0 / Q5_0 store x/d ≥ 7.5 / 15.5 (the side
  // opposite m) as 7 / 15: there the error is up to |d| (+ the same f16 term).
  const cases: [GgmlTypeName, number, number, number][] = [
    // type, divisor of d, first clipped x/d, largest |q|
    ["Q8_0", 127, Infinity, 127],
    ["Q4_0", -8, 7.5, 8],
    ["Q5_0", -16, 15.5, 16],
  ];
  for (const [type, div, clip, qmax] of cases) {
    const y = dequantize(type, quantize(type, NORMAL, 256), N);
    let clipped = 0;
    for (let b = 0; b < N; b += 32) {
      let m = 0;
      for (let j = b; j < b + 32; j++) if (Math.abs(NORMAL[j]) > Math.abs(m)) m = NORMAL[j];
      const d = Math.fround((type === "Q8_0" ? Math.abs(m) : m) / div);
      const slack = qmax * Math.abs(d - Math.f16round(d)) + 1e-6 * Math.abs(d);
      for (let j = b; j < b + 32; j++) {
        const err = Math.abs(NORMAL[j] - y[j]);
        const over = NORMAL[j] / d >= clip;
        if (over) clipped++;
        const bound = (over ? Math.abs(d) : Math.abs(d) / 2) + slack;
        assert.ok(err <= bound, `${type} value ${j}: |error| ${err} > ${bound} (d = ${d})`);
      }
    }
    if (type !== "Q8_0") assert.ok(clipped > 0, `${type}: the data should reach the clipped side`);
  }
});

Deno.test("Q4_1 and Q5_1 error is at most d/2 plus the f16 rounding of d and m", () => {
  for (const [type, levels] of [["Q4_1", 15], ["Q5_1", 31]] as const) {
    const y = dequantize(type, quantize(type, NORMAL, 256), N);
    for (let b = 0; b < N; b += 32) {
      let lo = Infinity;
      let hi = -Infinity;
      for (let j = b; j < b + 32; j++) {
        lo = Math.min(lo, NORMAL[j]);
        hi = Math.max(hi, NORMAL[j]);
      }
      const d = Math.fround(Math.fround(hi - lo) / levels);
      const slack = levels * Math.abs(d - Math.f16round(d)) + Math.abs(lo - Math.f16round(lo)) + 1e-6 * d;
      for (let j = b; j < b + 32; j++) {
        assert.ok(Math.abs(NORMAL[j] - y[j]) <= d / 2 + slack, `${type} value ${j}`);
      }
    }
  }
});

/** √(Σ(x − y)² / Σx²) of a round trip through `type`. */
function rmsRelativeError(type: GgmlTypeName, x: Float32Array): number {
  const y = dequantize(type, quantize(type, x, 256), x.length);
  let se = 0;
  let sx = 0;
  for (let i = 0; i < x.length; i++) {
    se += (x[i] - y[i]) ** 2;
    sx += x[i] ** 2;
  }
  return Math.sqrt(se / sx);
}

Deno.test("round-trip RMS error relative to RMS(x), N(0, 1) and heavy-tailed data", () => {
  // Measured on these seeds (N(0,1) / x³ of N(0,1)): F16 0.00021/0.00021, BF16 0.0017/0.0017,
  // Q8_0 0.0053/0.0088, Q6_K 0.0177/0.0247, Q5_K 0.0360/0.0496, Q5_1 0.0376/0.0548,
  // Q5_0 0.0425/0.0602, Q4_K 0.0713/0.0893, Q4_1 0.0781/0.117, Q4_0 0.0858/0.110.
  // Bounds: the measured value plus about 5 %.
  const heavy = NORMAL.map((v) => v ** 3);
  const bounds: [GgmlTypeName, number, number][] = [
    ["F16", 0.00025, 0.00025],
    ["BF16", 0.0018, 0.0018],
    ["Q8_0", 0.0056, 0.0093],
    ["Q6_K", 0.0186, 0.026],
    ["Q5_K", 0.038, 0.052],
    ["Q5_1", 0.040, 0.058],
    ["Q5_0", 0.045, 0.064],
    ["Q4_K", 0.075, 0.094],
    ["Q4_1", 0.082, 0.123],
    ["Q4_0", 0.090, 0.116],
  ];
  for (const [type, normalBound, heavyBound] of bounds) {
    const e1 = rmsRelativeError(type, NORMAL);
    const e2 = rmsRelativeError(type, heavy);
    assert.ok(e1 < normalBound, `${type} on N(0,1): ${e1} ≥ ${normalBound}`);
    assert.ok(e2 < heavyBound, `${type} heavy-tailed: ${e2} ≥ ${heavyBound}`);
  }
  // More bits, less error, and the K-quants beat the legacy type of the same width.
  const e = (t: GgmlTypeName) => rmsRelativeError(t, NORMAL);
  assert.ok(e("Q6_K") < e("Q5_K") && e("Q5_K") < e("Q4_K"));
  assert.ok(e("Q4_K") < e("Q4_0") && e("Q5_K") < e("Q5_0"));
});

Deno.test("an all-zero block quantizes to zeros and back to zeros in every type", () => {
  const zeros = new Float32Array(512);
  for (const type of GOLDEN_TYPES) {
    // Q4_0 and Q5_0 give −0 (d = 0/−8 = −0), as ggml does.
    assert.ok(dequantize(type, quantize(type, zeros, 256), 512).every((v) => v === 0), type);
  }
  assert.deepEqual(quantize("Q6_K", zeros, 256), new Uint8Array(420));
});

// ----------------------------------------------------------------------------------------------
// Types and sizes

Deno.test("ggml type ids, block sizes and byte counts are ggml's", () => {
  assert.deepEqual(
    { ...GGML_TYPE },
    { F32: 0, F16: 1, Q4_0: 2, Q4_1: 3, Q5_0: 6, Q5_1: 7, Q8_0: 8, Q4_K: 12, Q5_K: 13, Q6_K: 14, BF16: 30 },
  );
  const sizes: Record<GgmlTypeName, [number, number]> = {
    F32: [1, 4],
    F16: [1, 2],
    BF16: [1, 2],
    Q4_0: [32, 18],
    Q4_1: [32, 20],
    Q5_0: [32, 22],
    Q5_1: [32, 24],
    Q8_0: [32, 34],
    Q4_K: [256, 144],
    Q5_K: [256, 176],
    Q6_K: [256, 210],
  };
  for (const [type, [blockSize, typeSize]] of Object.entries(sizes) as [GgmlTypeName, [number, number]][]) {
    assert.deepEqual(ggmlBlock(type), { blockSize, typeSize }, type);
    assert.equal(ggmlBytes(type, 4096 * 2), (8192 / blockSize) * typeSize, type);
  }
  assert.deepEqual(LLAMA_FTYPE, {
    F32: 0,
    F16: 1,
    Q4_0: 2,
    Q8_0: 7,
    Q4_K_M: 15,
    Q5_K_M: 17,
    Q6_K: 18,
    BF16: 32,
  });
});

Deno.test("F32 quantize and dequantize are copies", () => {
  const x = Float32Array.from([1, -0, NaN, Infinity, 1e-45]);
  const q = quantize("F32", x, 1);
  assert.deepEqual(q, bytesOf(x));
  assert.deepEqual(dequantize("F32", q, 5), x);
});

// ----------------------------------------------------------------------------------------------
// Bad input

Deno.test("bad input is a LatheError naming the type, the length and the block", () => {
  assert.throws(
    () => quantize("Q4_K", new Float32Array(200), 100),
    (e: unknown) =>
      e instanceof LatheError &&
      e.message === "Cannot quantize to Q4_K: row length 100 is not a multiple of its block size 256",
  );
  assert.throws(() => quantize("Q8_0", new Float32Array(48), 48), /row length 48 .* block size 32/);
  assert.throws(() => quantize("Q8_0", new Float32Array(96), 64), /96 values are not whole rows of 64/);
  assert.throws(
    () => quantize("Q3_X" as GgmlTypeName, new Float32Array(32), 32),
    (e: unknown) => e instanceof LatheError && /unknown ggml type "Q3_X" \(known: F32, F16/.test(e.message),
  );
  assert.throws(() => ggmlBlock("toString" as GgmlTypeName), LatheError);
  assert.throws(
    () => ggmlBytes("Q6_K", 300),
    /Cannot size 300 values of Q6_K: not a whole number of 256-value blocks/,
  );
  assert.throws(() => dequantize("Q8_0", new Uint8Array(33), 32), /33 bytes given, 34 needed/);
  const x = new Float32Array(512);
  x[300] = NaN;
  assert.throws(
    () => quantize("Q4_K", x, 256),
    (e: unknown) =>
      e instanceof LatheError && e.message === "Cannot quantize to Q4_K: value 300 (row 1, column 44) is NaN",
  );
  x[300] = -Infinity;
  assert.throws(() => quantize("Q8_0", x, 256), /value 300 \(row 1, column 44\) is -Infinity/);
  assert.throws(
    () =>
      tensorType(
        "Q3_K_M" as GgufFileType,
        { name: "x.weight", shape: [256, 256] },
        LLAMA_8B,
        new MixCounters([]),
      ),
    /unknown GGUF file type "Q3_K_M"/,
  );
});

// ----------------------------------------------------------------------------------------------
// llama-quantize's tensor types

const LLAMA_8B: MixModel = { nLayers: 32, nHead: 32, nHeadKv: 8, tiedEmbeddings: false };

/** A Llama-like model's tensors (ggml shapes, ne[0] first), D = hidden, F = FFN, V = vocab. */
function llamaTensors(
  nLayers: number,
  D: number,
  F: number,
  kv: number,
  tied: boolean,
): Map<string, number[]> {
  const V = 1024;
  const t = new Map<string, number[]>([["token_embd.weight", [D, V]]]);
  for (let i = 0; i < nLayers; i++) {
    t.set(`blk.${i}.attn_norm.weight`, [D]);
    t.set(`blk.${i}.attn_q.weight`, [D, D]);
    t.set(`blk.${i}.attn_k.weight`, [D, kv]);
    t.set(`blk.${i}.attn_v.weight`, [D, kv]);
    t.set(`blk.${i}.attn_output.weight`, [D, D]);
    t.set(`blk.${i}.ffn_norm.weight`, [D]);
    t.set(`blk.${i}.ffn_gate.weight`, [D, F]);
    t.set(`blk.${i}.ffn_up.weight`, [D, F]);
    t.set(`blk.${i}.ffn_down.weight`, [F, D]);
  }
  t.set("output_norm.weight", [D]);
  if (!tied) t.set("output.weight", [D, V]);
  t.set("rope_freqs.weight", [64]);
  return t;
}

/** name → type for a whole model, visited in llama-quantize's order. */
function mix(
  ftype: GgufFileType,
  tensors: Map<string, number[]>,
  model: MixModel,
): Map<string, GgmlTypeName> {
  const counters = new MixCounters(tensors.keys());
  const out = new Map<string, GgmlTypeName>();
  for (const name of llamaQuantizeOrder(tensors.keys())) {
    out.set(name, tensorType(ftype, { name, shape: tensors.get(name)! }, model, counters));
  }
  return out;
}

Deno.test("tensorType() chooses llama.cpp's types (golden from libllama's llama_quant_compute_types)", () => {
  for (const mix of goldenMixes()) {
    for (const ftype of mix.ftypes) {
      const expected: string[] = golden.tensor_types[mix.name][ftype].split(" ");
      const counters = new MixCounters(mix.tensors.map(([name]) => name));
      mix.tensors.forEach(([name, shape], i) => {
        const type = tensorType(ftype, { name, shape }, mix.model, counters);
        assert.equal(type, expected[i], `${mix.name} ${ftype} ${name} ${JSON.stringify(shape)}`);
      });
    }
  }
});

// use_more_bits(i, 32): i < 4, i ≥ 28, or (i − 4) % 3 == 2.
const MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];

Deno.test("llamaQuantizeOrder() sorts like llama.cpp's weights_map: non-block tensors, then by layer number", () => {
  assert.deepEqual(
    llamaQuantizeOrder([
      "blk.10.attn_q.weight",
      "output.weight",
      "blk.9.ffn_up.weight",
      "blk.9.attn_k.weight",
      "token_embd.weight",
      "blk.2.x",
    ]),
    [
      "output.weight",
      "token_embd.weight",
      "blk.2.x",
      "blk.9.attn_k.weight",
      "blk.9.ffn_up.weight",
      "blk.10.attn_q.weight",
    ],
  );
});

Deno.test("Q4_K_M and Q5_K_M on a 32-layer Llama: Q6_K output, attn_v and ffn_down where use_more_bits", () => {
  const tensors = llamaTensors(32, 4096, 14336, 1024, false);
  for (const [ftype, base] of [["Q4_K_M", "Q4_K"], ["Q5_K_M", "Q5_K"]] as const) {
    const types = mix(ftype, tensors, LLAMA_8B);
    assert.equal(types.get("token_embd.weight"), base, ftype);
    assert.equal(types.get("output.weight"), "Q6_K", ftype);
    assert.equal(types.get("output_norm.weight"), "F32");
    assert.equal(types.get("rope_freqs.weight"), "F32");
    const sixBit = (kind: string) =>
      Array.from({ length: 32 }, (_, i) => i).filter((i) => types.get(`blk.${i}.${kind}.weight`) === "Q6_K");
    assert.deepEqual(sixBit("attn_v"), MORE_BITS_32, `${ftype} attn_v`);
    assert.deepEqual(sixBit("ffn_down"), MORE_BITS_32, `${ftype} ffn_down`);
    for (let i = 0; i < 32; i++) {
      for (const kind of ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"]) {
        assert.equal(types.get(`blk.${i}.${kind}.weight`), base, `${ftype} blk.${i}.${kind}`);
      }
      if (!MORE_BITS_32.includes(i)) assert.equal(types.get(`blk.${i}.attn_v.weight`), base);
      for (const kind of ["attn_norm", "ffn_norm"]) assert.equal(types.get(`blk.${i}.${kind}.weight`), "F32");
    }
  }
});

Deno.test("tied embeddings: token_embd takes the output's Q6_K (Q8_0 when its rows do not fit)", () => {
  const tied = { ...LLAMA_8B, tiedEmbeddings: true };
  const tensors = llamaTensors(32, 4096, 14336, 1024, true);
  assert.equal(mix("Q4_K_M", tensors, tied).get("token_embd.weight"), "Q6_K");
  assert.equal(mix("Q4_0", tensors, tied).get("token_embd.weight"), "Q6_K");
  assert.equal(mix("Q8_0", tensors, tied).get("token_embd.weight"), "Q8_0");
  const small = llamaTensors(2, 96, 256, 32, true); // ne[0] = 96: not a multiple of 256, of 32 yes
  assert.equal(mix("Q4_K_M", small, tied).get("token_embd.weight"), "Q8_0");
});

Deno.test("whole-file types: F32, F16, BF16 everywhere but 1-D; Q8_0, Q4_0, Q6_K with a Q6_K or Q8_0 output", () => {
  const tensors = llamaTensors(4, 512, 1024, 128, false);
  const model = { ...LLAMA_8B, nLayers: 4 };
  for (
    const [ftype, body, output] of [
      ["F32", "F32", "F32"],
      ["F16", "F16", "F16"],
      ["BF16", "BF16", "BF16"],
      ["Q8_0", "Q8_0", "Q8_0"],
      ["Q4_0", "Q4_0", "Q6_K"],
      ["Q6_K", "Q6_K", "Q6_K"],
    ] as const
  ) {
    const types = mix(ftype, tensors, model);
    for (const [name, shape] of tensors) {
      const want = shape.length === 1 ? "F32" : name === "output.weight" ? output : body;
      assert.equal(types.get(name), want, `${ftype} ${name}`);
    }
  }
});

Deno.test("ne[0] = 64 falls back as llama.cpp does: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; then F16", () => {
  const tensors = llamaTensors(8, 64, 128, 64, false);
  const model = { nLayers: 8, nHead: 4, nHeadKv: 4, tiedEmbeddings: false };
  // use_more_bits(i, 8): i < 1, i ≥ 7, (i − 1) % 3 == 2 → layers 0, 3, 6, 7.
  for (const [ftype, base, fallback] of [["Q4_K_M", "Q4_K", "Q5_0"], ["Q5_K_M", "Q5_K", "Q5_1"]] as const) {
    const counters = new MixCounters(tensors.keys());
    const types = new Map<string, GgmlTypeName>();
    for (const name of llamaQuantizeOrder(tensors.keys())) {
      types.set(name, tensorType(ftype, { name, shape: tensors.get(name)! }, model, counters));
    }
    assert.equal(types.get("output.weight"), "Q8_0", `${ftype}: ne[0] % 256 ≠ 0 makes the output Q8_0`);
    assert.equal(types.get("token_embd.weight"), fallback, ftype);
    for (let i = 0; i < 8; i++) {
      const more = [0, 3, 6, 7].includes(i);
      assert.equal(types.get(`blk.${i}.attn_v.weight`), more ? "Q8_0" : fallback, `${ftype} attn_v ${i}`);
      assert.equal(types.get(`blk.${i}.attn_q.weight`), fallback, `${ftype} attn_q ${i}`);
      // ffn_down has ne[0] = 128: also not a multiple of 256.
      assert.equal(types.get(`blk.${i}.ffn_down.weight`), more ? "Q8_0" : fallback, `${ftype} ffn_down ${i}`);
    }
    // Every 2-D tensor but the output fell back (token_embd + 7 per layer).
    assert.equal(counters.nFallback, 1 + 7 * 8, ftype);
    assert.equal(base === "Q4_K" ? "Q5_0" : "Q5_1", fallback);
  }
  // A row of 48 fits no 32-value block either: F16.
  const c = new MixCounters([]);
  assert.equal(tensorType("Q4_K_M", { name: "blk.0.attn_q.weight", shape: [48, 48] }, model, c), "F16");
  assert.equal(tensorType("Q8_0", { name: "blk.0.attn_q.weight", shape: [48, 48] }, model, c), "F16");
  assert.equal(tensorType("Q4_0", { name: "blk.0.attn_q.weight", shape: [64, 48] }, model, c), "Q4_0");
  assert.equal(c.nFallback, 2);
});

Deno.test("70B and 8-expert rules: attn_v Q5_K outside use_more_bits; Q8_0 attn_v/attn_k with 8 experts", () => {
  const model70 = { nLayers: 80, nHead: 64, nHeadKv: 8, tiedEmbeddings: false };
  const tensors = llamaTensors(80, 8192, 28672, 1024, false);
  const types = mix("Q4_K_M", tensors, model70);
  // use_more_bits(i, 80): i < 10, i ≥ 70, (i − 10) % 3 == 2.
  for (let i = 0; i < 80; i++) {
    const more = i < 10 || i >= 70 || (i - 10) % 3 === 2;
    assert.equal(types.get(`blk.${i}.attn_v.weight`), more ? "Q6_K" : "Q5_K", `attn_v ${i}`);
    assert.equal(types.get(`blk.${i}.ffn_down.weight`), more ? "Q6_K" : "Q4_K", `ffn_down ${i}`);
  }
  // 80 layers with n_head == n_head_kv is a 65B for llama.cpp: no lift.
  const mha = mix("Q4_K_M", tensors, { ...model70, nHeadKv: 64 });
  assert.equal(mha.get("blk.20.attn_v.weight"), "Q4_K");

  const moe = { ...LLAMA_8B, nExpert: 8 };
  const c = new MixCounters(["blk.0.attn_v.weight"]);
  const shape = [4096, 4096];
  assert.equal(tensorType("Q4_K_M", { name: "blk.0.attn_v.weight", shape }, moe, c), "Q8_0");
  assert.equal(tensorType("Q4_K_M", { name: "blk.0.attn_k.weight", shape }, moe, c), "Q8_0");
  assert.equal(tensorType("Q4_K_M", { name: "blk.0.attn_output.weight", shape }, moe, c), "Q5_K");
  // MoE ffn_down takes its layer from the name: blk.31 is in the last eighth.
  assert.equal(
    tensorType("Q4_K_M", { name: "blk.31.ffn_down_exps.weight", shape: [14336, 4096, 8] }, moe, c),
    "Q6_K",
  );
  assert.equal(tensorType("Q4_K_M", { name: "blk.30.ffn_gate_inp.weight", shape: [4096, 8] }, moe, c), "F32");
  assert.throws(
    () => tensorType("Q4_K_M", { name: "blk.40.ffn_down_exps.weight", shape }, moe, c),
    /layer 40/,
  );
});
