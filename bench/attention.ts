/**
 * Attention benchmark: time and GFLOP/s of lathe's attention forward and backward
 * (kernels/ops/attention.ts) at a few shapes, as ratios against two references run in the same
 * process on the same adapter:
 * - `previous`: the kernels as they were before register blocking (bench/attention_previous.ts,
 *   a snapshot of them, with that version's tile choice);
 * - `matmul`: lathe's matmul (NT, the tile it chooses) on a square n×n×n product with about the
 *   FLOPs of the attention forward (2n³ ≈ its FLOPs, n a multiple of 64): the adapter's ceiling
 *   for this kind of work.
 *
 * ```
 * deno task bench attention [-- options]     or   deno run -A bench/attention.ts [options]
 *   --S N --H N --Hkv N --hd N --B N   override that size in every default shape
 *   --dtypes f32,f16     dtype of q, k, v and out; default both (f16 where shader-f16 exists)
 *   --window W           sliding window (default none)
 *   --docs N             packed documents per row, at seeded random cut points (default 1)
 *   --passes forward,backward
 *   --tiles forward=64x32/8/4,dq=...,dkdv=...   lathe's tiles (Br x Bc / TPR / RPT), default its choice
 *   --seconds 2 --rounds 3   time per (shape, dtype, pass, kernel), best of rounds
 *   --no-previous --no-matmul   skip a reference
 *   --json FILE          also write the figures as JSON (device, date, config, results)
 * ```
 *
 * Default shapes: on CPU adapters B 1, S 256 with (H 8, Hkv 2, hd 64) and (H 4, Hkv 1, hd 128);
 * on GPUs B 1 with Llama-3-8B's heads (H 32, Hkv 8, hd 128) at S 2048 and 4096, and Qwen2-0.5B's
 * (H 14, Hkv 2, hd 64) at S 2048. The backward includes its stats pass; dout, dq, dk, dv are f32, as in
 * training (the gradient reaching attention from o_proj is f32).
 *
 * FLOP model (bench/train_flops.ts, per layer): A = attended (query, key) pairs summed over rows and
 * documents (S(S+1)/2 for one causal row), forward 4·H·hd·A (QKᵀ and P·V), backward 8·H·hd·A (dQ, dK,
 * dV, dP); the causal half is not counted twice and recomputation is not counted.
 *
 * Each figure is the best of `rounds` timed rounds; each round runs as many calls as fill its share
 * of `seconds` and then waits for the GPU. Contenders are interleaved round by round, so load from
 * other processes hits them alike.
 * @module
 */
import { type BenchDevice, benchUsage, type Usage } from "./_common.ts";
import { parseArgs } from "node:util";
import { getGpu, type Gpu } from "../kernels/device.ts";
import {
  attentionBackward,
  attentionForward,
  type AttentionKernel,
  type AttentionTile,
  attentionTileName,
  chooseAttentionTile,
} from "../kernels/ops/attention.ts";
import { configName, matmul, matmulChoice } from "../kernels/ops/matmul.ts";
import { recorder } from "../kernels/recorder.ts";
import { Tensor } from "../kernels/tensor.ts";
import { writeJsonAtomic } from "../foundation/atomic.ts";
import { runMain } from "../foundation/errors.ts";
import { Progress } from "../foundation/progress.ts";
import { previousBackward, previousForward, previousTile } from "./attention_previous.ts";
import { attentionPairs } from "./train_flops.ts";
import { uniformFiller } from "../foundation/random.ts";

/** One benchmarked problem. */
export interface AttentionShape {
  B: number;
  S: number;
  H: number;
  Hkv: number;
  hd: number;
}

/** The settings of a run, as parsed from the command line. */
export interface AttentionBenchConfig {
  shapes: AttentionShape[];
  dtypes: ("f32" | "f16")[];
  window: number | null;
  docsPerRow: number;
  passes: ("forward" | "backward")[];
  tiles: Partial<Record<AttentionKernel, AttentionTile>>;
  seconds: number;
  rounds: number;
  previous: boolean;
  matmul: boolean;
}

/** One timed figure. */
export interface AttentionResult {
  shape: AttentionShape;
  dtype: "f32" | "f16";
  pass: "forward" | "backward" | "matmul";
  /** `lathe`, `previous`, or `matmul n=…`. */
  kernel: string;
  /** Tiles used (per kernel), or the matmul's tile. */
  tiles: string;
  ms: number;
  gflops: number;
  /** GFLOP/s over the previous kernel's on the same pass, or null. */
  vsPrevious: number | null;
  /** GFLOP/s over the matmul reference's, or null. */
  vsMatmul: number | null;
}

/** Everything the benchmark measured, as written by `--json`. */
export interface AttentionBenchReport {
  benchmark: "attention";
  date: string;
  device: BenchDevice;
  deno: string;
  config: AttentionBenchConfig;
  flopModel: string;
  results: AttentionResult[];
}

const FLOP_MODEL = "A = Σ_rows Σ_docs pairs (S(S+1)/2 causal); forward 4·H·hd·A; backward 8·H·hd·A";

const usage: Usage = benchUsage("attention");

/** Parses `forward=64x32/8/4,dq=...` into tiles. */
export function parseTiles(text: string): Partial<Record<AttentionKernel, AttentionTile>> {
  const tiles: Partial<Record<AttentionKernel, AttentionTile>> = {};
  for (const item of text.split(",").map((s) => s.trim()).filter((s) => s !== "")) {
    const m = /^(forward|dq|dkdv)=(\d+)x(\d+)\/(\d+)(?:\/(\d+))?$/.exec(item);
    if (m === null) {
      usage(`--tiles item "${item}" is not KERNEL=BRxBC/TPR/RPT`, "e.g. --tiles forward=64x32/8/4");
    }
    tiles[m[1] as AttentionKernel] = {
      BR: Number(m[2]),
      BC: Number(m[3]),
      TPR: Number(m[4]),
      RPT: Number(m[5] ?? 1),
    };
  }
  return tiles;
}

/** Parses the command line; `gpu` supplies the defaults (shapes by adapter kind, f16 support). */
export function parseAttentionArgs(
  args: string[],
  gpu: Pick<Gpu, "f16" | "software">,
): { config: AttentionBenchConfig; json: string | null } {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        S: { type: "string" },
        H: { type: "string" },
        Hkv: { type: "string" },
        hd: { type: "string" },
        B: { type: "string" },
        dtypes: { type: "string" },
        window: { type: "string" },
        docs: { type: "string", default: "1" },
        passes: { type: "string", default: "forward,backward" },
        tiles: { type: "string", default: "" },
        seconds: { type: "string", default: "2" },
        rounds: { type: "string", default: "3" },
        "no-previous": { type: "boolean", default: false },
        "no-matmul": { type: "boolean", default: false },
        json: { type: "string" },
      },
      strict: true,
    }));
  } catch (error) {
    usage((error as Error).message);
  }
  const int = (key: "S" | "H" | "Hkv" | "hd" | "B" | "window" | "docs" | "rounds", raw: string) => {
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1) usage(`--${key} "${raw}" is not an integer ≥ 1`);
    return n;
  };
  const defaults: AttentionShape[] = gpu.software
    ? [{ B: 1, S: 256, H: 8, Hkv: 2, hd: 64 }, { B: 1, S: 256, H: 4, Hkv: 1, hd: 128 }]
    : [
      { B: 1, S: 2048, H: 32, Hkv: 8, hd: 128 },
      { B: 1, S: 4096, H: 32, Hkv: 8, hd: 128 },
      { B: 1, S: 2048, H: 14, Hkv: 2, hd: 64 },
    ];
  const seen = new Set<string>();
  const shapes: AttentionShape[] = [];
  for (const d of defaults) {
    const s = { ...d };
    for (const key of ["S", "H", "Hkv", "hd", "B"] as const) {
      if (values[key] !== undefined) s[key] = int(key, values[key]);
    }
    if (s.H % s.Hkv !== 0) usage(`H "${s.H}" is not a multiple of Hkv "${s.Hkv}"`);
    if (s.hd % 4 !== 0) usage(`hd "${s.hd}" is not a multiple of 4`);
    const key = JSON.stringify(s);
    if (!seen.has(key)) shapes.push(s);
    seen.add(key);
  }
  const dtypes = (values.dtypes ?? (gpu.f16 ? "f32,f16" : "f32")).split(",").map((d) => d.trim());
  for (const d of dtypes) {
    if (d !== "f32" && d !== "f16") usage(`--dtypes names "${d}"; f32 or f16 expected`);
    if (d === "f16" && !gpu.f16) usage("--dtypes f16 needs shader-f16, which this adapter lacks");
  }
  const passes = values.passes.split(",").map((p) => p.trim());
  for (const p of passes) {
    if (p !== "forward" && p !== "backward") usage(`--passes names "${p}"; forward or backward expected`);
  }
  const seconds = Number(values.seconds);
  if (!(seconds > 0)) usage(`--seconds "${values.seconds}" is not a positive number`);
  return {
    config: {
      shapes,
      dtypes: dtypes as ("f32" | "f16")[],
      window: values.window === undefined ? null : int("window", values.window),
      docsPerRow: int("docs", values.docs),
      passes: passes as ("forward" | "backward")[],
      tiles: parseTiles(values.tiles),
      seconds,
      rounds: int("rounds", values.rounds),
      previous: !values["no-previous"],
      matmul: !values["no-matmul"],
    },
    json: values.json ?? null,
  };
}

/** doc[T]: `n` documents per row at seeded random cut points (contiguous runs, as packing makes them). */
export function benchDocs(B: number, S: number, n: number, seed = 1): Uint32Array {
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32;
  const docs = new Uint32Array(B * S);
  let id = 0;
  for (let b = 0; b < B; b++) {
    const cuts = new Set<number>();
    while (cuts.size < Math.min(n, S) - 1) cuts.add(1 + Math.floor(next() * (S - 1)));
    for (let i = 0; i < S; i++) {
      if (cuts.has(i)) id++;
      docs[b * S + i] = id;
    }
    id++;
  }
  return docs;
}

/** A timed contender: runs `count` calls and waits for the last. */
interface Contender {
  pass: "forward" | "backward" | "matmul";
  kernel: string;
  tiles: string;
  flops: number;
  run: (count: number) => Promise<void>;
}

const tileText = (t: { BR: number; BC: number; TPR: number }) => `${t.BR}x${t.BC}/${t.TPR}`;

/** Calibrates each contender's count, then times `rounds` interleaved rounds; returns seconds per call. */
async function time(contenders: Contender[], seconds: number, rounds: number, progress: Progress) {
  const perRound = seconds / rounds;
  const counts = new Map<Contender, number>();
  for (const c of contenders) {
    await c.run(1); // compiles the pipelines
    let count = 1;
    for (;;) {
      const t0 = performance.now();
      await c.run(count);
      const t = (performance.now() - t0) / 1000;
      if (t >= perRound || count >= 1 << 16) break;
      count = Math.ceil(count * Math.min(8, Math.max(2, perRound / Math.max(t, 1e-4))));
    }
    counts.set(c, count);
  }
  const best = new Map<Contender, number>();
  for (let r = 0; r < rounds; r++) {
    for (const c of contenders) {
      const count = counts.get(c)!;
      const t0 = performance.now();
      await c.run(count);
      best.set(c, Math.min(best.get(c) ?? Infinity, (performance.now() - t0) / 1000 / count));
      progress.tick(1, `${c.pass} ${c.kernel}`);
    }
  }
  return best;
}

/** Runs the benchmark with command-line style arguments; prints a table; returns the figures. */
export async function run(args: string[]): Promise<AttentionBenchReport> {
  const gpu = await getGpu();
  const { config: cfg, json } = parseAttentionArgs(args, gpu);
  console.log(
    `attention benchmark on ${gpu.info.description} (${gpu.info.backend}${gpu.software ? ", CPU" : ""}): ` +
      `window ${cfg.window ?? "none"}, ${cfg.docsPerRow} doc(s)/row, best of ${cfg.rounds} rounds ` +
      `of ~${(cfg.seconds / cfg.rounds).toFixed(2)} s per contender`,
  );
  const rec = recorder(gpu);
  const results: AttentionResult[] = [];
  const perCase = cfg.passes.length * (cfg.previous ? 2 : 1) + (cfg.matmul ? 1 : 0);
  const progress = new Progress(
    "attention",
    cfg.shapes.length * cfg.dtypes.length * perCase * cfg.rounds,
    "runs",
  );
  for (const shape of cfg.shapes) {
    const { B, S, H, Hkv, hd } = shape;
    const T = B * S;
    const docIds = cfg.docsPerRow > 1 ? benchDocs(B, S, cfg.docsPerRow) : null;
    const pairs = attentionPairs({ rows: B, seqLen: S, docs: docIds ?? new Uint32Array(T) }, cfg.window);
    const flops = { forward: 4 * H * hd * pairs, backward: 8 * H * hd * pairs };
    for (const dtype of cfg.dtypes) {
      const made: Tensor[] = [];
      const tensor = (data: Float32Array | null, shape: number[], dt: "f32" | "f16", label: string) => {
        const t = data === null
          ? Tensor.empty(gpu, shape, dt, { label })
          : Tensor.from(gpu, data, shape, dt, { label });
        made.push(t);
        return t;
      };
      try {
        const q = tensor(uniformFiller(T * H * hd, 1), [T, H, hd], dtype, "bench_q");
        const k = tensor(uniformFiller(T * Hkv * hd, 2), [T, Hkv, hd], dtype, "bench_k");
        const v = tensor(uniformFiller(T * Hkv * hd, 3), [T, Hkv, hd], dtype, "bench_v");
        // dout is f32 whatever the inputs, as training's gradient from o_proj is.
        const dout = tensor(uniformFiller(T * H * hd, 4), [T, H, hd], "f32", "bench_dout");
        const docs = docIds === null ? null : Tensor.from(gpu, docIds, [T], "u32", { label: "bench_docs" });
        if (docs !== null) made.push(docs);
        const out = tensor(null, [T, H, hd], dtype, "bench_out");
        const lse = tensor(null, [T, H], "f32", "bench_lse");
        const dq = tensor(null, [T, H, hd], "f32", "bench_dq");
        const dk = tensor(null, [T, Hkv, hd], "f32", "bench_dk");
        const dv = tensor(null, [T, Hkv, hd], "f32", "bench_dv");
        const mask = { S, window: cfg.window, docs };
        const opts = { ...mask, tiles: cfg.tiles };
        attentionForward(q, k, v, { ...opts, out, lse }); // the backward's out and lse
        const floats = { q: dtype, k: dtype, v: dtype, dout: "f32" as const };
        const ours = (kind: AttentionKernel) =>
          attentionTileName(cfg.tiles[kind] ?? chooseAttentionTile(gpu, kind, hd, { floats }));
        const theirs = (kind: AttentionKernel) => tileText(previousTile(gpu, kind, hd));
        const loop = (f: () => void) => async (count: number) => {
          for (let i = 0; i < count; i++) f();
          await rec.sync();
        };
        const contenders: Contender[] = [];
        if (cfg.passes.includes("forward")) {
          contenders.push({
            pass: "forward",
            kernel: "lathe",
            tiles: ours("forward"),
            flops: flops.forward,
            run: loop(() => attentionForward(q, k, v, { ...opts, out, lse })),
          });
          if (cfg.previous) {
            const o2 = tensor(null, [T, H, hd], dtype, "bench_out_previous");
            const l2 = tensor(null, [T, H], "f32", "bench_lse_previous");
            contenders.push({
              pass: "forward",
              kernel: "previous",
              tiles: theirs("forward"),
              flops: flops.forward,
              run: loop(() => previousForward(q, k, v, o2, l2, mask)),
            });
          }
        }
        if (cfg.passes.includes("backward")) {
          contenders.push({
            pass: "backward",
            kernel: "lathe",
            tiles: `dq ${ours("dq")}, dkdv ${ours("dkdv")}`,
            flops: flops.backward,
            run: loop(() => attentionBackward(dout, q, k, v, out, lse, { ...opts, dq, dk, dv })),
          });
          if (cfg.previous) {
            contenders.push({
              pass: "backward",
              kernel: "previous",
              tiles: `dq ${theirs("dq")}, dkdv ${theirs("dkdv")}`,
              flops: flops.backward,
              run: loop(() => previousBackward(dout, q, k, v, out, lse, { dq, dk, dv }, mask)),
            });
          }
        }
        if (cfg.matmul) {
          // 2n³ ≈ the forward's FLOPs, n a multiple of 64 (at least 64).
          const n = Math.max(64, Math.round(Math.cbrt(flops.forward / 2) / 64) * 64);
          const a = tensor(uniformFiller(n * n, 5), [n, n], dtype, "bench_a");
          const b = tensor(uniformFiller(n * n, 6), [n, n], dtype, "bench_b");
          const c = tensor(null, [n, n], dtype, "bench_c");
          const choice = matmulChoice(gpu, { layout: "NT", a: dtype, b: dtype, M: n, N: n, K: n });
          contenders.push({
            pass: "matmul",
            kernel: `matmul n=${n}`,
            tiles: configName(choice.config),
            flops: 2 * n ** 3,
            run: loop(() => matmul(a, b, { layout: "NT", out: c })),
          });
        }
        const best = await time(contenders, cfg.seconds, cfg.rounds, progress);
        const gflops = (c: Contender) => c.flops / best.get(c)! / 1e9;
        const mm = contenders.find((c) => c.pass === "matmul");
        for (const c of contenders) {
          const prev = contenders.find((x) => x.pass === c.pass && x.kernel === "previous");
          results.push({
            shape,
            dtype,
            pass: c.pass,
            kernel: c.kernel,
            tiles: c.tiles,
            ms: best.get(c)! * 1000,
            gflops: gflops(c),
            vsPrevious: prev && c.pass !== "matmul" ? gflops(c) / gflops(prev) : null,
            vsMatmul: mm && c.pass !== "matmul" ? gflops(c) / gflops(mm) : null,
          });
        }
      } finally {
        await rec.sync();
        for (const t of made) t.destroy();
      }
    }
  }
  progress.done();
  const report: AttentionBenchReport = {
    benchmark: "attention",
    date: new Date().toISOString(),
    device: {
      description: gpu.info.description,
      backend: gpu.info.backend,
      features: gpu.info.features,
      software: gpu.software,
    },
    deno: Deno.version.deno,
    config: cfg,
    flopModel: FLOP_MODEL,
    results,
  };
  printReport(report);
  if (json !== null) {
    await writeJsonAtomic(json, report);
    console.log(`\nwrote ${json}`);
  }
  return report;
}

function printReport(report: AttentionBenchReport): void {
  const ratio = (x: number | null) => x === null ? "-" : `${x.toFixed(2)}x`;
  const rows = report.results.map((r) => [
    `B${r.shape.B} S${r.shape.S} H${r.shape.H}/${r.shape.Hkv} hd${r.shape.hd}`,
    r.dtype,
    r.pass,
    r.kernel,
    r.tiles,
    r.ms.toFixed(2),
    r.gflops.toFixed(2),
    ratio(r.vsPrevious),
    ratio(r.vsMatmul),
  ]);
  console.log();
  printTable(
    ["shape", "dtype", "pass", "kernel", "tiles", "ms", "GFLOP/s", "vs previous", "vs matmul"],
    rows,
    5,
  );
  const lathe = report.results.filter((r) => r.kernel === "lathe" && r.vsPrevious !== null);
  if (lathe.length > 0) {
    console.log(
      `\nlathe / previous: ${
        lathe.map((r) => `${r.pass} S${r.shape.S} hd${r.shape.hd} ${r.dtype} ${ratio(r.vsPrevious)}`).join(
          ", ",
        )
      }`,
    );
  }
  console.log(`FLOP model: ${report.flopModel}`);
}

/** Prints a table: the first `left` columns left-aligned, the others right-aligned. */
function printTable(header: string[], rows: string[][], left = 1): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i < left ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  console.log(line(header));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of rows) console.log(line(r));
}

if (import.meta.main) {
  await runMain(async () => {
    await run(Deno.args);
  });
}
