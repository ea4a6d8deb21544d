/**
 * LoRA benchmark: the forward and the backward of a LoRA linear layer (kernels/ops/lora.ts) with
 * the adapter's term inside the projection's matmul (`fuse: true`, the matmul's `lowRank` term)
 * against the same layer with the term as its own matmul accumulating into y or dx (`fuse: false`),
 * in the same process on the same adapter. The ratio is unfused time / fused time (> 1: fusing
 * pays).
 *
 * ```
 * deno task bench lora [-- options]          or   deno run -A bench/lora.ts [options]
 *   --shapes T:K:N:r,...   tokens, in features, out features, rank (defaults below)
 *   --dtypes f32,f16       dtype of x, W and y (default both, f16 where shader-f16 exists); dx is f32
 *   --dropout 0,0.05       LoRA dropout values (default 0; with dropout the backward never fuses:
 *                          both contenders then run the same backward, a check on the noise)
 *   --seconds 4 --rounds 15  time per (case, pass) over all contenders, and rounds
 *   --json FILE            also write the figures as JSON (device, date, config, results)
 * ```
 *
 * Default shapes: on CPU adapters the projections of the tiny Llamas at 4×256 tokens (nano: D 64,
 * kv 32, F 128; micro: D 128, F 256; r 8) and one wider layer (T 256, K = N = 512, r 16); on GPUs
 * Llama/Mistral-7B projections at T 2048, r 16 (q/o 4096→4096, k/v 4096→1024, gate/up 4096→14336,
 * down 14336→4096) and one token-poor case (T 16, 4096→4096, where split-K runs).
 *
 * A forward is `loraForward` into a given y; a backward is `loraBackward` into given dx, dA, dB,
 * from a saved xa. Each round runs every contender (in a rotating order) for as many calls as fill
 * its share of `seconds`, then waits for the GPU; times are medians over rounds, and ratios and
 * differences are taken within a round before the median, so load from other processes, which
 * shifts neighbouring figures alike, largely cancels. The dispatch counts are per call; `rel
 * diff` is max |fused − unfused| / max |unfused| of y or dx (the order of the sum differs in the
 * last bits; an f16 y is rounded once fused, twice unfused).
 *
 * What fusing trades, timed alongside: `term pass`, the term's own matmul accumulating into y
 * (xa·Bᵀ) or dx (dxa·A), a dispatch and a read and write of y or dx that fusing removes; and
 * `term inside`, the projection's matmul with the term minus the same matmul without it, the
 * work fusing adds to it. Fusing pays where term inside < term pass.
 * @module
 */
import { type BenchDevice, benchDevice, benchUsage, type Usage } from "./_common.ts";
import { parseArgs } from "node:util";
import { getGpu, type Gpu } from "../kernels/device.ts";
import { loraBackward, loraForward, loraScaling, type LoraWeights } from "../kernels/ops/lora.ts";
import { matmul } from "../kernels/ops/matmul.ts";
import { recorder } from "../kernels/recorder.ts";
import { Tensor } from "../kernels/tensor.ts";
import { writeJsonAtomic } from "../foundation/atomic.ts";
import { runMain } from "../foundation/errors.ts";
import { uniformFiller } from "../foundation/random.ts";

/** One layer shape: y[T,N] = x[T,K]·W[N,K]ᵀ + s·(x·A[r,K]ᵀ)·B[N,r]ᵀ. */
export interface LoraShape {
  T: number;
  K: number;
  N: number;
  r: number;
}

/** The settings of a run, as parsed from the command line. */
export interface LoraBenchConfig {
  shapes: LoraShape[];
  dtypes: ("f32" | "f16")[];
  dropouts: number[];
  seconds: number;
  rounds: number;
}

/** The figures of one (shape, dtype, dropout, pass). */
export interface LoraResult {
  shape: LoraShape;
  dtype: "f32" | "f16";
  dropout: number;
  pass: "forward" | "backward";
  unfusedMs: number;
  fusedMs: number;
  /** Median over rounds of unfused / fused time in the same round. */
  ratio: number;
  /** The projection's matmul alone, without the term (x·Wᵀ or dy·W). */
  projectionMs: number;
  /** The term's own matmul accumulating into y or dx (what fusing removes). */
  termMs: number;
  /**
   * Median over rounds of the projection's matmul with the term inside minus the same matmul
   * without it, in the same round (what fusing adds).
   */
  termInsideMs: number;
  dispatches: { unfused: number; fused: number };
  /** max |fused − unfused| / max |unfused| of y (forward) or dx (backward). */
  relDiff: number;
}

/** Everything the benchmark measured, as written by `--json`. */
export interface LoraBenchReport {
  benchmark: "lora";
  date: string;
  device: BenchDevice;
  deno: string;
  config: LoraBenchConfig;
  results: LoraResult[];
}

const usage: Usage = benchUsage("lora");

/** The default shapes for an adapter kind (see the module documentation). */
export function defaultLoraShapes(software: boolean): LoraShape[] {
  if (software) {
    return [
      { T: 1024, K: 64, N: 64, r: 8 },
      { T: 1024, K: 64, N: 32, r: 8 },
      { T: 1024, K: 64, N: 128, r: 8 },
      { T: 1024, K: 128, N: 64, r: 8 },
      { T: 1024, K: 128, N: 128, r: 8 },
      { T: 1024, K: 128, N: 256, r: 8 },
      { T: 256, K: 512, N: 512, r: 16 },
    ];
  }
  return [
    { T: 2048, K: 4096, N: 4096, r: 16 },
    { T: 2048, K: 4096, N: 1024, r: 16 },
    { T: 2048, K: 4096, N: 14336, r: 16 },
    { T: 2048, K: 14336, N: 4096, r: 16 },
    { T: 16, K: 4096, N: 4096, r: 16 },
  ];
}

/** Parses the command line; `gpu` supplies the defaults (shapes by adapter kind, f16 support). */
export function parseLoraArgs(
  args: string[],
  gpu: Pick<Gpu, "f16" | "software">,
): { config: LoraBenchConfig; json: string | null } {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        shapes: { type: "string" },
        dtypes: { type: "string" },
        dropout: { type: "string", default: "0" },
        seconds: { type: "string", default: "4" },
        rounds: { type: "string", default: "15" },
        json: { type: "string" },
      },
      strict: true,
    }));
  } catch (error) {
    usage((error as Error).message);
  }
  const shapes = values.shapes === undefined ? defaultLoraShapes(gpu.software) : values.shapes.split(",").map(
    (item) => {
      const parts = item.trim().split(":").map(Number);
      if (parts.length !== 4 || !parts.every((n) => Number.isInteger(n) && n >= 1)) {
        usage(
          `--shapes item "${item}" is not T:K:N:r with positive integers`,
          "e.g. --shapes 2048:4096:4096:16",
        );
      }
      const [T, K, N, r] = parts;
      return { T, K, N, r };
    },
  );
  const dtypes = (values.dtypes ?? (gpu.f16 ? "f32,f16" : "f32")).split(",").map((d) => d.trim());
  for (const d of dtypes) {
    if (d !== "f32" && d !== "f16") usage(`--dtypes names "${d}"; f32 or f16 expected`);
    if (d === "f16" && !gpu.f16) usage("--dtypes f16 needs shader-f16, which this adapter lacks");
  }
  const dropouts = values.dropout.split(",").map((p) => Number(p.trim()));
  for (const p of dropouts) if (!(p >= 0 && p < 1)) usage(`--dropout "${p}" is not in [0, 1)`);
  const seconds = Number(values.seconds);
  if (!(seconds > 0)) usage(`--seconds "${values.seconds}" is not a positive number`);
  const rounds = Number(values.rounds);
  if (!Number.isInteger(rounds) || rounds < 1) usage(`--rounds "${values.rounds}" is not an integer ≥ 1`);
  return {
    config: { shapes, dtypes: dtypes as ("f32" | "f16")[], dropouts, seconds, rounds },
    json: values.json ?? null,
  };
}

/** The tensors of one layer, with the saved xa its backward starts from. */
interface Layer {
  x: Tensor;
  W: Tensor;
  lora: LoraWeights;
  y: Tensor;
  dy: Tensor;
  xa: Tensor;
  /** dxa[T,r] = s·dy·B, as the backward computes it. */
  dxa: Tensor;
  dx: Tensor;
  dA: Tensor;
  dB: Tensor;
  dispose: () => void;
}

function makeLayer(gpu: Gpu, s: LoraShape, dtype: "f32" | "f16", p: number): Layer {
  const x = Tensor.from(gpu, uniformFiller(s.T * s.K, 1), [s.T, s.K], dtype, { label: "bench_x" });
  const W = Tensor.from(gpu, uniformFiller(s.N * s.K, 2, 0.05), [s.N, s.K], dtype, { label: "bench_W" });
  const A = Tensor.from(gpu, uniformFiller(s.r * s.K, 3, 0.05), [s.r, s.K], "f32", { label: "bench_A" });
  // B is random (PEFT starts it at zero) so the term is not all zeros.
  const B = Tensor.from(gpu, uniformFiller(s.N * s.r, 4, 0.05), [s.N, s.r], "f32", { label: "bench_B" });
  const dy = Tensor.from(gpu, uniformFiller(s.T * s.N, 5), [s.T, s.N], "f32", { label: "bench_dy" });
  const lora: LoraWeights = { A, B, scaling: loraScaling(2 * s.r, s.r), dropout: p, seed: 12345 };
  const y = Tensor.empty(gpu, [s.T, s.N], dtype, { label: "bench_y" });
  const { xa } = loraForward(x, W, lora, { out: y, fuse: false });
  const dxa = matmul(dy, B, { layout: "NN", alpha: lora.scaling, label: "bench_dxa" });
  const dx = Tensor.empty(gpu, [s.T, s.K], "f32", { label: "bench_dx" });
  const dA = Tensor.zeros(gpu, [s.r, s.K], "f32", { label: "bench_dA" });
  const dB = Tensor.zeros(gpu, [s.N, s.r], "f32", { label: "bench_dB" });
  const all = [x, W, A, B, dy, y, xa, dxa, dx, dA, dB];
  return { x, W, lora, y, dy, xa, dxa, dx, dA, dB, dispose: () => all.forEach((t) => t.destroy()) };
}

function forward(l: Layer, fuse: boolean): void {
  loraForward(l.x, l.W, l.lora, { out: l.y, fuse }).xa.destroy();
}

function backward(l: Layer, fuse: boolean): void {
  loraBackward(l.dy, l.x, l.W, l.lora, l.xa, { dx: l.dx, dA: l.dA, dB: l.dB, fuse });
}

/** max |a − b| / max |b|. */
function relDiff(a: Float32Array, b: Float32Array): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return scale === 0 ? diff : diff / scale;
}

/**
 * Times contenders (each records one call) in `rounds` short rounds, all contenders in each round
 * in a rotating order, so that neighbours in time share the load of other processes. Returns
 * per contender the median seconds per call, and per round its seconds per call (for ratios
 * taken round by round).
 */
export async function timeAll(gpu: Gpu, contenders: (() => void)[], seconds: number, rounds: number) {
  const rec = recorder(gpu);
  const calls = async (run: () => void, count: number) => {
    const t0 = performance.now();
    for (let i = 0; i < count; i++) run();
    await rec.sync();
    return (performance.now() - t0) / 1000 / count;
  };
  const perRound = seconds / rounds / contenders.length;
  const counts: number[] = [];
  for (const run of contenders) {
    // Warm-up (compiles pipelines), then grow the count until one round fills its share.
    await calls(run, 1);
    let count = 1;
    for (;;) {
      const t = (await calls(run, count)) * count;
      if (t >= perRound || count >= 1 << 16) break;
      count = Math.ceil(count * Math.min(8, Math.max(2, perRound / Math.max(t, 1e-4))));
    }
    counts.push(count);
  }
  const perCall: number[][] = contenders.map(() => []);
  for (let r = 0; r < rounds; r++) {
    for (let j = 0; j < contenders.length; j++) {
      const i = (j + r) % contenders.length;
      perCall[i].push(await calls(contenders[i], counts[i]));
    }
  }
  return { median: perCall.map(median), perCall };
}

/** The median of `values`. */
export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/**
 * The parts of a pass that fusing changes: the projection's matmul alone (x·Wᵀ, or dy·W), the
 * same matmul with the term inside, and the term's own matmul accumulating into y or dx.
 */
function parts(
  l: Layer,
  pass: "forward" | "backward",
): { plain: () => void; fused: () => void; term: () => void } {
  if (pass === "forward") {
    const lowRank = { a: l.xa, b: l.lora.B, scale: l.lora.scaling };
    return {
      plain: () => matmul(l.x, l.W, { layout: "NT", out: l.y }),
      fused: () => matmul(l.x, l.W, { layout: "NT", out: l.y, lowRank }),
      term: () => matmul(l.xa, l.lora.B, { layout: "NT", alpha: l.lora.scaling, out: l.y, accumulate: true }),
    };
  }
  const lowRank = { a: l.dxa, b: l.lora.A, scale: 1 };
  return {
    plain: () => matmul(l.dy, l.W, { layout: "NN", out: l.dx }),
    fused: () => matmul(l.dy, l.W, { layout: "NN", out: l.dx, lowRank }),
    term: () => matmul(l.dxa, l.lora.A, { layout: "NN", out: l.dx, accumulate: true }),
  };
}

/** Dispatches one call records. */
function dispatchesOf(gpu: Gpu, run: () => void): number {
  const rec = recorder(gpu);
  const before = rec.dispatchCount;
  run();
  return rec.dispatchCount - before;
}

/** Runs the benchmark with command-line style arguments; prints a table to stdout. */
export async function run(args: string[]): Promise<LoraBenchReport> {
  const gpu = await getGpu();
  const { config, json } = parseLoraArgs(args, gpu);
  console.log(
    `adapter: ${gpu.info.description} (${gpu.info.backend}${gpu.software ? ", CPU" : ""}); ` +
      `features: ${gpu.info.features.join(", ") || "none"}`,
  );
  console.log(
    `medians of ${config.rounds} rounds, ~${config.seconds}s per case and pass; ` +
      "ratio = unfused / fused time\n",
  );
  const results: LoraResult[] = [];
  for (const shape of config.shapes) {
    for (const dtype of config.dtypes) {
      for (const p of config.dropouts) {
        const layer = makeLayer(gpu, shape, dtype, p);
        try {
          for (const pass of ["forward", "backward"] as const) {
            const call = (fuse: boolean) => pass === "forward" ? forward(layer, fuse) : backward(layer, fuse);
            const out = pass === "forward" ? layer.y : layer.dx;
            call(false);
            const unfusedOut = await out.readF32();
            call(true);
            const fusedOut = await out.readF32();
            const dispatches = {
              unfused: dispatchesOf(gpu, () => call(false)),
              fused: dispatchesOf(gpu, () => call(true)),
            };
            const part = parts(layer, pass);
            const timed = await timeAll(
              gpu,
              [() => call(false), () => call(true), part.plain, part.fused, part.term],
              config.seconds,
              config.rounds,
            );
            const [unfused, fused, plain, , term] = timed.median;
            const [u, f, pl, pf] = timed.perCall;
            const result: LoraResult = {
              shape,
              dtype,
              dropout: p,
              pass,
              unfusedMs: unfused * 1000,
              fusedMs: fused * 1000,
              ratio: median(u.map((x, i) => x / f[i])),
              projectionMs: plain * 1000,
              termMs: term * 1000,
              termInsideMs: median(pl.map((x, i) => pf[i] - x)) * 1000,
              dispatches,
              relDiff: relDiff(fusedOut, unfusedOut),
            };
            results.push(result);
            console.error(`  ${describe(result)}`);
          }
        } finally {
          layer.dispose();
        }
      }
    }
  }
  console.log();
  printTable(
    [
      "T×K→N, r",
      "dtype",
      "p",
      "pass",
      "unfused ms",
      "fused ms",
      "ratio",
      "x·Wᵀ|dy·W ms",
      "term pass ms",
      "term inside ms",
      "dispatches",
      "rel diff",
    ],
    results.map((r) => [
      `${r.shape.T}×${r.shape.K}→${r.shape.N}, ${r.shape.r}`,
      r.dtype,
      String(r.dropout),
      r.pass,
      r.unfusedMs.toFixed(3),
      r.fusedMs.toFixed(3),
      `${r.ratio.toFixed(2)}x`,
      r.projectionMs.toFixed(3),
      r.termMs.toFixed(3),
      r.termInsideMs.toFixed(3),
      `${r.dispatches.unfused}→${r.dispatches.fused}`,
      r.relDiff.toExponential(1),
    ]),
    4,
  );
  const report: LoraBenchReport = {
    benchmark: "lora",
    date: new Date().toISOString(),
    device: benchDevice(gpu),
    deno: Deno.version.deno,
    config,
    results,
  };
  if (json !== null) {
    await writeJsonAtomic(json, report);
    console.log(`\nwritten: ${json}`);
  }
  return report;
}

function describe(r: LoraResult): string {
  const s = r.shape;
  return `${s.T}×${s.K}→${s.N} r ${s.r} ${r.dtype} p ${r.dropout} ${r.pass}: unfused ${
    r.unfusedMs.toFixed(3)
  } ms, ` +
    `fused ${r.fusedMs.toFixed(3)} ms (${r.ratio.toFixed(2)}x)`;
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

if (import.meta.main) await runMain(async () => void await run(Deno.args));
