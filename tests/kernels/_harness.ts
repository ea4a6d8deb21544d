/**
 * Test helpers for GPU kernels: seeded random data, a tolerance check that reports the worst
 * element, and `gpuTest`, which runs a test on the current adapter. Only a machine with no
 * WebGPU adapter at all skips the GPU tests (with a message); any other failure fails.
 * @module
 */
import { type Gpu, tryGetGpu } from "../../kernels/device.ts";
import { recorder } from "../../kernels/recorder.ts";
import { type DType, Tensor } from "../../kernels/tensor.ts";

/** The adapter for this test process, or null when none exists. */
export const gpu: Gpu | null = await tryGetGpu();

if (gpu === null) {
  console.warn("warning: no WebGPU adapter: GPU kernel tests are skipped (install mesa-vulkan-drivers)");
}

/**
 * Registers a test that needs the GPU. It is skipped (ignored, with the warning above) only
 * when no adapter exists; `needsF16` tests are also skipped where shader-f16 is not offered.
 * After the body runs, the device must hold no unread error.
 */
export function gpuTest(
  name: string,
  fn: (gpu: Gpu) => Promise<void> | void,
  options: { needsF16?: boolean } = {},
): void {
  const ignore = gpu === null || (options.needsF16 === true && !gpu.f16);
  Deno.test({
    name: ignore && gpu !== null ? `${name} (skipped: no shader-f16 on this adapter)` : name,
    ignore,
    // WebGPU keeps device-wide resources and async work alive across tests by design.
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      await fn(gpu!);
      await recorder(gpu!).sync();
    },
  });
}

/** mulberry32: a small seeded PRNG returning floats in [0, 1). */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** n normal samples (Box–Muller) with mean 0 and standard deviation `std`, seeded. */
export function randn(n: number, seed: number, std = 1): Float32Array {
  const next = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u1 = 1 - next(); // (0, 1]: log is finite
    const u2 = next();
    const r = Math.sqrt(-2 * Math.log(u1)) * std;
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

/** n uniform samples in [lo, hi), seeded. */
export function randu(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  const next = rng(seed);
  return Float32Array.from({ length: n }, () => lo + (hi - lo) * next());
}

/** Rounds values to what an f16 tensor holds (so a reference sees the GPU's inputs). */
export function roundF16(x: Float32Array): Float32Array {
  return Float32Array.from(x, (v) => Math.f16round(v));
}

/** Tolerances of {@link assertClose}: |gpu − ref| ≤ atol + rtol·|ref|. */
export interface Tolerance {
  atol: number;
  rtol: number;
  /** Names the comparison in the failure message. */
  name?: string;
}

/**
 * Asserts |gpu[i] − ref[i]| ≤ atol + rtol·|ref[i]| for every i; NaN anywhere fails. The
 * message names the worst element: index, both values, error and allowed error.
 */
export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: Tolerance): void {
  const name = tol.name ?? "values";
  if (actual.length !== expected.length) {
    throw new Error(`${name}: length ${actual.length} != expected ${expected.length}`);
  }
  let worst = -1;
  let worstExcess = 0;
  let bad = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i];
    const e = expected[i];
    const allowed = tol.atol + tol.rtol * Math.abs(e);
    const err = Math.abs(a - e);
    const excess = Number.isNaN(err) ? Infinity : err - allowed;
    if (excess > 0) bad++;
    if (excess > worstExcess || (worst < 0 && excess > 0)) {
      worst = i;
      worstExcess = excess;
    }
  }
  if (bad > 0) {
    const a = actual[worst];
    const e = expected[worst];
    throw new Error(
      `${name}: ${bad}/${actual.length} elements out of tolerance (atol ${tol.atol}, rtol ${tol.rtol}); ` +
        `worst at [${worst}]: got ${a}, expected ${e}, error ${Math.abs(a - e)}, allowed ${
          tol.atol + tol.rtol * Math.abs(e)
        }`,
    );
  }
}

/**
 * An output tensor pre-filled with NaN from the host, so a kernel that did not run (or did
 * not write every element) can never read back as plausible zeros.
 */
export function nanTensor(gpu: Gpu, shape: number[], dtype: DType = "f32", label = "out"): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = dtype === "f16" ? new Uint16Array(n).fill(0x7e00) : new Float32Array(n).fill(NaN);
  return Tensor.from(gpu, data, shape, dtype, { label });
}
