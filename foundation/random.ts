/**
 * A seeded random number generator for weight initialisation: PCG32 (O'Neill 2014,
 * `pcg32_random_r` / `pcg32_srandom_r` from pcg-c-basic, XSH-RR output on a 64-bit LCG).
 * The same (seed, stream) gives the same sequence on every platform; the 64-bit state is
 * kept as two 32-bit halves so no BigInt is needed on the hot path.
 *
 * Derived distributions:
 * - `uniform()`: u32 · 2⁻³² in [0, 1).
 * - `normal()`: Box–Muller on two draws, u1 = (u32 + 1) · 2⁻³² in (0, 1], u2 = u32 · 2⁻³²;
 *   z0 = √(−2 ln u1) · cos(2π u2), z1 = √(−2 ln u1) · sin(2π u2) (z1 is kept for the next call).
 *
 * @example
 * ```ts
 * const rng = new Pcg32(42, 54);
 * rng.nextU32(); // 0xa15c02b7, as in pcg32-demo
 * ```
 * @module
 */

const TWO_32 = 4294967296;
// 6364136223846793005 = 0x5851f42d_4c957f2d, the PCG default multiplier.
const MUL_HI = 0x5851f42d;
const MUL_LO = 0x4c957f2d;

/** PCG32 (XSH-RR) with 64-bit state and a selectable stream. */
export class Pcg32 {
  #hi = 0;
  #lo = 0;
  #incHi: number;
  #incLo: number;
  #spare: number | null = null;

  /**
   * Seeds like `pcg32_srandom_r(seed, stream)`. Both are non-negative integers below 2⁵³.
   */
  constructor(seed: number, stream = 0) {
    for (const [label, v] of [["seed", seed], ["stream", stream]] as const) {
      if (!Number.isSafeInteger(v) || v < 0) {
        throw new RangeError(`Cannot seed PCG32: ${label} ${v} is not a non-negative safe integer`);
      }
    }
    const streamHi = Math.floor(stream / TWO_32) >>> 0;
    const streamLo = stream >>> 0;
    // inc = (stream << 1) | 1, modulo 2^64
    this.#incHi = ((streamHi << 1) | (streamLo >>> 31)) >>> 0;
    this.#incLo = ((streamLo << 1) | 1) >>> 0;
    this.#step();
    this.#add(Math.floor(seed / TWO_32) >>> 0, seed >>> 0);
    this.#step();
  }

  /** The next 32 random bits as an unsigned integer. */
  nextU32(): number {
    const hi = this.#hi;
    const lo = this.#lo;
    this.#step();
    // xorshifted = ((old >> 18) ^ old) >> 27, low 32 bits; rot = old >> 59
    const xHi = hi ^ (hi >>> 18);
    const xLo = lo ^ ((lo >>> 18) | (hi << 14));
    const xs = ((xLo >>> 27) | (xHi << 5)) >>> 0;
    const rot = hi >>> 27;
    return ((xs >>> rot) | (xs << ((-rot) & 31))) >>> 0;
  }

  /** A uniform draw in [0, 1). */
  uniform(): number {
    return this.nextU32() / TWO_32;
  }

  /** A draw from N(0, 1) (Box–Muller). */
  normal(): number {
    if (this.#spare !== null) {
      const z = this.#spare;
      this.#spare = null;
      return z;
    }
    const u1 = (this.nextU32() + 1) / TWO_32;
    const u2 = this.nextU32() / TWO_32;
    const r = Math.sqrt(-2 * Math.log(u1));
    this.#spare = r * Math.sin(2 * Math.PI * u2);
    return r * Math.cos(2 * Math.PI * u2);
  }

  /** Fills `out` with uniform draws in [lo, hi) (rounded to f32). */
  fillUniform(out: Float32Array, lo: number, hi: number): Float32Array {
    const span = hi - lo;
    for (let i = 0; i < out.length; i++) out[i] = lo + span * this.uniform();
    return out;
  }

  /** Fills `out` with draws from N(mean, std²) (rounded to f32). */
  fillNormal(out: Float32Array, mean: number, std: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = mean + std * this.normal();
    return out;
  }

  // state = state · MUL + inc (mod 2^64)
  #step(): void {
    const [pHi, pLo] = mulLo64(this.#hi, this.#lo, MUL_HI, MUL_LO);
    this.#hi = pHi;
    this.#lo = pLo;
    this.#add(this.#incHi, this.#incLo);
  }

  #add(hi: number, lo: number): void {
    const sum = this.#lo + lo;
    const carry = sum >= TWO_32 ? 1 : 0;
    this.#lo = sum >>> 0;
    this.#hi = (this.#hi + hi + carry) >>> 0;
  }
}

/** Low 64 bits of (aHi·2³² + aLo)·(bHi·2³² + bLo), as [hi, lo] unsigned 32-bit halves. */
function mulLo64(aHi: number, aLo: number, bHi: number, bLo: number): [number, number] {
  // aLo·bLo in full, from 16-bit limbs: every partial product and sum stays below 2^53.
  const a0 = aLo & 0xffff, a1 = aLo >>> 16;
  const b0 = bLo & 0xffff, b1 = bLo >>> 16;
  const mid = a0 * b1 + a1 * b0;
  const low = a0 * b0 + (mid % 65536) * 65536;
  const lo = low % TWO_32;
  let hi = a1 * b1 + Math.floor(mid / 65536) + Math.floor(low / TWO_32);
  hi = (hi + Math.imul(aHi, bLo) + Math.imul(aLo, bHi)) >>> 0;
  return [hi, lo >>> 0];
}

/**
 * mulberry32: a small, fast 32-bit seeded generator returning floats in [0, 1), for test data,
 * benchmarks and the demo-data generator (where PCG32's stream selection is not needed).
 * Changing it changes every file generated from it (data/demo is checked against its generator).
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / TWO_32;
  };
}

/**
 * n values uniform in [−scale, scale) from a 32-bit linear congruential generator: cheap filler
 * for benchmarks and the matmul tuner, where the values only have to be finite and varied.
 *
 * @example
 * ```ts
 * const a = uniformFiller(1024 * 1024, 1); // Float32Array in [-1, 1)
 * ```
 */
export function uniformFiller(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = (s / 2 ** 31 - 1) * scale;
  }
  return out;
}
