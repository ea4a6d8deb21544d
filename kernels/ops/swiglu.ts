/**
 * SwiGLU on the GPU, forward and backward (kernels/wgsl/swiglu.wgsl): the activation of the
 * Llama / Mistral / Qwen2 MLP, down_proj(silu(gate_proj(x)) ⊙ up_proj(x)).
 *
 * T = tokens, F = ffn (intermediate) size.
 *   forward:  h[T,F] = silu(g) ⊙ u
 *   backward: dg = dh ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))),  du = dh ⊙ silu(g)
 * g and u are separate [T,F] tensors, or the two halves of one fused gate_up[T,2F] tensor
 * (`…Fused`, g = columns [0,F), u = columns [F,2F)). Tensors are f32 or f16: the forward's all
 * one dtype; in the backward g and u share one and the gradients dh, dg, du another (f32
 * gradients of f16 activations), and dg may overwrite dh (`dg: dh`). Math is f32. Tensors split into row chunks are handled range by range. The CPU reference is
 * kernels/reference/swiglu.ts. This file is the only place the workgroup size is chosen.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import { type FloatDType, floatDType, grid, loadWgsl, rowSegments, specializeWgsl } from "./_rowwise.ts";

/** Invocations (elements) per workgroup. */
const SWIGLU_WORKGROUP = 256;

/** Columns [col, col + F) of the rows of a tensor. */
interface View {
  tensor: Tensor;
  col: number;
}

/** Output options of the SwiGLU ops. */
export interface SwigluOptions {
  /** Output h[T,F] (same dtype as the inputs); created when absent. */
  out?: Tensor;
  /** Label of a created output. */
  label?: string;
}

/**
 * h = silu(g) ⊙ u.
 *
 * @param g g[T,F] (gate_proj output), f32 or f16
 * @param u u[T,F] (up_proj output), same dtype
 * @example
 * ```ts
 * const h = swigluForward(gate, up); // then down_proj(h)
 * ```
 */
export function swigluForward(g: Tensor, u: Tensor, options: SwigluOptions = {}): Tensor {
  const op = "swiglu forward";
  const [T, F] = dims(op, g, 1);
  expect2d(op, "u", u, T, F);
  return forward(op, { tensor: g, col: 0 }, { tensor: u, col: 0 }, T, F, options);
}

/**
 * h = silu(g) ⊙ u with g and u the two halves of each row of one fused tensor.
 *
 * @param gateUp gate_up[T,2F]: g = columns [0,F), u = columns [F,2F)
 * @returns h[T,F]
 */
export function swigluForwardFused(gateUp: Tensor, options: SwigluOptions = {}): Tensor {
  const op = "swiglu forward";
  const [T, F] = dims(op, gateUp, 2);
  return forward(op, { tensor: gateUp, col: 0 }, { tensor: gateUp, col: F }, T, F, options);
}

/** Options of {@link swigluBackward}. */
export interface SwigluBackwardOptions {
  /** Output dg[T,F]; created when absent. `dh` itself: dg is written over dh (one buffer less). */
  dg?: Tensor;
  /** Output du[T,F]; created when absent. */
  du?: Tensor;
}

/**
 * Gradients of {@link swigluForward}.
 *
 * @param dh dh[T,F]
 * @param g g[T,F] (the forward input)
 * @param u u[T,F] (the forward input)
 * @returns dg[T,F] and du[T,F], written `=`
 */
export function swigluBackward(
  dh: Tensor,
  g: Tensor,
  u: Tensor,
  options: SwigluBackwardOptions = {},
): { dg: Tensor; du: Tensor } {
  const op = "swiglu backward";
  const [T, F] = dims(op, dh, 1);
  expect2d(op, "g", g, T, F);
  expect2d(op, "u", u, T, F);
  const dtype = floatDType(op, dh);
  const dg = options.dg ?? Tensor.empty(dh.gpu, [T, F], dtype, { label: "swiglu_dg" });
  if (dg === dh) {
    const du = options.du ?? Tensor.empty(dh.gpu, [T, F], dtype, { label: "swiglu_du" });
    expect2d(op, "du", du, T, F);
    backward(op, dh, { tensor: g, col: 0 }, { tensor: u, col: 0 }, { tensor: dh, col: 0 }, {
      tensor: du,
      col: 0,
    }, F);
    return { dg, du };
  }
  const du = options.du ?? Tensor.empty(dh.gpu, [T, F], dtype, { label: "swiglu_du" });
  expect2d(op, "dg", dg, T, F);
  expect2d(op, "du", du, T, F);
  if (dg === du) throw new RangeError(`Cannot run ${op}: dg and du must be different tensors`);
  backward(
    op,
    dh,
    { tensor: g, col: 0 },
    { tensor: u, col: 0 },
    { tensor: dg, col: 0 },
    { tensor: du, col: 0 },
    F,
  );
  return { dg, du };
}

/** Options of {@link swigluBackwardFused}. */
export interface SwigluBackwardFusedOptions {
  /** Output dgate_up[T,2F]; created when absent. */
  out?: Tensor;
  /** Label of a created output. */
  label?: string;
}

/**
 * Gradients of {@link swigluForwardFused}, written into one fused tensor.
 *
 * @param dh dh[T,F]
 * @param gateUp gate_up[T,2F] (the forward input)
 * @returns dgate_up[T,2F]: dg in columns [0,F), du in columns [F,2F)
 */
export function swigluBackwardFused(
  dh: Tensor,
  gateUp: Tensor,
  options: SwigluBackwardFusedOptions = {},
): Tensor {
  const op = "swiglu backward";
  const [T, F] = dims(op, dh, 1);
  expect2d(op, "gate_up", gateUp, T, 2 * F);
  const out = options.out ??
    Tensor.empty(dh.gpu, [T, 2 * F], floatDType(op, dh), { label: options.label ?? "swiglu_dgate_up" });
  expect2d(op, "dgate_up", out, T, 2 * F);
  backward(
    op,
    dh,
    { tensor: gateUp, col: 0 },
    { tensor: gateUp, col: F },
    { tensor: out, col: 0 },
    { tensor: out, col: F },
    F,
  );
  return out;
}

function forward(op: string, g: View, u: View, T: number, F: number, options: SwigluOptions): Tensor {
  const gpu = g.tensor.gpu;
  const A = sameDType(op, [g.tensor, u.tensor]);
  const h = options.out ?? Tensor.empty(gpu, [T, F], A, { label: options.label ?? "swiglu_h" });
  expect2d(op, "output", h, T, F);
  sameDType(op, [g.tensor, h]);
  if (h === g.tensor || h === u.tensor) {
    throw new RangeError(`Cannot run ${op}: the output must not be an input`);
  }
  const kernel = getKernel(gpu, {
    name: "swiglu_forward",
    params: { A },
    code: () => specializeWgsl(loadWgsl("swiglu"), { A }),
    entryPoint: "forward",
    bindings: ["read", "read", "write"],
    uniformBytes: 32,
    constants: { WG: SWIGLU_WORKGROUP },
  });
  const rec = recorder(gpu);
  const p = new Uint32Array(8);
  for (const seg of rowSegments([g.tensor, u.tensor, h])) {
    const [pg, pu, ph] = seg.parts;
    const count = seg.rows * F;
    p.set([
      count,
      F,
      pg.offset + g.col,
      g.tensor.rowSize,
      pu.offset + u.col,
      u.tensor.rowSize,
      ph.offset,
      F,
    ]);
    rec.dispatch(
      kernel,
      [pg.buffer, pu.buffer, ph.buffer],
      p,
      grid(gpu, Math.ceil(count / SWIGLU_WORKGROUP)),
    );
  }
  return h;
}

/**
 * Records the backward. g and u share their dtype A, dh, dg and du theirs, D (f32 gradients of
 * f16 activations). dg may be dh itself (written over it, in place) with its own column 0.
 */
function backward(op: string, dh: Tensor, g: View, u: View, dg: View, du: View, F: number): void {
  const gpu = dh.gpu;
  const A = sameDType(op, [g.tensor, u.tensor]);
  const D = sameDType(op, [dh, dg.tensor, du.tensor]);
  const inPlace = dg.tensor === dh;
  for (const out of [dg.tensor, du.tensor]) {
    if ((out === dh && !(inPlace && out === dg.tensor)) || out === g.tensor || out === u.tensor) {
      throw new RangeError(`Cannot run ${op}: output "${out.label}" must not be an input`);
    }
  }
  // dg and du in one tensor: du is written through the dg binding (flags bit 0).
  const fusedOut = dg.tensor === du.tensor;
  if (inPlace && (fusedOut || dg.col !== 0)) {
    throw new RangeError(`Cannot run ${op}: dg over dh needs a separate du and dg at column 0`);
  }
  const kernel = getKernel(gpu, {
    name: inPlace ? "swiglu_backward_in_place" : "swiglu_backward",
    params: { A, D },
    code: () => specializeWgsl(loadWgsl("swiglu"), { A, D }),
    entryPoint: inPlace ? "backward_in_place" : "backward",
    // In place, binding 3 (dg) is unused: dg goes to binding 0.
    bindings: [inPlace ? "write" : "read", "read", "read", "write", "write"],
    uniformBytes: 52,
    constants: { WG: SWIGLU_WORKGROUP },
  });
  const rec = recorder(gpu);
  const p = new Uint32Array(13);
  for (const seg of rowSegments([dh, g.tensor, u.tensor, dg.tensor, du.tensor])) {
    const [pdh, pg, pu, pdg, pdu] = seg.parts;
    const count = seg.rows * F;
    p.set([
      count,
      F,
      fusedOut ? 1 : 0,
      pdh.offset,
      F,
      pg.offset + g.col,
      g.tensor.rowSize,
      pu.offset + u.col,
      u.tensor.rowSize,
      pdg.offset + dg.col,
      dg.tensor.rowSize,
      pdu.offset + du.col,
      du.tensor.rowSize,
    ]);
    const duBuffer = fusedOut ? scratch(gpu) : pdu.buffer;
    rec.dispatch(
      kernel,
      [pdh.buffer, pg.buffer, pu.buffer, inPlace ? scratch(gpu) : pdg.buffer, duBuffer],
      p,
      grid(gpu, Math.ceil(count / SWIGLU_WORKGROUP)),
    );
  }
}

const scratches = new WeakMap<Gpu, Tensor>();

/** A small buffer for a binding a dispatch leaves unused (du through dg's binding, or dg over dh). */
function scratch(gpu: Gpu): GPUBuffer {
  let t = scratches.get(gpu);
  if (t === undefined) scratches.set(gpu, t = Tensor.empty(gpu, [1], "f32", { label: "swiglu_unused_du" }));
  return t.buffer;
}

/** [T, F] of a rank-2 tensor whose rows hold `parts`·F elements. */
function dims(op: string, t: Tensor, parts: number): [number, number] {
  if (t.shape.length !== 2 || t.shape[1] % parts !== 0) {
    const want = parts === 1 ? "[T, F]" : "[T, 2F]";
    throw new RangeError(`Cannot run ${op}: "${t.label}" has shape [${t.shape}], expected ${want}`);
  }
  return [t.shape[0], t.shape[1] / parts];
}

function expect2d(op: string, what: string, t: Tensor, T: number, F: number): void {
  if (t.shape.length !== 2 || t.shape[0] !== T || t.shape[1] !== F) {
    throw new RangeError(
      `Cannot run ${op}: ${what} "${t.label}" has shape [${t.shape}], expected [${T},${F}]`,
    );
  }
}

function sameDType(op: string, tensors: Tensor[]): FloatDType {
  const dtype = floatDType(op, tensors[0]);
  for (const t of tensors) {
    if (floatDType(op, t) !== dtype) {
      throw new TypeError(
        `Cannot run ${op}: "${t.label}" is ${t.dtype}, "${
          tensors[0].label
        }" is ${dtype} (one dtype expected)`,
      );
    }
  }
  return dtype;
}
