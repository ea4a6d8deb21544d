/**
 * ggml's tensor types on the host: f32 rows quantized into ggml blocks byte for byte as
 * llama.cpp's reference quantizers write them (`ggml/src/ggml-quants.c`, the `_ref` paths that
 * `llama-quantize` takes without an importance matrix), the inverse as ggml's `dequantize_row_*`
 * computes it, and the per-tensor type choice of `llama-quantize` (`src/llama-quant.cpp`).
 * FORMATS.md, "GGUF (v3), as llama.cpp reads it".
 *
 * Read from llama.cpp as node-llama-cpp 3.21.1 bundles it (release tag `v0.4.0`, ggml 0.23.0,
 * source `node-llama-cpp/llama/gitRelease.bundle`, commit 80fb11ac73e6); checked byte for byte
 * against that build's `libggml-base.so` (`ggml_quantize_chunk`, `dequantize_row_*`) by
 * scripts/golden/gguf_quants.ts, whose output tests/formats/gguf_quants_test.ts compares.
 *
 * Without an imatrix, `quantize_q4_K/q5_K/q6_K/q4_0/q5_0/q5_1/q8_0` (what `ggml_quantize_chunk`
 * calls) run `quantize_row_*_ref` over all rows at once; a row length that is a multiple of the
 * block makes that the same as quantizing each row alone.
 *
 * Arithmetic is f32 as in C: every product, sum, quotient and square root is rounded with
 * `Math.fround` (f64 holds the exact result of one f32 operation to within the rounding that
 * makes double rounding harmless for + − × ÷ √), and sums run in ggml's order. ggml-base is
 * built without FMA contraction on x86-64, so no operation is fused. A few shortcuts skip work
 * whose outcome is already decided (a trial whose quants repeat the previous trial's; an error
 * sum that has reached the best); they cannot change a byte. Scratch buffers are module-level,
 * so quantization allocates nothing per block (each worker has its own module instance).
 * Speed on one core (Deno 2.9, x86-64): about 7 ns/value for Q8_0, Q4_0, F16, BF16, and about
 * 120 (Q6_K), 180 (Q5_K) and 220 (Q4_K) ns/value, 3–4× ggml's C; rows are independent, so a
 * large export can quantize on several workers.
 * Byte order is little-endian (F32 and F16 rows are written through typed-array views).
 *
 * Helpers (ggml's names):
 * - nearest_int(v) = the f32 `v + 1.5·2²³`, its low 23 mantissa bits − 2²²: round half to even
 *   for |v| ≤ 2²² − 1 (what every K-quant rounds with); garbage beyond, reproduced bit for bit.
 * - f16 (`GGML_FP32_TO_FP16`): IEEE binary16, round to nearest even, subnormals kept, overflow
 *   to ±Inf, NaN → sign | 0x7E00. bf16 (`ggml_compute_fp32_to_bf16`): the top 16 bits rounded
 *   to nearest even (`(u + 0x7FFF + ((u >> 16) & 1)) >> 16`), NaN → `(u >> 16) | 0x40` (quiet).
 *
 * Blocks (little-endian; d, dmin, m are f16; x = the block's f32 inputs):
 * - Q8_0 (32 → 34 B): d | i8 qs[32]. d = amax/127, qs = roundf(x · (1/d)) (half away from 0).
 * - Q4_0 (32 → 18 B): d | qs[16]. With m the x of largest |x| (first wins), d = m/−8,
 *   q = min(15, trunc(x · (1/d) + 8.5)), qs[j] = q[j] | q[j+16] << 4; x ≈ (q − 8) · d.
 * - Q4_1 (32 → 20 B): d | m | qs[16]. d = (max − min)/15, q = min(15, trunc((x − min)/d + 0.5)),
 *   x ≈ q · d + m with m = min.
 * - Q5_0 (32 → 22 B): d | u32 qh | qs[16]. d = m/−16, q = min(31, trunc(x/d + 16.5)); low
 *   nibbles packed as Q4_0, bit 4 of q[j] is bit j of qh; x ≈ (q − 16) · d.
 * - Q5_1 (32 → 24 B): d | m | u32 qh | qs[16]. d = (max − min)/31, q = trunc((x − min)/d + 0.5).
 * - Q4_K (256 → 144 B): d | dmin | scales[12] | qs[128]. Eight sub-blocks of 32; each gets a
 *   scale s and a min m ≥ 0 from make_qkx2_quants (nmax 15, weights av + |x| with av = rms of
 *   the sub-block, 21 trial scales (−1 + 0.1·is + 15)/(max − min), the weighted least-squares
 *   (scale, min) of each kept if its weighted squared error is lower). d = max s / 63,
 *   dmin = max m / 63; 6-bit ls = nearest_int(63·s/max s), lm likewise (≤ 63), packed
 *   (get_scale_min_k4): sub-block j < 4: scales[j] = ls, scales[j+4] = lm; j ≥ 4:
 *   scales[j+4] = ls & 15 | (lm & 15) << 4, top two bits of ls in bits 6–7 of scales[j−4],
 *   of lm in bits 6–7 of scales[j]. Then q = clamp(nearest_int((x + dmin·lm)/(d·ls)), 0, 15)
 *   with d and dmin as stored (f16); a sub-block whose d·ls is 0 keeps make_qkx2_quants' q.
 *   qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4. x ≈ d·ls·q − dmin·lm.
 * - Q5_K (256 → 176 B): d | dmin | scales[12] | qh[32] | qs[128]. As Q4_K with nmax 31 and
 *   16 trial scales (−0.5 + 0.1·is + 31)/(max − min); q's low nibbles packed as Q4_K, bit 4 of
 *   q[64c + l] is bit 2c of qh[l], of q[64c + 32 + l] bit 2c + 1.
 * - Q6_K (256 → 210 B): ql[128] | qh[64] | i8 scales[16] | d. Sixteen groups of 16; each scale
 *   from make_qx_quants (nmax 32, weights x², 19 trial scales −(32 + 0.1·is)/max, is = −9…9,
 *   kept when (Σw·x·l)²/Σw·l² grows); with S the scale of largest |S|: iscale = −128/S, d = 1/iscale,
 *   scales[g] = min(127, nearest_int(iscale·S_g)); q = clamp(nearest_int(x/(d·scales[g])),
 *   −32, 31) + 32. For c in 0, 1 and l < 32 (q index 128c + l + 32k, k = 0…3):
 *   ql[64c + l] = q₀ & 15 | (q₂ & 15) << 4, ql[64c + 32 + l] = q₁ & 15 | (q₃ & 15) << 4,
 *   qh[32c + l] = q₀ >> 4 | (q₁ >> 4) << 2 | (q₂ >> 4) << 4 | (q₃ >> 4) << 6.
 *   x ≈ d · scales[g] · (q − 32). A block whose scales are all below 1e-15 is all zero bytes.
 *
 * @example
 * ```ts
 * import { dequantize, ggmlBytes, quantize } from "./gguf_quants.ts";
 * const w = Float32Array.from({ length: 2 * 256 }, (_, i) => Math.sin(i));
 * const q = quantize("Q4_K", w, 256); // two rows of 256
 * q.length === ggmlBytes("Q4_K", w.length); // 288
 * const back = dequantize("Q4_K", q, w.length);
 * ```
 * @module
 */
import { LatheError } from "../foundation/errors.ts";

/** ggml type ids (`enum ggml_type`, ggml/include/ggml.h) of the types lathe writes. */
export const GGML_TYPE = {
  F32: 0,
  F16: 1,
  Q4_0: 2,
  Q4_1: 3,
  Q5_0: 6,
  Q5_1: 7,
  Q8_0: 8,
  Q4_K: 12,
  Q5_K: 13,
  Q6_K: 14,
  BF16: 30,
} as const;

/** A ggml type lathe can write, by ggml's name. */
export type GgmlTypeName = keyof typeof GGML_TYPE;

/** Values per block and bytes per block (`type_traits[type].blck_size` / `.type_size`). */
const BLOCKS: Record<GgmlTypeName, { blockSize: number; typeSize: number }> = {
  F32: { blockSize: 1, typeSize: 4 },
  F16: { blockSize: 1, typeSize: 2 },
  BF16: { blockSize: 1, typeSize: 2 },
  Q4_0: { blockSize: 32, typeSize: 18 },
  Q4_1: { blockSize: 32, typeSize: 20 },
  Q5_0: { blockSize: 32, typeSize: 22 },
  Q5_1: { blockSize: 32, typeSize: 24 },
  Q8_0: { blockSize: 32, typeSize: 34 },
  Q4_K: { blockSize: 256, typeSize: 144 },
  Q5_K: { blockSize: 256, typeSize: 176 },
  Q6_K: { blockSize: 256, typeSize: 210 },
};

function blockOf(type: GgmlTypeName, action: string): { blockSize: number; typeSize: number } {
  const block = Object.hasOwn(BLOCKS, type) ? BLOCKS[type] : undefined;
  if (block === undefined) {
    throw new LatheError(
      `Cannot ${action}: unknown ggml type ${JSON.stringify(type)} (known: ${
        Object.keys(BLOCKS).join(", ")
      })`,
    );
  }
  return block;
}

/**
 * A type's block: `blockSize` values are stored in `typeSize` bytes.
 *
 * @example
 * ```ts
 * ggmlBlock("Q4_K"); // { blockSize: 256, typeSize: 144 }
 * ```
 */
export function ggmlBlock(type: GgmlTypeName): { blockSize: number; typeSize: number } {
  return { ...blockOf(type, "size a block") };
}

/**
 * Bytes of `elementCount` values of `type` (`ggml_row_size`); a LatheError when the count is
 * not a whole number of blocks.
 *
 * @example
 * ```ts
 * ggmlBytes("Q8_0", 4096); // 4352
 * ```
 */
export function ggmlBytes(type: GgmlTypeName, elementCount: number): number {
  const { blockSize, typeSize } = blockOf(type, "size a tensor");
  if (!Number.isSafeInteger(elementCount) || elementCount < 0 || elementCount % blockSize !== 0) {
    throw new LatheError(
      `Cannot size ${elementCount} values of ${type}: not a whole number of ${blockSize}-value blocks`,
    );
  }
  return (elementCount / blockSize) * typeSize;
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers: f32 rounding, nearest_int, f16 and bf16.

const f = Math.fround;
const F32_ONE = new Float32Array(1);
const U32_ONE = new Uint32Array(F32_ONE.buffer);
const I32_ONE = new Int32Array(F32_ONE.buffer);

/** GROUP_MAX_EPS: a group whose largest |x| is below it is all zero. */
const GROUP_MAX_EPS = f(1e-15);
/** 0.1f, the step of the trial scales. */
const TENTH = f(0.1);

/** ggml's nearest_int of an f32 value (module doc). */
function nearestInt(v: number): number {
  if (v <= 4194303 && v >= -4194303) return f(v + 12582912) - 12582912;
  F32_ONE[0] = v + 12582912;
  return (I32_ONE[0] & 0x007fffff) - 0x00400000;
}

/** IEEE binary16 bits of an f32 value (sign, 5-bit exponent, 10-bit mantissa), as bits of x. */
function f16FromF32Bits(w: number): number {
  const sign = (w >>> 16) & 0x8000;
  const e = (w >>> 23) & 0xff; // f32 biased exponent
  const m = w & 0x7fffff;
  if (e === 0xff) return sign | (m !== 0 ? 0x7e00 : 0x7c00);
  if (e >= 113) { // |x| ≥ 2⁻¹⁴: normal f16 (exponent e − 112) or overflow
    let h = ((e - 112) << 10) | (m >>> 13);
    const rest = m & 0x1fff; // the 13 dropped bits; 0x1000 is half an f16 ulp
    if (rest > 0x1000 || (rest === 0x1000 && (h & 1) !== 0)) h++;
    return sign | (h >= 0x7c00 ? 0x7c00 : h);
  }
  if (e < 102) return sign; // |x| < 2⁻²⁵: rounds to ±0
  // f16 subnormal: units of 2⁻²⁴; x = (m | 2²³) · 2^(e − 150), so shift right by 126 − e.
  const full = m | 0x800000;
  const shift = 126 - e; // 14 … 24
  let h = full >>> shift;
  const rest = full & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rest > half || (rest === half && (h & 1) !== 0)) h++;
  return sign | h;
}

/**
 * `GGML_FP32_TO_FP16`: the f16 bits of a number (rounded to f32 first): round to nearest even,
 * subnormals kept, overflow to ±Inf, NaN to sign | 0x7E00.
 *
 * @example
 * ```ts
 * fp32ToFp16Bits(1); // 0x3c00
 * fp32ToFp16Bits(65520); // 0x7c00 (a tie above 65504 rounds to Inf)
 * ```
 */
export function fp32ToFp16Bits(x: number): number {
  F32_ONE[0] = x;
  return f16FromF32Bits(U32_ONE[0]);
}

/** f16 bits → f32 value, all 65536 of them (`GGML_FP16_TO_FP32`; NaN payloads kept, quieted). */
const F16_TO_F32: Float32Array = (() => {
  const table = new Float32Array(65536);
  const bits = new Uint32Array(table.buffer);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const e = (h >>> 10) & 0x1f;
    const m = h & 0x3ff;
    if (e === 0x1f) bits[h] = (sign | 0x7f800000 | (m << 13) | (m !== 0 ? 0x400000 : 0)) >>> 0;
    else if (e === 0) table[h] = (sign ? -m : m) * 2 ** -24; // ±0 and subnormals, exact
    else bits[h] = (sign | ((e + 112) << 23) | (m << 13)) >>> 0;
  }
  return table;
})();

/** `GGML_FP16_TO_FP32`: the value of f16 bits (exact). */
export function fp16BitsToFp32(h: number): number {
  return F16_TO_F32[h & 0xffff];
}

/** bf16 bits of f32 bits w (`ggml_compute_fp32_to_bf16`). */
function bf16FromF32Bits(w: number): number {
  if ((w & 0x7fffffff) > 0x7f800000) return ((w >>> 16) | 0x40) & 0xffff; // NaN, forced quiet
  return (w + 0x7fff + ((w >>> 16) & 1)) >>> 16; // < 2³² for every non-NaN w
}

/**
 * `ggml_compute_fp32_to_bf16`: the bf16 bits of a number (rounded to f32 first): the top 16
 * bits rounded to nearest even (so a huge finite value can round to Inf); NaN keeps its sign
 * and top payload bits and is made quiet (| 0x40).
 *
 * @example
 * ```ts
 * fp32ToBf16Bits(1); // 0x3f80
 * ```
 */
export function fp32ToBf16Bits(x: number): number {
  F32_ONE[0] = x;
  return bf16FromF32Bits(U32_ONE[0]);
}

/** `GGML_BF16_TO_FP32`: the value of bf16 bits (exact). */
export function bf16BitsToFp32(h: number): number {
  U32_ONE[0] = (h & 0xffff) << 16;
  return F32_ONE[0];
}

function writeF16(out: Uint8Array, o: number, x: number): number {
  const h = fp32ToFp16Bits(x);
  out[o] = h & 0xff;
  out[o + 1] = h >>> 8;
  return h;
}

function readF16(bytes: Uint8Array, o: number): number {
  return F16_TO_F32[bytes[o] | (bytes[o + 1] << 8)];
}

/**
 * C's roundf (half away from zero) of an f32 value |x| < 1024: floor(x + 0.5), then a negative
 * tie one lower. Written without Math.round and without a sign test on the common path, which
 * are several times slower here in V8.
 */
function roundAway(x: number): number {
  let r = ((x + 1024.5) | 0) - 1024; // x + 1024.5 is exact and positive
  if (r - x === 0.5 && x < 0) r--;
  return r;
}

// ---------------------------------------------------------------------------------------------
// 32-value blocks. x[xo + j], j < 32, into out[o ...]; the formulas are in the module doc.

/** quantize_row_q8_0_ref, one block: d | i8 qs[32]. */
function quantizeQ8_0Block(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  let amax = 0;
  for (let j = 0; j < 32; j++) {
    const a = Math.abs(x[xo + j]);
    if (a > amax) amax = a;
  }
  const d = f(amax / 127);
  const id = d !== 0 ? f(1 / d) : 0;
  writeF16(out, o, d);
  for (let j = 0; j < 32; j++) out[o + 2 + j] = roundAway(f(x[xo + j] * id)) & 0xff;
}

/** The signed value of largest |x| in x[xo, xo + n), the first of equals (`amax < |v|`). */
function signedAbsMax(x: Float32Array, xo: number, n: number): number {
  let amax = 0;
  let max = 0;
  for (let j = 0; j < n; j++) {
    const v = x[xo + j];
    const a = Math.abs(v);
    if (amax < a) {
      amax = a;
      max = v;
    }
  }
  return max;
}

/** quantize_row_q4_0_ref, one block: d | qs[16]. */
function quantizeQ4_0Block(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  const d = f(signedAbsMax(x, xo, 32) / -8);
  const id = d !== 0 ? f(1 / d) : 0;
  writeF16(out, o, d);
  for (let j = 0; j < 16; j++) {
    const q0 = Math.min(15, f(f(x[xo + j] * id) + 8.5) | 0); // (int8_t) truncates; ≥ 0 here
    const q1 = Math.min(15, f(f(x[xo + 16 + j] * id) + 8.5) | 0);
    out[o + 2 + j] = q0 | (q1 << 4);
  }
}

/** quantize_row_q4_1_ref, one block: d | m | qs[16]. */
function quantizeQ4_1Block(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  let min = 3.4028234663852886e38;
  let max = -3.4028234663852886e38;
  for (let j = 0; j < 32; j++) {
    const v = x[xo + j];
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const d = f(f(max - min) / 15);
  const id = d !== 0 ? f(1 / d) : 0;
  writeF16(out, o, d);
  writeF16(out, o + 2, min);
  for (let j = 0; j < 16; j++) {
    const q0 = Math.min(15, f(f(f(x[xo + j] - min) * id) + 0.5) | 0);
    const q1 = Math.min(15, f(f(f(x[xo + 16 + j] - min) * id) + 0.5) | 0);
    out[o + 4 + j] = q0 | (q1 << 4);
  }
}

function writeU32(out: Uint8Array, o: number, v: number): void {
  out[o] = v & 0xff;
  out[o + 1] = (v >>> 8) & 0xff;
  out[o + 2] = (v >>> 16) & 0xff;
  out[o + 3] = v >>> 24;
}

/** quantize_row_q5_0_ref, one block: d | qh | qs[16]. */
function quantizeQ5_0Block(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  const d = f(signedAbsMax(x, xo, 32) / -16);
  const id = d !== 0 ? f(1 / d) : 0;
  writeF16(out, o, d);
  let qh = 0;
  for (let j = 0; j < 16; j++) {
    const q0 = Math.min(31, f(f(x[xo + j] * id) + 16.5) | 0);
    const q1 = Math.min(31, f(f(x[xo + 16 + j] * id) + 16.5) | 0);
    out[o + 6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
    qh |= ((q0 & 0x10) >>> 4) << j;
    qh |= ((q1 & 0x10) >>> 4) << (j + 16);
  }
  writeU32(out, o + 2, qh);
}

/** quantize_row_q5_1_ref, one block: d | m | qh | qs[16]. */
function quantizeQ5_1Block(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  let min = 3.4028234663852886e38;
  let max = -3.4028234663852886e38;
  for (let j = 0; j < 32; j++) {
    const v = x[xo + j];
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const d = f(f(max - min) / 31);
  const id = d !== 0 ? f(1 / d) : 0;
  writeF16(out, o, d);
  writeF16(out, o + 2, min);
  let qh = 0;
  for (let j = 0; j < 16; j++) {
    const q0 = (f(f(f(x[xo + j] - min) * id) + 0.5) | 0) & 0xff; // (uint8_t)
    const q1 = (f(f(f(x[xo + 16 + j] - min) * id) + 0.5) | 0) & 0xff;
    out[o + 8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
    qh |= ((q0 & 0x10) >>> 4) << j;
    qh |= ((q1 & 0x10) >>> 4) << (j + 16);
  }
  writeU32(out, o + 4, qh);
}

// ---------------------------------------------------------------------------------------------
// K-quants. Scratch shared by the block functions (single-threaded; no allocation per block).

const K_WEIGHTS = new Float32Array(32); // make_qkx2_quants' weights of one sub-block
const K_L = new Uint8Array(256); // the quants of one super-block, L in ggml
const K_LAUX = new Uint8Array(32); // a trial's quants
const K_XM = new Float32Array(32); // x − min of the sub-block, f32
const K_SCALES = new Float32Array(16); // per sub-block (Q4_K, Q5_K: 8) or group (Q6_K: 16)
const K_MINS = new Float32Array(8);
let qkxMin = 0; // make_qkx2_quants' *the_min

/**
 * make_qkx2_quants(32, nmax, x, K_WEIGHTS, L + lo, &the_min, Laux, rmin, rdelta, nstep, false):
 * an asymmetric quantization x ≈ scale·l − the_min, l ∈ [0, nmax], searched over nstep + 1
 * trial scales, each refined by weighted least squares (module doc). Returns scale; the_min
 * (≥ 0) in qkxMin; the quants in L[lo, lo + 32).
 */
function makeQkx2Quants(
  x: Float32Array,
  xo: number,
  nmax: number,
  rmin: number,
  nstep: number,
  L: Uint8Array,
  lo: number,
): number {
  const w = K_WEIGHTS;
  const laux = K_LAUX;
  const xm = K_XM;
  let min = x[xo];
  let max = x[xo];
  const sumW0 = w[0];
  let sumW = sumW0;
  let sumX = f(sumW0 * x[xo]);
  for (let i = 1; i < 32; i++) {
    const xi = x[xo + i];
    if (xi < min) min = xi;
    if (xi > max) max = xi;
    const wi = w[i];
    sumW = f(sumW + wi);
    sumX = f(sumX + f(wi * xi));
  }
  if (min > 0) min = 0;
  if (max === min) {
    L.fill(0, lo, lo + 32);
    qkxMin = -min;
    return 0;
  }
  for (let i = 0; i < 32; i++) xm[i] = x[xo + i] - min; // x − min, rounded to f32 by the store
  let iscale = f(nmax / f(max - min));
  let scale = f(1 / iscale);
  let bestError = 0;
  for (let i = 0; i < 32; i++) {
    let l = nearestInt(f(iscale * xm[i]));
    l = l < 0 ? 0 : l > nmax ? nmax : l;
    L[lo + i] = l;
    let diff = f(f(f(scale * l) + min) - x[xo + i]);
    diff = f(diff * diff);
    bestError = f(bestError + f(w[i] * diff));
  }
  // Shortcuts that cannot change the result: a trial whose quants equal the previous trial's
  // has the same sums and error, which did not (or no longer can) beat the best; and the error
  // sum only grows (non-negative terms), so it stops once it reaches the best.
  let havePrevious = false;
  for (let is = 0; is <= nstep; is++) {
    iscale = f(f(f(rmin + f(TENTH * is)) + nmax) / f(max - min));
    let same = havePrevious;
    for (let i = 0; i < 32; i++) {
      let l = nearestInt(f(iscale * xm[i]));
      l = l < 0 ? 0 : l > nmax ? nmax : l;
      if (laux[i] !== l) {
        laux[i] = l;
        same = false;
      }
    }
    havePrevious = true;
    if (same) continue;
    let sumL = 0;
    let sumL2 = 0;
    let sumXL = 0;
    for (let i = 0; i < 32; i++) {
      const l = laux[i];
      const wl = f(w[i] * l);
      sumL = f(sumL + wl);
      sumL2 = f(sumL2 + f(wl * l));
      sumXL = f(sumXL + f(wl * x[xo + i]));
    }
    const D = f(f(sumW * sumL2) - f(sumL * sumL));
    if (D > 0) {
      let thisScale = f(f(f(sumW * sumXL) - f(sumX * sumL)) / D);
      let thisMin = f(f(f(sumL2 * sumX) - f(sumL * sumXL)) / D);
      if (thisMin > 0) {
        thisMin = 0;
        thisScale = f(sumXL / sumL2);
      }
      let curError = 0;
      for (let i = 0; i < 32 && curError < bestError; i++) {
        let diff = f(f(f(thisScale * laux[i]) + thisMin) - x[xo + i]);
        diff = f(diff * diff);
        curError = f(curError + f(w[i] * diff));
      }
      if (curError < bestError) {
        L.set(laux, lo);
        bestError = curError;
        scale = thisScale;
        const moved = thisMin !== min;
        min = thisMin;
        if (moved) { for (let i = 0; i < 32; i++) xm[i] = x[xo + i] - min; }
      }
    }
  }
  qkxMin = -min;
  return scale;
}

/**
 * The shared front half of quantize_row_q4_K_ref / q5_K_ref: per sub-block scale and min
 * (make_qkx2_quants), the 6-bit packed scales, d and dmin at out[o], out[o + 2], scales at
 * out[o + 4 ... o + 16), then the final quants (clamped to [0, nmax]) in K_L.
 */
function quantizeKScalesMins(
  x: Float32Array,
  xo: number,
  out: Uint8Array,
  o: number,
  nmax: number,
  rmin: number,
  nstep: number,
): void {
  let maxScale = 0;
  let maxMin = 0;
  for (let j = 0; j < 8; j++) {
    const base = xo + 32 * j;
    let sumX2 = 0;
    for (let l = 0; l < 32; l++) {
      const v = x[base + l];
      sumX2 = f(sumX2 + f(v * v));
    }
    const avX = f(Math.sqrt(f(sumX2 / 32)));
    for (let l = 0; l < 32; l++) K_WEIGHTS[l] = avX + Math.abs(x[base + l]); // stored as f32
    const scale = makeQkx2Quants(x, base, nmax, rmin, nstep, K_L, 32 * j);
    K_SCALES[j] = scale;
    K_MINS[j] = qkxMin;
    if (scale > maxScale) maxScale = scale;
    if (qkxMin > maxMin) maxMin = qkxMin;
  }
  const invScale = maxScale > 0 ? f(63 / maxScale) : 0;
  const invMin = maxMin > 0 ? f(63 / maxMin) : 0;
  const s = o + 4; // scales[12]
  for (let j = 0; j < 8; j++) {
    const ls = Math.min(63, nearestInt(f(invScale * K_SCALES[j])) & 0xff); // uint8_t, then MIN
    const lm = Math.min(63, nearestInt(f(invMin * K_MINS[j])) & 0xff);
    if (j < 4) {
      out[s + j] = ls;
      out[s + j + 4] = lm;
    } else {
      out[s + j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
      out[s + j - 4] |= (ls >>> 4) << 6;
      out[s + j] |= (lm >>> 4) << 6;
    }
  }
  const dBits = writeF16(out, o, f(maxScale / 63));
  const dminBits = writeF16(out, o + 2, f(maxMin / 63));
  const dAll = F16_TO_F32[dBits];
  const dminAll = F16_TO_F32[dminBits];
  for (let j = 0; j < 8; j++) {
    // get_scale_min_k4(j, scales): the 6-bit scale and min of sub-block j
    let sc: number;
    let m: number;
    if (j < 4) {
      sc = out[s + j] & 63;
      m = out[s + j + 4] & 63;
    } else {
      sc = (out[s + j + 4] & 0xf) | ((out[s + j - 4] >>> 6) << 4);
      m = (out[s + j + 4] >>> 4) | ((out[s + j] >>> 6) << 4);
    }
    const d = f(dAll * sc);
    if (d === 0) continue;
    const dm = f(dminAll * m);
    const base = xo + 32 * j;
    for (let ii = 0; ii < 32; ii++) {
      const l = nearestInt(f(f(x[base + ii] + dm) / d));
      K_L[32 * j + ii] = l < 0 ? 0 : l > nmax ? nmax : l;
    }
  }
}

/** quantize_row_q4_K_ref, one super-block: d | dmin | scales[12] | qs[128]. */
function quantizeQ4_KBlock(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  quantizeKScalesMins(x, xo, out, o, 15, -1, 20);
  const q = o + 16;
  for (let c = 0; c < 4; c++) {
    for (let l = 0; l < 32; l++) out[q + 32 * c + l] = K_L[64 * c + l] | (K_L[64 * c + 32 + l] << 4);
  }
}

/** quantize_row_q5_K_ref, one super-block: d | dmin | scales[12] | qh[32] | qs[128]. */
function quantizeQ5_KBlock(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  quantizeKScalesMins(x, xo, out, o, 31, -0.5, 15);
  const qh = o + 16;
  const ql = o + 48;
  out.fill(0, qh, qh + 32);
  for (let c = 0; c < 4; c++) {
    const m1 = 1 << (2 * c);
    const m2 = 2 << (2 * c);
    for (let j = 0; j < 32; j++) {
      let l1 = K_L[64 * c + j];
      if (l1 > 15) {
        l1 -= 16;
        out[qh + j] |= m1;
      }
      let l2 = K_L[64 * c + 32 + j];
      if (l2 > 15) {
        l2 -= 16;
        out[qh + j] |= m2;
      }
      out[ql + 32 * c + j] = l1 | (l2 << 4);
    }
  }
}

/**
 * make_qx_quants(16, 32, x, L + lo, rmse_type 1, NULL): a symmetric quantization
 * x ≈ scale·(L − 32), L ∈ [0, 63], weights x², over 19 trial scales (module doc). Returns scale.
 */
function makeQxQuants16(x: Float32Array, xo: number, L: Uint8Array, lo: number): number {
  const nmax = 32;
  let max = 0;
  let amax = 0;
  for (let i = 0; i < 16; i++) {
    const v = x[xo + i];
    const a = Math.abs(v);
    if (a > amax) {
      amax = a;
      max = v;
    }
  }
  if (amax < GROUP_MAX_EPS) {
    L.fill(0, lo, lo + 16);
    return 0;
  }
  let iscale = f(-nmax / max);
  let sumLX = 0;
  let sumL2 = 0;
  for (let i = 0; i < 16; i++) {
    const xi = x[xo + i];
    let l = nearestInt(f(iscale * xi));
    l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
    L[lo + i] = l + nmax;
    const w = f(xi * xi);
    sumLX = f(sumLX + f(f(w * xi) * l));
    sumL2 = f(sumL2 + f(f(w * l) * l));
  }
  let scale = sumL2 !== 0 ? f(sumLX / sumL2) : 0;
  let best = f(scale * sumLX);
  for (let is = -9; is <= 9; is++) {
    if (is === 0) continue;
    iscale = f(-f(nmax + f(TENTH * is)) / max);
    sumLX = 0;
    sumL2 = 0;
    for (let i = 0; i < 16; i++) {
      const xi = x[xo + i];
      let l = nearestInt(f(iscale * xi));
      l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
      const w = f(xi * xi);
      sumLX = f(sumLX + f(f(w * xi) * l));
      sumL2 = f(sumL2 + f(f(w * l) * l));
    }
    if (sumL2 > 0 && f(sumLX * sumLX) > f(best * sumL2)) {
      for (let i = 0; i < 16; i++) {
        const l = nearestInt(f(iscale * x[xo + i]));
        L[lo + i] = nmax + (l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l);
      }
      scale = f(sumLX / sumL2);
      best = f(scale * sumLX);
    }
  }
  return scale;
}

/** quantize_row_q6_K_ref, one super-block: ql[128] | qh[64] | i8 scales[16] | d. */
function quantizeQ6_KBlock(x: Float32Array, xo: number, out: Uint8Array, o: number): void {
  let maxScale = 0;
  let maxAbsScale = 0;
  for (let g = 0; g < 16; g++) {
    const scale = makeQxQuants16(x, xo + 16 * g, K_L, 16 * g);
    K_SCALES[g] = scale;
    const a = Math.abs(scale);
    if (a > maxAbsScale) {
      maxAbsScale = a;
      maxScale = scale;
    }
  }
  if (maxAbsScale < GROUP_MAX_EPS) {
    out.fill(0, o, o + 210); // and d = f16(0) = 0
    return;
  }
  const iscale = f(-128 / maxScale);
  const dAll = F16_TO_F32[writeF16(out, o + 208, f(1 / iscale))];
  const sc = o + 192;
  for (let g = 0; g < 16; g++) out[sc + g] = Math.min(127, nearestInt(f(iscale * K_SCALES[g]))); // int8_t
  for (let g = 0; g < 16; g++) {
    const d = f(dAll * ((out[sc + g] << 24) >> 24));
    if (d === 0) continue;
    const base = xo + 16 * g;
    for (let ii = 0; ii < 16; ii++) {
      const l = nearestInt(f(x[base + ii] / d));
      K_L[16 * g + ii] = (l < -32 ? -32 : l > 31 ? 31 : l) + 32;
    }
  }
  for (let c = 0; c < 2; c++) {
    const ql = o + 64 * c;
    const qh = o + 128 + 32 * c;
    const q = 128 * c;
    for (let l = 0; l < 32; l++) {
      const q0 = K_L[q + l];
      const q1 = K_L[q + l + 32];
      const q2 = K_L[q + l + 64];
      const q3 = K_L[q + l + 96];
      out[ql + l] = (q0 & 0xf) | ((q2 & 0xf) << 4);
      out[ql + l + 32] = (q1 & 0xf) | ((q3 & 0xf) << 4);
      out[qh + l] = (q0 >>> 4) | ((q1 >>> 4) << 2) | ((q2 >>> 4) << 4) | ((q3 >>> 4) << 6);
    }
  }
}

type BlockQuantizer = (x: Float32Array, xo: number, out: Uint8Array, o: number) => void;

const BLOCK_QUANTIZERS: Partial<Record<GgmlTypeName, BlockQuantizer>> = {
  Q4_0: quantizeQ4_0Block,
  Q4_1: quantizeQ4_1Block,
  Q5_0: quantizeQ5_0Block,
  Q5_1: quantizeQ5_1Block,
  Q8_0: quantizeQ8_0Block,
  Q4_K: quantizeQ4_KBlock,
  Q5_K: quantizeQ5_KBlock,
  Q6_K: quantizeQ6_KBlock,
};

/**
 * Quantizes rows of `rowLength` contiguous f32 values to `type`, as llama.cpp's
 * `ggml_quantize_chunk(type, values, out, 0, rows, rowLength, NULL)` does: bytes equal to
 * llama.cpp's. `rowLength` must be a multiple of the type's block and `values` whole rows;
 * block types refuse NaN and ±Inf (llama.cpp would write garbage); F16 and BF16 convert them.
 * `out`, when given, receives the bytes (at least {@link ggmlBytes} long) and is returned.
 *
 * @example
 * ```ts
 * const q = quantize("Q8_0", Float32Array.from({ length: 64 }, (_, i) => i - 32), 32);
 * q.length; // 68: two blocks of 34 bytes
 * ```
 */
export function quantize(
  type: GgmlTypeName,
  values: Float32Array,
  rowLength: number,
  out?: Uint8Array,
): Uint8Array {
  const { blockSize, typeSize } = blockOf(type, "quantize");
  if (!Number.isSafeInteger(rowLength) || rowLength <= 0 || rowLength % blockSize !== 0) {
    throw new LatheError(
      `Cannot quantize to ${type}: row length ${rowLength} is not a multiple of its block size ${blockSize}`,
      { hint: "llama.cpp falls back to another type for such tensors (see tensorType())" },
    );
  }
  if (values.length % rowLength !== 0) {
    throw new LatheError(
      `Cannot quantize to ${type}: ${values.length} values are not whole rows of ${rowLength}`,
    );
  }
  const n = values.length;
  const bytes = (n / blockSize) * typeSize;
  if (out !== undefined && out.length < bytes) {
    throw new RangeError(`Cannot quantize to ${type}: the output holds ${out.length} bytes, ${bytes} needed`);
  }
  const dst = out ?? new Uint8Array(bytes);
  if (type === "F32") dst.set(new Uint8Array(values.buffer, values.byteOffset, n * 4));
  else if (type === "F16" && dst.byteOffset % 2 === 0) f16Row(values, dst);
  else if (type === "F16" || type === "BF16") halfRowBytes(values, dst, type === "F16");
  else {
    const bad = firstNonFinite(values);
    if (bad >= 0) {
      const where = `row ${Math.floor(bad / rowLength)}, column ${bad % rowLength}`;
      throw new LatheError(`Cannot quantize to ${type}: value ${bad} (${where}) is ${values[bad]}`);
    }
    const block = BLOCK_QUANTIZERS[type]!;
    for (let xo = 0, o = 0; xo < n; xo += blockSize, o += typeSize) block(values, xo, dst, o);
  }
  return dst;
}

/** The index of the first NaN or ±Inf, or −1. */
function firstNonFinite(values: Float32Array): number {
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v - v !== 0) return i;
  }
  return -1;
}

/**
 * f32 → f16 into 2-byte-aligned `dst`: Float16Array stores round to nearest even as
 * GGML_FP32_TO_FP16 does (checked over all 2³² f32 values by scripts/golden/gguf_quants.ts
 * --compare); NaN gets ggml's bits.
 */
function f16Row(values: Float32Array, dst: Uint8Array): void {
  const n = values.length;
  const half = new Float16Array(dst.buffer, dst.byteOffset, n);
  const hbits = new Uint16Array(dst.buffer, dst.byteOffset, n);
  const bits = new Int32Array(values.buffer, values.byteOffset, n);
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (v === v) half[i] = v;
    else hbits[i] = f16FromF32Bits(bits[i]);
  }
}

/** f32 → f16 or bf16 bits, little-endian, byte by byte. */
function halfRowBytes(values: Float32Array, dst: Uint8Array, f16: boolean): void {
  const bits = new Int32Array(values.buffer, values.byteOffset, values.length); // f32 bits as int32
  for (let i = 0; i < bits.length; i++) {
    const h = f16 ? f16FromF32Bits(bits[i]) : bf16FromF32Bits(bits[i]);
    dst[2 * i] = h & 0xff;
    dst[2 * i + 1] = h >>> 8;
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantization: ggml's dequantize_row_* (f32 arithmetic, ggml's order).

/** Int8 value of a byte. */
function i8(b: number): number {
  return (b << 24) >> 24;
}

function dequantizeBlocks(type: GgmlTypeName, q: Uint8Array, y: Float32Array, nb: number): void {
  switch (type) {
    case "Q8_0":
      for (let b = 0, o = 0, k = 0; b < nb; b++, o += 34) {
        const d = readF16(q, o);
        for (let j = 0; j < 32; j++) y[k++] = i8(q[o + 2 + j]) * d;
      }
      return;
    case "Q4_0":
      for (let b = 0, o = 0; b < nb; b++, o += 18) {
        const d = readF16(q, o);
        for (let j = 0; j < 16; j++) {
          y[32 * b + j] = ((q[o + 2 + j] & 0xf) - 8) * d;
          y[32 * b + j + 16] = ((q[o + 2 + j] >>> 4) - 8) * d;
        }
      }
      return;
    case "Q4_1":
      for (let b = 0, o = 0; b < nb; b++, o += 20) {
        const d = readF16(q, o);
        const m = readF16(q, o + 2);
        for (let j = 0; j < 16; j++) {
          y[32 * b + j] = f((q[o + 4 + j] & 0xf) * d) + m;
          y[32 * b + j + 16] = f((q[o + 4 + j] >>> 4) * d) + m;
        }
      }
      return;
    case "Q5_0":
      for (let b = 0, o = 0; b < nb; b++, o += 22) {
        const d = readF16(q, o);
        const qh = q[o + 2] | (q[o + 3] << 8) | (q[o + 4] << 16) | (q[o + 5] << 24);
        for (let j = 0; j < 16; j++) {
          const h0 = ((qh >>> j) << 4) & 0x10;
          const h1 = (qh >>> (j + 12)) & 0x10;
          y[32 * b + j] = (((q[o + 6 + j] & 0xf) | h0) - 16) * d;
          y[32 * b + j + 16] = (((q[o + 6 + j] >>> 4) | h1) - 16) * d;
        }
      }
      return;
    case "Q5_1":
      for (let b = 0, o = 0; b < nb; b++, o += 24) {
        const d = readF16(q, o);
        const m = readF16(q, o + 2);
        const qh = q[o + 4] | (q[o + 5] << 8) | (q[o + 6] << 16) | (q[o + 7] << 24);
        for (let j = 0; j < 16; j++) {
          const h0 = ((qh >>> j) << 4) & 0x10;
          const h1 = (qh >>> (j + 12)) & 0x10;
          y[32 * b + j] = f(((q[o + 8 + j] & 0xf) | h0) * d) + m;
          y[32 * b + j + 16] = f(((q[o + 8 + j] >>> 4) | h1) * d) + m;
        }
      }
      return;
    case "Q4_K":
    case "Q5_K": {
      const five = type === "Q5_K";
      const size = five ? 176 : 144;
      for (let b = 0, o = 0, k = 0; b < nb; b++, o += size) {
        const d = readF16(q, o);
        const min = readF16(q, o + 2);
        const s = o + 4;
        const qh = o + 16;
        const ql = five ? o + 48 : o + 16;
        for (let j = 0; j < 8; j++) {
          const sc = j < 4 ? q[s + j] & 63 : (q[s + j + 4] & 0xf) | ((q[s + j - 4] >>> 6) << 4);
          const m = j < 4 ? q[s + j + 4] & 63 : (q[s + j + 4] >>> 4) | ((q[s + j] >>> 6) << 4);
          const d1 = f(d * sc);
          const m1 = f(min * m);
          const c = j >>> 1; // 64-value chunk: sub-block 2c in low nibbles, 2c + 1 in high
          const shift = (j & 1) * 4;
          for (let l = 0; l < 32; l++) {
            let v = (q[ql + 32 * c + l] >>> shift) & 0xf;
            if (five && (q[qh + l] & (1 << j)) !== 0) v += 16;
            y[k++] = f(d1 * v) - m1;
          }
        }
      }
      return;
    }
    case "Q6_K":
      for (let b = 0, o = 0; b < nb; b++, o += 210) {
        const d = readF16(q, o + 208);
        for (let c = 0; c < 2; c++) {
          const ql = o + 64 * c;
          const qh = o + 128 + 32 * c;
          const sc = o + 192 + 8 * c;
          const yo = 256 * b + 128 * c;
          for (let l = 0; l < 32; l++) {
            const is = l >>> 4;
            const h = q[qh + l];
            const q0 = ((q[ql + l] & 0xf) | ((h & 3) << 4)) - 32;
            const q1 = ((q[ql + l + 32] & 0xf) | (((h >>> 2) & 3) << 4)) - 32;
            const q2 = ((q[ql + l] >>> 4) | (((h >>> 4) & 3) << 4)) - 32;
            const q3 = ((q[ql + l + 32] >>> 4) | (((h >>> 6) & 3) << 4)) - 32;
            y[yo + l] = f(d * i8(q[sc + is])) * q0;
            y[yo + l + 32] = f(d * i8(q[sc + is + 2])) * q1;
            y[yo + l + 64] = f(d * i8(q[sc + is + 4])) * q2;
            y[yo + l + 96] = f(d * i8(q[sc + is + 6])) * q3;
          }
        }
      }
      return;
    default:
      throw new Error(`unreachable: ${type}`);
  }
}

/**
 * The f32 values of `count` values of `type` in `bytes`, as ggml's `dequantize_row_*` (and
 * `ggml_fp16_to_fp32_row` / `ggml_bf16_to_fp32_row`) compute them, bit for bit.
 *
 * @example
 * ```ts
 * const w = Float32Array.from({ length: 32 }, (_, i) => i);
 * dequantize("Q8_0", quantize("Q8_0", w, 32), 32)[31]; // 31
 * ```
 */
export function dequantize(type: GgmlTypeName, bytes: Uint8Array, count: number): Float32Array {
  const need = ggmlBytes(type, count);
  if (bytes.length < need) {
    throw new LatheError(
      `Cannot dequantize ${count} values of ${type}: ${bytes.length} bytes given, ${need} needed`,
    );
  }
  const y = new Float32Array(count);
  if (type === "F32") {
    new Uint8Array(y.buffer).set(bytes.subarray(0, need));
  } else if (type === "F16") {
    for (let i = 0; i < count; i++) y[i] = F16_TO_F32[bytes[2 * i] | (bytes[2 * i + 1] << 8)];
  } else if (type === "BF16") {
    const bits = new Uint32Array(y.buffer);
    for (let i = 0; i < count; i++) bits[i] = ((bytes[2 * i] << 16) | (bytes[2 * i + 1] << 24)) >>> 0;
  } else {
    dequantizeBlocks(type, bytes, y, count / BLOCKS[type].blockSize);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Tensor types of a llama-quantize mix (src/llama-quant.cpp).

/** The file types (`llama-quantize` presets) lathe exports. */
export type GgufFileType = "F32" | "F16" | "BF16" | "Q8_0" | "Q4_0" | "Q4_K_M" | "Q5_K_M" | "Q6_K";

/** `enum llama_ftype` (include/llama.h): the value of `general.file_type`. */
export const LLAMA_FTYPE: Record<GgufFileType, number> = {
  F32: 0, // LLAMA_FTYPE_ALL_F32
  F16: 1, // LLAMA_FTYPE_MOSTLY_F16
  Q4_0: 2, // LLAMA_FTYPE_MOSTLY_Q4_0
  Q8_0: 7, // LLAMA_FTYPE_MOSTLY_Q8_0
  Q4_K_M: 15, // LLAMA_FTYPE_MOSTLY_Q4_K_M
  Q5_K_M: 17, // LLAMA_FTYPE_MOSTLY_Q5_K_M
  Q6_K: 18, // LLAMA_FTYPE_MOSTLY_Q6_K
  BF16: 32, // LLAMA_FTYPE_MOSTLY_BF16
};

/** llama_ftype_get_default_type: the type of a tensor no rule singles out. */
const FTYPE_DEFAULT: Record<GgufFileType, GgmlTypeName> = {
  F32: "F32",
  F16: "F16",
  BF16: "BF16",
  Q8_0: "Q8_0",
  Q4_0: "Q4_0",
  Q4_K_M: "Q4_K",
  Q5_K_M: "Q5_K",
  Q6_K: "Q6_K",
};

type Category =
  | "output"
  | "token_embd"
  | "attn_qkv"
  | "attn_kv_b"
  | "attn_v"
  | "attn_k"
  | "attn_q"
  | "attn_output"
  | "ffn_up"
  | "ffn_gate"
  | "ffn_down"
  | "other";

/** tensor_get_category: first match wins (exact names, then substrings, in this order). */
function categoryOf(name: string): Category {
  if (name === "output.weight") return "output";
  if (name === "token_embd.weight" || name === "per_layer_token_embd.weight") return "token_embd";
  if (name.includes("attn_qkv.weight")) return "attn_qkv";
  if (name.includes("attn_kv_b.weight")) return "attn_kv_b";
  if (name.includes("attn_v.weight")) return "attn_v";
  if (name.includes("attn_k.weight")) return "attn_k";
  if (name.includes("attn_q.weight")) return "attn_q";
  if (name.includes("attn_output.weight")) return "attn_output";
  if (name.includes("ffn_up")) return "ffn_up";
  if (name.includes("ffn_gate")) return "ffn_gate";
  if (name.includes("ffn_down")) return "ffn_down";
  return "other";
}

/** category_is_attn_v: the tensors the attn_v rules and counter cover. */
function isAttnVLike(category: Category): boolean {
  return category === "attn_v" || category === "attn_qkv" || category === "attn_kv_b";
}

/**
 * Counters of `llama_model_quantize_impl` (`quantize_state_impl`): how many attn_v-like tensors
 * the file holds, and how many of each counted kind {@link tensorType} has visited. Build one
 * per file from every tensor name, then call tensorType once per tensor in llama.cpp's order
 * ({@link llamaQuantizeOrder}): the attn_v and ffn_down rules depend on the visit index.
 *
 * @example
 * ```ts
 * const counters = new MixCounters(names);
 * for (const name of llamaQuantizeOrder(names)) tensorType("Q4_K_M", tensors[name], model, counters);
 * ```
 */
export class MixCounters {
  /** n_attention_wv: tensors named like attn_v, attn_qkv or attn_kv_b. */
  readonly nAttentionWv: number;
  /** i_attention_wv: attn_v-like tensors visited by the mix rules. */
  iAttentionWv = 0;
  /** i_ffn_down, i_ffn_gate, i_ffn_up: the same for ffn_down, ffn_gate and ffn_up. */
  iFfnDown = 0;
  iFfnGate = 0;
  iFfnUp = 0;
  /** n_fallback: tensors whose row length did not fit their type (llama.cpp warns on each). */
  nFallback = 0;

  /** `tensorNames`: every tensor of the file (init_quantize_state_counters). */
  constructor(tensorNames: Iterable<string>) {
    let n = 0;
    for (const name of tensorNames) if (isAttnVLike(categoryOf(name))) n++;
    this.nAttentionWv = n;
  }
}

/** The layer of a `blk.N.` name, or −1 (sscanf(name, "blk.%d.") in llama.cpp). */
function layerOfName(name: string): number | null {
  const m = /^blk\.([+-]?\d+)/.exec(name);
  return m === null ? null : Number(m[1]);
}

/**
 * The order `llama-quantize` visits (and writes) tensors: its `weights_map` comparer sorts by
 * layer number (`blk.N.`; other tensors count as −1, so they come first), then by name.
 */
export function llamaQuantizeOrder(names: Iterable<string>): string[] {
  const layer = (s: string) => layerOfName(s) ?? -1;
  return [...names].sort((a, b) => {
    const la = layer(a);
    const lb = layer(b);
    if (la !== lb) return la - lb;
    return a < b ? -1 : a > b ? 1 : 0;
  });
}

/** Substrings of tensor names llama-quantize never quantizes (tensor_allows_quantization). */
const NEVER_QUANTIZED = [
  "_norm.weight",
  "ffn_gate_inp.weight",
  "ffn_gate_tid2eid.weight",
  "altup",
  "laurel",
  "per_layer_model_proj",
  "ssm_conv1d",
  "shortconv.conv.weight",
  "indexer.k_proj.weight",
  "indexer.q_proj.weight",
  "time_mix_first.weight",
  "time_mix_w0.weight",
  "time_mix_w1.weight",
  "time_mix_w2.weight",
  "time_mix_v0.weight",
  "time_mix_v1.weight",
  "time_mix_v2.weight",
  "time_mix_a0.weight",
  "time_mix_a1.weight",
  "time_mix_a2.weight",
  "time_mix_g1.weight",
  "time_mix_g2.weight",
  "time_mix_decay_w1.weight",
  "time_mix_decay_w2.weight",
  "time_mix_lerp_fused.weight",
  "attn_rel_b.weight",
  ".position_embd",
  "sam.pos_embd",
  "sam.neck.",
  "sam.net_",
  ".rel_pos",
  ".patch_embd",
  ".patch_merger",
  "a.rvq.codebook",
  "mm.a.code_embd",
];

/** ggml_n_dims: dimensions up to the last ne[i] > 1 (at least 1). */
function nDims(shape: readonly number[]): number {
  for (let i = shape.length - 1; i >= 1; i--) if (shape[i] > 1) return i + 1;
  return 1;
}

/** tensor_allows_quantization with default params (output quantized, no --only-copy). */
function allowsQuantization(name: string, shape: readonly number[]): boolean {
  if (nDims(shape) < 2) return false;
  if (!name.endsWith("weight")) return false;
  if (name === "position_embd.weight" || name === "token_types.weight") return false;
  return !NEVER_QUANTIZED.some((s) => name.includes(s));
}

const QUANTIZED = new Set<GgmlTypeName>(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]);

/** use_more_bits: the first and last eighth of the layers, and every third in between. */
function useMoreBits(iLayer: number, nLayers: number): boolean {
  const eighth = Math.trunc(nLayers / 8);
  return iLayer < eighth || iLayer >= Math.trunc((7 * nLayers) / 8) || (iLayer - eighth) % 3 === 2;
}

/** The model facts the mix rules read. */
export interface MixModel {
  /** Decoder layers (`block_count`; llama.cpp's n_layer_all). */
  nLayers: number;
  /** Attention heads and KV heads (n_gqa = nHead / nHeadKv). */
  nHead: number;
  nHeadKv: number;
  /** Experts per MoE layer (absent or ≤ 1: dense). */
  nExpert?: number;
  /** True when the file has no `output.weight` (token_embd is the output). */
  tiedEmbeddings: boolean;
  /** `general.architecture`; default "llama". llama.cpp singles out falcon and 70B models. */
  architecture?: string;
}

/**
 * The ggml type `llama-quantize <in> <out> <ftype>` (no imatrix, no overrides) gives a tensor
 * whose input type is F32, as llama_tensor_get_type decides it (src/llama-quant.cpp):
 * - not quantizable (fewer than 2 dims, e.g. norms, biases, `rope_freqs`; a name not ending in
 *   "weight"; `*_norm.weight`, `ffn_gate_inp`, …): kept as it is, F32.
 * - F32 / F16 / BF16 files: every other tensor in that type.
 * - `output.weight`, and `token_embd.weight` when the embeddings are tied: Q8_0 when ne[0] is not
 *   a multiple of the ftype's block (or falcon), else Q6_K unless the type is already Q8_0
 *   (so Q4_0, Q4_K_M, Q5_K_M and Q6_K files all get a Q6_K output).
 * - attn_v (and attn_qkv, attn_kv_b): Q6_K under Q4_K_M / Q5_K_M where use_more_bits(i, n) for
 *   the i-th of n such tensors; a 70B model (llama with n_head ≠ n_head_kv, or qwen2; 80 layers)
 *   lifts a remaining Q4_K to Q5_K; 8 experts make it Q8_0.
 * - ffn_down: Q6_K under Q4_K_M / Q5_K_M where use_more_bits(layer, nLayers) (falcon under
 *   Q4_K_M: Q6_K in the first sixteenth, Q5_K where use_more_bits, else Q4_K); the layer is the
 *   visit count, or the `blk.N.` number in MoE models.
 * - 8 experts: attn_k Q8_0; attn_output Q5_K under Q4_K_M.
 * - then the fallback for a row length ne[0] that is not a multiple of the block: Q4_K → Q5_0,
 *   Q5_K → Q5_1, Q6_K → Q8_0, a 32-block type keeps itself, and F16 if that still does not fit.
 * The n_gqa rules of llama.cpp only concern Q2_K, Q3_K, IQ* mixes, which lathe does not write.
 *
 * @example
 * ```ts
 * const model = { nLayers: 32, nHead: 32, nHeadKv: 8, tiedEmbeddings: false };
 * const c = new MixCounters(["blk.0.attn_v.weight"]);
 * tensorType("Q4_K_M", { name: "blk.0.attn_v.weight", shape: [4096, 1024] }, model, c); // "Q6_K"
 * ```
 */
export function tensorType(
  ftype: GgufFileType,
  tensor: { name: string; shape: readonly number[] },
  model: MixModel,
  counters: MixCounters,
): GgmlTypeName {
  const defaultType = Object.hasOwn(FTYPE_DEFAULT, ftype) ? FTYPE_DEFAULT[ftype] : undefined;
  if (defaultType === undefined) {
    throw new LatheError(
      `Cannot choose tensor types: unknown GGUF file type ${JSON.stringify(ftype)} (known: ${
        Object.keys(FTYPE_DEFAULT).join(", ")
      })`,
    );
  }
  const { name, shape } = tensor;
  if (!allowsQuantization(name, shape)) return "F32";
  if (!QUANTIZED.has(defaultType)) return defaultType;
  const chosen = mixRules(ftype, defaultType, name, shape, model, counters);
  return fallback(chosen, shape[0], counters);
}

/** llama_tensor_get_type_impl for the ftypes lathe writes. */
function mixRules(
  ftype: GgufFileType,
  type: GgmlTypeName,
  name: string,
  shape: readonly number[],
  model: MixModel,
  counters: MixCounters,
): GgmlTypeName {
  const arch = model.architecture ?? "llama";
  const falcon = arch === "falcon";
  const nExpert = model.nExpert ?? 0;
  const kMix = ftype === "Q4_K_M" || ftype === "Q5_K_M";
  const category = categoryOf(name);
  // The layer of a per-layer tensor: the visit count, or in MoE models the blk.N of its name.
  const layerInfo = (visited: number): number => {
    if (Math.max(1, nExpert) <= 1) return visited;
    const layer = layerOfName(name);
    if (layer === null) throw new LatheError(`Cannot choose the type of "${name}": no layer in its name`);
    if (layer < 0 || layer >= model.nLayers) {
      throw new LatheError(
        `Cannot choose the type of "${name}": layer ${layer} is not in [0, ${model.nLayers})`,
      );
    }
    return layer;
  };

  if (category === "output" || (model.tiedEmbeddings && category === "token_embd")) {
    if (falcon || shape[0] % BLOCKS[type].blockSize !== 0) return "Q8_0";
    return type !== "Q8_0" ? "Q6_K" : type;
  }
  if (category === "token_embd") return type;
  if (isAttnVLike(category)) {
    if (kMix && useMoreBits(counters.iAttentionWv, counters.nAttentionWv)) type = "Q6_K";
    const is70B = model.nLayers === 80 &&
      ((arch === "llama" && nExpert !== 8 && model.nHead !== model.nHeadKv) || arch === "qwen2");
    if (is70B && type === "Q4_K") type = "Q5_K";
    if (nExpert === 8) type = "Q8_0";
    counters.iAttentionWv++;
    return type;
  }
  if (category === "attn_k") return nExpert === 8 ? "Q8_0" : type;
  if (category === "ffn_down") {
    const layer = layerInfo(counters.iFfnDown);
    const n = model.nLayers;
    if (ftype === "Q4_K_M") {
      if (falcon) {
        type = layer < Math.trunc(n / 16) ? "Q6_K" : useMoreBits(layer, n) ? "Q5_K" : "Q4_K";
      } else if (useMoreBits(layer, n)) type = "Q6_K";
    } else if (ftype === "Q5_K_M" && useMoreBits(layer, n)) type = "Q6_K";
    counters.iFfnDown++;
    return type;
  }
  if (category === "attn_output") {
    return !falcon && nExpert === 8 && ftype === "Q4_K_M" ? "Q5_K" : type;
  }
  if (category === "ffn_gate") {
    layerInfo(counters.iFfnGate);
    counters.iFfnGate++;
  } else if (category === "ffn_up") {
    layerInfo(counters.iFfnUp);
    counters.iFfnUp++;
  }
  return type;
}

/** tensor_type_fallback: a type whose block divides the row length ne[0]. */
function fallback(type: GgmlTypeName, ne0: number, counters: MixCounters): GgmlTypeName {
  if (ne0 % BLOCKS[type].blockSize === 0) return type;
  counters.nFallback++;
  let next: GgmlTypeName;
  if (type === "Q4_K") next = "Q5_0";
  else if (type === "Q5_K") next = "Q5_1";
  else if (type === "Q6_K") next = "Q8_0";
  else next = type; // already a 32-value block: nothing smaller to demote to
  return ne0 % BLOCKS[next].blockSize === 0 ? next : "F16";
}
