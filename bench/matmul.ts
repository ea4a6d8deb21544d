/**
 * Matmul benchmark: GFLOP/s of lathe's matmul in the linear layer's layout (NT: x[n,n]·W[n,n]ᵀ)
 * against the naive kernel and TensorFlow.js's WebGPU backend (`tf.matMul(a, b, false, true)`)
 * in the same process, on the same adapter.
 *
 * ```
 * deno run -A bench/matmul.ts [--sizes 256,512,1024] [--dtypes f32,f16] [--seconds 2] [--rounds 3]
 *                             [--naive-max 512] [--no-tfjs] [--peak 66.9]
 * ```
 * lathe's contender runs the tile `matmul` would choose: the adapter's tuning table's where it has
 * one (shown as `(tuned)`, with the heuristic's tile beside it), else the heuristic's.
 * `--tune` (or `deno task bench tune`) runs the tile tuner instead: see {@link tune}.
 *
 * Defaults: sizes 256,512,1024 on CPU adapters (add 2048 with --sizes), 256..4096 on GPUs;
 * `LATHE_PEAK_TFLOPS` (or --peak) adds each result's fraction of that peak. Each figure is the
 * best of `rounds` timed rounds, each round running as many products as fill its share of
 * `seconds`, then waiting for the GPU; kernels are interleaved round by round, so load from
 * other processes hits them alike. The ratio column is lathe's f32 kernel over TF.js (target ≥ 2).
 * @module
 */
import { parseArgs } from "node:util";
import { getGpu, type Gpu } from "../kernels/device.ts";
import {
  chooseConfig,
  configName,
  matmul,
  MATMUL_TILES,
  matmulChoice,
  type MatmulConfig,
  type MatmulLayout,
  matmulNaive,
} from "../kernels/ops/matmul.ts";
import { adapterIdentity } from "../kernels/ops/matmul_table.ts";
import {
  defaultTuneShapes,
  describeShape,
  tuneMatmul,
  type TuneMeasurement,
  type TuneShape,
} from "../kernels/ops/matmul_tune.ts";
import { LatheError } from "../foundation/errors.ts";
import { recorder } from "../kernels/recorder.ts";
import { memoryStats, resetPeakMemory, Tensor } from "../kernels/tensor.ts";
import { runMain } from "../foundation/errors.ts";
import { uniformFiller } from "../foundation/random.ts";

/** One timed contender: runs `count` products and waits for the last. */
interface Contender {
  name: string;
  /** lathe's default kernel for this size: the one the ratio line reports. */
  primary: boolean;
  dtype: "f32" | "f16";
  run: (count: number) => Promise<void>;
  dispose: () => void;
}

/** Runs the benchmark with command-line style arguments; prints a table to stdout. */
export async function run(args: string[]): Promise<void> {
  if (args.includes("--tune")) return await tune(args.filter((a) => a !== "--tune"));
  const { values } = parseArgs({
    args,
    options: {
      sizes: { type: "string" },
      dtypes: { type: "string", default: "f32,f16" },
      seconds: { type: "string", default: "2" },
      rounds: { type: "string", default: "3" },
      "naive-max": { type: "string" },
      "no-tfjs": { type: "boolean", default: false },
      peak: { type: "string" },
    },
    strict: true,
  });
  const gpu = await getGpu();
  const sizes = (values.sizes ?? (gpu.software ? "256,512,1024" : "256,512,1024,2048,4096")).split(",").map(
    Number,
  );
  const dtypes = values.dtypes.split(",").filter((d) =>
    d === "f32" || (d === "f16" && gpu.f16)
  ) as ("f32" | "f16")[];
  const seconds = Number(values.seconds);
  const rounds = Number(values.rounds);
  const naiveMax = Number(values["naive-max"] ?? (gpu.software ? 512 : 4096));
  const peak = Number(values.peak ?? Deno.env.get("LATHE_PEAK_TFLOPS") ?? 0);
  const tf = values["no-tfjs"] ? null : await loadTfjs();

  console.log(
    `adapter: ${gpu.info.description} (${gpu.info.backend}${gpu.software ? ", CPU" : ""}); ` +
      `features: ${gpu.info.features.join(", ") || "none"}`,
  );
  if (typeof tf === "string") console.log(`tfjs: unavailable (${tf})`);
  console.log(`best of ${rounds} rounds, ~${seconds}s per size and contender; C[n,n] = A[n,n]·B[n,n]ᵀ\n`);
  const header = [
    "n",
    "kernel",
    "dtype",
    "ms",
    "GFLOP/s",
    "vs naive",
    "vs tfjs",
    ...(peak > 0 ? ["% peak"] : []),
  ];
  const rows: string[][] = [];
  const ratios: string[] = [];
  for (const n of sizes) {
    const contenders: Contender[] = [];
    const defaultConfig = chooseConfig(gpu, n, n);
    for (const dtype of dtypes) {
      // lathe's own choice (the tuning table's tile where one exists), and the heuristic's beside it.
      const choice = matmulChoice(gpu, { layout: "NT", a: dtype, b: dtype, M: n, N: n, K: n });
      contenders.push(ours(gpu, n, dtype, choice.config, true, choice.source === "tuned" ? "tuned" : ""));
      if (choice.source === "tuned" && configName(choice.config) !== configName(defaultConfig)) {
        contenders.push(ours(gpu, n, dtype, defaultConfig, false, "heuristic"));
      }
    }
    if (defaultConfig.kind !== "tiled") {
      contenders.push(ours(gpu, n, "f32", { kind: "tiled", tile: MATMUL_TILES.gpu64 }, false));
    }
    if (n <= naiveMax) contenders.push(ours(gpu, n, "f32", null, false));
    if (tf !== null && typeof tf !== "string") contenders.push(tfjs(tf, n));
    const flops = 2 * n ** 3;
    const best = new Map<Contender, number>();
    const counts = new Map<Contender, number>();
    for (const c of contenders) {
      // Warm-up (compiles pipelines), then double the count until one round fills its share of
      // the time: a round ends with one readback, whose fixed latency (~10 ms in Deno, which
      // polls the device) must be small against the round.
      await c.run(1);
      const perRound = seconds / rounds;
      let count = 1;
      for (;;) {
        const t0 = performance.now();
        await c.run(count);
        const t = (performance.now() - t0) / 1000;
        if (t >= perRound || count >= 1 << 20) break;
        count = Math.ceil(count * Math.min(8, Math.max(2, perRound / Math.max(t, 1e-4))));
      }
      counts.set(c, count);
    }
    resetPeakMemory(gpu);
    for (let r = 0; r < rounds; r++) {
      for (const c of contenders) {
        const count = counts.get(c)!;
        const t0 = performance.now();
        await c.run(count);
        const perCall = (performance.now() - t0) / 1000 / count;
        best.set(c, Math.min(best.get(c) ?? Infinity, perCall));
      }
    }
    const gflops = (c: Contender | undefined) => c === undefined ? NaN : flops / best.get(c)! / 1e9;
    const naive = contenders.find((c) => c.name === "matmul_naive");
    // The ratio columns compare like with like: f32 contenders only against f32 baselines.
    const ref = contenders.find((c) => c.name === "tfjs");
    for (const c of contenders) {
      const g = gflops(c);
      const row = [
        String(n),
        c.name,
        c.dtype,
        (best.get(c)! * 1000).toFixed(2),
        g.toFixed(2),
        naive ? `${(g / gflops(naive)).toFixed(2)}x` : "-",
        ref ? `${(g / gflops(ref)).toFixed(2)}x` : "-",
      ];
      if (peak > 0) row.push(`${(100 * g / (peak * 1000)).toFixed(1)}%`);
      rows.push(row);
      if (c.primary && c.dtype === "f32" && ref) ratios.push(`n=${n}: ${(g / gflops(ref)).toFixed(2)}x`);
    }
    console.log(
      `n=${n}: peak GPU memory of lathe's contenders ${
        (memoryStats(gpu).peakBytes / 2 ** 20).toFixed(1)
      } MiB`,
    );
    for (const c of contenders) c.dispose();
  }
  console.log();
  printTable(header, rows, 3);
  if (ratios.length > 0) console.log(`\nlathe matmul f32 / tfjs (target >= 2x): ${ratios.join(", ")}`);
}

/** lathe's matmul with a config, or the naive kernel (config null), on random data. */
function ours(
  gpu: Gpu,
  n: number,
  dtype: "f32" | "f16",
  config: MatmulConfig | null,
  primary: boolean,
  note = "",
): Contender {
  const a = Tensor.from(gpu, uniformFiller(n * n, 1), [n, n], dtype, { label: "bench_a" });
  const b = Tensor.from(gpu, uniformFiller(n * n, 2), [n, n], dtype, { label: "bench_b" });
  const out = Tensor.empty(gpu, [n, n], dtype, { label: "bench_c" });
  const rec = recorder(gpu);
  const name = config === null ? "matmul_naive" : `matmul ${configName(config)}${note ? ` (${note})` : ""}`;
  return {
    name,
    primary,
    dtype,
    run: async (count) => {
      for (let i = 0; i < count; i++) {
        if (config === null) matmulNaive(a, b, { layout: "NT", out });
        else matmul(a, b, { layout: "NT", out, config });
      }
      await rec.sync();
    },
    dispose: () => [a, b, out].forEach((t) => t.destroy()),
  };
}

/**
 * The tile tuner: times every candidate tile on each shape on this adapter, prints a table of
 * GFLOP/s (candidates × shapes, per layout and dtype, `*` on the tile chosen for the shape's
 * class) and the chosen tiles against the built-in heuristic, and writes the adapter's tuning
 * table, which `matmul` then uses. Progress goes to stderr.
 *
 * ```
 * deno task bench tune [--shapes NT:2048x4096x4096,NN:...] [--dtypes f32,f16] [--tokens 2048]
 *                      [--squares 256,512,1024,2048,4096] [--reps 5] [--warmup 2]
 *                      [--timer auto|timestamp|wall] [--exhaustive] [--keep 3] [--cache-dir DIR] [--no-save]
 * ```
 * Default shapes: the products of a Llama/Mistral-7B layer at `--tokens` (forward NT, dx NN,
 * dW TN) and the `--squares` in each layout, for f32 and (with shader-f16) f16.
 */
export async function tune(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      shapes: { type: "string" },
      dtypes: { type: "string" },
      tokens: { type: "string", default: "2048" },
      squares: { type: "string", default: "256,512,1024,2048,4096" },
      reps: { type: "string", default: "5" },
      warmup: { type: "string", default: "2" },
      timer: { type: "string", default: "auto" },
      exhaustive: { type: "boolean", default: false },
      keep: { type: "string", default: "3" },
      "cache-dir": { type: "string" },
      "no-save": { type: "boolean", default: false },
    },
    strict: true,
  });
  const gpu = await getGpu();
  const dtypes = (values.dtypes ?? (gpu.f16 ? "f32,f16" : "f32")).split(",").map((d) => d.trim());
  for (const d of dtypes) {
    if (d !== "f32" && d !== "f16") {
      throw new LatheError(`Cannot tune matmul: dtype "${d}" is not f32 or f16`, {
        hint: "--dtypes f32,f16",
      });
    }
    if (d === "f16" && !gpu.f16) {
      throw new LatheError("Cannot tune matmul in f16: this adapter has no shader-f16", {
        hint: "--dtypes f32",
      });
    }
  }
  const timer = values.timer;
  if (timer !== "auto" && timer !== "timestamp" && timer !== "wall") {
    throw new LatheError(`Cannot tune matmul: --timer "${timer}" is not auto, timestamp or wall`);
  }
  const shapes = values.shapes === undefined
    ? defaultTuneShapes(
      dtypes as ("f32" | "f16")[],
      positive(values.tokens, "--tokens"),
      values.squares.split(",").map((n) => positive(n, "--squares")),
    )
    : parseShapes(values.shapes, dtypes as ("f32" | "f16")[]);
  const adapter = adapterIdentity(gpu);
  console.log(
    `adapter: ${adapter.description} (${adapter.backend}; vendor ${adapter.vendor || "?"}, ` +
      `architecture ${adapter.architecture || "?"}, driver ${adapter.driver})`,
  );
  console.log(
    `tuning ${shapes.length} shapes, timer ${
      timer === "auto" ? (gpu.timestamps ? "timestamp" : "wall") : timer
    }, ` +
      `${values.exhaustive ? "every candidate" : "staged search"}\n`,
  );
  const result = await tuneMatmul(gpu, shapes, {
    search: values.exhaustive ? "exhaustive" : "staged",
    keep: positive(values.keep, "--keep"),
    reps: positive(values.reps, "--reps"),
    warmup: Number(values.warmup),
    timer,
    cacheDir: values["cache-dir"],
    save: !values["no-save"],
  });
  printTuning(result.measurements, result.entries);
  console.log(`\ntimer: ${result.timer}`);
  if (result.path !== null) console.log(`table written: ${result.path}`);
}

function positive(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) {
    throw new LatheError(`Cannot tune matmul: ${flag} "${text}" is not a positive integer`);
  }
  return n;
}

/** `NT:2048x4096x4096,TN:4096x4096x2048` (layout:MxNxK), once per dtype. */
function parseShapes(text: string, dtypes: ("f32" | "f16")[]): TuneShape[] {
  const shapes: TuneShape[] = [];
  for (const item of text.split(",").map((s) => s.trim()).filter((s) => s !== "")) {
    const m = /^(NN|NT|TN):(\d+)x(\d+)x(\d+)$/i.exec(item);
    if (m === null) {
      throw new LatheError(`Cannot tune matmul: shape "${item}" is not LAYOUT:MxNxK`, {
        hint: "e.g. --shapes NT:2048x4096x4096,NN:2048x4096x14336",
      });
    }
    const [M, N, K] = [m[2], m[3], m[4]].map((x) => positive(x, "--shapes"));
    for (const dtype of dtypes) shapes.push({ layout: m[1].toUpperCase() as MatmulLayout, dtype, M, N, K });
  }
  return shapes;
}

/** Three significant digits: 0.123, 12.3, 12345. */
function gflopsText(g: number): string {
  return g < 1 ? g.toFixed(3) : g < 100 ? g.toPrecision(3) : g.toFixed(0);
}

/** Prints GFLOP/s of candidates × shapes per layout and dtype, then the chosen tiles. */
function printTuning(
  measurements: readonly TuneMeasurement[],
  entries: Record<string, { config: MatmulConfig; gflops: number; heuristicGflops: number | null }>,
): void {
  const groups = new Map<string, TuneMeasurement[]>();
  for (const m of measurements) {
    const g = `${m.shape.layout} ${m.shape.dtype}`;
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g)!.push(m);
  }
  for (const [group, ms] of groups) {
    const shapes = [...new Set(ms.map((m) => m.shape))];
    const configs = [...new Set(ms.map((m) => configName(m.config)))];
    const cell = (config: string, s: TuneShape) => {
      const m = ms.find((x) => x.shape === s && configName(x.config) === config);
      if (m === undefined) return "";
      if (m.gflops === null) return "fail";
      const chosen = configName(entries[m.key]?.config ?? m.config) === config &&
        entries[m.key] !== undefined;
      return `${gflopsText(m.gflops)}${chosen ? "*" : ""}`;
    };
    const best = (config: string) =>
      Math.max(0, ...ms.filter((m) => configName(m.config) === config).map((m) => m.gflops ?? 0));
    configs.sort((x, y) => best(y) - best(x));
    console.log(
      `\n${group}: GFLOP/s per candidate (rows) and shape (columns, M×N×K); * = chosen for its class`,
    );
    const header = ["candidate", ...shapes.map((s) => `${s.M}×${s.N}×${s.K}`)];
    printTable(header, configs.map((c) => [c, ...shapes.map((s) => cell(c, s))]));
    const failures = ms.filter((m) => m.error !== undefined);
    for (const f of failures) {
      console.log(`  ${configName(f.config)} on ${describeShape(f.shape)}: ${f.error}`);
    }
  }
  console.log("\nchosen tiles per shape class:");
  const rows = Object.entries(entries).map(([key, e]) => [
    key,
    configName(e.config),
    gflopsText(e.gflops),
    e.heuristicGflops === null ? "-" : gflopsText(e.heuristicGflops),
    e.heuristicGflops ? `${(e.gflops / e.heuristicGflops).toFixed(2)}x` : "-",
  ]);
  printTable(["class", "chosen", "GFLOP/s", "heuristic GFLOP/s", "speedup"], rows);
}

// deno-lint-ignore no-explicit-any
type Tf = any;

/** Loads TF.js with its WebGPU backend, or returns why it could not. */
async function loadTfjs(): Promise<Tf | string> {
  try {
    const tf = await import("@tensorflow/tfjs-core");
    await import("@tensorflow/tfjs-backend-webgpu");
    if (!(await tf.setBackend("webgpu"))) return "the webgpu backend did not initialise";
    await tf.ready();
    return tf;
  } catch (error) {
    return error instanceof Error ? error.message.split("\n")[0] : String(error);
  }
}

/** TF.js WebGPU: tf.matMul(a, b, false, true), timed to the readback of the last result. */
function tfjs(tf: Tf, n: number): Contender {
  const a = tf.tensor2d(uniformFiller(n * n, 1), [n, n]);
  const b = tf.tensor2d(uniformFiller(n * n, 2), [n, n]);
  return {
    name: "tfjs",
    primary: false,
    dtype: "f32",
    run: async (count) => {
      let last = null;
      for (let i = 0; i < count; i++) {
        last?.dispose();
        last = tf.matMul(a, b, false, true);
      }
      await last.data();
      last.dispose();
    },
    dispose: () => {
      a.dispose();
      b.dispose();
    },
  };
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

if (import.meta.main) await runMain(() => run(Deno.args));
