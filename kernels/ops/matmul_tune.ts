/**
 * The matmul autotuner and its per-adapter table of tiles.
 *
 * `tuneMatmul(gpu, shapes)` times every candidate config of the adapter's kernel family
 * (`matmulCandidates` in matmul.ts) on each shape, picks the fastest per shape class, and
 * writes the table to a JSON file keyed by the adapter. `matmul` reads that file once per
 * device (`tunedConfig`) and uses its entry for a product's class; without one it keeps the
 * built-in heuristic. Tuning never runs on its own: `deno task bench tune` runs it.
 *
 * M, N, K as in C[M,N] = op(A)[M,K]·op(B)[K,N]. A shape class is the layout, the operand
 * dtypes and M, N, K each rounded to the nearest power of two (in log2: 11008 → 8192,
 * 14336 → 16384), written `NT/f16/m2048/n4096/k4096`. A product with no entry of its own
 * class takes the entry nearest in log2 (sum of exponent differences) among those of its
 * layout and dtypes that differ by at most one power of two in each of M, N, K.
 *
 * Results never depend on the table: every config of a family sums each output element in
 * the same order (matmul_wgsl.ts), entries of the other family are ignored, and split-K is
 * decided from the shape alone (matmul.ts).
 *
 * Files: `<cache>/matmul/<adapter slug>-<hash>.json`, cache = `$LATHE_CACHE_DIR`, else
 * `$XDG_CACHE_HOME/lathe`, else `~/.cache/lathe`. `LATHE_MATMUL_TUNING=off` makes `matmul`
 * ignore the tables.
 * @module
 */
import { createHash } from "node:crypto";
import { homedir } from "node:os";
import { join } from "node:path";
import * as z from "zod";
import { formatZodIssues } from "../../steps/errors.ts";
import { writeJsonAtomic } from "../../steps/atomic.ts";
import { Progress } from "../../steps/progress.ts";
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
  type MatmulShape,
  planMatmul,
} from "./matmul.ts";
import type { FloatDType, MatmulLayout } from "./matmul_wgsl.ts";
import { uniformFiller } from "../models/random.ts";

// ---------------------------------------------------------------------------------------------
// Adapter identity and file location

/** What a tuning table is keyed by: a table only applies to the adapter and driver it was timed on. */
export interface AdapterIdentity {
  vendor: string;
  architecture: string;
  device: string;
  description: string;
  /** WebGPU backend (`vulkan`, `gl`, `metal`, `dx12`). */
  backend: string;
  /**
   * Driver version where the platform tells it (WebGPU does not): NVIDIA's kernel module
   * version on Linux; else the description, which names Mesa's LLVM for lavapipe/llvmpipe.
   */
  driver: string;
}

/** The identity of this device's adapter. */
export function adapterIdentity(gpu: Gpu): AdapterIdentity {
  const info = (gpu.device as GPUDevice & { adapterInfo?: GPUAdapterInfo }).adapterInfo;
  return {
    vendor: info?.vendor || gpu.info.vendor || "",
    architecture: info?.architecture || gpu.info.architecture || "",
    device: info?.device || "",
    description: info?.description || gpu.info.description,
    backend: gpu.info.backend,
    driver: driverVersion(info?.vendor || gpu.info.vendor, gpu.info.description),
  };
}

/** The driver version the operating system reports for this vendor, or "unknown". */
function driverVersion(vendor: string, description: string): string {
  // PCI vendor 0x10de (4318) or the name: NVIDIA's module says its version in /sys (Linux).
  if (/^(4318|0x10de|nvidia)$/i.test(vendor) || /nvidia/i.test(description)) {
    for (const path of ["/sys/module/nvidia/version", "/proc/driver/nvidia/version"]) {
      try {
        const text = Deno.readTextFileSync(path);
        const version = text.match(/\d+\.\d+(\.\d+)?/);
        if (version) return `nvidia ${version[0]}`;
      } catch {
        // not Linux, or no read permission: try the next source
      }
    }
  }
  return "unknown";
}

/** Reads an environment variable, or undefined (also without env permission). */
type Env = (name: string) => string | undefined;

const processEnv: Env = (name) => {
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined;
  }
};

/** The cache directory: `$LATHE_CACHE_DIR`, else `$XDG_CACHE_HOME/lathe`, else `~/.cache/lathe`. */
export function latheCacheDir(env: Env = processEnv): string {
  return env("LATHE_CACHE_DIR") ?? join(env("XDG_CACHE_HOME") ?? join(homedir(), ".cache"), "lathe");
}

/** The table file of an adapter: `<cache>/matmul/<slug>-<first 16 hex of sha256(identity)>.json`. */
export function tuningTablePath(adapter: AdapterIdentity, cacheDir: string = latheCacheDir()): string {
  const hash = createHash("sha256").update(adapterKey(adapter)).digest("hex").slice(0, 16);
  const slug = `${adapter.description} ${adapter.backend}`.toLowerCase().replace(/[^a-z0-9]+/g, "-")
    .replace(/^-|-$/g, "").slice(0, 48);
  return join(cacheDir, "matmul", `${slug || "adapter"}-${hash}.json`);
}

/** A canonical string of an identity (fixed field order). */
function adapterKey(a: AdapterIdentity): string {
  return JSON.stringify([a.vendor, a.architecture, a.device, a.description, a.backend, a.driver]);
}

// ---------------------------------------------------------------------------------------------
// The table

/** `format` field of a table file. */
export const TUNING_FORMAT = "lathe-matmul-tuning";
/** `version` field of a table file. */
export const TUNING_VERSION = 1;

const dim = z.number().int().positive();
const ConfigSchema = z.discriminatedUnion("kind", [
  z.strictObject({
    kind: z.literal("tiled"),
    tile: z.strictObject({ BM: dim, BN: dim, BK: dim, TM: dim, TN: dim, f16Tiles: z.boolean().optional() }),
  }),
  z.strictObject({ kind: z.literal("direct"), tile: z.strictObject({ TM: dim, TN: dim, WG: dim }) }),
]);

const EntrySchema = z.strictObject({
  /** The fastest config of the class. */
  config: ConfigSchema,
  /** The shapes timed for the class, [M, N, K] each. */
  shapes: z.array(z.tuple([dim, dim, dim])).min(1),
  /** Median milliseconds of the chosen config, summed over `shapes`. */
  ms: z.number().nonnegative(),
  /** GFLOP/s of the chosen config over `shapes`. */
  gflops: z.number().nonnegative(),
  /** GFLOP/s of the heuristic's config over `shapes` (null when it failed). */
  heuristicGflops: z.number().nonnegative().nullable(),
  /** How the times were taken. */
  timer: z.enum(["timestamp", "wall"]),
  /** When the class was tuned (ISO 8601). */
  tuned: z.string(),
});

const TableSchema = z.strictObject({
  format: z.literal(TUNING_FORMAT),
  version: z.literal(TUNING_VERSION),
  adapter: z.strictObject({
    vendor: z.string(),
    architecture: z.string(),
    device: z.string(),
    description: z.string(),
    backend: z.string(),
    driver: z.string(),
  }),
  /** Deno version of the last tuning run (informational: the table is keyed by adapter). */
  deno: z.string(),
  entries: z.record(z.string(), EntrySchema),
});

/** One tuned shape class. */
export type TuningEntry = z.infer<typeof EntrySchema>;
/** A tuning table file. */
export type TuningTable = z.infer<typeof TableSchema>;

/** An empty table for an adapter. */
export function emptyTuningTable(adapter: AdapterIdentity): TuningTable {
  return { format: TUNING_FORMAT, version: TUNING_VERSION, adapter, deno: Deno.version.deno, entries: {} };
}

/** Result of {@link readTuningTable}: the table, or null with the reason when it cannot be used. */
export interface ReadTableResult {
  table: TuningTable | null;
  /** Why an existing file was not used (absent when there is no file, or it was used). */
  warning?: string;
}

/**
 * Reads the table at `path` for `adapter`. A missing file gives no table and no warning; a
 * file that is not JSON, does not match the format, or belongs to another adapter gives no
 * table and a warning that says so (it never throws for the file's contents).
 */
export function readTuningTable(path: string, adapter: AdapterIdentity): ReadTableResult {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return { table: null };
    return { table: null, warning: unusable(path, (error as Error).message) };
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    return { table: null, warning: unusable(path, `not JSON (${(error as Error).message})`) };
  }
  const parsed = TableSchema.safeParse(json);
  if (!parsed.success) return { table: null, warning: unusable(path, formatZodIssues(parsed.error)) };
  if (adapterKey(parsed.data.adapter) !== adapterKey(adapter)) {
    return {
      table: null,
      warning: unusable(
        path,
        `it was tuned on "${parsed.data.adapter.description}" (another adapter or driver)`,
      ),
    };
  }
  return { table: parsed.data };
}

function unusable(path: string, why: string): string {
  return `Cannot use matmul tuning table "${path}": ${why}; using the built-in tile heuristic ` +
    `(hint: delete the file, or run \`deno task bench tune\` to write it again)`;
}

/** Writes a table atomically (temp file and rename). */
export async function writeTuningTable(path: string, table: TuningTable): Promise<void> {
  await writeJsonAtomic(path, TableSchema.parse(table));
}

/** The class of a product: `NT/f16/m2048/n4096/k4096` (see the module documentation). */
export function shapeClass(shape: MatmulShape): string {
  const [m, n, k] = [shape.M, shape.N, shape.K].map((x) => 2 ** exponent(x));
  return `${dtypePrefix(shape)}/m${m}/n${n}/k${k}`;
}

/** `NT/f16` or, for mixed operands, `NT/f32-f16` (a's dtype first). */
function dtypePrefix(shape: { layout: MatmulLayout; a: FloatDType; b: FloatDType }): string {
  return `${shape.layout}/${shape.a === shape.b ? shape.a : `${shape.a}-${shape.b}`}`;
}

/** log2 rounded to the nearest integer (x ≥ 1), clamped to [0, 24]. */
function exponent(x: number): number {
  return Math.min(24, Math.max(0, Math.round(Math.log2(Math.max(1, x)))));
}

const CLASS_KEY = /^(NN|NT|TN)\/([a-z0-9-]+)\/m(\d+)\/n(\d+)\/k(\d+)$/;

// ---------------------------------------------------------------------------------------------
// Lookup (what matmul consults)

interface ClassPoint {
  key: string;
  e: [number, number, number];
  config: MatmulConfig;
}

interface TuningState {
  table: TuningTable | null;
  /** Entries by `layout/dtypes` prefix. */
  index: Map<string, ClassPoint[]>;
}

const states = new WeakMap<Gpu, TuningState>();

/** Whether `LATHE_MATMUL_TUNING` turns the table off (`off`, `0`, `false`, `no`). */
export function tuningDisabled(env: Env = processEnv): boolean {
  const value = env("LATHE_MATMUL_TUNING");
  return value !== undefined && ["off", "0", "false", "no"].includes(value.toLowerCase());
}

/**
 * The tuned config for a product's class, or null (no table, tuning off, no entry near
 * enough). Loads this adapter's table on the first call per device; a table that cannot be
 * used prints one warning and is treated as absent.
 */
export function tunedConfig(gpu: Gpu, shape: MatmulShape): { config: MatmulConfig; entry: string } | null {
  let state = states.get(gpu);
  if (state === undefined) {
    let table: TuningTable | null = null;
    if (!tuningDisabled()) {
      const read = readTuningTable(tuningTablePath(adapterIdentity(gpu)), adapterIdentity(gpu));
      if (read.warning) console.warn(`warning: ${read.warning}`);
      table = read.table;
    }
    state = indexTable(table);
    states.set(gpu, state);
  }
  const points = state.index.get(dtypePrefix(shape));
  if (points === undefined) return null;
  const e = [shape.M, shape.N, shape.K].map(exponent);
  let best: ClassPoint | null = null;
  let bestDistance = Infinity;
  for (const p of points) {
    const d = p.e.map((x, i) => Math.abs(x - e[i]));
    if (Math.max(...d) > 1) continue;
    const distance = d[0] + d[1] + d[2];
    if (distance < bestDistance) [best, bestDistance] = [p, distance];
  }
  return best === null ? null : { config: best.config, entry: best.key };
}

function indexTable(table: TuningTable | null): TuningState {
  const index = new Map<string, ClassPoint[]>();
  // Sorted keys: the nearest-class search breaks ties the same way on every load.
  for (const key of Object.keys(table?.entries ?? {}).sort()) {
    const m = CLASS_KEY.exec(key);
    if (m === null) continue;
    const prefix = `${m[1]}/${m[2]}`;
    const e = [m[3], m[4], m[5]].map((x) => exponent(Number(x))) as [number, number, number];
    if (!index.has(prefix)) index.set(prefix, []);
    index.get(prefix)!.push({ key, e, config: table!.entries[key].config as MatmulConfig });
  }
  return { table, index };
}

/**
 * Makes `matmul` on this device use `table` (null: none) instead of the file, until
 * {@link resetMatmulTuning}. The tuner calls it with the table it wrote.
 */
export function setMatmulTuning(gpu: Gpu, table: TuningTable | null): void {
  states.set(gpu, indexTable(table));
}

/** Forgets the loaded table: the next `matmul` on this device reads the file (and the env) again. */
export function resetMatmulTuning(gpu: Gpu): void {
  states.delete(gpu);
}

/** The table `matmul` uses on this device now (loading it if needed), or null. */
export function activeTuningTable(gpu: Gpu): TuningTable | null {
  tunedConfig(gpu, { layout: "NN", a: "f32", b: "f32", M: 1, N: 1, K: 1 });
  return states.get(gpu)!.table;
}

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
