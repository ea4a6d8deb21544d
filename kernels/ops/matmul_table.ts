/**
 * The per-adapter table of matmul tiles that `matmul` consults (`tunedConfig`), and its file.
 * `matmul_tune.ts` (`deno task bench tune`) writes it.
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
 * Files: `<cache>/matmul/<adapter slug>-<hash>.json`, cache = foundation/paths.ts
 * `latheCacheDir()` (`$LATHE_CACHE_DIR`, else `$XDG_CACHE_HOME/lathe`, else `~/.cache/lathe`).
 * `LATHE_MATMUL_TUNING=off` makes `matmul` ignore the tables.
 * @module
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import * as z from "zod";
import { writeJsonAtomic } from "../../foundation/atomic.ts";
import { formatZodIssues } from "../../foundation/errors.ts";
import { type Env, latheCacheDir, processEnv } from "../../foundation/paths.ts";
import type { Gpu } from "../device.ts";
import type { FloatDType, MatmulConfig, MatmulLayout, MatmulShape } from "./matmul_wgsl.ts";

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
