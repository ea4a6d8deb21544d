/**
 * Elementwise helpers on f32 and f16 tensors: add, mul, scale, axpy, fill, copy, cast.
 * Arithmetic is f32; f16 results are rounded once, when stored. Tensors split into row
 * chunks work when all operands share the same chunk rows.
 * This file is the only place their workgroup size is chosen (see elementwise_wgsl.ts).
 * @module
 */
import type { Gpu } from "../device.ts";
import { getKernel } from "../pipeline.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import {
  type ElementDType,
  ELEMENTWISE_UNIFORM_BYTES,
  ELEMENTWISE_WORKGROUP,
  elementwiseWgsl,
  fillWordsWgsl,
} from "./elementwise_wgsl.ts";

/** Output options of the elementwise ops. */
export interface ElementwiseOptions {
  /** Output tensor (may be one of the inputs: the op then runs in place). */
  out?: Tensor;
  /** dtype of a created output (default: the inputs' dtype, f32 when they differ). */
  dtype?: ElementDType;
  /** Label of a created output. */
  label?: string;
}

/**
 * out = a + b.
 * @example
 * ```ts
 * const sum = add(x, y);       // new tensor
 * add(h, residual, { out: h }); // in place
 * ```
 */
export function add(a: Tensor, b: Tensor, options: ElementwiseOptions = {}): Tensor {
  return map("add", "x0 + x1", [a, b], [0, 0], options);
}

/** out = a ⊙ b (elementwise product). */
export function mul(a: Tensor, b: Tensor, options: ElementwiseOptions = {}): Tensor {
  return map("mul", "x0 * x1", [a, b], [0, 0], options);
}

/** out = s·x (in place with `{ out: x }`). */
export function scale(x: Tensor, s: number, options: ElementwiseOptions = {}): Tensor {
  return map("scale", "x0 * u.s0", [x], [s, 0], options);
}

/** y += a·x, in place; returns y. */
export function axpy(y: Tensor, a: number, x: Tensor): Tensor {
  return map("axpy", "x0 + u.s0 * x1", [y, x], [a, 0], { out: y });
}

/** Sets every element of `t` to `value` (f32, f16, u32, i32); returns t. */
export function fill(t: Tensor, value: number): Tensor {
  if (t.dtype === "f32" || t.dtype === "f16") {
    return map("fill", "vec2<f32>(u.s0)", [], [value, 0], { out: t });
  }
  if (t.dtype !== "u32" && t.dtype !== "i32") {
    throw new TypeError(`Cannot fill "${t.label}": dtype ${t.dtype}`);
  }
  const bits = new Uint32Array(new Int32Array([value]).buffer)[0];
  const kernel = getKernel(t.gpu, {
    name: "fill_words",
    code: fillWordsWgsl,
    bindings: ["write"],
    uniformBytes: ELEMENTWISE_UNIFORM_BYTES,
  });
  const rec = recorder(t.gpu);
  const rowSize = t.rowSize;
  for (const c of t.chunks) {
    const n = c.rows * rowSize;
    rec.dispatch(
      kernel,
      [c.buffer],
      new Uint32Array([n, 0, 0, t.dtype === "u32" ? value >>> 0 : bits]),
      groups(t.gpu, n),
    );
  }
  return t;
}

/** dst = src (same dtype and shape; a buffer copy in stream order); returns dst. */
export function copy(src: Tensor, dst: Tensor): Tensor {
  if (src.dtype !== dst.dtype || src.shape.join() !== dst.shape.join()) {
    throw new RangeError(
      `Cannot copy "${src.label}" ${src.dtype}[${src.shape}] to "${dst.label}" ${dst.dtype}[${dst.shape}]`,
    );
  }
  sameChunks("copy", [src, dst]);
  const rec = recorder(src.gpu);
  src.chunks.forEach((c, i) =>
    rec.copyBuffer(c.buffer, 0, dst.chunks[i].buffer, 0, Math.ceil(c.byteLength / 4) * 4)
  );
  return dst;
}

/** out = x converted to `dtype` (f32 ↔ f16; works without shader-f16). */
export function cast(
  x: Tensor,
  dtype: ElementDType,
  options: Omit<ElementwiseOptions, "dtype"> = {},
): Tensor {
  if (x.dtype === dtype && options.out === undefined) {
    return copy(x, Tensor.empty(x.gpu, x.shape, dtype, { label: options.label ?? `${x.label}_${dtype}` }));
  }
  return map("cast", "x0", [x], [0, 0], { ...options, dtype });
}

/** Dispatches one elementwise variant per chunk. */
function map(
  name: string,
  expr: string,
  inputs: Tensor[],
  scalars: [number, number],
  options: ElementwiseOptions,
): Tensor {
  const first = inputs[0] ?? options.out!;
  const gpu = first.gpu;
  for (const t of [...inputs, options.out]) {
    if (t === undefined) continue;
    if (t.dtype !== "f32" && t.dtype !== "f16") {
      throw new TypeError(`Cannot run ${name} on "${t.label}": dtype ${t.dtype} (f32 or f16 expected)`);
    }
    if (t.size !== first.size) {
      throw new RangeError(
        `Cannot run ${name}: "${t.label}" [${t.shape}] and "${first.label}" [${first.shape}] differ`,
      );
    }
  }
  const dtype = options.out?.dtype as ElementDType | undefined ?? options.dtype ??
    (inputs.every((t) => t.dtype === "f16") && inputs.length > 0 ? "f16" : "f32");
  const out = options.out ?? Tensor.empty(gpu, first.shape, dtype, { label: options.label ?? `${name}_out` });
  const all = [...inputs, out];
  sameChunks(name, all);
  // Inputs that are `out` itself are read through the output's read_write binding.
  const variant = {
    expr,
    inputs: inputs.map((t) => t.dtype as ElementDType),
    out: out.dtype as ElementDType,
    aliased: inputs.map((t) => t === out),
  };
  const kernel = getKernel(gpu, {
    name,
    params: {
      in: variant.inputs.join(",") || "none",
      out: variant.out,
      aliased: variant.aliased.map(Number).join("") || "none",
    },
    code: () => elementwiseWgsl(variant),
    bindings: [...inputs.filter((t) => t !== out).map(() => "read" as const), "write"],
    uniformBytes: ELEMENTWISE_UNIFORM_BYTES,
  });
  const rec = recorder(gpu);
  const rowSize = out.rowSize;
  const f = new Float32Array(4);
  const u = new Uint32Array(f.buffer);
  out.chunks.forEach((c, ci) => {
    const n = c.rows * rowSize;
    u[0] = n;
    f[1] = scalars[0];
    f[2] = scalars[1];
    const buffers = inputs.filter((t) => t !== out).map((t) => t.chunks[ci].buffer);
    rec.dispatch(kernel, [...buffers, c.buffer], u, groups(gpu, Math.ceil(n / 2)));
  });
  return out;
}

/** Workgroups for `items` invocations: x up to the per-dimension limit, then y. */
function groups(gpu: Gpu, items: number): [number, number] {
  const total = Math.ceil(items / ELEMENTWISE_WORKGROUP);
  const max = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (total <= max) return [total, 1];
  const y = Math.ceil(total / max);
  return [Math.ceil(total / y), y];
}

function sameChunks(name: string, tensors: Tensor[]): void {
  const key = (t: Tensor) => t.chunks.map((c) => `${c.rowStart}+${c.rows}`).join(",");
  const want = key(tensors[0]);
  for (const t of tensors) {
    if (key(t) !== want) {
      throw new RangeError(
        `Cannot run ${name}: "${t.label}" and "${tensors[0].label}" are split into different row chunks`,
      );
    }
  }
}
