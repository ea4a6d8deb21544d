/**
 * AdamW on the GPU with PyTorch's semantics (torch.optim.AdamW: decoupled weight decay, bias
 * correction, amsgrad off), in place on f32 parameters, gradients and moments.
 *
 * The gradient is multiplied by the clip scale of `gradNorm` (grad_norm.ts; a [2] f32 tensor on the
 * GPU), so clipping needs no readback. The learning rate, betas, eps, weight decay and step are
 * uniforms: a schedule changes them every step without recompiling. The bias corrections are
 * computed on the host in f64. This file is the only place the kernel's workgroup size is written.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { grid } from "./_grid.ts";

/** Invocations per workgroup. */
const WG = 256;
/** Bytes of the uniform block (see adamw.wgsl). */
const UNIFORM_BYTES = 48;

/** AdamW hyper-parameters (torch names: lr, betas, eps, weight_decay). */
export interface AdamWHyperParams {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** λ, decoupled: p ← p·(1 − lr·λ) before the Adam update. */
  weightDecay: number;
}

/** One parameter tensor with its gradient and moments (all f32, same shape and chunks). */
export interface AdamWTensors {
  param: Tensor;
  grad: Tensor;
  /** exp_avg (zeros before step 1). */
  m: Tensor;
  /** exp_avg_sq (zeros before step 1). */
  v: Tensor;
}

/** Options of {@link adamwStep}. */
export interface AdamWStepOptions extends AdamWHyperParams {
  /** t, 1 for the first step. */
  step: number;
  /** The (norm, scale) tensor of `gradNorm`: gradients are multiplied by its scale. */
  clip?: Tensor;
  /** Set the gradients to zero after the update (ready for the next accumulation). */
  zeroGrad?: boolean;
}

/**
 * Zeroed moments m (exp_avg) and v (exp_avg_sq) for a parameter.
 *
 * @example
 * ```ts
 * const { m, v } = adamwState(loraA);
 * ```
 */
export function adamwState(param: Tensor): { m: Tensor; v: Tensor } {
  return {
    m: Tensor.zeros(param.gpu, param.shape, "f32", { label: `${param.label}.exp_avg` }),
    v: Tensor.zeros(param.gpu, param.shape, "f32", { label: `${param.label}.exp_avg_sq` }),
  };
}

/**
 * One AdamW step on every parameter in `params`.
 *
 * @example
 * ```ts
 * const clip = gradNorm(params.map((p) => p.grad), { maxNorm: 1 });
 * adamwStep(params, { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step, clip, zeroGrad: true });
 * ```
 */
export function adamwStep(params: readonly AdamWTensors[], options: AdamWStepOptions): void {
  if (params.length === 0) return;
  const { lr, beta1, beta2, eps, weightDecay, step } = options;
  if (!Number.isInteger(step) || step < 1) {
    throw new RangeError(`Cannot take an AdamW step: step "${step}" must be an integer >= 1`);
  }
  for (const [name, value] of [["beta1", beta1], ["beta2", beta2]] as const) {
    if (!(value >= 0 && value < 1)) {
      throw new RangeError(`Cannot take an AdamW step: ${name} "${value}" is not in [0, 1)`);
    }
  }
  if (!(lr >= 0) || !(eps > 0) || !(weightDecay >= 0)) {
    throw new RangeError(
      `Cannot take an AdamW step: lr "${lr}", eps "${eps}" and weight_decay "${weightDecay}" must be ` +
        `non-negative (eps positive)`,
    );
  }
  const gpu = params[0].param.gpu;
  const clip = options.clip ?? noClip(gpu);
  if (clip.dtype !== "f32" || clip.size !== 2 || clip.chunked) {
    throw new RangeError(
      `Cannot clip with "${clip.label}" ${clip.dtype}[${clip.shape}]: the [2] f32 of gradNorm expected`,
    );
  }
  const u = new Float32Array(UNIFORM_BYTES / 4);
  const w = new Uint32Array(u.buffer);
  w[1] = options.zeroGrad ? 1 : 0;
  u[2] = 1 - lr * weightDecay;
  u[3] = lr / (1 - beta1 ** step);
  u[4] = beta1;
  u[5] = 1 - beta1;
  u[6] = beta2;
  u[7] = 1 - beta2;
  u[8] = Math.sqrt(1 - beta2 ** step);
  u[9] = eps;
  const kernel = getKernel(gpu, {
    name: "adamw",
    code: () => Deno.readTextFileSync(new URL("../wgsl/adamw.wgsl", import.meta.url)),
    bindings: ["write", "write", "write", "write", "read"],
    uniformBytes: UNIFORM_BYTES,
    constants: { WG },
  });
  const rec = recorder(gpu);
  for (const t of params) {
    check(t);
    t.param.chunks.forEach((c, i) => {
      const n = c.rows * t.param.rowSize;
      w[0] = n;
      const buffers = [
        c.buffer,
        t.grad.chunks[i].buffer,
        t.m.chunks[i].buffer,
        t.v.chunks[i].buffer,
        clip.buffer,
      ];
      rec.dispatch(kernel, buffers, u, grid(gpu, Math.ceil(n / WG)));
    });
  }
}

function check({ param, grad, m, v }: AdamWTensors): void {
  const layout = (t: Tensor) => `${t.shape}|${t.chunks.map((c) => c.rows).join(",")}`;
  for (const t of [param, grad, m, v]) {
    if (t.dtype !== "f32") {
      throw new TypeError(`Cannot take an AdamW step on "${t.label}": dtype ${t.dtype}, f32 expected`);
    }
    if (layout(t) !== layout(param)) {
      throw new RangeError(
        `Cannot take an AdamW step on "${param.label}" [${param.shape}]: "${t.label}" [${t.shape}] differs in shape or chunks`,
      );
    }
  }
}

const noClips = new WeakMap<Gpu, Tensor>();

/** A (norm 0, scale 1) tensor bound when no clip tensor is given. */
function noClip(gpu: Gpu): Tensor {
  let t = noClips.get(gpu);
  if (t === undefined || t.destroyed) {
    noClips.set(gpu, t = Tensor.from(gpu, [0, 1], [2], "f32", { label: "no_clip" }));
  }
  return t;
}
