/**
 * Global gradient 2-norm over a list of f32 tensors and the clip scale of
 * torch.nn.utils.clip_grad_norm_, computed on the GPU without float atomics:
 *   pass 1 (`grad_norm_partial`): each workgroup writes Σ g² of one block of one buffer;
 *   pass 2 (`grad_norm_finish`):  one workgroup sums the partials, norm = sqrt(Σ),
 *                                 scale = min(1, max_norm / (norm + 1e-6)).
 * The result is a [2] f32 tensor (norm, scale) that AdamW reads on the GPU, so a step needs no
 * readback; read it back only to log the norm. The gradients themselves are not modified.
 * This file is the only place these kernels' workgroup sizes are written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel, type Kernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { grid } from "./_grid.ts";

/** Index of the norm before clipping in the result of {@link gradNorm}. */
export const GRAD_NORM_INDEX = 0;
/** Index of the clip scale (1 when not clipped) in the result of {@link gradNorm}. */
export const CLIP_SCALE_INDEX = 1;

/** Invocations per workgroup of both passes (a power of two). */
const WG = 256;
/** Elements each invocation of pass 1 squares: a workgroup covers WG·ITEMS elements. */
const ITEMS = 16;
const BLOCK = WG * ITEMS;

/** Options of {@link gradNorm}. */
export interface GradNormOptions {
  /** max_norm of clipping; absent (or Infinity): the scale is 1. */
  maxNorm?: number;
  /** [2] f32 tensor to write (created when absent). */
  out?: Tensor;
}

/**
 * sqrt(Σ over all `grads` of g²) and the clip scale, into a [2] f32 tensor (norm, scale).
 *
 * @param grads f32 gradient tensors (any shapes; may be split into row chunks)
 * @example
 * ```ts
 * const clip = gradNorm(grads, { maxNorm: 1.0 });
 * adamwStep(params, { ...hyper, step, clip });
 * const [norm] = await clip.readF32(); // only when logging
 * ```
 */
export function gradNorm(grads: readonly Tensor[], options: GradNormOptions = {}): Tensor {
  if (grads.length === 0) throw new RangeError("Cannot compute the gradient norm: no gradients given");
  const gpu = grads[0].gpu;
  const maxNorm = options.maxNorm ?? Infinity;
  if (!(maxNorm > 0)) {
    throw new RangeError(`Cannot clip gradients: max_norm "${maxNorm}" must be positive`);
  }
  const out = options.out ?? Tensor.empty(gpu, [2], "f32", { label: "grad_norm" });
  if (out.dtype !== "f32" || out.size !== 2 || out.chunked) {
    throw new RangeError(
      `Cannot write the gradient norm to "${out.label}" ${out.dtype}[${out.shape}]: f32 [2] expected`,
    );
  }
  const buffers: { buffer: GPUBuffer; n: number }[] = [];
  for (const g of grads) {
    if (g.gpu !== gpu) {
      throw new RangeError(`Cannot compute the gradient norm: "${g.label}" is on another device`);
    }
    if (g.dtype !== "f32") {
      throw new TypeError(
        `Cannot compute the gradient norm: "${g.label}" has dtype ${g.dtype}; f32 expected`,
      );
    }
    for (const c of g.chunks) {
      if (c.rows * g.rowSize > 0) buffers.push({ buffer: c.buffer, n: c.rows * g.rowSize });
    }
  }
  const P = buffers.reduce((sum, b) => sum + Math.ceil(b.n / BLOCK), 0);
  const rec = recorder(gpu);
  const partials = Tensor.empty(gpu, [Math.max(1, P)], "f32", { label: "grad_norm_partials" });
  const partial = kernel(gpu, "grad_norm_partial", ["read", "write"], { WG, ITEMS });
  let base = 0;
  for (const { buffer, n } of buffers) {
    const groups = Math.ceil(n / BLOCK);
    rec.dispatch(
      partial,
      [buffer, partials.buffer],
      new Uint32Array([n, base, groups, 0]),
      grid(gpu, groups),
    );
    base += groups;
  }
  const finish = kernel(gpu, "grad_norm_finish", ["read", "write"], { WG });
  const u = new Uint32Array(4);
  u[0] = P;
  new Float32Array(u.buffer)[1] = Number.isFinite(maxNorm) ? maxNorm : 0;
  u[2] = Number.isFinite(maxNorm) ? 1 : 0;
  rec.dispatch(finish, [partials.buffer, out.buffer], u, [1]);
  partials.destroy();
  return out;
}

function kernel(
  gpu: Gpu,
  name: string,
  bindings: ("read" | "write")[],
  constants: Record<string, number>,
): Kernel {
  return getKernel(gpu, {
    name,
    code: () => Deno.readTextFileSync(new URL(`../wgsl/${name}.wgsl`, import.meta.url)),
    bindings,
    uniformBytes: 16,
    constants,
  });
}
