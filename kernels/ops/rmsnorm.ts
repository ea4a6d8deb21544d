/**
 * RMSNorm on the GPU, forward and backward (LlamaRMSNorm: weight multiplies, no bias).
 *
 * T = tokens, D = hidden.
 *   forward:  x[T,D], w[D] -> y[T,D] = x · rstd · w, rstd[T] = 1 / sqrt(mean_d(x²) + eps)
 *   backward: dy[T,D] -> dx[T,D] (kernels/wgsl/rmsnorm_backward.wgsl) and, when asked,
 *             dw[D] = Σ_t dy·x·rstd (kernels/wgsl/rmsnorm_dw.wgsl: per-block partial sums, then
 *             a second pass over the blocks; no atomics).
 * Activations (x, y, dy, dx) are f32 or f16, w is f32 or f16, rstd and dw are f32; every sum is
 * f32. Tensors split into row chunks are handled range by range. The CPU reference is
 * kernels/reference/rmsnorm.ts. This file is the only place the workgroup sizes are chosen.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import {
  expectShape,
  type FloatDType,
  floatDType,
  grid,
  loadWgsl,
  rowSegments,
  rowWorkgroup,
  specializeWgsl,
} from "./_rowwise.ts";

/** Invocations (columns) per workgroup of the dw kernels. */
const DW_WORKGROUP = 64;
/**
 * Rows per block of the dw partial sums: at least DW_MIN_ROWS, and enough that there are at most
 * DW_MAX_BLOCKS blocks, so the second pass stays short.
 */
const DW_MIN_ROWS = 32;
/** See {@link DW_MIN_ROWS}. */
const DW_MAX_BLOCKS = 128;

/** Options of {@link rmsnormForward}. */
export interface RmsNormOptions {
  /** The epsilon inside the square root (config.rms_norm_eps). */
  eps: number;
  /** Output y[T,D] (same dtype as x); created when absent. */
  out?: Tensor;
  /** Output rstd[T] (f32); created when absent. */
  rstd?: Tensor;
  /**
   * res[T,D] (same dtype as x): first adds it into x, in place (x += res, the residual stream
   * update before a pre-norm), then normalises the sum; saves one pass over x.
   */
  residual?: Tensor;
  /** Label of a created y. */
  label?: string;
}

/** Result of {@link rmsnormForward}. */
export interface RmsNormResult {
  /** y[T,D]. */
  y: Tensor;
  /** rstd[T] = 1 / sqrt(mean(x²) + eps), for {@link rmsnormBackward}. */
  rstd: Tensor;
}

/**
 * y = x / sqrt(mean(x²) + eps) · w, one workgroup per row; with `residual`, x += res first.
 *
 * @param x x[T,D], f32 or f16
 * @param w w[D], f32 or f16
 * @example
 * ```ts
 * const { y, rstd } = rmsnormForward(x, inputLayernormWeight, { eps: 1e-5 });
 * // h += attn_out, then the MLP's pre-norm of the new h, in one pass:
 * const mlpIn = rmsnormForward(h, postAttentionLayernormWeight, { eps: 1e-5, residual: attnOut });
 * ```
 */
export function rmsnormForward(x: Tensor, w: Tensor, options: RmsNormOptions): RmsNormResult {
  const op = "rmsnorm forward";
  const gpu = x.gpu;
  const [T, D] = dims2(op, x);
  const A = floatDType(op, x);
  const W = floatDType(op, w);
  expectShape(op, "weight", w, [D]);
  checkEps(op, options.eps);
  const y = options.out ?? Tensor.empty(gpu, [T, D], A, { label: options.label ?? "rmsnorm_y" });
  expectShape(op, "output", y, [T, D]);
  if (y.dtype !== A) throw new TypeError(`Cannot run ${op}: output "${y.label}" is ${y.dtype}, x is ${A}`);
  if (y === x) throw new RangeError(`Cannot run ${op}: the output must not be x itself`);
  const rstd = options.rstd ?? Tensor.empty(gpu, [T], "f32", { label: "rmsnorm_rstd" });
  expectShape(op, "rstd", rstd, [T]);
  if (rstd.dtype !== "f32") {
    throw new TypeError(`Cannot run ${op}: rstd "${rstd.label}" is ${rstd.dtype}, not f32`);
  }

  const res = options.residual;
  if (res !== undefined) {
    expectShape(op, "residual", res, [T, D]);
    if (res.dtype !== A) {
      throw new TypeError(`Cannot run ${op}: residual "${res.label}" is ${res.dtype}, x is ${A}`);
    }
    if (res === x || res === y) {
      throw new RangeError(`Cannot run ${op}: the residual must not be x or the output`);
    }
  }

  const wg = rowWorkgroup(D);
  const kernel = getKernel(gpu, {
    name: "rmsnorm",
    params: { A, W, residual: res !== undefined },
    code: () => specializeWgsl(loadWgsl("rmsnorm"), { A, W }),
    entryPoint: res === undefined ? "main" : "main_residual",
    bindings: res === undefined
      ? ["read", "read", "write", "write"]
      : ["write", "read", "write", "write", "read"],
    uniformBytes: 28,
    constants: { WG: wg },
  });
  const rec = recorder(gpu);
  const u = new Uint32Array(7);
  const f = new Float32Array(u.buffer);
  for (const seg of rowSegments(res === undefined ? [x, y, rstd] : [x, y, rstd, res])) {
    const [px, py, pr, pres] = seg.parts;
    u.set([seg.rows, D, 0, px.offset, py.offset, pr.offset, pres?.offset ?? 0]);
    f[2] = options.eps;
    const buffers = [px.buffer, w.buffer, py.buffer, pr.buffer];
    if (pres !== undefined) buffers.push(pres.buffer);
    rec.dispatch(kernel, buffers, u, grid(gpu, seg.rows));
  }
  return { y, rstd };
}

/** Options of {@link rmsnormBackward}. */
export interface RmsNormBackwardOptions {
  /** Output dx[T,D] (same dtype as dy); created when absent. */
  dx?: Tensor;
  /** Add to `dx` instead of overwriting it (needs `dx`). */
  accumulate?: boolean;
  /** Compute dw (default: false, or true when `dw` is given). */
  weightGrad?: boolean;
  /** Output dw[D] (f32); created when absent and `weightGrad` is set. */
  dw?: Tensor;
  /** Add to `dw` instead of overwriting it (needs `dw`). */
  accumulateDw?: boolean;
}

/** Result of {@link rmsnormBackward}. */
export interface RmsNormGrads {
  /** dx[T,D]. */
  dx: Tensor;
  /** dw[D], or null when not asked for. */
  dw: Tensor | null;
}

/**
 * Gradients of RMSNorm: dx = rstd·(dy·w − x̂·mean(dy·w·x̂)) and, when asked, dw = Σ_t dy·x̂
 * (x̂ = x·rstd).
 *
 * @param dy dy[T,D]
 * @param x x[T,D], the forward input
 * @param w w[D]
 * @param rstd rstd[T] from {@link rmsnormForward}
 * @example
 * ```ts
 * const { rstd } = rmsnormForward(x, w, { eps });
 * // ... later, add the norm's input gradient to the residual gradient dres:
 * rmsnormBackward(dy, x, w, rstd, { dx: dres, accumulate: true });
 * ```
 */
export function rmsnormBackward(
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  options: RmsNormBackwardOptions = {},
): RmsNormGrads {
  const op = "rmsnorm backward";
  const gpu = dy.gpu;
  const [T, D] = dims2(op, x);
  const A = floatDType(op, x);
  const G = floatDType(op, dy);
  const W = floatDType(op, w);
  expectShape(op, "dy", dy, [T, D]);
  expectShape(op, "weight", w, [D]);
  expectShape(op, "rstd", rstd, [T]);
  if (rstd.dtype !== "f32") {
    throw new TypeError(`Cannot run ${op}: rstd "${rstd.label}" is ${rstd.dtype}, not f32`);
  }
  if (options.accumulate && options.dx === undefined) {
    throw new RangeError(`Cannot run ${op}: accumulate needs the dx tensor to add to`);
  }
  const dx = options.dx ?? Tensor.empty(gpu, [T, D], G, { label: "rmsnorm_dx" });
  expectShape(op, "dx", dx, [T, D]);
  if (dx.dtype !== G) throw new TypeError(`Cannot run ${op}: dx "${dx.label}" is ${dx.dtype}, dy is ${G}`);
  if (dx === dy || dx === x) throw new RangeError(`Cannot run ${op}: dx must not be dy or x itself`);

  const wg = rowWorkgroup(D);
  const kernel = getKernel(gpu, {
    name: "rmsnorm_backward",
    params: { A, G, W },
    code: () => specializeWgsl(loadWgsl("rmsnorm_backward"), { A, G, W }),
    bindings: ["read", "read", "read", "read", "write"],
    uniformBytes: 28,
    constants: { WG: wg },
  });
  const rec = recorder(gpu);
  const segments = rowSegments([dy, x, rstd, dx]);
  const u = new Uint32Array(7);
  for (const seg of segments) {
    const [pg, px, pr, pd] = seg.parts;
    u.set([seg.rows, D, options.accumulate ? 1 : 0, pg.offset, px.offset, pr.offset, pd.offset]);
    rec.dispatch(kernel, [pg.buffer, px.buffer, w.buffer, pr.buffer, pd.buffer], u, grid(gpu, seg.rows));
  }

  const wantDw = options.weightGrad ?? options.dw !== undefined;
  if (!wantDw) return { dx, dw: null };
  if (options.accumulateDw && options.dw === undefined) {
    throw new RangeError(`Cannot run ${op}: accumulateDw needs the dw tensor to add to`);
  }
  const dw = options.dw ?? Tensor.empty(gpu, [D], "f32", { label: "rmsnorm_dw" });
  expectShape(op, "dw", dw, [D]);
  if (dw.dtype !== "f32") throw new TypeError(`Cannot run ${op}: dw "${dw.label}" is ${dw.dtype}, not f32`);
  weightGrad(gpu, dy, x, rstd, dw, A, G, options.accumulateDw ?? false);
  return { dx, dw };
}

/** dw[D] (+)= Σ_t dy·x·rstd in two passes: per-block partial sums, then their sum. */
function weightGrad(
  gpu: Gpu,
  dy: Tensor,
  x: Tensor,
  rstd: Tensor,
  dw: Tensor,
  A: FloatDType,
  G: FloatDType,
  accumulate: boolean,
): void {
  const [T, D] = x.shape;
  const R = Math.max(DW_MIN_ROWS, Math.ceil(T / DW_MAX_BLOCKS));
  const segments = rowSegments([dy, x, rstd]);
  const blocks = segments.reduce((n, s) => n + Math.ceil(s.rows / R), 0);
  const spec = {
    name: "rmsnorm_dw",
    params: { A, G },
    code: () => specializeWgsl(loadWgsl("rmsnorm_dw"), { A, G }),
    constants: { WG: DW_WORKGROUP },
  };
  const partial = getKernel(gpu, {
    ...spec,
    entryPoint: "partial",
    bindings: ["read", "read", "read", "write"],
    uniformBytes: 32,
  });
  const rec = recorder(gpu);
  const columns = Math.ceil(D / DW_WORKGROUP);
  // One block: the partial pass writes dw itself.
  const part = blocks === 1 ? dw : Tensor.empty(gpu, [blocks, D], "f32", { label: "rmsnorm_dw_partial" });
  const u = new Uint32Array(8);
  let block = 0;
  for (const seg of segments) {
    const [pg, px, pr] = seg.parts;
    const n = Math.ceil(seg.rows / R);
    u.set([seg.rows, D, R, blocks === 1 && accumulate ? 1 : 0, pg.offset, px.offset, pr.offset, block]);
    rec.dispatch(partial, [pg.buffer, px.buffer, pr.buffer, part.buffer], u, [columns, n]);
    block += n;
  }
  if (part === dw) return;
  const reduce = getKernel(gpu, {
    ...spec,
    entryPoint: "reduce",
    bindings: ["read", "write"],
    uniformBytes: 12,
  });
  rec.dispatch(reduce, [part.buffer, dw.buffer], new Uint32Array([D, blocks, accumulate ? 1 : 0]), [columns]);
  // The recorded dispatches keep using the buffer; the pool hands it out again only for later work.
  part.destroy();
}

function dims2(op: string, x: Tensor): [number, number] {
  if (x.shape.length !== 2) {
    throw new RangeError(`Cannot run ${op}: x "${x.label}" has shape [${x.shape}], expected [T, D]`);
  }
  if (x.shape[1] === 0) throw new RangeError(`Cannot run ${op}: x "${x.label}" has D = 0`);
  return [x.shape[0], x.shape[1]];
}

function checkEps(op: string, eps: number): void {
  if (!Number.isFinite(eps) || eps < 0) {
    throw new RangeError(`Cannot run ${op}: eps "${eps}" must be finite and ≥ 0`);
  }
}
