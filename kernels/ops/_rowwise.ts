/**
 * Private helpers of the row-wise ops (RMSNorm, RoPE, SwiGLU, embedding): loading a kernel's
 * `.wgsl` file and specialising its storage types, float-dtype checks, workgroup grids, and
 * the row ranges that lie in one chunk of every tensor of a call.
 *
 * Type specialisation: a kernel file declares each storage type it reads or writes as
 * `alias NAME = f32;` on a line of its own; {@link specializeWgsl} turns the ones asked for
 * into `f16` and puts `enable f16;` in front. Arithmetic stays f32 (`f32(X[i])` on load,
 * `A(v)` on store), so an f16 tensor is rounded once, when it is written.
 * @module
 */
import type { Gpu } from "../device.ts";
import type { Tensor } from "../tensor.ts";

/** Storage types of the float tensors these ops read and write. */
export type FloatDType = "f32" | "f16";

const sources = new Map<string, string>();

/** The text of `kernels/wgsl/<name>.wgsl` (read once per process). */
export function loadWgsl(name: string): string {
  let code = sources.get(name);
  if (code === undefined) {
    code = Deno.readTextFileSync(new URL(`../wgsl/${name}.wgsl`, import.meta.url));
    sources.set(name, code);
  }
  return code;
}

/**
 * Sets the storage types of a kernel: each `alias NAME = f32;` line named in `types` becomes
 * `alias NAME = <dtype>;`, with `enable f16;` first when any of them is f16.
 *
 * @example
 * ```ts
 * const code = specializeWgsl(loadWgsl("rmsnorm"), { A: "f16", W: "f32" });
 * ```
 */
export function specializeWgsl(code: string, types: Record<string, FloatDType>): string {
  let out = code;
  for (const [name, dtype] of Object.entries(types)) {
    const line = new RegExp(`^alias ${name} = f32;`, "m");
    if (!line.test(out)) throw new Error(`Cannot specialise WGSL: it has no line "alias ${name} = f32;"`);
    out = out.replace(line, `alias ${name} = ${dtype};`);
  }
  return Object.values(types).includes("f16") ? `enable f16;\n${out}` : out;
}

/**
 * The float dtype of `t`, checked: f32 or f16, and f16 only where the adapter has shader-f16.
 * `op` names the operation in the error.
 */
export function floatDType(op: string, t: Tensor): FloatDType {
  if (t.dtype !== "f32" && t.dtype !== "f16") {
    throw new TypeError(`Cannot run ${op}: "${t.label}" has dtype ${t.dtype} (f32 or f16 expected)`);
  }
  if (t.dtype === "f16" && !t.gpu.f16) {
    throw new TypeError(
      `Cannot run ${op}: "${t.label}" is f16 and this adapter has no shader-f16 (use f32 tensors here)`,
    );
  }
  return t.dtype;
}

/** Throws a RangeError unless `t` has exactly `shape`; `op` and `what` name it. */
export function expectShape(op: string, what: string, t: Tensor, shape: readonly number[]): void {
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new RangeError(
      `Cannot run ${op}: ${what} "${t.label}" has shape [${t.shape}], expected [${shape}]`,
    );
  }
}

/** Throws a TypeError unless `t` is a u32 tensor. */
export function expectU32(op: string, what: string, t: Tensor): void {
  if (t.dtype !== "u32") {
    throw new TypeError(`Cannot run ${op}: ${what} "${t.label}" has dtype ${t.dtype} (u32 expected)`);
  }
}

/**
 * Workgroups for `count` linear workgroup ids: x up to the per-dimension limit, then y. A
 * kernel recovers the id as `wg.y·nwg.x + wg.x` and returns when it is ≥ its count.
 */
export function grid(gpu: Gpu, count: number): [number, number] {
  const max = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (count <= max) return [count, 1];
  const y = Math.ceil(count / max);
  return [Math.ceil(count / y), y];
}

/** Smallest power of two ≥ n, clamped to [lo, hi]. */
export function pow2Clamp(n: number, lo: number, hi: number): number {
  return Math.min(hi, Math.max(lo, 2 ** Math.ceil(Math.log2(Math.max(1, n)))));
}

/** Where a row range sits in one tensor: the chunk buffer and the range's first element in it. */
export interface SegmentPart {
  buffer: GPUBuffer;
  /** Element offset of the range's first row inside `buffer` (row · rowSize). */
  offset: number;
}

/** A range of rows that lies inside one chunk of every tensor it was made for. */
export interface RowSegment {
  /** First row. */
  row: number;
  /** Number of rows. */
  rows: number;
  /** One entry per tensor, in the order given. */
  parts: SegmentPart[];
}

/**
 * Splits the rows shared by `tensors` (all with the same first dimension) at every chunk
 * boundary of any of them, so each range lies in one buffer of each. Unsplit tensors give one
 * range covering all rows.
 */
export function rowSegments(tensors: readonly Tensor[]): RowSegment[] {
  const rows = tensors[0].rows;
  const cuts = new Set([0, rows]);
  for (const t of tensors) for (const c of t.chunks) cuts.add(c.rowStart);
  const sorted = [...cuts].sort((a, b) => a - b);
  const out: RowSegment[] = [];
  for (let i = 0; i + 1 < sorted.length; i++) {
    const row = sorted[i];
    const n = sorted[i + 1] - row;
    if (n === 0) continue;
    const parts = tensors.map((t) => {
      const c = t.chunks.find((c) => row >= c.rowStart && row < c.rowStart + c.rows)!;
      return { buffer: c.buffer, offset: (row - c.rowStart) * t.rowSize };
    });
    out.push({ row, rows: n, parts });
  }
  return out;
}

/** Invocations per workgroup of a row kernel for rows of D elements: about 4 columns each, 32..256. */
export function rowWorkgroup(D: number): number {
  return pow2Clamp(Math.ceil(D / 4), 32, 256);
}
