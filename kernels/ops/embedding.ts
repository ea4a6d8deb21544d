/**
 * Token embedding on the GPU (kernels/wgsl/embedding.wgsl): the gather out = E[ids] and, for a
 * trained table, its scatter-add gradient dE.
 *
 * T = tokens, V = vocab, D = hidden.
 *   forward:  ids[T], E[V,D] -> out[T,D] = E[ids[t], :]
 *   backward: dout[T,D] -> dE[V,D] (+)= Σ_{t : ids[t] = v} dout[t, :]
 * E may be f16 (widened exactly) or f32 and may be split into row chunks (vocabularies larger
 * than one storage binding): the forward dispatches once per chunk. An id ≥ V in a GPU ids
 * tensor yields a NaN row; host ids are checked before anything runs. The backward groups the
 * tokens by id on the host (it takes the ids as a host array), so one workgroup sums each
 * distinct id's rows: deterministic, no atomics, O(T·D) work. The CPU reference is
 * kernels/reference/embedding.ts. This file is the only place the workgroup sizes are chosen.
 * @module
 */
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import {
  expectShape,
  expectU32,
  type FloatDType,
  floatDType,
  grid,
  loadWgsl,
  rowSegments,
  rowWorkgroup,
  specializeWgsl,
} from "./_rowwise.ts";

/** Bits of an f32 quiet NaN. */
const NAN_BITS = 0x7fc00000;

/** Token ids: a u32 tensor on the GPU, or host values (checked against V, then uploaded). */
export type TokenIds = Tensor | Uint32Array | Int32Array | readonly number[];

/** Options of {@link embeddingForward}. */
export interface EmbeddingOptions {
  /** Output out[T,D]; created when absent. */
  out?: Tensor;
  /** dtype of a created output (default f32). */
  dtype?: FloatDType;
  /** Label of a created output. */
  label?: string;
}

/**
 * out[T,D] = E[ids].
 *
 * @param table E[V,D] (embed_tokens.weight), f32 or f16, possibly split into row chunks
 * @param ids ids[T]
 * @example
 * ```ts
 * const h = embeddingForward(embedTokens, batch.inputIds); // h[T,D] f32
 * ```
 */
export function embeddingForward(table: Tensor, ids: TokenIds, options: EmbeddingOptions = {}): Tensor {
  const op = "embedding forward";
  const gpu = table.gpu;
  const [V, D] = tableDims(op, table);
  const E = floatDType(op, table);
  const idTensor = ids instanceof Tensor ? ids : Tensor.from(gpu, checkIds(op, ids, V), [ids.length], "u32", {
    label: "token_ids",
  });
  expectU32(op, "ids", idTensor);
  if (idTensor.shape.length !== 1) {
    throw new RangeError(
      `Cannot run ${op}: ids "${idTensor.label}" has shape [${idTensor.shape}], expected [T]`,
    );
  }
  const T = idTensor.rows;
  const out = options.out ??
    Tensor.empty(gpu, [T, D], options.dtype ?? "f32", { label: options.label ?? "embeddings" });
  expectShape(op, "output", out, [T, D]);
  const A = floatDType(op, out);

  const kernel = getKernel(gpu, {
    name: "embedding_forward",
    params: { E, A },
    code: () => specializeWgsl(loadWgsl("embedding"), { E, A }),
    entryPoint: "forward",
    bindings: ["read", "read", "write"],
    uniformBytes: 32,
    constants: { WG: rowWorkgroup(D) },
  });
  const rec = recorder(gpu);
  const p = new Uint32Array(8);
  const chunks = table.chunks;
  for (const seg of rowSegments([idTensor, out])) {
    const [pi, po] = seg.parts;
    chunks.forEach((c, i) => {
      p.set([
        seg.rows,
        D,
        pi.offset,
        po.offset,
        c.rowStart,
        c.rows,
        i === chunks.length - 1 ? 1 : 0,
        NAN_BITS,
      ]);
      rec.dispatch(kernel, [pi.buffer, c.buffer, po.buffer], p, grid(gpu, seg.rows));
    });
  }
  if (!(ids instanceof Tensor)) idTensor.destroy();
  return out;
}

/** Options of {@link embeddingBackward}. */
export interface EmbeddingBackwardOptions {
  /** Output dE[V,D] (f32); created when absent. */
  dE?: Tensor;
  /** Add to `dE` instead of overwriting it (needs `dE`). */
  accumulate?: boolean;
}

/**
 * dE[V,D] = Σ_{t : ids[t] = v} dout[t, :] (rows of ids not in the batch are 0, or keep their
 * value when accumulating).
 *
 * @param dout dout[T,D], f32 or f16
 * @param ids ids[T] on the host (the same ids as the forward)
 * @param V vocab rows of dE
 * @example
 * ```ts
 * embeddingBackward(dh, batch.inputIds, V, { dE: embedGrad, accumulate: true });
 * ```
 */
export function embeddingBackward(
  dout: Tensor,
  ids: Uint32Array | Int32Array | readonly number[],
  V: number,
  options: EmbeddingBackwardOptions = {},
): Tensor {
  const op = "embedding backward";
  const gpu = dout.gpu;
  const A = floatDType(op, dout);
  if (dout.shape.length !== 2 || dout.rows !== ids.length) {
    throw new RangeError(
      `Cannot run ${op}: dout "${dout.label}" has shape [${dout.shape}], expected [${ids.length}, D] for ${ids.length} ids`,
    );
  }
  const D = dout.shape[1];
  if (!Number.isInteger(V) || V <= 0) {
    throw new RangeError(`Cannot run ${op}: V "${V}" must be a positive integer`);
  }
  const host = checkIds(op, ids, V);
  if (options.accumulate && options.dE === undefined) {
    throw new RangeError(`Cannot run ${op}: accumulate needs the dE tensor to add to`);
  }
  const dE = options.dE ?? Tensor.empty(gpu, [V, D], "f32", { label: "embedding_grad" });
  expectShape(op, "dE", dE, [V, D]);
  if (dE.dtype !== "f32") throw new TypeError(`Cannot run ${op}: dE "${dE.label}" is ${dE.dtype}, not f32`);
  const rec = recorder(gpu);
  if (!options.accumulate) {
    for (const c of dE.chunks) rec.clearBuffer(c.buffer, 0, Math.ceil(c.byteLength / 4) * 4);
  }

  // One plan per row range of dout: uniq[G], starts[G+1], order[n] (token indices in the range).
  const segments = rowSegments([dout]);
  const words: number[] = [];
  const plans = segments.map((seg) => {
    const order = Array.from({ length: seg.rows }, (_, i) => i);
    order.sort((a, b) => host[seg.row + a] - host[seg.row + b] || a - b);
    const uniq: number[] = [];
    const starts: number[] = [];
    order.forEach((t, s) => {
      const id = host[seg.row + t];
      if (uniq.length === 0 || uniq[uniq.length - 1] !== id) {
        uniq.push(id);
        starts.push(s);
      }
    });
    starts.push(order.length);
    const plan = { uniq, uniqOff: words.length, startsOff: words.length + uniq.length, orderOff: 0 };
    plan.orderOff = plan.startsOff + starts.length;
    for (const list of [uniq, starts, order]) for (const w of list) words.push(w);
    return plan;
  });
  const planTensor = Tensor.from(gpu, Uint32Array.from(words), [words.length], "u32", {
    label: "embedding_plan",
  });

  const kernel = getKernel(gpu, {
    name: "embedding_backward",
    params: { A },
    code: () => specializeWgsl(loadWgsl("embedding"), { E: "f32", A }),
    entryPoint: "backward",
    bindings: ["read", "read", "write"],
    uniformBytes: 32,
    constants: { WG: rowWorkgroup(D) },
  });
  const p = new Uint32Array(8);
  segments.forEach((seg, si) => {
    const plan = plans[si];
    for (const c of dE.chunks) {
      const first = lowerBound(plan.uniq, c.rowStart);
      const groups = lowerBound(plan.uniq, c.rowStart + c.rows) - first;
      if (groups === 0) continue;
      p.set([groups, D, first, seg.parts[0].offset, c.rowStart, plan.uniqOff, plan.startsOff, plan.orderOff]);
      rec.dispatch(kernel, [seg.parts[0].buffer, planTensor.buffer, c.buffer], p, grid(gpu, groups));
    }
  });
  planTensor.destroy();
  return dE;
}

/** [V, D] of a table, checked. */
function tableDims(op: string, table: Tensor): [number, number] {
  if (table.shape.length !== 2 || table.shape[1] === 0) {
    throw new RangeError(
      `Cannot run ${op}: table "${table.label}" has shape [${table.shape}], expected [V, D]`,
    );
  }
  return [table.shape[0], table.shape[1]];
}

/** Host ids as u32, each checked to lie in [0, V). */
function checkIds(op: string, ids: Uint32Array | Int32Array | readonly number[], V: number): Uint32Array {
  for (let t = 0; t < ids.length; t++) {
    const id = ids[t];
    if (!Number.isInteger(id) || id < 0 || id >= V) {
      throw new RangeError(`Cannot run ${op}: token ${t} has id "${id}", outside the vocabulary [0, ${V})`);
    }
  }
  return ids instanceof Uint32Array ? ids : Uint32Array.from(ids);
}

/** First index i with sorted[i] ≥ value. */
function lowerBound(sorted: readonly number[], value: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
