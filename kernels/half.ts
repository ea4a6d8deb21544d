/**
 * Host-side conversions between f32 and the 16-bit float formats. f16 and bf16 values are
 * held as their u16 bit patterns (`Uint16Array`), which is how they sit in GPU buffers and
 * in safetensors files.
 *
 * f16 (IEEE binary16): 1 sign, 5 exponent (bias 15), 10 mantissa bits; max 65504,
 * smallest subnormal 2⁻²⁴. bf16: the top 16 bits of an f32 (1 sign, 8 exponent, 7 mantissa).
 * f32 → f16 and f32 → bf16 round to nearest, ties to even, as hardware and PyTorch do.
 * @module
 */

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/**
 * Converts one f32 bit pattern to f16 bits (round to nearest even; overflow to ±Inf; NaN
 * stays NaN with its top mantissa bits and the quiet bit set).
 */
export function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
  // Unbiased exponent e = exp - 127; f16 normal range is e in [-14, 15].
  const e = exp - 127;
  if (e > 15) return sign | 0x7c00;
  if (e >= -14) {
    // Normal: keep 10 mantissa bits, round on the 13 dropped bits.
    let h = ((e + 15) << 10) | (mant >>> 13);
    const rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h += 1; // carry may reach Inf: correct
    return sign | h;
  }
  if (e < -25) return sign; // below half the smallest subnormal: ±0
  // Subnormal: value = m · 2^(e-23) with the implicit bit; f16 subnormal unit is 2⁻²⁴.
  const m = mant | 0x800000;
  const shift = -e - 1; // 14..24: m >> shift is the value in units of 2⁻²⁴
  let h = m >>> shift;
  const rest = m & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rest > half || (rest === half && (h & 1) === 1)) h += 1;
  return sign | h;
}

/** Converts one number to f16 bits (via f32, as a GPU would store it). */
export function f32ToF16(x: number): number {
  f32Scratch[0] = x;
  return f32BitsToF16Bits(u32Scratch[0]);
}

/** Converts f16 bits to the number they encode (exact). */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Converts an f32 array to f16 bit patterns (round to nearest even). */
export function f32ArrayToF16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) out[i] = f32BitsToF16Bits(bits[i]);
  return out;
}

/** Converts f16 bit patterns to an f32 array (exact). */
export function f16ArrayToF32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const table = f16Table();
  for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
  return out;
}

/** Converts bf16 bit patterns to an f32 array (exact: bf16 is the top half of an f32). */
export function bf16ArrayToF32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
  return out;
}

/** Converts one f32 bit pattern to bf16 bits (round to nearest even; NaN stays a quiet NaN). */
export function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) return ((x >>> 16) | 0x40) & 0xffff;
  const rounded = x + 0x7fff + ((x >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

/** Converts an f32 array to bf16 bit patterns (round to nearest even). */
export function f32ArrayToBf16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) out[i] = f32BitsToBf16Bits(bits[i]);
  return out;
}

let table: Float32Array | null = null;
/** All 65536 f16 values as f32, built once (256 KiB). */
function f16Table(): Float32Array {
  if (table === null) {
    table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) table[h] = f16ToF32(h);
  }
  return table;
}
