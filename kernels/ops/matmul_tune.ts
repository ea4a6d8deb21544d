/**
 * The matmul autotuner: `tuneMatmul(gpu, shapes)` times every candidate config of the
 * adapter's kernel family (`matmulCandidates` in matmul.ts) on each shape, picks the fastest
 * per shape class, and writes the table (matmul_table.ts) to a JSON file keyed by the adapter.
 * `matmul` reads that file once per device and uses its entry for a product's class; without
 * one it keeps the built-in heuristic. Tuning never runs on its own: `deno task bench tune`
 * runs it.
 * @module
 */
import { Progress } from "../../foundation/progress.ts";
import type { Gpu } from "../device.ts";
import { recorder } from "../recorder.ts";
import { Tensor } from "../tensor.ts";
import {
  chooseConfig,
  configFits,
  configName,
  matmulCandidates,
  type MatmulConfig,
  type MatmulPlan,
  planMatmul,
} from "./matmul.ts";
import {
  type AdapterIdentity,
  adapterIdentity,
  emptyTuningTable,
  readTuningTable,
  setMatmulTuning,
  shapeClass,
  type TuningEntry,
  tuningTablePath,
  writeTuningTable,
} from "./matmul_table.ts";
import type { FloatDType, MatmulLayout } from "./matmul_wgsl.ts";
import { uniformFiller } from "../../foundation/random.ts";

// ---------------------------------------------------------------------------------------------
// The tuner

/** A product to tune: its layout, operand dtype (both operands) and size. */
export interface TuneShape {
  layout: MatmulLayout;
  dtype: FloatDType;
  M: number;
  N: number;
  K: number;
  /** What the product is (shown in tables), e.g. `q_proj fwd`. */
  name?: string;
}

/** Options of {@link tuneMatmul}. */
export interface TuneOptions {
  /** Configs to time (default: `matmulCandidates` for the shape's dtypes). */
  candidates?: MatmulConfig[];
  /**
   * `staged` (default): all block shapes at BK 16 first, then the other BK (and f16 tiles)
   * of the `keep` fastest; `exhaustive`: every candidate. Explicit `candidates` are all timed.
   */
  search?: "staged" | "exhaustive";
  /** Block shapes kept for the second stage (default 3). */
  keep?: number;
  /** Untimed runs before the timed ones (default 2). */
  warmup?: number;
  /** Timed runs; the median is kept (default 5). */
  reps?: number;
  /** `auto` (default): GPU timestamps when the adapter offers them, else the wall clock. */
  timer?: "auto" | "timestamp" | "wall";
  /** With the wall clock, each timed run repeats the product to last at least this long (default 50 ms). */
  minRunMs?: number;
  /** Cache directory of the table (default {@link latheCacheDir}). */
  cacheDir?: string;
  /** Write the table (merged into the adapter's file) and use it in this process (default true). */
  save?: boolean;
  /** Show progress on stderr (default true). */
  progress?: boolean;
}

/** One timing: a config on a shape. */
export interface TuneMeasurement {
  shape: TuneShape;
  /** Shape class of the shape. */
  key: string;
  config: MatmulConfig;
  /** Median milliseconds, or null when the config failed (then `error` says why). */
  ms: number | null;
  gflops: number | null;
  error?: string;
}

/** What {@link tuneMatmul} found. */
export interface TuneResult {
  adapter: AdapterIdentity;
  /** The table file written (null with `save: false`). */
  path: string | null;
  timer: "timestamp" | "wall";
  /** The classes tuned in this run. */
  entries: Record<string, TuningEntry>;
  /** Every timing, in the order taken. */
  measurements: TuneMeasurement[];
  /** The heuristic's config per shape (for comparison). */
  heuristic: Map<TuneShape, MatmulConfig>;
}

/** Llama/Mistral-7B dimensions: D hidden, F ffn (Mistral, Llama 2), KV = Hkv·hd (Mistral GQA). */
const LLAMA_7B = { D: 4096, F_MISTRAL: 14336, F_LLAMA: 11008, KV: 1024 } as const;

/**
 * The default shapes: every product of one Llama/Mistral-7B decoder layer at T tokens — the
 * forward y[T,out] = x[T,in]·W[out,in]ᵀ (NT), dx[T,in] = dy[T,out]·W (NN), dW[out,in] =
 * dyᵀ·x (TN) for q/o (4096→4096), k/v (4096→1024, Mistral), gate/up (4096→14336 Mistral,
 * 4096→11008 Llama 2) and down (back to 4096) — plus square n×n×n products, n = 256…4096, in
 * each layout; for each dtype.
 */
export function defaultTuneShapes(
  dtypes: readonly FloatDType[] = ["f32", "f16"],
  T = 2048,
  squares: readonly number[] = [256, 512, 1024, 2048, 4096],
): TuneShape[] {
  const { D, F_MISTRAL, F_LLAMA, KV } = LLAMA_7B;
  const linears: [string, number, number][] = [ // name, in, out
    ["q_proj", D, D],
    ["k_proj", D, KV],
    ["gate_proj", D, F_MISTRAL],
    ["down_proj", F_MISTRAL, D],
    ["gate_proj llama", D, F_LLAMA],
    ["down_proj llama", F_LLAMA, D],
  ];
  const shapes: TuneShape[] = [];
  for (const dtype of dtypes) {
    for (const [name, In, Out] of linears) {
      shapes.push({ layout: "NT", dtype, M: T, N: Out, K: In, name: `${name} fwd` });
      shapes.push({ layout: "NN", dtype, M: T, N: In, K: Out, name: `${name} dx` });
      shapes.push({ layout: "TN", dtype, M: Out, N: In, K: T, name: `${name} dW` });
    }
    for (const n of squares) {
      for (const layout of ["NT", "NN", "TN"] as const) {
        shapes.push({ layout, dtype, M: n, N: n, K: n, name: `square ${n}` });
      }
    }
  }
  return shapes;
}

/**
 * Times the candidate configs on each shape on this adapter and keeps the fastest per shape
 * class (summing times over the shapes of one class). Each timing runs the launches `matmul`
 * would record for that config (split-K included, chosen from the shape as `matmul` does):
 * `warmup` untimed runs, then `reps` timed ones, median kept; GPU timestamps around each run's
 * compute pass where the adapter offers `timestamp-query`, else the wall clock around
 * submit-and-wait. A config that fails to compile or run is reported and skipped. With `save`,
 * the classes are merged into the adapter's table file, which this process then uses.
 *
 * @example
 * ```ts
 * const result = await tuneMatmul(gpu, [{ layout: "NT", dtype: "f16", M: 2048, N: 4096, K: 4096 }]);
 * console.log(result.path, result.entries);
 * ```
 */
export async function tuneMatmul(
  gpu: Gpu,
  shapes: readonly TuneShape[] = defaultTuneShapes(gpu.f16 ? ["f32", "f16"] : ["f32"]),
  options: TuneOptions = {},
): Promise<TuneResult> {
  const warmup = options.warmup ?? 2;
  const reps = Math.max(1, options.reps ?? 5);
  const search = options.candidates ? "exhaustive" : options.search ?? "staged";
  const keep = options.keep ?? 3;
  let timer: "timestamp" | "wall" = options.timer === "wall" || !gpu.timestamps ? "wall" : "timestamp";
  if (options.timer === "timestamp" && !gpu.timestamps) {
    throw new RangeError("Cannot time matmul with GPU timestamps: this adapter has no timestamp-query");
  }
  for (const s of shapes) {
    if (s.dtype === "f16" && !gpu.f16) {
      throw new RangeError(`Cannot tune ${describeShape(s)}: f16 needs shader-f16, which this adapter lacks`);
    }
  }
  const adapter = adapterIdentity(gpu);
  const measurements: TuneMeasurement[] = [];
  const heuristic = new Map<TuneShape, MatmulConfig>();
  const candidatesOf = (s: TuneShape) =>
    options.candidates?.filter((c) => configFits(gpu, c, { a: s.dtype, b: s.dtype }) === null) ??
      matmulCandidates(gpu, { a: s.dtype, b: s.dtype });
  const firstStage = (s: TuneShape) => {
    const all = candidatesOf(s);
    if (search === "exhaustive") return all;
    const stage = all.filter((c) => c.kind !== "tiled" || (c.tile.BK === 16 && !c.tile.f16Tiles));
    return stage.length > 0 ? stage : all;
  };
  // Second stage: each kept block shape's other BK and storage variants.
  const secondStage = (s: TuneShape) => {
    if (search !== "staged") return 0;
    const all = candidatesOf(s);
    const perBlock = all.filter((c) => blockName(c) === blockName(all[0])).length;
    return keep * Math.max(0, perBlock - 1);
  };
  const total = shapes.reduce((n, s) => n + firstStage(s).length + secondStage(s), 0);
  const progress = new Progress("tune matmul", total, "timings", options.progress === false);
  await recorder(gpu).sync();
  // One timer for the whole run (times of two clocks do not rank against each other).
  if (timer === "timestamp" && shapes.length > 0) {
    const why = await timestampProblem(gpu, shapes[0]);
    if (why !== null) {
      if (options.timer === "timestamp") throw new Error(`Cannot time matmul with GPU timestamps: ${why}`);
      console.warn(`warning: timing with the wall clock: ${why}`);
      timer = "wall";
    }
  }

  for (const shape of shapes) {
    const operands = makeOperands(gpu, shape);
    try {
      const key = shapeClass({ ...shape, a: shape.dtype, b: shape.dtype });
      const timed = new Map<string, TuneMeasurement>();
      const time = async (config: MatmulConfig) => {
        const name = configName(config);
        if (timed.has(name)) return;
        const m: TuneMeasurement = { shape, key, config, ms: null, gflops: null };
        try {
          m.ms = await timeConfig(gpu, operands, shape, config, {
            warmup,
            reps,
            timer,
            minRunMs: options.minRunMs,
          });
          m.gflops = flops(shape) / (m.ms * 1e6);
        } catch (error) {
          m.error = (error as Error).message.split("\n")[0];
        }
        timed.set(name, m);
        measurements.push(m);
        const best = [...timed.values()].filter((t) => t.gflops !== null).sort((x, y) => x.ms! - y.ms!)[0];
        progress.tick(
          1,
          `${describeShape(shape)}${
            best ? ` best ${configName(best.config)} ${best.gflops!.toPrecision(3)} GFLOP/s` : ""
          }`,
        );
      };
      const h = chooseConfig(gpu, shape.M, shape.N);
      heuristic.set(shape, h);
      for (const config of firstStage(shape)) await time(config);
      if (configFits(gpu, h, { a: shape.dtype, b: shape.dtype }) === null) await time(h);
      if (search === "staged") {
        // The other BK and storage variants of the fastest block shapes.
        const blocks = [...timed.values()].filter((t) => t.ms !== null && t.config.kind === "tiled")
          .sort((x, y) => x.ms! - y.ms!).map((t) => blockName(t.config));
        const kept = [...new Set(blocks)].slice(0, keep);
        for (const config of candidatesOf(shape)) {
          if (kept.includes(blockName(config))) await time(config);
        }
      }
    } finally {
      for (const t of operands.tensors) t.destroy();
    }
  }
  progress.done();

  const entries = chooseEntries(shapes, measurements, heuristic, timer);
  let path: string | null = null;
  if (options.save ?? true) {
    path = tuningTablePath(adapter, options.cacheDir);
    const read = readTuningTable(path, adapter);
    if (read.warning) console.warn(`warning: ${read.warning} (it will be replaced)`);
    const table = read.table ?? emptyTuningTable(adapter);
    table.deno = Deno.version.deno;
    Object.assign(table.entries, entries);
    await writeTuningTable(path, table);
    setMatmulTuning(gpu, table);
  }
  return { adapter, path, timer, entries, measurements, heuristic };
}

/** 2·M·N·K. */
function flops(s: { M: number; N: number; K: number }): number {
  return 2 * s.M * s.N * s.K;
}

/** `NT f16 2048×4096×4096`. */
export function describeShape(s: TuneShape): string {
  return `${s.layout} ${s.dtype} ${s.M}×${s.N}×${s.K}`;
}

/** A tiled config without its BK and storage: `128x64/8x8`. */
function blockName(config: MatmulConfig): string {
  return config.kind === "tiled"
    ? `${config.tile.BM}x${config.tile.BN}/${config.tile.TM}x${config.tile.TN}`
    : configName(config);
}

/** Per class: the config with the least total time over the class's shapes, among those timed on all. */
function chooseEntries(
  shapes: readonly TuneShape[],
  measurements: readonly TuneMeasurement[],
  heuristic: Map<TuneShape, MatmulConfig>,
  timer: "timestamp" | "wall",
): Record<string, TuningEntry> {
  const entries: Record<string, TuningEntry> = {};
  const keys = [...new Set(measurements.map((m) => m.key))];
  const tuned = new Date().toISOString();
  for (const key of keys) {
    const members = shapes.filter((s) => measurements.some((m) => m.shape === s && m.key === key));
    const totals = new Map<string, { config: MatmulConfig; ms: number; count: number }>();
    for (const m of measurements) {
      if (m.key !== key || m.ms === null) continue;
      const name = configName(m.config);
      const t = totals.get(name) ?? { config: m.config, ms: 0, count: 0 };
      t.ms += m.ms;
      t.count++;
      totals.set(name, t);
    }
    let best: { config: MatmulConfig; ms: number } | null = null;
    for (const t of totals.values()) {
      if (t.count === members.length && (best === null || t.ms < best.ms)) best = t;
    }
    if (best === null) continue;
    const work = members.reduce((sum, s) => sum + flops(s), 0);
    let heuristicMs: number | null = 0;
    for (const s of members) {
      const name = configName(heuristic.get(s)!);
      const ms = measurements.find((x) => x.shape === s && configName(x.config) === name)?.ms ?? null;
      heuristicMs = ms === null || heuristicMs === null ? null : heuristicMs + ms;
    }
    entries[key] = {
      config: best.config,
      shapes: members.map((s) => [s.M, s.N, s.K] as [number, number, number]),
      ms: best.ms,
      gflops: work / (best.ms * 1e6),
      heuristicGflops: heuristicMs === null ? null : work / (heuristicMs * 1e6),
      timer,
      tuned,
    };
  }
  return entries;
}

interface Operands {
  a: Tensor;
  b: Tensor;
  out: Tensor;
  tensors: Tensor[];
}

/** Random operands of a shape (uniform in [−1, 1): the values change power draw, not the work). */
function makeOperands(gpu: Gpu, s: TuneShape): Operands {
  const aShape = s.layout === "TN" ? [s.K, s.M] : [s.M, s.K];
  const bShape = s.layout === "NT" ? [s.N, s.K] : [s.K, s.N];
  const a = Tensor.from(gpu, uniformFiller(s.M * s.K, 1), aShape, s.dtype, { label: "tune_a" });
  const b = Tensor.from(gpu, uniformFiller(s.K * s.N, 2), bShape, s.dtype, { label: "tune_b" });
  const out = Tensor.empty(gpu, [s.M, s.N], s.dtype, { label: "tune_c" });
  return { a, b, out, tensors: [a, b, out] };
}

/**
 * Why this adapter's GPU timestamps cannot time matmul (they read zero, or longer than the
 * wall-clock time around them), or null: one product of `shape` with the heuristic's config,
 * timed by both clocks.
 */
async function timestampProblem(gpu: Gpu, shape: TuneShape): Promise<string | null> {
  const operands = makeOperands(gpu, shape);
  const plan = planMatmul(operands.a, operands.b, {
    layout: shape.layout,
    out: operands.out,
    config: chooseConfig(gpu, shape.M, shape.N),
  });
  const launches = new Launches(gpu, plan);
  try {
    await launches.ready();
    await launches.runWall(1);
    const t0 = performance.now();
    const times = await launches.runTimestamps(3);
    const wall = performance.now() - t0;
    const sum = times.reduce((x, y) => x + y, 0);
    if (sum > 0 && sum <= 1.5 * wall) return null;
    return `3 passes read ${sum.toFixed(3)} ms by GPU timestamps and took ${
      wall.toFixed(3)
    } ms of wall clock`;
  } finally {
    launches.destroy();
    for (const t of operands.tensors) t.destroy();
  }
}

/**
 * Median milliseconds of one product with `config` by `timer`: GPU timestamps around each of
 * `reps` passes, or the wall clock around runs of several products.
 */
async function timeConfig(
  gpu: Gpu,
  o: Operands,
  shape: TuneShape,
  config: MatmulConfig,
  t: { warmup: number; reps: number; timer: "timestamp" | "wall"; minRunMs?: number },
): Promise<number> {
  const plan = planMatmul(o.a, o.b, { layout: shape.layout, out: o.out, config });
  const launches = new Launches(gpu, plan);
  try {
    await launches.ready();
    if (t.warmup > 0) await launches.runWall(t.warmup);
    if (t.timer === "timestamp") {
      const ms = median(await launches.runTimestamps(t.reps));
      if (ms <= 0) throw new Error("Cannot time matmul: GPU timestamps read 0 ms (below their resolution)");
      return ms;
    }
    // Wall clock: grow the products per run until a run lasts `minRunMs`, so the fixed cost of
    // a submit and its wait (~10 ms where Deno polls the device) is spread over many products.
    const minRunMs = t.minRunMs ?? 50;
    let inner = 1;
    let run = await launches.runWall(1);
    while (run < minRunMs && inner < 1024) {
      inner = Math.min(1024, inner * Math.min(8, Math.max(2, Math.ceil(minRunMs / Math.max(run, 0.01)))));
      run = await launches.runWall(inner);
    }
    const times: number[] = [];
    for (let r = 0; r < t.reps; r++) times.push((await launches.runWall(inner)) / inner);
    return median(times);
  } finally {
    launches.destroy();
  }
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/**
 * The launches of a plan encoded outside the recorder, into the tuner's own compute passes
 * (which can carry timestamp writes): each launch gets its own uniform buffer and bind group.
 */
class Launches {
  #gpu: Gpu;
  #plan: MatmulPlan;
  #groups: GPUBindGroup[] = [];
  #uniforms: GPUBuffer[] = [];

  constructor(gpu: Gpu, plan: MatmulPlan) {
    this.#gpu = gpu;
    this.#plan = plan;
    const device = gpu.device;
    for (const d of plan.dispatches) {
      const size = d.kernel.uniformBytes;
      const ubuf = device.createBuffer({
        label: "tune_uniforms",
        size,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      });
      const bytes = new Uint8Array(size);
      bytes.set(
        new Uint8Array(d.uniforms.buffer, d.uniforms.byteOffset, Math.min(size, d.uniforms.byteLength)),
      );
      device.queue.writeBuffer(ubuf, 0, bytes);
      this.#uniforms.push(ubuf);
      const entries: GPUBindGroupEntry[] = d.buffers.map((buffer, binding) => ({
        binding,
        resource: { buffer },
      }));
      entries.push({ binding: d.buffers.length, resource: { buffer: ubuf, offset: 0, size } });
      this.#groups.push(
        device.createBindGroup({ label: `${d.kernel.label}:tune`, layout: d.kernel.layout, entries }),
      );
    }
  }

  /** Waits for the kernels to compile; throws a compile error. */
  async ready(): Promise<void> {
    for (const d of this.#plan.dispatches) await d.kernel.ready;
  }

  #encode(pass: GPUComputePassEncoder): void {
    this.#plan.dispatches.forEach((d, i) => {
      pass.setPipeline(d.kernel.pipeline);
      pass.setBindGroup(0, this.#groups[i], [0]);
      pass.dispatchWorkgroups(...d.groups);
    });
  }

  /** Runs the product `count` times in one pass, waits; returns the wall-clock milliseconds. */
  async runWall(count: number): Promise<number> {
    const device = this.#gpu.device;
    const t0 = performance.now();
    await this.#submit(() => {
      const encoder = device.createCommandEncoder({ label: "tune" });
      const pass = encoder.beginComputePass({ label: "tune" });
      for (let i = 0; i < count; i++) this.#encode(pass);
      pass.end();
      return encoder.finish();
    });
    await device.queue.onSubmittedWorkDone();
    return performance.now() - t0;
  }

  /** Runs the product `count` times, one pass each with timestamps; returns each pass's milliseconds. */
  async runTimestamps(count: number): Promise<number[]> {
    const device = this.#gpu.device;
    const querySet = device.createQuerySet({ label: "tune", type: "timestamp", count: 2 * count });
    const resolve = device.createBuffer({
      label: "tune_timestamps",
      size: 16 * count,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    const read = device.createBuffer({
      label: "tune_timestamps_read",
      size: 16 * count,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    try {
      await this.#submit(() => {
        const encoder = device.createCommandEncoder({ label: "tune" });
        for (let i = 0; i < count; i++) {
          const pass = encoder.beginComputePass({
            label: "tune",
            timestampWrites: { querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 },
          });
          this.#encode(pass);
          pass.end();
        }
        encoder.resolveQuerySet(querySet, 0, 2 * count, resolve, 0);
        encoder.copyBufferToBuffer(resolve, 0, read, 0, 16 * count);
        return encoder.finish();
      });
      await read.mapAsync(GPUMapMode.READ);
      const ticks = new BigUint64Array(read.getMappedRange().slice(0));
      read.unmap();
      // Timestamps are nanoseconds (WebGPU); an end before its begin reads as 0.
      return Array.from({ length: count }, (_, i) => {
        const d = ticks[2 * i + 1] - ticks[2 * i];
        return d > 0n ? Number(d) / 1e6 : 0;
      });
    } finally {
      querySet.destroy();
      resolve.destroy();
      read.destroy();
    }
  }

  /** Submits a command buffer inside error scopes and throws the first error (naming the kernels). */
  async #submit(build: () => GPUCommandBuffer): Promise<void> {
    const device = this.#gpu.device;
    device.pushErrorScope("validation");
    device.pushErrorScope("out-of-memory");
    device.queue.submit([build()]);
    const oom = await device.popErrorScope();
    const validation = await device.popErrorScope();
    const error = validation ?? oom;
    if (error !== null) {
      const labels = this.#plan.dispatches.map((d) => `"${d.kernel.label}"`).join(", ");
      throw new Error(`Cannot run ${labels}: ${error.message.trim()}`);
    }
    this.#gpu.assertAlive();
  }

  destroy(): void {
    for (const b of this.#uniforms) b.destroy();
    for (const t of this.#plan.scratch) t.destroy();
  }
}
