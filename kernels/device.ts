/**
 * The GPU device: adapter selection, features, limits, and device-loss reporting.
 *
 * `getGpu()` returns one shared {@link Gpu} per process. The adapter is asked for with
 * `powerPreference: "high-performance"` first, then with no preference. Every feature the
 * engine can use is requested when offered (`shader-f16`, `timestamp-query`, subgroups), and
 * every numeric limit of the adapter is requested as-is (a device otherwise gets WebGPU's
 * defaults, e.g. 128 MiB storage bindings and 16 KiB workgroup memory).
 *
 * Environment: `DENO_WEBGPU_BACKEND` (read by Deno: `vulkan`, `gl`, `metal`, `dx12`) picks
 * the backend; `LATHE_F16=0` makes the engine use f32 even where `shader-f16` is offered;
 * `LATHE_MAX_BINDING_BYTES=<bytes>` lowers the largest storage binding the engine uses below the
 * adapter's, so that tensors above it are split into row chunks (to run the chunked paths of every
 * op on small models, e.g. in tests).
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import type { GpuInfo } from "../foundation/manifest.ts";

export type { GpuInfo };

/** Features used when the adapter offers them. */
const WANTED_FEATURES = ["shader-f16", "timestamp-query", "subgroups", "subgroups-f16"] as const;

/** Adapter description fragments of CPU (software) implementations. */
const SOFTWARE_ADAPTERS = /llvmpipe|lavapipe|swiftshader|softpipe|warp|basic render/i;

/** A WebGPU device with what the engine needs to know about it. */
export class Gpu {
  /** The device all engine work runs on. */
  readonly device: GPUDevice;
  /** Adapter description, vendor, backend and features, as recorded in manifests. */
  readonly info: GpuInfo;
  /** Whether kernels may use f16 storage and arithmetic (`shader-f16`, unless `LATHE_F16=0`). */
  readonly f16: boolean;
  /** Whether `timestamp-query` was granted. */
  readonly timestamps: boolean;
  /** Whether the `subgroups` feature was granted. */
  readonly subgroups: boolean;
  /** Whether the adapter is a CPU implementation (lavapipe, llvmpipe, SwiftShader, WARP). */
  readonly software: boolean;
  /** The device's limits (the adapter's own, as requested). */
  readonly limits: GPUSupportedLimits;
  /** Label of the last kernel dispatched; named when the device is lost. */
  lastKernel: string | null = null;
  #lost: Error | null = null;
  #bindingCap: number;

  /** @param bindingCap largest storage binding the engine uses, if below the adapter's limit */
  constructor(device: GPUDevice, info: GpuInfo, f16: boolean, bindingCap: number = Infinity) {
    this.device = device;
    this.info = info;
    this.f16 = f16;
    this.#bindingCap = bindingCap;
    this.limits = device.limits;
    this.timestamps = device.features.has("timestamp-query");
    this.subgroups = device.features.has("subgroups");
    this.software = info.fallback || SOFTWARE_ADAPTERS.test(info.description);
    device.lost.then((lost) => {
      const kernel = this.lastKernel === null
        ? "no kernel had been dispatched"
        : `last kernel "${this.lastKernel}"`;
      this.#lost = new Error(
        `Cannot use the GPU: device "${info.description}" was lost (${lost.reason}: ${
          lost.message || "no message"
        }); ${kernel}`,
      );
    });
  }

  /** The device-loss error, or null while the device is alive. */
  get lost(): Error | null {
    return this.#lost;
  }

  /** Throws the device-loss error if the device was lost. */
  assertAlive(): void {
    if (this.#lost !== null) throw this.#lost;
  }

  /**
   * Largest byte size one buffer binding may have: tensors above it are split into row chunks. The
   * adapter's limit, or less where {@link RequestGpuOptions.maxBindingBytes} asks for less.
   */
  get maxBindingBytes(): number {
    return Math.min(this.limits.maxStorageBufferBindingSize, this.limits.maxBufferSize, this.#bindingCap);
  }
}

/** Options for {@link requestGpu}. */
export interface RequestGpuOptions {
  /** Use f16 kernels when offered (default: true unless `LATHE_F16=0`). */
  f16?: boolean;
  /**
   * Largest storage binding the engine uses, in bytes, when below the adapter's limit (default:
   * `LATHE_MAX_BINDING_BYTES`, else the adapter's limit). Tensors above it are split into row chunks.
   */
  maxBindingBytes?: number;
}

let shared: Promise<Gpu> | null = null;

/**
 * The process-wide GPU, created on first use.
 *
 * @example
 * ```ts
 * const gpu = await getGpu();
 * console.log(gpu.info.description, gpu.f16 ? "f16" : "f32");
 * ```
 * @throws {LatheError} when no WebGPU adapter exists (the message says which driver to install).
 */
export function getGpu(): Promise<Gpu> {
  if (shared === null) {
    shared = requestGpu();
    // A failed request is not cached: the next call tries again (e.g. after a driver install).
    shared.catch(() => (shared = null));
  }
  return shared;
}

/** The shared GPU, or null when no adapter exists (for tests and benchmarks that skip). */
export async function tryGetGpu(): Promise<Gpu | null> {
  bindingCapFromEnv(); // a malformed LATHE_MAX_BINDING_BYTES is an error, not a missing adapter
  try {
    return await getGpu();
  } catch (error) {
    if (error instanceof LatheError) return null;
    throw error;
  }
}

/** Requests a new device (not shared). Most code wants {@link getGpu}. */
export async function requestGpu(options: RequestGpuOptions = {}): Promise<Gpu> {
  ensureRuntimeDir();
  if (typeof navigator === "undefined" || navigator.gpu === undefined) {
    throw new LatheError("Cannot use the GPU: this Deno has no WebGPU (navigator.gpu is undefined)", {
      hint: "use Deno 2 or later",
    });
  }
  const adapter = (await navigator.gpu.requestAdapter({ powerPreference: "high-performance" })) ??
    (await navigator.gpu.requestAdapter());
  if (adapter === null) throw noAdapterError();

  const f16Wanted = options.f16 ?? Deno.env.get("LATHE_F16") !== "0";
  const bindingCap = options.maxBindingBytes ?? bindingCapFromEnv();
  if (!(Number.isInteger(bindingCap) && bindingCap >= 4) && bindingCap !== Infinity) {
    throw new RangeError(
      `Cannot use the GPU: maxBindingBytes "${bindingCap}" must be an integer of at least 4`,
    );
  }
  const offered = new Set<string>(adapter.features);
  const requiredFeatures = WANTED_FEATURES.filter((f) =>
    offered.has(f) && (f16Wanted || !f.endsWith("f16"))
  ) as GPUFeatureName[];
  const requiredLimits: Record<string, number> = {};
  for (const key in adapter.limits) {
    const value = (adapter.limits as unknown as Record<string, unknown>)[key];
    if (typeof value === "number") requiredLimits[key] = value;
  }
  let device: GPUDevice;
  try {
    device = await adapter.requestDevice({ label: "lathe", requiredFeatures, requiredLimits });
  } catch {
    // Some drivers report limits their own device request refuses; defaults still work.
    device = await adapter.requestDevice({ label: "lathe", requiredFeatures });
  }
  const info: GpuInfo = {
    description: adapter.info.description || adapter.info.device || "unknown adapter",
    vendor: adapter.info.vendor,
    architecture: adapter.info.architecture,
    backend: backendName(),
    features: [...device.features].sort(),
    fallback: (adapter.info as { isFallbackAdapter?: boolean }).isFallbackAdapter ?? false,
  };
  return new Gpu(device, info, f16Wanted && device.features.has("shader-f16"), bindingCap);
}

/** `LATHE_MAX_BINDING_BYTES` as a number of bytes, or Infinity when unset. */
function bindingCapFromEnv(): number {
  const raw = Deno.env.get("LATHE_MAX_BINDING_BYTES");
  if (raw === undefined || raw.trim() === "") return Infinity;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 4) {
    throw new LatheError(
      `Cannot use the GPU: LATHE_MAX_BINDING_BYTES "${raw}" is not a byte count of at least 4`,
      {
        hint:
          "set it to the largest storage binding in bytes (e.g. 65536), or unset it to use the adapter's limit",
      },
    );
  }
  return value;
}

/**
 * The backend Deno uses: the one `DENO_WEBGPU_BACKEND` names, else the platform's primary
 * one (wgpu prefers Vulkan on Linux, Metal on macOS, DX12 on Windows).
 */
export function backendName(
  env: string | null = Deno.env.get("DENO_WEBGPU_BACKEND") ?? null,
  os: string = Deno.build.os,
): string {
  const aliases: Record<string, string> = {
    vulkan: "vulkan",
    vk: "vulkan",
    gl: "gl",
    gles: "gl",
    opengl: "gl",
    metal: "metal",
    mtl: "metal",
    dx12: "dx12",
    d3d12: "dx12",
  };
  const named = (env ?? "").split(",").map((s) => s.trim().toLowerCase()).filter((s) => s !== "");
  if (named.length > 0) return named.map((s) => aliases[s] ?? s).join(",");
  if (os === "darwin") return "metal";
  if (os === "windows") return "dx12";
  return "vulkan";
}

/** The error for a machine with no WebGPU adapter: says which driver to install. */
export function noAdapterError(): LatheError {
  const backend = backendName();
  return new LatheError(`Cannot use the GPU: no WebGPU adapter found (backend "${backend}")`, {
    hint: backend === "gl"
      ? "install Mesa's OpenGL drivers (apt-get install libgl1-mesa-dri libegl1) or unset DENO_WEBGPU_BACKEND"
      : "install the Vulkan driver for your GPU (NVIDIA: the proprietary driver; AMD/Intel: Mesa); " +
        "without a GPU, `apt-get install mesa-vulkan-drivers` gives the lavapipe software adapter, " +
        "or set DENO_WEBGPU_BACKEND=gl to use llvmpipe through OpenGL",
  });
}

/**
 * Wayland/X11 probing inside wgpu's Vulkan and GL backends wants `XDG_RUNTIME_DIR`; on a
 * headless machine it is often unset, which makes the backends print errors. Point it at a
 * private temp directory before the adapter is requested.
 */
function ensureRuntimeDir(): void {
  try {
    if (Deno.env.get("XDG_RUNTIME_DIR")) return;
    Deno.env.set("XDG_RUNTIME_DIR", Deno.makeTempDirSync({ prefix: "lathe-xdg-" }));
  } catch {
    // Without env/write permission the backends still work; they only print a warning.
  }
}
