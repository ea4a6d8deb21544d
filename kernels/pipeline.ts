/**
 * Compute pipelines: one cache per device keyed by kernel name and template parameters, with
 * creation wrapped in a validation error scope so a WGSL or layout error names its kernel.
 *
 * Binding convention for every kernel: group 0 holds the storage buffers at bindings
 * `0..n-1` in the order of {@link KernelSpec.bindings}, then (when the kernel has uniform
 * parameters) a uniform block at binding `n`, bound with a dynamic offset into the
 * recorder's uniform ring.
 * @module
 */
import type { Gpu } from "./device.ts";

/** How a kernel uses a storage buffer: `read` (read-only) or `write` (read_write). */
export type BindingAccess = "read" | "write";

/** Template parameters of a kernel: part of its cache key and its label. */
export type KernelParams = Record<string, string | number | boolean>;

/** What a kernel is: its WGSL, bindings and parameters. */
export interface KernelSpec {
  /** Kernel name, e.g. `"matmul_tiled"`; with `params` it makes the label and cache key. */
  name: string;
  /** Template parameters the code was generated from. */
  params?: KernelParams;
  /** WGSL source, or a function that builds it (called only on a cache miss). */
  code: string | (() => string);
  /** Storage buffers at bindings 0..n-1. */
  bindings: readonly BindingAccess[];
  /** Size of the uniform block at binding n, in bytes (0 or absent: none). */
  uniformBytes?: number;
  /** Entry point (default `main`). */
  entryPoint?: string;
  /** Values for `override` declarations in the WGSL. */
  constants?: Record<string, number>;
}

/** A compiled kernel, ready to dispatch through the recorder. */
export interface Kernel {
  /** `name[param=value,...]`: names the kernel in every error and in device-loss reports. */
  readonly label: string;
  readonly pipeline: GPUComputePipeline;
  readonly layout: GPUBindGroupLayout;
  readonly bindings: readonly BindingAccess[];
  /** Uniform block size in bytes, rounded up to 16 (0: none). */
  readonly uniformBytes: number;
  /** Settles when the device has validated the pipeline; rejects with an error naming the kernel. */
  readonly ready: Promise<void>;
  /** The validation error once known, else null. */
  readonly error: Error | null;
  /** Small integer identifying the kernel in bind-group cache keys. */
  readonly id: number;
}

interface CacheEntry extends Kernel {
  error: Error | null;
  code: string;
}

const caches = new WeakMap<Gpu, Map<string, CacheEntry>>();
const layouts = new WeakMap<Gpu, Map<string, GPUBindGroupLayout>>();
let nextId = 1;

/** Formats `name[k=v,...]` from a kernel name and its template parameters. */
export function kernelLabel(name: string, params?: KernelParams, constants?: Record<string, number>): string {
  const all = { ...params, ...constants };
  const keys = Object.keys(all).sort();
  if (keys.length === 0) return name;
  return `${name}[${keys.map((k) => `${k}=${all[k]}`).join(",")}]`;
}

/**
 * Returns the kernel for `spec`, compiling it on first use. Compilation errors surface
 * through {@link Kernel.ready}, on the first readback after a dispatch of it, and as a
 * thrown error on any later dispatch.
 *
 * @example
 * ```ts
 * const kernel = getKernel(gpu, { name: "fill", code: WGSL, bindings: ["write"], uniformBytes: 16 });
 * await kernel.ready; // throws `Cannot compile kernel "fill": ...` on a WGSL error
 * ```
 */
export function getKernel(gpu: Gpu, spec: KernelSpec): Kernel {
  gpu.assertAlive();
  let cache = caches.get(gpu);
  if (cache === undefined) caches.set(gpu, cache = new Map());
  const label = kernelLabel(spec.name, spec.params, spec.constants);
  const key = `${label}|${spec.entryPoint ?? "main"}|${spec.bindings.join(",")}|${spec.uniformBytes ?? 0}`;
  const hit = cache.get(key);
  if (hit !== undefined) {
    if (typeof spec.code === "string" && spec.code !== hit.code) {
      throw new Error(
        `Kernel "${label}" was compiled from different WGSL: its params must name every variant`,
      );
    }
    return hit;
  }
  const code = typeof spec.code === "string" ? spec.code : spec.code();
  const uniformBytes = spec.uniformBytes ? Math.ceil(spec.uniformBytes / 16) * 16 : 0;
  const device = gpu.device;
  device.pushErrorScope("validation");
  const layout = bindGroupLayout(gpu, spec.bindings, uniformBytes);
  const module = device.createShaderModule({ label, code });
  const pipeline = device.createComputePipeline({
    label,
    layout: device.createPipelineLayout({ label, bindGroupLayouts: [layout] }),
    compute: { module, entryPoint: spec.entryPoint ?? "main", constants: spec.constants },
  });
  const entry: CacheEntry = {
    label,
    pipeline,
    layout,
    bindings: spec.bindings,
    uniformBytes,
    error: null,
    code,
    id: nextId++,
    ready: device.popErrorScope().then((error) => {
      if (error === null) return;
      entry.error = new Error(`Cannot compile kernel "${label}": ${error.message.trim()}`);
      throw entry.error;
    }),
  };
  entry.ready.catch(() => {}); // observed by the recorder and by callers that await it
  cache.set(key, entry);
  return entry;
}

/** Number of compiled kernels on this device (for tests and diagnostics). */
export function kernelCount(gpu: Gpu): number {
  return caches.get(gpu)?.size ?? 0;
}

function bindGroupLayout(
  gpu: Gpu,
  bindings: readonly BindingAccess[],
  uniformBytes: number,
): GPUBindGroupLayout {
  let cache = layouts.get(gpu);
  if (cache === undefined) layouts.set(gpu, cache = new Map());
  const key = `${bindings.join(",")}|${uniformBytes}`;
  let layout = cache.get(key);
  if (layout === undefined) {
    const entries: GPUBindGroupLayoutEntry[] = bindings.map((access, binding) => ({
      binding,
      visibility: GPUShaderStage.COMPUTE,
      buffer: { type: access === "read" ? "read-only-storage" : "storage" },
    }));
    if (uniformBytes > 0) {
      entries.push({
        binding: bindings.length,
        visibility: GPUShaderStage.COMPUTE,
        buffer: { type: "uniform", hasDynamicOffset: true, minBindingSize: uniformBytes },
      });
    }
    layout = gpu.device.createBindGroupLayout({ label: `layout[${key}]`, entries });
    cache.set(key, layout);
  }
  return layout;
}
