/**
 * Rotary position embedding on the GPU, forward and backward, in the Hugging Face rotate_half
 * layout (kernels/wgsl/rope.wgsl).
 *
 * T = tokens, nH = heads rotated (H for q, Hkv for k), hd = head dim, h2 = hd/2.
 *   forward:  y = x·cos + rotate_half(x)·sin, angle[t,i] = position[t] · inv_freq[i]
 *   backward: dx = dy rotated by −angle (the transpose)
 * cos and sin carry the attention factor (yarn's mscale). Positions are per token (u32), so
 * packed documents restart at 0. The frequencies come from the CPU reference's
 * `rope_inv_freq` (default, linear, dynamic, llama3 and yarn scaling), computed in f64 on the
 * host; the kernel computes the angles on the GPU with an exact range reduction, so large
 * positions lose no accuracy. x is f32 or f16; math is f32. This file is the only place the
 * workgroup size is chosen.
 *
 * Dynamic NTK scaling equals the default below its original length; positions past it are not
 * checked on the GPU: call the reference's `rope_check_positions` on the host positions.
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { rope_inv_freq, type RopeConfig, type RopeFrequencies } from "../rope_frequencies.ts";
import { Tensor } from "../tensor.ts";
import {
  expectShape,
  expectU32,
  floatDType,
  grid,
  loadWgsl,
  rowSegments,
  specializeWgsl,
} from "./_rowwise.ts";

export type { RopeConfig, RopeFrequencies };

/** Invocations (rotated pairs) per workgroup. */
const ROPE_WORKGROUP = 256;

/** The frequencies of one RoPE configuration, on the GPU. Destroy it with the model. */
export interface RopeTable extends Disposable {
  /** freq[h2, 4] f32: inv_freq/(2π) split into three f32 parts (see {@link ropeFreqWords}) and a 0. */
  readonly freq: Tensor;
  /** Multiplies cos and sin (1 except for yarn). */
  readonly attentionFactor: number;
  /** hd. */
  readonly headDim: number;
  /** Frees `freq`. */
  destroy(): void;
}

/**
 * The kernel's frequency words: for each i, q = inv_freq[i]/(2π) in turns per position, split
 * as q1 + q2 + q3 with q1 and q2 of 12 significant bits (q1 = q with the low 12 of the 24 f32
 * mantissa bits cleared, q2 likewise from q − q1) and q3 = f32(q − q1 − q2), then a 0.
 * ph·q1 and ph·q2 are exact in f32 for positions < 2²⁴ (ph = position − position mod 4096).
 *
 * @param invFreq inv_freq[h2]
 * @returns words[h2·4]
 */
export function ropeFreqWords(invFreq: ArrayLike<number>): Float32Array {
  const words = new Float32Array(invFreq.length * 4);
  for (let i = 0; i < invFreq.length; i++) {
    const q = invFreq[i] / (2 * Math.PI);
    const q1 = top12(q);
    const q2 = top12(q - q1);
    words[4 * i] = q1;
    words[4 * i + 1] = q2;
    words[4 * i + 2] = q - q1 - q2;
  }
  return words;
}

const scratch = new Float32Array(1);
const scratchBits = new Uint32Array(scratch.buffer);

/** f32(x) with the low 12 mantissa bits cleared: 12 significant bits. */
function top12(x: number): number {
  scratch[0] = x;
  scratchBits[0] &= 0xfffff000;
  return scratch[0];
}

/**
 * Uploads the frequencies of a RoPE configuration.
 *
 * @param freqs inv_freq and the attention factor, from the reference's `rope_inv_freq`; or a
 *   {@link RopeConfig} (head dim, theta, rope_scaling) to compute them from
 * @example
 * ```ts
 * using table = ropeTable(gpu, { headDim: 64, theta: 500000, scaling: config.ropeScaling });
 * ropeForward(q, positions, table, { out: q }); // in place
 * ```
 */
export function ropeTable(gpu: Gpu, freqs: RopeFrequencies | RopeConfig): RopeTable {
  const f = "invFreq" in freqs ? freqs : rope_inv_freq(freqs);
  const h2 = f.invFreq.length;
  if (h2 === 0) throw new RangeError("Cannot build a RoPE table: inv_freq is empty");
  if (!Number.isFinite(f.attentionFactor)) {
    throw new RangeError(`Cannot build a RoPE table: attention factor "${f.attentionFactor}" is not finite`);
  }
  const freq = Tensor.from(gpu, ropeFreqWords(f.invFreq), [h2, 4], "f32", { label: "rope_freq" });
  return {
    freq,
    attentionFactor: f.attentionFactor,
    headDim: 2 * h2,
    destroy: () => freq.destroy(),
    [Symbol.dispose]: () => freq.destroy(),
  };
}

/** Options of {@link ropeForward} and {@link ropeBackward}. */
export interface RopeOptions {
  /**
   * Output: x itself (in place), or a tensor of T rows of nH·hd elements holding only the rotated
   * heads. Created ([T, nH, hd], dtype of x) when absent.
   */
  out?: Tensor;
  /** First head of each row of x to rotate (default 0; e.g. H for the k part of a fused qkv row). */
  headStart?: number;
  /** Heads to rotate (default: all heads of the row from headStart on). */
  heads?: number;
  /** Label of a created output. */
  label?: string;
}

/**
 * y = x·cos + rotate_half(x)·sin, per token position.
 *
 * @param x x[T, nH, hd] (or [T, nH·hd]; any rows of whole heads), f32 or f16
 * @param positions position[T], u32
 * @example
 * ```ts
 * ropeForward(q, positions, table, { out: q }); // q[T,H,hd] in place
 * const kRot = ropeForward(k, positions, table); // k[T,Hkv,hd] -> new tensor
 * ```
 */
export function ropeForward(
  x: Tensor,
  positions: Tensor,
  table: RopeTable,
  options: RopeOptions = {},
): Tensor {
  return rope("rope forward", x, positions, table, options, 1);
}

/**
 * dx = dy rotated by −angle (the transpose of {@link ropeForward}).
 *
 * @param dy dy[T, nH, hd], f32 or f16
 * @param positions position[T], u32 (the forward's)
 */
export function ropeBackward(
  dy: Tensor,
  positions: Tensor,
  table: RopeTable,
  options: RopeOptions = {},
): Tensor {
  return rope("rope backward", dy, positions, table, options, -1);
}

function rope(
  op: string,
  x: Tensor,
  positions: Tensor,
  table: RopeTable,
  options: RopeOptions,
  sign: 1 | -1,
): Tensor {
  const gpu = x.gpu;
  const A = floatDType(op, x);
  const hd = table.headDim;
  const h2 = hd / 2;
  const T = x.rows;
  if (x.shape.length < 2 || x.rowSize % hd !== 0) {
    throw new RangeError(
      `Cannot run ${op}: x "${x.label}" has shape [${x.shape}], expected [T, heads, ${hd}] (rows of whole heads)`,
    );
  }
  expectU32(op, "positions", positions);
  expectShape(op, "positions", positions, [T]);
  expectShape(op, "frequency table", table.freq, [h2, 4]);
  const rowHeads = x.rowSize / hd;
  const headStart = options.headStart ?? 0;
  const nH = options.heads ?? rowHeads - headStart;
  const end = headStart + nH;
  if (!Number.isInteger(headStart) || !Number.isInteger(nH) || headStart < 0 || nH < 0 || end > rowHeads) {
    throw new RangeError(
      `Cannot run ${op}: heads ${headStart}..${end} are outside the ${rowHeads} heads of "${x.label}"`,
    );
  }
  const inPlace = options.out === x;
  const out = options.out ?? Tensor.empty(gpu, [T, nH, hd], A, { label: options.label ?? "rope_out" });
  if (!inPlace) {
    if (out.rows !== T || out.rowSize !== nH * hd) {
      throw new RangeError(
        `Cannot run ${op}: output "${out.label}" has shape [${out.shape}], expected ${T} rows of ${nH}·${hd} elements`,
      );
    }
    if (out.dtype !== A) {
      throw new TypeError(`Cannot run ${op}: output "${out.label}" is ${out.dtype}, x is ${A}`);
    }
  }

  const kernel = getKernel(gpu, {
    name: "rope",
    params: { A, inplace: inPlace },
    code: () => specializeWgsl(loadWgsl("rope"), { A }),
    entryPoint: inPlace ? "main_inplace" : "main",
    bindings: inPlace ? ["read", "read", "write"] : ["read", "read", "read", "write"],
    uniformBytes: 48,
    constants: { WG: ROPE_WORKGROUP },
  });
  const rec = recorder(gpu);
  const u = new Uint32Array(12);
  const f = new Float32Array(u.buffer);
  const tensors = inPlace ? [positions, x] : [positions, x, out];
  for (const seg of rowSegments(tensors)) {
    const [pp, px, py = px] = seg.parts;
    const count = seg.rows * nH * h2;
    u.set([
      count,
      nH,
      h2,
      x.rowSize,
      out.rowSize,
      headStart,
      inPlace ? headStart : 0,
      px.offset,
      py.offset,
      pp.offset,
    ]);
    f[10] = table.attentionFactor;
    f[11] = sign;
    const buffers = inPlace
      ? [pp.buffer, table.freq.buffer, px.buffer]
      : [pp.buffer, table.freq.buffer, px.buffer, py.buffer];
    rec.dispatch(kernel, buffers, u, grid(gpu, Math.ceil(count / ROPE_WORKGROUP)));
  }
  return out;
}
