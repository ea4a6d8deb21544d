/**
 * bitsandbytes 4-bit quantization (NF4 and FP4, blockwise, with optional double quantization)
 * with the exact semantics of its CUDA kernels, so the codes lathe writes are the codes
 * bitsandbytes writes (../shared/FORMATS.md, "bitsandbytes 4-bit"). Checked code for code
 * against an independent numpy reference (scripts/golden/nf4.py).
 *
 * n = elements of a weight W[out, in], flattened row-major (blocks run across row ends);
 * B = blocksize (64), nb = ⌈n / B⌉ blocks, N = nested blocksize (256).
 *
 * Quantize (`kQuantizeBlockwise`, csrc/kernels.cu), per block b, in f32:
 *   absmax[b] = max |w|;  inv = 1 / absmax[b];  x = w · inv
 *   code = dQuantizeNF4(x): a tree of strict `>` tests against the f32 midpoints of the NF4
 *          table (a value on a midpoint takes the lower code; NaN fails every test: code 0)
 *   packed byte j = code[2j] << 4 | code[2j + 1]; a short last block is padded with 0 (code 7),
 *   so an odd n ends in a low nibble of 7. An all-zero block has absmax 0, inv = ∞ and
 *   x = 0 · ∞ = NaN: its codes are 0, and it dequantizes to 0 · absmax = 0 all the same.
 * Double quantization (`quantize_4bit(compress_statistics=True)`, functional.py):
 *   offset = mean(absmax) (accumulated in f64, rounded to f32; torch's CUDA mean sums in f32
 *            in its own order, which can differ in the last bit);
 *   c = absmax − offset (f32); per nested block of N: nested_absmax = max |c|,
 *   x = c · (1 / nested_absmax), absmax_code = dQuantize(dynamic map, x): a binary search over
 *   the 256 sorted map entries, then the nearer neighbour by the f32 midpoint (a tie goes to the
 *   lower entry when x is above the pivot, to the pivot when below).
 * Dequantize: absmax[b] = map[absmax_code[b]] · nested_absmax[b >> 8] + offset (or the f32
 *   absmax), w[k] = table[code_k] · absmax[k >> 6].
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import type { TensorSource } from "./safetensors.ts";

/** The 4-bit data types bitsandbytes knows. */
export type QuantType = "nf4" | "fp4";

/** NF4 values by code (bitsandbytes' `get_4bit_type("nf4")`), as f32. */
export const NF4_TABLE: Float32Array = Float32Array.from([
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
]);

/**
 * FP4 values by code (bitsandbytes' `get_4bit_type("fp4")`: sign bit, then the e2m1 values
 * 0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12).
 */
export const FP4_TABLE: Float32Array = (() => {
  const magnitudes = [0, 0.0625, 8, 12, 4, 6, 2, 3];
  return Float32Array.from([...magnitudes, ...magnitudes.map((m) => -m)], (v) => v / 12);
})();

const f = Math.fround;

/** dQuantizeNF4's thresholds (csrc/kernels.cu) in its tree order, as the f32 literals the kernel compiles. */
export const NF4_THRESHOLDS: readonly number[] = [
  0.03979014977812767,
  0.3893125355243683,
  0.6427869200706482,
  0.8614784181118011,
  0.5016634166240692,
  0.2035212516784668,
  0.2920137718319893,
  0.1202552504837513,
  -0.33967943489551544,
  -0.13791173323988914,
  -0.045525018125772476,
  -0.23460740596055984,
  -0.6106329262256622,
  -0.4599952697753906,
  -0.8480964004993439,
].map(f);

/** `dQuantizeNF4(x)` for an f32 `x`: the NF4 code, by the kernel's comparison tree. */
export function quantizeNF4(x: number): number {
  const t = NF4_THRESHOLDS;
  if (x > t[0]) {
    if (x > t[1]) {
      if (x > t[2]) return x > t[3] ? 0b1111 : 0b1110;
      return x > t[4] ? 0b1101 : 0b1100;
    }
    if (x > t[5]) return x > t[6] ? 0b1011 : 0b1010;
    return x > t[7] ? 0b1001 : 0b1000;
  }
  if (x > t[8]) {
    if (x > t[9]) return x > t[10] ? 0b0111 : 0b0110;
    return x > t[11] ? 0b0101 : 0b0100;
  }
  if (x > t[12]) return x > t[13] ? 0b0011 : 0b0010;
  return x > t[14] ? 0b0001 : 0b0000;
}

/** dQuantizeFP4's magnitude thresholds in its tree order, as f32. */
export const FP4_THRESHOLDS: readonly number[] = [
  0.29166667,
  0.583333,
  0.8333333,
  0.4166667,
  0.0859375,
  0.20833333,
  0.00260417,
].map(f);

/** `dQuantizeFP4(x)` for an f32 `x`: sign bit 0b1000 for x < 0, then the magnitude's tree. */
export function quantizeFP4(x: number): number {
  const sign = x < 0 ? 0b1000 : 0;
  const a = Math.abs(x);
  const t = FP4_THRESHOLDS;
  if (a > t[0]) {
    if (a > t[1]) return (a > t[2] ? 0b0011 : 0b0010) + sign;
    return (a > t[3] ? 0b0101 : 0b0100) + sign;
  }
  if (a > t[4]) return (a > t[5] ? 0b0111 : 0b0110) + sign;
  return (a > t[6] ? 0b0001 : 0b0000) + sign;
}

/**
 * bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, the map of
 * the nested absmax codes (`name2qmap["dynamic"]`): for exponent i in [0, 7), the midpoints of
 * torch.linspace(0.1, 1, 2^i + 1) scaled by ±10^(i − 6); then 0 and 1; sorted; 256 f32 values.
 * Written out as torch computes it (its vectorised linspace rounds differently from a plain loop
 * in the last bit of 44 entries); scripts/golden/nf4.py checks it against torch. Readers use the
 * map stored in the file.
 */
export const DYNAMIC_MAP: Float32Array = Float32Array.from([
  -0.992968738079071,
  -0.9789062142372131,
  -0.96484375,
  -0.9507812261581421,
  -0.9367187023162842,
  -0.922656238079071,
  -0.9085937738418579,
  -0.89453125,
  -0.8804687261581421,
  -0.8664062023162842,
  -0.852343738079071,
  -0.8382812142372131,
  -0.82421875,
  -0.8101562261581421,
  -0.7960937023162842,
  -0.782031238079071,
  -0.7679687738418579,
  -0.75390625,
  -0.7398437857627869,
  -0.725781261920929,
  -0.7117187976837158,
  -0.6976562738418579,
  -0.68359375,
  -0.6695312857627869,
  -0.655468761920929,
  -0.641406238079071,
  -0.6273437738418579,
  -0.61328125,
  -0.5992187261581421,
  -0.585156261920929,
  -0.5710937976837158,
  -0.5570312738418579,
  -0.54296875,
  -0.5289062261581421,
  -0.514843761920929,
  -0.500781238079071,
  -0.4867187738418579,
  -0.47265625,
  -0.4585937261581421,
  -0.44453126192092896,
  -0.43046873807907104,
  -0.41640621423721313,
  -0.40234375,
  -0.3882812261581421,
  -0.37421876192092896,
  -0.36015623807907104,
  -0.34609371423721313,
  -0.33203125,
  -0.3179687261581421,
  -0.30390626192092896,
  -0.28984373807907104,
  -0.2757812738418579,
  -0.26171875,
  -0.24765625596046448,
  -0.23359376192092896,
  -0.21953125298023224,
  -0.20546874403953552,
  -0.19140625,
  -0.17734374105930328,
  -0.16328124701976776,
  -0.14921875298023224,
  -0.13515624403953552,
  -0.12109375,
  -0.10703125596046448,
  -0.09859374910593033,
  -0.09578124433755875,
  -0.09296875447034836,
  -0.09015624970197678,
  -0.08734375238418579,
  -0.08453124761581421,
  -0.08171874284744263,
  -0.07890625298023224,
  -0.07609374821186066,
  -0.07328125089406967,
  -0.07046874612569809,
  -0.0676562562584877,
  -0.06484375149011612,
  -0.06203124672174454,
  -0.05921875312924385,
  -0.05640624836087227,
  -0.053593751043081284,
  -0.05078125,
  -0.047968748956918716,
  -0.04515625163912773,
  -0.04234374687075615,
  -0.039531249552965164,
  -0.03671875223517418,
  -0.0339062474668026,
  -0.031093750149011612,
  -0.02828124724328518,
  -0.025468749925494194,
  -0.02265625074505806,
  -0.019843749701976776,
  -0.017031250521540642,
  -0.014218750409781933,
  -0.011406250298023224,
  -0.009718749672174454,
  -0.009156249463558197,
  -0.008593750186264515,
  -0.008031249977648258,
  -0.0074687497690320015,
  -0.006906250026077032,
  -0.006343749817460775,
  -0.005781250074505806,
  -0.0052187503315508366,
  -0.0046562496572732925,
  -0.004093749914318323,
  -0.0035312497057020664,
  -0.002968749962747097,
  -0.002406249986961484,
  -0.001843750011175871,
  -0.001281249918974936,
  -0.0009437500848434865,
  -0.0008312499849125743,
  -0.0007187500596046448,
  -0.0006062500760890543,
  -0.000493750034365803,
  -0.0003812500217463821,
  -0.0002687500382307917,
  -0.00015625001105945557,
  -8.874999912222847e-05,
  -6.625000241911039e-05,
  -4.374999844003469e-05,
  -2.1249998098937795e-05,
  -7.749999895168003e-06,
  -3.250000190746505e-06,
  -5.500000384017767e-07,
  0.0,
  5.500000384017767e-07,
  3.250000190746505e-06,
  7.749999895168003e-06,
  2.1249998098937795e-05,
  4.374999844003469e-05,
  6.625000241911039e-05,
  8.874999912222847e-05,
  0.00015625001105945557,
  0.0002687500382307917,
  0.0003812500217463821,
  0.000493750034365803,
  0.0006062500760890543,
  0.0007187500596046448,
  0.0008312499849125743,
  0.0009437500848434865,
  0.001281249918974936,
  0.001843750011175871,
  0.002406249986961484,
  0.002968749962747097,
  0.0035312497057020664,
  0.004093749914318323,
  0.0046562496572732925,
  0.0052187503315508366,
  0.005781250074505806,
  0.006343749817460775,
  0.006906250026077032,
  0.0074687497690320015,
  0.008031249977648258,
  0.008593750186264515,
  0.009156249463558197,
  0.009718749672174454,
  0.011406250298023224,
  0.014218750409781933,
  0.017031250521540642,
  0.019843749701976776,
  0.02265625074505806,
  0.025468749925494194,
  0.02828124724328518,
  0.031093750149011612,
  0.0339062474668026,
  0.03671875223517418,
  0.039531249552965164,
  0.04234374687075615,
  0.04515625163912773,
  0.047968748956918716,
  0.05078125,
  0.053593751043081284,
  0.05640624836087227,
  0.05921875312924385,
  0.06203124672174454,
  0.06484375149011612,
  0.0676562562584877,
  0.07046874612569809,
  0.07328125089406967,
  0.07609374821186066,
  0.07890625298023224,
  0.08171874284744263,
  0.08453124761581421,
  0.08734375238418579,
  0.09015624970197678,
  0.09296875447034836,
  0.09578124433755875,
  0.09859374910593033,
  0.10703125596046448,
  0.12109375,
  0.13515624403953552,
  0.14921875298023224,
  0.16328124701976776,
  0.17734374105930328,
  0.19140625,
  0.20546874403953552,
  0.21953125298023224,
  0.23359376192092896,
  0.24765625596046448,
  0.26171875,
  0.2757812738418579,
  0.28984373807907104,
  0.30390626192092896,
  0.3179687261581421,
  0.33203125,
  0.34609371423721313,
  0.36015623807907104,
  0.37421876192092896,
  0.3882812261581421,
  0.40234375,
  0.41640621423721313,
  0.43046873807907104,
  0.44453126192092896,
  0.4585937261581421,
  0.47265625,
  0.4867187738418579,
  0.500781238079071,
  0.514843761920929,
  0.5289062261581421,
  0.54296875,
  0.5570312738418579,
  0.5710937976837158,
  0.585156261920929,
  0.5992187261581421,
  0.61328125,
  0.6273437738418579,
  0.641406238079071,
  0.655468761920929,
  0.6695312857627869,
  0.68359375,
  0.6976562738418579,
  0.7117187976837158,
  0.725781261920929,
  0.7398437857627869,
  0.75390625,
  0.7679687738418579,
  0.782031238079071,
  0.7960937023162842,
  0.8101562261581421,
  0.82421875,
  0.8382812142372131,
  0.852343738079071,
  0.8664062023162842,
  0.8804687261581421,
  0.89453125,
  0.9085937738418579,
  0.922656238079071,
  0.9367187023162842,
  0.9507812261581421,
  0.96484375,
  0.9789062142372131,
  0.992968738079071,
  1.0,
]);

/** A copy of {@link DYNAMIC_MAP}. */
export function dynamicMap(): Float32Array {
  return DYNAMIC_MAP.slice();
}

/** `dQuantize<0>(code, 0, x)`: the index of the map entry nearest `x` (see the module doc). */
export function quantizeDynamic(map: Float32Array, x: number): number {
  let pivot = 127, upperPivot = 255, lowerPivot = 0;
  let lower = -1, upper = 1;
  let val = map[pivot];
  for (let i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lowerPivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upperPivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = map[pivot];
  }
  if (upperPivot === 255) upper = map[upperPivot];
  if (lowerPivot === 0) lower = map[lowerPivot];
  if (x > val) return x > f(f(upper + val) * 0.5) ? upperPivot : pivot;
  return x < f(f(lower + val) * 0.5) ? lowerPivot : pivot;
}

/** A weight in bitsandbytes' 4-bit layout. */
export interface Quantized4bit {
  quantType: QuantType;
  blocksize: number;
  /** [out, in] of the original weight. */
  shape: number[];
  /** ⌈n / 2⌉ packed codes, element 2j in the high nibble. */
  codes: Uint8Array;
  /** The 16 values of the codes. */
  quantMap: Float32Array;
  /** Per block: the f32 absmax, or with double quantization its 8-bit code. */
  absmax: Float32Array | Uint8Array;
  /** Double quantization only. */
  nested?: {
    blocksize: number;
    /** One per nested block. */
    absmax: Float32Array;
    /** The 256-entry dynamic map. */
    quantMap: Float32Array;
    offset: number;
  };
  /**
   * The torch dtype of the weight that was quantized (the quant_state's `dtype`: "float32",
   * "float16" or "bfloat16"; bitsandbytes dequantizes to it). Set on weights read from a
   * checkpoint (formats/bnb4bit_checkpoint.ts).
   */
  dtype?: TorchDtypeName;
}

/** Options of {@link quantize4bit}. */
export interface Quantize4bitOptions {
  quantType?: QuantType;
  /** Default 64 (bitsandbytes accepts 32 … 4096, powers of two). */
  blocksize?: number;
  /** Double quantization of the absmax (`bnb_4bit_use_double_quant`); default true. */
  doubleQuant?: boolean;
}

/** The blocksizes bitsandbytes' 4-bit kernels accept. */
export const BLOCKSIZES: readonly number[] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
const NESTED_BLOCKSIZE = 256;

/** A quantized weight without its codes: what the block statistics give (see {@link quantize4bit}). */
export type Quantized4bitStats = Omit<Quantized4bit, "codes"> & {
  /** The f32 absmax per block, which the codes are computed with (also under double quantization). */
  blockAbsmax: Float32Array;
};

function checkQuantizeArgs(n: number, shape: number[], B: number): void {
  if (!BLOCKSIZES.includes(B)) {
    throw new LatheError(`Cannot quantize: blocksize ${B} is not one of ${BLOCKSIZES.join(", ")}`);
  }
  if (n !== shape.reduce((a, b) => a * b, 1)) {
    throw new RangeError(`Cannot quantize: ${n} values for shape [${shape.join(", ")}]`);
  }
}

/**
 * The block statistics of a weight: the f32 absmax per block and, with double quantization,
 * their 8-bit codes, nested absmax and offset. Cheap next to the codes, and enough to lay out
 * the checkpoint (the quant_state JSON holds the offset) before any code is written.
 */
export function quantizeStats(
  values: Float32Array,
  shape: number[],
  options: Quantize4bitOptions = {},
): Quantized4bitStats {
  const B = options.blocksize ?? 64;
  const n = values.length;
  checkQuantizeArgs(n, shape, B);
  const nb = Math.ceil(n / B);
  const absmax = new Float32Array(nb);
  for (let b = 0; b < nb; b++) {
    let m = 0;
    for (let k = b * B, end = Math.min(n, k + B); k < end; k++) m = Math.max(m, Math.abs(values[k]));
    absmax[b] = m;
  }
  return statsOfAbsmax(absmax, shape, options);
}

/** Sign-less bits of the largest finite magnitude, and the smallest non-finite, per float dtype. */
const MAGNITUDE = {
  F32: { bytes: 4, mask: 0x7fffffff, nonFinite: 0x7f800000 },
  F16: { bytes: 2, mask: 0x7fff, nonFinite: 0x7c00 },
  BF16: { bytes: 2, mask: 0x7fff, nonFinite: 0x7f80 },
} as const;

/**
 * The f32 absmax of each block of B elements, read from a weight's stored bytes (F32, F16 or
 * BF16, little-endian) without converting them: a float's magnitude orders as its bits with the
 * sign cleared, so the block's largest such bit pattern is its absmax, exactly. Returns null when
 * an element is NaN or infinite (its block's absmax would be too).
 */
export function blockAbsmaxOfBytes(
  dtype: keyof typeof MAGNITUDE,
  bytes: Uint8Array,
  blocksize: number,
): Float32Array | null {
  const { bytes: size, mask, nonFinite } = MAGNITUDE[dtype];
  const n = bytes.length / size;
  const aligned = bytes.byteOffset % size === 0 ? bytes : bytes.slice();
  const words = size === 4
    ? new Uint32Array(aligned.buffer, aligned.byteOffset, n)
    : new Uint16Array(aligned.buffer, aligned.byteOffset, n);
  const maxBits = magnitudeMax(words, mask, blocksize);
  const absmax = new Float32Array(maxBits.length);
  const out = new Uint32Array(absmax.buffer);
  const f16 = dtype === "F16" ? new Float32Array(1) : null;
  for (let b = 0; b < maxBits.length; b++) {
    const m = maxBits[b];
    if (m >= nonFinite) return null;
    if (dtype === "F32") out[b] = m;
    else if (dtype === "BF16") out[b] = m << 16;
    else absmax[b] = f16ToF32(m, f16!);
  }
  return absmax;
}

/** Per block, the largest `word & mask` (a small function: the JIT keeps its loop tight). */
function magnitudeMax(words: Uint16Array | Uint32Array, mask: number, B: number): Uint32Array {
  const n = words.length;
  const out = new Uint32Array(Math.ceil(n / B));
  for (let b = 0, start = 0; start < n; b++, start += B) {
    let m = 0;
    for (let k = start, end = Math.min(n, start + B); k < end; k++) {
      const v = (words[k] & mask) >>> 0;
      if (v > m) m = v;
    }
    out[b] = m;
  }
  return out;
}

/** An f16 bit pattern's value (finite, non-negative). */
function f16ToF32(h: number, scratch: Float32Array): number {
  const e = h >> 10, m = h & 0x3ff;
  scratch[0] = e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15);
  return scratch[0];
}

/**
 * {@link quantizeStats} from the f32 absmax of each block (e.g. {@link blockAbsmaxOfBytes}):
 * the double quantization of the absmax, the maps and the layout.
 */
export function statsOfAbsmax(
  absmax: Float32Array,
  shape: number[],
  options: Quantize4bitOptions = {},
): Quantized4bitStats {
  const quantType = options.quantType ?? "nf4";
  const B = options.blocksize ?? 64;
  const n = shape.reduce((a, b) => a * b, 1);
  checkQuantizeArgs(n, shape, B);
  const nb = Math.ceil(n / B);
  if (absmax.length !== nb) throw new RangeError(`Cannot quantize: ${absmax.length} absmax for ${nb} blocks`);
  const quantMap = quantType === "nf4" ? NF4_TABLE.slice() : FP4_TABLE.slice();
  const base = { quantType, blocksize: B, shape: [...shape], quantMap, blockAbsmax: absmax };
  if (options.doubleQuant === false) return { ...base, absmax };
  let sum = 0;
  for (let b = 0; b < nb; b++) sum += absmax[b];
  const offset = f(sum / nb);
  const map = dynamicMap();
  const nn = Math.ceil(nb / NESTED_BLOCKSIZE);
  const nestedAbsmax = new Float32Array(nn);
  const absmaxCodes = new Uint8Array(nb);
  for (let j = 0; j < nn; j++) {
    const start = j * NESTED_BLOCKSIZE, end = Math.min(nb, start + NESTED_BLOCKSIZE);
    let m = 0;
    for (let b = start; b < end; b++) m = Math.max(m, Math.abs(f(absmax[b] - offset)));
    nestedAbsmax[j] = m;
    const inv = f(1 / m);
    for (let b = start; b < end; b++) absmaxCodes[b] = quantizeDynamic(map, f(f(absmax[b] - offset) * inv));
  }
  return {
    ...base,
    absmax: absmaxCodes,
    nested: { blocksize: NESTED_BLOCKSIZE, absmax: nestedAbsmax, quantMap: map, offset },
  };
}

/** A code table entry whose f32 bucket straddles a threshold: the comparison tree decides. */
const TREE = 255;
const codeTables = new Map<QuantType, Uint8Array>();

/**
 * The code of every f32 whose upper 16 bits are i, where all 2¹⁶ of them share one (the tree is
 * monotone in x, so the bucket's two ends decide), else {@link TREE}: about 30 of the 65536
 * buckets straddle one of the 15 thresholds. NaN buckets hold the tree's answer for NaN.
 */
function codeTable(quantType: QuantType): Uint8Array {
  let table = codeTables.get(quantType);
  if (table) return table;
  const code = quantType === "nf4" ? quantizeNF4 : quantizeFP4;
  table = new Uint8Array(65536);
  const ends = new Float32Array(2);
  const bits = new Uint32Array(ends.buffer);
  for (let i = 0; i < 65536; i++) {
    bits[0] = i << 16;
    bits[1] = (i << 16) | 0xffff;
    const a = code(ends[0]), b = code(ends[1]);
    table[i] = a === b ? a : TREE;
  }
  codeTables.set(quantType, table);
  return table;
}

/**
 * The ⌈n / 2⌉ packed codes of `values`, given its block statistics: code(f32(x · (1/absmax)))
 * as the kernel computes it, looked up by the scaled value's upper 16 bits (the comparison tree
 * only where a bucket straddles a threshold).
 */
export function encode4bit(values: Float32Array, stats: Quantized4bitStats): Uint8Array {
  checkQuantizeArgs(values.length, stats.shape, stats.blocksize);
  return encodeBlocks(values.length, stats, (start, into) => {
    for (let j = 0; j < into.length; j++) into[j] = values[start + j];
  }, false).codes;
}

/** What {@link encode4bitBytes} gives. */
export interface Encoded4bit {
  codes: Uint8Array;
  /** Σ (w − x)² over the weight, w its dequantized value with the stored absmax (f32). */
  squaredError: number;
  /** Σ x². */
  squaredNorm: number;
}

/**
 * {@link encode4bit} straight from a weight's stored bytes (F32, F16 or BF16, little-endian),
 * one block at a time (never widened whole), with the squared error of the weight as every
 * reader will dequantize it: what the quantize step needs of its second pass in one sweep.
 */
export function encode4bitBytes(
  dtype: "F32" | "F16" | "BF16",
  bytes: Uint8Array,
  stats: Quantized4bitStats,
): Encoded4bit {
  const size = dtype === "F32" ? 4 : 2;
  const n = bytes.length / size;
  checkQuantizeArgs(n, stats.shape, stats.blocksize);
  const aligned = bytes.byteOffset % size === 0 ? bytes : bytes.slice();
  let load: (start: number, into: Float32Array) => void;
  if (dtype === "F32") {
    const src = new Float32Array(aligned.buffer, aligned.byteOffset, n);
    load = (start, into) => into.set(src.subarray(start, start + into.length));
  } else {
    const src = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
    load = dtype === "BF16" ? bf16Block(src) : f16Block(src);
  }
  const { codes, err, ref } = encodeBlocks(n, stats, load, true);
  return { codes, squaredError: err, squaredNorm: ref };
}

/** Loads a block of bf16 words as f32 (the bits are the f32's upper half). */
function bf16Block(src: Uint16Array): (start: number, into: Float32Array) => void {
  return (start, into) => {
    const bits = new Int32Array(into.buffer, into.byteOffset, into.length);
    for (let j = 0; j < bits.length; j++) bits[j] = src[start + j] << 16;
  };
}

/** Loads a block of f16 words as f32 (exactly, by value). */
function f16Block(src: Uint16Array): (start: number, into: Float32Array) => void {
  const scratch = new Float32Array(1);
  return (start, into) => {
    for (let j = 0; j < into.length; j++) {
      const h = src[start + j];
      const e = (h >> 10) & 0x1f, m = h & 0x3ff, sign = h & 0x8000 ? -1 : 1;
      scratch[0] = e === 0
        ? sign * m * 2 ** -24
        : e === 31
        ? (m === 0 ? sign * Infinity : NaN)
        : sign * (1 + m / 1024) * 2 ** (e - 15);
      into[j] = scratch[0];
    }
  };
}

/**
 * The codes of n values loaded a block at a time by `load(start, into)` (into.length values from
 * `start`), and with `withError` the squared error against the stored absmax.
 */
function encodeBlocks(
  n: number,
  stats: Quantized4bitStats,
  load: (start: number, into: Float32Array) => void,
  withError: boolean,
): { codes: Uint8Array; err: number; ref: number } {
  const B = stats.blocksize;
  const code = stats.quantType === "nf4" ? quantizeNF4 : quantizeFP4;
  const table = codeTable(stats.quantType);
  const map = stats.quantMap;
  const stored = withError ? blockAbsmax({ ...stats, codes: new Uint8Array(0) }) : null;
  const codes = new Uint8Array(Math.ceil(n / 2));
  const x = new Float32Array(B);
  // One block scaled into f32 (the store rounds x · inv to f32, as the kernel's f32 product does).
  const scaled = new Float32Array(B);
  const bits = new Uint32Array(scaled.buffer);
  const w = new Float32Array(1);
  let err = 0, ref = 0;
  for (let b = 0, nb = stats.blockAbsmax.length; b < nb; b++) {
    const start = b * B, count = Math.min(B, n - start);
    load(start, count === B ? x : x.subarray(0, count));
    const inv = f(1 / stats.blockAbsmax[b]);
    // Padding to an even count is 0, and 0 · inv is 0 (NaN when the block is all zeros, inv = ∞).
    const stop = count + (count & 1);
    if (count & 1) x[count] = 0;
    for (let j = 0; j < stop; j++) scaled[j] = x[j] * inv;
    const a = stored?.[b] ?? 0;
    for (let j = 0; j < stop; j += 2) {
      let hi = table[bits[j] >>> 16];
      if (hi === TREE) hi = code(scaled[j]);
      let lo = table[bits[j + 1] >>> 16];
      if (lo === TREE) lo = code(scaled[j + 1]);
      codes[(start + j) >> 1] = (hi << 4) | lo;
      if (withError) {
        w[0] = map[hi] * a;
        const d0 = w[0] - x[j];
        err += d0 * d0;
        ref += x[j] * x[j];
        if (j + 1 < count) {
          w[0] = map[lo] * a;
          const d1 = w[0] - x[j + 1];
          err += d1 * d1;
          ref += x[j + 1] * x[j + 1];
        }
      }
    }
  }
  return { codes, err, ref };
}

/**
 * Quantizes `values` (the weight as f32, each value exactly its source dtype's value) of
 * `shape` as bitsandbytes' `quantize_4bit` does on CUDA.
 */
export function quantize4bit(
  values: Float32Array,
  shape: number[],
  options: Quantize4bitOptions = {},
): Quantized4bit {
  const stats = quantizeStats(values, shape, options);
  const { blockAbsmax: _, ...rest } = stats;
  return { ...rest, codes: encode4bit(values, stats) };
}

/** The per-block absmax a quantized weight dequantizes with (f32). */
export function blockAbsmax(q: Quantized4bit): Float32Array {
  if (!q.nested) return q.absmax as Float32Array;
  const { absmax: nested, quantMap, offset, blocksize } = q.nested;
  return Float32Array.from(
    q.absmax,
    (c, b) => f(f(quantMap[c] * nested[Math.floor(b / blocksize)]) + offset),
  );
}

/** w[k] = quantMap[code_k] · absmax[k / blocksize], as f32, in the original shape's row-major order. */
export function dequantize4bit(q: Quantized4bit): Float32Array {
  const n = q.shape.reduce((a, b) => a * b, 1);
  const absmax = blockAbsmax(q);
  const out = new Float32Array(n);
  for (let k = 0; k < n; k++) {
    const byte = q.codes[k >> 1];
    const c = (k & 1) === 0 ? byte >> 4 : byte & 0xf;
    out[k] = f(q.quantMap[c] * absmax[Math.floor(k / q.blocksize)]);
  }
  return out;
}

/** Python's `repr(float)`: the shortest round-trip digits, exponent form below 1e-4 or from 1e16. */
export function pythonFloatRepr(x: number): string {
  if (Number.isInteger(x) && Math.abs(x) < 1e16) return x.toFixed(1);
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "NaN" : x > 0 ? "Infinity" : "-Infinity";
  const abs = Math.abs(x);
  if (abs >= 1e-4 && abs < 1e16) return String(x);
  const [mantissa, exponent] = x.toExponential().split("e");
  const e = Number(exponent);
  return `${mantissa}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
}

/**
 * The `quant_state.bitsandbytes__<type>` JSON of a weight, byte for byte as bitsandbytes'
 * `QuantState.as_dict(packed=True)` writes it (Python's `json.dumps`, keys in its order).
 * `dtype` is the torch dtype name of the weight that was quantized ("bfloat16", "float16", "float32").
 */
export function quantStateJson(q: Quantized4bit, dtype: string): string {
  const parts = [
    `"quant_type": "${q.quantType}"`,
    `"blocksize": ${q.blocksize}`,
    `"dtype": "${dtype}"`,
    `"shape": [${q.shape.join(", ")}]`,
  ];
  if (q.nested) {
    parts.push(
      `"nested_blocksize": ${q.nested.blocksize}`,
      `"nested_dtype": "float32"`,
      `"nested_offset": ${pythonFloatRepr(q.nested.offset)}`,
    );
  }
  return `{${parts.join(", ")}}`;
}

/** The torch dtype names bitsandbytes records (`str(dtype)` less "torch."), by safetensors dtype. */
export const TORCH_DTYPE_NAMES = { F32: "float32", F16: "float16", BF16: "bfloat16" } as const;

/** One of the values of {@link TORCH_DTYPE_NAMES}. */
export type TorchDtypeName = typeof TORCH_DTYPE_NAMES[keyof typeof TORCH_DTYPE_NAMES];

const f32Bytes = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/**
 * The tensors transformers saves for one 4-bit linear weight `name` (`…X_proj.weight`), in
 * bitsandbytes' layout (FORMATS.md): the packed codes `[⌈n/2⌉, 1]` (U8), `.absmax` (U8 codes or
 * F32), `.quant_map`, with double quantization `.nested_absmax` and `.nested_quant_map`, and
 * `.quant_state.bitsandbytes__<type>` (the JSON as U8). `codes` is called when the file
 * writer reaches the codes, so a weight's codes need not be held while others are written.
 */
export function bnb4bitTensors(
  name: string,
  stats: Quantized4bitStats,
  dtype: keyof typeof TORCH_DTYPE_NAMES,
  codes: () => Uint8Array | Promise<Uint8Array>,
): TensorSource[] {
  const n = stats.shape.reduce((a, b) => a * b, 1);
  const state = new TextEncoder().encode(
    quantStateJson({ ...stats, codes: new Uint8Array(0) }, TORCH_DTYPE_NAMES[dtype]),
  );
  const out: TensorSource[] = [
    { name, dtype: "U8", shape: [Math.ceil(n / 2), 1], data: codes },
    stats.absmax instanceof Uint8Array
      ? { name: `${name}.absmax`, dtype: "U8", shape: [stats.absmax.length], data: stats.absmax }
      : { name: `${name}.absmax`, dtype: "F32", shape: [stats.absmax.length], data: f32Bytes(stats.absmax) },
    { name: `${name}.quant_map`, dtype: "F32", shape: [16], data: f32Bytes(stats.quantMap) },
  ];
  if (stats.nested) {
    out.push(
      {
        name: `${name}.nested_absmax`,
        dtype: "F32",
        shape: [stats.nested.absmax.length],
        data: f32Bytes(stats.nested.absmax),
      },
      { name: `${name}.nested_quant_map`, dtype: "F32", shape: [256], data: f32Bytes(stats.nested.quantMap) },
    );
  }
  out.push({
    name: `${name}.quant_state.bitsandbytes__${stats.quantType}`,
    dtype: "U8",
    shape: [state.length],
    data: state,
  });
  return out;
}

/** Settings of a 4-bit checkpoint, as `BitsAndBytesConfig` names them. */
export interface Bnb4bitSettings {
  quantType: QuantType;
  doubleQuant: boolean;
  /** `bnb_4bit_compute_dtype`: "float16" or "bfloat16" (recorded; the kernels compute in f32). */
  computeDtype: string;
  /** `llm_int8_skip_modules`: module names kept in 16 bit; null = transformers' default (lm_head). */
  skipModules: string[] | null;
}

/** config.json's `quantization_config` for a 4-bit checkpoint, keys as transformers writes them. */
export function quantizationConfig(s: Bnb4bitSettings): Record<string, unknown> {
  return {
    _load_in_4bit: true,
    _load_in_8bit: false,
    bnb_4bit_compute_dtype: s.computeDtype,
    bnb_4bit_quant_storage: "uint8",
    bnb_4bit_quant_type: s.quantType,
    bnb_4bit_use_double_quant: s.doubleQuant,
    llm_int8_enable_fp32_cpu_offload: false,
    llm_int8_has_fp16_weight: false,
    llm_int8_skip_modules: s.skipModules,
    llm_int8_threshold: 6.0,
    load_in_4bit: true,
    load_in_8bit: false,
    quant_method: "bitsandbytes",
  };
}
