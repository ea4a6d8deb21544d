/**
 * NF4 benchmark: what a 4-bit (QLoRA) base costs against the same work on a 16-bit base, as
 * ratios against a reference measured in the same process on the same adapter.
 *
 * 1. matmul: a product with a 4-bit weight as the engine runs it (`GpuWeights.matrix`:
 *    `dequantize4bitGpu` into a pooled copy, then the regular `matmul`; forward `y = x·Wᵀ` (NT)
 *    and input gradient `dx = dy·W` (NN)) against the same `matmul` on the weight held in f16
 *    (f32 without shader-f16), on the same x and the same W (the 16-bit copy holds the 4-bit
 *    weight's values, so both products must agree exactly). Ratio = 4-bit time / 16-bit time
 *    (target: little above 1 at training token counts). The dequantization alone is reported
 *    as bandwidth against a plain buffer copy of its output bytes (the copy ceiling).
 * 2. train: a QLoRA step against a LoRA step on the same random model and adapter (bench/train.ts
 *    `benchGpu`; the 4-bit copy is written by the quantize step, NF4 with double quantization
 *    at blocksize 64): tokens/s ratio QLoRA / LoRA (target ≥ 0.8) and each step's peak GPU
 *    memory (`memoryStats(gpu).peakBytes`).
 * 3. quantize: the quantize step's run (steps/quantize_model.ts, without the runner's hashing and
 *    manifest) on a random bf16 model against reading the same tensors and writing as many bytes
 *    to a temp file, synced as the step's writer syncs; MB/s of source bytes, ratio step /
 *    reference (target ≥ 0.5).
 *
 * ```
 * deno task bench nf4 [-- options]           or   deno run -A bench/nf4.ts [options]
 *   --parts matmul,train,quantize  the parts to run (default all)
 *   --tokens T              matmul: rows of x and dy (CPU 256, GPU 2048)
 *   --matrices NxK,...      matmul: weights W[N,K] (CPU 512x512,1792x512; GPU 4096x4096,14336x4096)
 *   --seconds S --rounds N  matmul: time per weight over all contenders, and rounds (CPU 6, 5; GPU 4, 15)
 *   --dtype f16|f32         weights and activations (f16 where the adapter has shader-f16)
 *   --shape NAME            train: small | mistral-7b | llama3-8b | qwen2-7b (CPU small, GPU mistral-7b)
 *   --layers N              train: layers kept (small 2; shapes 4: --layers 32 for all of Mistral 7B)
 *   --rows B --seq S        train: micro-batch (CPU 1 × 256, GPU 1 × 2048)
 *   --steps N --warmup N    train: timed and untimed steps per run (CPU 4 and 1, GPU 5 and 1)
 *   --train-repeats N       train: runs of each model, in pairs alternating which goes first (CPU 3, GPU 1)
 *   --rank r                train: LoRA rank on all seven projections, alpha 2r (CPU 8, GPU 16)
 *   --peak TFLOPS           train: peak for the "% peak" figures (default LATHE_PEAK_TFLOPS, or known)
 *   --quantize-mb MB        quantize: bytes of the random bf16 model (CPU 24, GPU 512)
 *   --quantize-rounds N     quantize: rounds of step and reference, alternating (3)
 *   --tmp DIR               where checkpoints are written (default: the system temp dir)
 *   --json FILE             also write the figures as JSON (device, date, config, results)
 * ```
 *
 * `small` is Mistral 7B's config at D 256, F 896, H 4, Hkv 2, V 512 (a step in about half a
 * second on a CPU adapter). Matmul timing is bench/lora.ts `timeAll`: rounds of all contenders in a
 * rotating order, medians over rounds, ratios taken within a round before the median. Runs from
 * the bench bundle too (bench/gpu.sh).
 * @module
 */
import { type BenchDevice, benchDevice, benchStepContext, benchUsage, type Usage } from "./_common.ts";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { getGpu, type Gpu } from "../kernels/device.ts";
import { quantize4bit } from "../formats/bnb4bit.ts";
import { loadModelConfig } from "../formats/model_config.ts";
import { ModelWeights } from "../formats/safetensors.ts";
import { GpuWeights } from "../kernels/models/gpu_weights.ts";
import { matmul } from "../kernels/ops/matmul.ts";
import { dequantize4bitGpu, uploadQuant4bit } from "../kernels/ops/quant_4bit.ts";
import { recorder } from "../kernels/recorder.ts";
import { DTYPE_BYTES, Tensor, trimPool } from "../kernels/tensor.ts";
import { writeJsonAtomic } from "../foundation/atomic.ts";
import { runMain } from "../foundation/errors.ts";
import { uniformFiller } from "../foundation/random.ts";
import { modelSources } from "../steps/model_source.ts";
import { QuantizeConfig, quantizeModel } from "../steps/quantize_model.ts";
import { median, timeAll } from "./lora.ts";
import { benchGpu, parseTrainArgs, printReport, type TrainBenchConfig, type TrainResult } from "./train.ts";
import { shapeConfigJson, SHAPES, writeRandomCheckpoint } from "./train_checkpoint.ts";

/** The parts, in the order they run. */
export const PARTS = ["matmul", "train", "quantize"] as const;
export type Nf4Part = typeof PARTS[number];

/** Mistral 7B's config shrunk for CPU adapters (`--shape small`). */
const SMALL = {
  hidden_size: 256,
  intermediate_size: 896,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 512,
};

/**
 * The quantize part's model: Mistral 7B's config at D 512, F 1792, H 4, Hkv 1 (hd 128), V 1024,
 * with as many layers as make `--quantize-mb` (6.8 MB of bf16 per layer; 2 MB of embeddings).
 */
export const QUANTIZE_SHAPE = {
  hidden_size: 512,
  intermediate_size: 1792,
  num_attention_heads: 4,
  num_key_value_heads: 1,
  vocab_size: 1024,
};

/** The 4-bit format every part uses: the quantize step's defaults. */
const NF4 = { quantType: "nf4", blocksize: 64, doubleQuant: true } as const;

/** The settings of a run after defaults. */
export interface Nf4BenchConfig {
  parts: Nf4Part[];
  dtype: "f16" | "f32";
  matmul: { tokens: number; matrices: { N: number; K: number }[]; seconds: number; rounds: number };
  /** The training settings (bench/train.ts), and the shape and layers of the model. */
  train: { shape: string; layers: number; repeats: number; settings: TrainBenchConfig };
  quantize: { megabytes: number; rounds: number };
  seed: number;
}

/** The figures of one weight shape in the matmul part (times are medians, ms). */
export interface Nf4MatmulResult {
  T: number;
  N: number;
  K: number;
  dtype: "f16" | "f32";
  forward: { plainMs: number; nf4Ms: number; ratio: number };
  backward: { plainMs: number; nf4Ms: number; ratio: number };
  /** (forward + backward) 4-bit over 16-bit, median of the rounds' ratios. */
  ratio: number;
  dequantizeMs: number;
  copyMs: number;
  /** Bytes the dequantization reads (codes, absmax codes, tables) and writes (W). */
  dequantizeBytes: { read: number; written: number };
  /** GB/s of the dequantization (read + written) and of the copy (2 · W bytes). */
  dequantizeGBps: number;
  copyGBps: number;
  /** Copy time over dequantization time of the same output bytes, median of the rounds' ratios. */
  ofCopy: number;
  /** Whether the 4-bit and the 16-bit forward wrote the same y. */
  sameOutput: boolean;
}

/** The figures of the train part. */
export interface Nf4TrainResult {
  /** The first run of each (its peak memory is the figure; every run has the same). */
  lora: TrainResult;
  qlora: TrainResult;
  /** Every run, in pairs (`--train-repeats`; the pairs alternate which runs first). */
  runs: { lora: TrainResult; qlora: TrainResult }[];
  /** Medians over the runs. */
  tokensPerSecond: { lora: number; qlora: number };
  /** QLoRA tokens/s over LoRA tokens/s: the median of the pairs' ratios. */
  ratio: number;
  /** QLoRA peak GPU memory over LoRA's. */
  memoryRatio: number;
  /** Seconds the quantize step took to write the 4-bit copy, and its bytes. */
  quantizeSeconds: number;
  quantizedBytes: number;
}

/** The figures of the quantize part. */
export interface Nf4QuantizeResult {
  /** Bytes of tensor data read (the source checkpoint's). */
  bytes: number;
  bytesOut: number;
  layers: number;
  stepMBps: number;
  referenceMBps: number;
  /** Step MB/s over reference MB/s, median of the rounds' ratios. */
  ratio: number;
  stepSeconds: number[];
  referenceSeconds: number[];
  relRmsError: number;
}

/** Everything the benchmark measured, as written by `--json`. */
export interface Nf4BenchReport {
  benchmark: "nf4";
  date: string;
  device: BenchDevice;
  deno: string;
  config: Nf4BenchConfig;
  matmul: Nf4MatmulResult[];
  train: Nf4TrainResult | null;
  quantize: Nf4QuantizeResult | null;
}

const usage: Usage = benchUsage("nf4");

/** The command line: the settings, and where to write the JSON and the checkpoints. */
export interface Nf4BenchArgs {
  config: Nf4BenchConfig;
  json: string | null;
  tmp: string | null;
}

/** Parses the command line; `gpu` supplies the defaults (sizes by adapter kind, f16 support, peak). */
export function parseNf4Args(args: string[], gpu: Pick<Gpu, "f16" | "info" | "software">): Nf4BenchArgs {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        parts: { type: "string", default: PARTS.join(",") },
        tokens: { type: "string" },
        matrices: { type: "string" },
        seconds: { type: "string" },
        rounds: { type: "string" },
        dtype: { type: "string" },
        shape: { type: "string" },
        layers: { type: "string" },
        rows: { type: "string" },
        seq: { type: "string" },
        steps: { type: "string" },
        warmup: { type: "string" },
        rank: { type: "string" },
        peak: { type: "string" },
        "train-repeats": { type: "string" },
        "quantize-mb": { type: "string" },
        "quantize-rounds": { type: "string", default: "3" },
        seed: { type: "string", default: "0" },
        tmp: { type: "string" },
        json: { type: "string" },
      },
      strict: true,
    }));
  } catch (error) {
    usage((error as Error).message);
  }
  const cpu = gpu.software;
  const int = (key: keyof typeof values, fallback: number, min = 1): number => {
    const raw = values[key] as string | undefined;
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min) usage(`--${key} "${raw}" is not an integer ≥ ${min}`);
    return n;
  };
  const positive = (key: keyof typeof values, fallback: number): number => {
    const raw = values[key] as string | undefined;
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!(n > 0)) usage(`--${key} "${raw}" is not a positive number`);
    return n;
  };
  const parts = values.parts.split(",").map((p) => p.trim()).filter((p) => p !== "");
  for (const p of parts) {
    if (!(PARTS as readonly string[]).includes(p)) {
      usage(`--parts names "${p}"`, `Parts: ${PARTS.join(", ")}.`);
    }
  }
  if (parts.length === 0) usage("--parts is empty", `Parts: ${PARTS.join(", ")}.`);
  const dtype = values.dtype ?? (gpu.f16 ? "f16" : "f32");
  if (dtype !== "f16" && dtype !== "f32") usage(`--dtype "${dtype}" is not f16 or f32`);
  if (dtype === "f16" && !gpu.f16) {
    usage(`--dtype f16 needs shader-f16, which "${gpu.info.description}" lacks`);
  }
  const matrices = (values.matrices ?? (cpu ? "512x512,1792x512" : "4096x4096,14336x4096")).split(",").map(
    (item) => {
      const m = /^(\d+)x(\d+)$/.exec(item.trim());
      if (m === null || Number(m[1]) < 1 || Number(m[2]) < 1) {
        usage(`--matrices item "${item}" is not NxK with positive integers`, "e.g. --matrices 4096x4096");
      }
      return { N: Number(m[1]), K: Number(m[2]) };
    },
  );
  const shape = values.shape ?? (cpu ? "small" : "mistral-7b");
  if (shape !== "small" && !Object.hasOwn(SHAPES, shape)) {
    usage(`--shape "${shape}" is unknown`, `Shapes: small, ${Object.keys(SHAPES).join(", ")}.`);
  }
  const big = shape !== "small";
  const trainArgs = [
    ...["--shape", big ? shape : "mistral-7b", "--dtype", dtype, "--no-reference"],
    ...["--rows", String(int("rows", 1)), "--seq", String(int("seq", big ? 2048 : 256))],
    ...["--steps", String(int("steps", big ? 5 : 4)), "--warmup", String(int("warmup", 1, 0))],
    ...["--rank", String(int("rank", big ? 16 : 8)), "--seed", String(int("seed", 0, 0))],
    ...(values.peak === undefined ? [] : ["--peak", values.peak]),
  ];
  const config: Nf4BenchConfig = {
    parts: PARTS.filter((p) => parts.includes(p)),
    dtype,
    matmul: {
      tokens: int("tokens", cpu ? 256 : 2048),
      matrices,
      seconds: positive("seconds", cpu ? 6 : 4),
      rounds: int("rounds", cpu ? 5 : 15),
    },
    train: {
      shape,
      layers: int("layers", big ? 4 : SMALL.num_hidden_layers),
      repeats: int("train-repeats", cpu ? 3 : 1),
      settings: parseTrainArgs(trainArgs, gpu).config,
    },
    quantize: {
      megabytes: positive("quantize-mb", cpu ? 24 : 512),
      rounds: int("quantize-rounds", 3),
    },
    seed: int("seed", 0, 0),
  };
  return { config, json: values.json ?? null, tmp: values.tmp ?? null };
}

// ---------------------------------------------------------------------------------------------
// 1. matmul: dequantize + matmul against matmul.
// T = tokens, N = out features, K = in features.

async function benchMatmul(
  gpu: Gpu,
  cfg: Nf4BenchConfig,
  N: number,
  K: number,
): Promise<Nf4MatmulResult> {
  const { tokens: T, seconds, rounds } = cfg.matmul;
  const dtype = cfg.dtype;
  const n = N * K;
  const q = quantize4bit(uniformFiller(n, cfg.seed + 1, 0.05), [N, K], NF4);
  const name = "bench.weight";
  const w4 = uploadQuant4bit(gpu, q, q.codes, name);
  // The engine's holder of 4-bit weights: matrix() dequantizes into a pooled copy per product.
  using weights = new GpuWeights(dtype, new Map(), new Map([[name, w4]]));
  // W[N,K] in dtype holding the 4-bit weight's values: the 16-bit contender multiplies the same W.
  const W = dequantize4bitGpu(w4, dtype, { label: "bench_W" });
  const x = Tensor.from(gpu, uniformFiller(T * K, cfg.seed + 2), [T, K], dtype, { label: "bench_x" });
  const dy = Tensor.from(gpu, uniformFiller(T * N, cfg.seed + 3), [T, N], "f32", { label: "bench_dy" });
  const y = Tensor.empty(gpu, [T, N], dtype, { label: "bench_y" });
  const y4 = Tensor.empty(gpu, [T, N], dtype, { label: "bench_y4" });
  const dx = Tensor.empty(gpu, [T, K], "f32", { label: "bench_dx" });
  const Wd = Tensor.empty(gpu, [N, K], dtype, { label: "bench_Wd" });
  const copyDst = Tensor.empty(gpu, [N, K], dtype, { label: "bench_copy" });
  const all = [W, x, dy, y, y4, dx, Wd, copyDst];
  try {
    const rec = recorder(gpu);
    const plainForward = () => matmul(x, W, { layout: "NT", out: y });
    const nf4Forward = (out = y) => {
      using lent = weights.matrix(name);
      matmul(x, lent.tensor, { layout: "NT", out });
    };
    const plainBackward = () => matmul(dy, W, { layout: "NN", out: dx });
    const nf4Backward = () => {
      using lent = weights.matrix(name);
      matmul(dy, lent.tensor, { layout: "NN", out: dx });
    };
    const dequantize = () => dequantize4bitGpu(w4, dtype, { out: Wd });
    const copy = () => {
      // Same shape and dtype, so the row chunks match one for one.
      Wd.chunks.forEach((c, i) =>
        rec.copyBuffer(c.buffer, 0, copyDst.chunks[i].buffer, 0, Math.ceil(c.byteLength / 4) * 4)
      );
    };
    plainForward();
    nf4Forward(y4);
    const [a, b] = await Promise.all([y.readF32(), y4.readF32()]);
    const sameOutput = a.every((v, i) => Object.is(v, b[i]));
    const timed = await timeAll(
      gpu,
      [plainForward, () => nf4Forward(), plainBackward, nf4Backward, dequantize, copy],
      seconds,
      rounds,
    );
    const [pf, qf, pb, qb, dq, cp] = timed.perCall;
    const within = (num: number[], den: number[]) => median(num.map((v, i) => v / den[i]));
    const ms = (i: number) => timed.median[i] * 1000;
    const nb = Math.ceil(n / q.blocksize);
    const read = Math.ceil(n / 2) + (q.nested ? nb + 4 * (16 + 256 + q.nested.absmax.length) : 4 * (nb + 16));
    const written = n * DTYPE_BYTES[dtype];
    return {
      T,
      N,
      K,
      dtype,
      forward: { plainMs: ms(0), nf4Ms: ms(1), ratio: within(qf, pf) },
      backward: { plainMs: ms(2), nf4Ms: ms(3), ratio: within(qb, pb) },
      ratio: within(qf.map((v, i) => v + qb[i]), pf.map((v, i) => v + pb[i])),
      dequantizeMs: ms(4),
      copyMs: ms(5),
      dequantizeBytes: { read, written },
      dequantizeGBps: (read + written) / timed.median[4] / 1e9,
      copyGBps: 2 * written / timed.median[5] / 1e9,
      ofCopy: within(cp, dq),
      sameOutput,
    };
  } finally {
    for (const t of all) t.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// 2. train: a QLoRA step against a LoRA step on the same model.

/** What {@link runQuantizeStep} wrote. */
export interface QuantizedModel {
  /** The 4-bit model directory (`<stepDir>/model`). */
  dir: string;
  seconds: number;
  metrics: Record<string, number | string | boolean | null>;
}

/**
 * Runs the quantize step's run (steps/quantize_model.ts, default settings: NF4, double
 * quantization, blocksize 64) on model directory `model` (absolute) with `stepDir` as its step
 * directory, as the runner runs it but without the run's bookkeeping (source and output hashes,
 * manifest, git state); times it.
 */
export async function runQuantizeStep(model: string, stepDir: string): Promise<QuantizedModel> {
  const config = QuantizeConfig.parse({ model });
  const sources = await modelSources(model);
  const ctx = benchStepContext(stepDir, sources, "quantize");
  const t0 = performance.now();
  const result = await quantizeModel(ctx, config);
  return {
    dir: join(stepDir, "model"),
    seconds: (performance.now() - t0) / 1000,
    metrics: result.metrics ?? {},
  };
}

/** The model of the train part: its config.json and its name. */
function trainModel(cfg: Nf4BenchConfig): { json: Record<string, unknown>; name: string } {
  const { shape, layers } = cfg.train;
  const small = shape === "small";
  const json = shapeConfigJson(small ? "mistral-7b" : shape, {
    ...(small ? SMALL : {}),
    num_hidden_layers: layers,
  });
  return { json, name: `${shape} (${layers} layer${layers === 1 ? "" : "s"})` };
}

async function benchTrain(gpu: Gpu, cfg: Nf4BenchConfig, tmp: string): Promise<Nf4TrainResult> {
  const settings = cfg.train.settings;
  const { json, name } = trainModel(cfg);
  const base = join(tmp, "train-base");
  await Deno.mkdir(base);
  const t0 = performance.now();
  const ckpt = await writeRandomCheckpoint(base, json, {
    seed: cfg.seed,
    progress: gpu.software ? undefined : `write ${name}`,
  });
  const writeSeconds = (performance.now() - t0) / 1000;
  const quantized = await runQuantizeStep(base, join(tmp, "train-quantize"));
  const qconfig = await loadModelConfig(quantized.dir);
  const quantizedBytes = Number(quantized.metrics.bytes_out ?? 0);
  const { repeats } = cfg.train;
  const runs: { lora: TrainResult; qlora: TrainResult }[] = [];
  for (let i = 0; i < repeats; i++) {
    // The checkpoints go once their last load is done (the disk matters for 7B shapes).
    const last = i === repeats - 1;
    const then = (dir: string) => async () => last ? await Deno.remove(dir, { recursive: true }) : undefined;
    const suffix = repeats === 1 ? "" : ` #${i + 1}`;
    const lora = () =>
      benchGpu(
        gpu,
        `${name} ${settings.dtype} LoRA${suffix}`,
        base,
        ckpt.config,
        ckpt.weightBytes,
        i === 0 ? writeSeconds : null,
        settings,
        then(base),
      );
    const qlora = () =>
      benchGpu(
        gpu,
        `${name} NF4 QLoRA${suffix}`,
        quantized.dir,
        qconfig,
        quantizedBytes,
        null,
        settings,
        then(quantized.dir),
      );
    // Alternate which runs first, so that neither always follows the other.
    if (i % 2 === 0) {
      const l = await lora();
      runs.push({ lora: l, qlora: await qlora() });
    } else {
      const q = await qlora();
      runs.push({ lora: await lora(), qlora: q });
    }
  }
  const [first] = runs;
  return {
    lora: first.lora,
    qlora: first.qlora,
    runs,
    tokensPerSecond: {
      lora: median(runs.map((r) => r.lora.tokensPerSecond)),
      qlora: median(runs.map((r) => r.qlora.tokensPerSecond)),
    },
    ratio: median(runs.map((r) => r.qlora.tokensPerSecond / r.lora.tokensPerSecond)),
    memoryRatio: first.qlora.memory!.peakBytes / first.lora.memory!.peakBytes,
    quantizeSeconds: quantized.seconds,
    quantizedBytes,
  };
}

// ---------------------------------------------------------------------------------------------
// 3. quantize: the step against reading and writing the same bytes.

/** Reads every tensor of `dir` and writes the bytes to `path`, synced; returns the bytes. */
export async function readWrite(dir: string, path: string): Promise<number> {
  using weights = await ModelWeights.open(dir);
  using file = await Deno.open(path, { write: true, create: true, truncate: true });
  let total = 0;
  for (const name of weights.names()) {
    const bytes = await weights.readBytes(name);
    for (let at = 0; at < bytes.length;) at += await file.write(bytes.subarray(at));
    total += bytes.length;
  }
  await file.syncData();
  return total;
}

async function benchQuantize(cfg: Nf4BenchConfig, tmp: string): Promise<Nf4QuantizeResult> {
  const { megabytes, rounds } = cfg.quantize;
  const D = QUANTIZE_SHAPE.hidden_size, F = QUANTIZE_SHAPE.intermediate_size;
  const kv = QUANTIZE_SHAPE.num_key_value_heads * (D / QUANTIZE_SHAPE.num_attention_heads);
  const layerBytes = 2 * (2 * D * D + 2 * D * kv + 3 * D * F);
  const embedBytes = 2 * 2 * QUANTIZE_SHAPE.vocab_size * D;
  const layers = Math.max(1, Math.round((megabytes * 1e6 - embedBytes) / layerBytes));
  const source = join(tmp, "quantize-source");
  await Deno.mkdir(source);
  const ckpt = await writeRandomCheckpoint(
    source,
    shapeConfigJson("mistral-7b", { ...QUANTIZE_SHAPE, num_hidden_layers: layers }),
    { seed: cfg.seed },
  );
  const stepSeconds: number[] = [];
  const referenceSeconds: number[] = [];
  let last: QuantizedModel | null = null;
  for (let r = 0; r < rounds; r++) {
    // Alternate which goes first, so that neither always follows the other's writes.
    for (const which of r % 2 === 0 ? ["reference", "step"] : ["step", "reference"]) {
      if (which === "reference") {
        const path = join(tmp, "quantize-reference.bin");
        const t0 = performance.now();
        const bytes = await readWrite(source, path);
        referenceSeconds.push((performance.now() - t0) / 1000);
        await Deno.remove(path);
        if (bytes !== ckpt.weightBytes) throw new Error(`read ${bytes} bytes of ${ckpt.weightBytes}`);
      } else {
        const dir = join(tmp, `quantize-step-${r}`);
        last = await runQuantizeStep(source, dir);
        stepSeconds.push(last.seconds);
        await Deno.remove(dir, { recursive: true });
      }
    }
  }
  const mbps = (s: number) => ckpt.weightBytes / 1e6 / s;
  return {
    bytes: ckpt.weightBytes,
    bytesOut: Number(last!.metrics.bytes_out ?? 0),
    layers,
    stepMBps: mbps(median(stepSeconds)),
    referenceMBps: mbps(median(referenceSeconds)),
    ratio: median(stepSeconds.map((s, i) => referenceSeconds[i] / s)),
    stepSeconds,
    referenceSeconds,
    relRmsError: Number(last!.metrics.rel_rms_error ?? NaN),
  };
}

// ---------------------------------------------------------------------------------------------

/** Prints a table: the first `left` columns left-aligned, the others right-aligned. */
function printTable(header: string[], rows: string[][], left = 1): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i < left ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ").trimEnd();
  console.log(line(header));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of rows) console.log(line(r));
}

const x2 = (r: number) => `${r >= 0.1 ? r.toFixed(2) : r.toPrecision(2)}x`;
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

function printMatmul(results: Nf4MatmulResult[]): void {
  console.log(
    "\n== NF4 matmul: GpuWeights.matrix (dequantize4bitGpu + matmul) against matmul on the same W\n",
  );
  printTable(
    ["T×K→N", "dtype", "fwd ms", "nf4 fwd ms", "ratio", "bwd ms", "nf4 bwd ms", "ratio", "same y"],
    results.map((r) => [
      `${r.T}×${r.K}→${r.N}`,
      r.dtype,
      r.forward.plainMs.toFixed(3),
      r.forward.nf4Ms.toFixed(3),
      x2(r.forward.ratio),
      r.backward.plainMs.toFixed(3),
      r.backward.nf4Ms.toFixed(3),
      x2(r.backward.ratio),
      r.sameOutput ? "yes" : "NO",
    ]),
    2,
  );
  console.log();
  printTable(
    ["W[N,K]", "dtype", "dequantize ms", "GB/s", "copy ms", "GB/s", "copy/dequantize time"],
    results.map((r) => [
      `${r.N}×${r.K}`,
      r.dtype,
      r.dequantizeMs.toFixed(3),
      r.dequantizeGBps.toFixed(2),
      r.copyMs.toFixed(3),
      r.copyGBps.toFixed(2),
      x2(r.ofCopy),
    ]),
    2,
  );
  console.log(
    "(GB/s count bytes read + written: dequantize reads codes, absmax codes and tables and writes W; the copy reads and writes W)",
  );
  console.log(
    `\nnf4 / ${results[0].dtype} matmul time, forward + backward (target: little above 1x): ` +
      results.map((r) => `${r.T}×${r.K}→${r.N} ${x2(r.ratio)}`).join(", "),
  );
}

function printTrain(report: Nf4BenchReport, t: Nf4TrainResult): void {
  console.log("\n== QLoRA step against LoRA step on the same model (bench/train.ts)");
  printReport({
    benchmark: "train",
    date: report.date,
    device: { ...report.device, vendor: "" },
    deno: report.deno,
    config: report.config.train.settings,
    flopFormula: "",
    results: t.runs.flatMap((r) => [r.lora, r.qlora]),
    ratios: {},
    dpoRatios: {},
  });
  console.log(
    `\nquantize step: ${t.quantizeSeconds.toFixed(1)} s for the 4-bit copy (${mib(t.quantizedBytes)})`,
  );
  console.log(
    `peak GPU memory: LoRA ${mib(t.lora.memory!.peakBytes)}, QLoRA ${mib(t.qlora.memory!.peakBytes)} (${
      x2(t.memoryRatio)
    })`,
  );
  if (t.runs.length > 1) {
    console.log(
      `tokens/s, medians of ${t.runs.length} runs: LoRA ${t.tokensPerSecond.lora.toFixed(1)}, ` +
        `QLoRA ${t.tokensPerSecond.qlora.toFixed(1)}; ratios by pair ${
          t.runs.map((r) => x2(r.qlora.tokensPerSecond / r.lora.tokensPerSecond)).join(" ")
        }`,
    );
  }
  console.log(`QLoRA / LoRA tokens/s (target >= 0.8x): ${x2(t.ratio)}`);
}

function printQuantize(q: Nf4QuantizeResult): void {
  console.log(
    `\n== quantize step against read + write of the same bytes: ${(q.bytes / 1e6).toFixed(1)} MB of bf16 ` +
      `(${q.layers} layer${q.layers === 1 ? "" : "s"}) -> ${
        (q.bytesOut / 1e6).toFixed(1)
      } MB, relative RMS error ${q.relRmsError.toFixed(4)}\n`,
  );
  printTable(
    ["what", "MB/s", "seconds (rounds)"],
    [
      ["quantize step", q.stepMBps.toFixed(1), q.stepSeconds.map((s) => s.toFixed(2)).join(" ")],
      ["read + write", q.referenceMBps.toFixed(1), q.referenceSeconds.map((s) => s.toFixed(2)).join(" ")],
    ],
  );
  console.log(`\nquantize / read + write MB/s (target >= 0.5x): ${x2(q.ratio)}`);
}

/** Runs the benchmark with command-line style arguments; prints tables; returns the figures. */
export async function run(args: string[]): Promise<Nf4BenchReport> {
  const gpu = await getGpu();
  const { config, json, tmp: tmpParent } = parseNf4Args(args, gpu);
  console.log(
    `nf4 benchmark on ${gpu.info.description} (${gpu.info.backend}${gpu.software ? ", CPU" : ""}): ` +
      `${config.dtype}, parts ${config.parts.join(", ")}; NF4, double quantization, blocksize 64`,
  );
  const report: Nf4BenchReport = {
    benchmark: "nf4",
    date: new Date().toISOString(),
    device: benchDevice(gpu),
    deno: Deno.version.deno,
    config,
    matmul: [],
    train: null,
    quantize: null,
  };
  const tmp = await Deno.makeTempDir({ dir: tmpParent ?? undefined, prefix: "lathe-bench-nf4-" });
  try {
    if (config.parts.includes("matmul")) {
      for (const { N, K } of config.matmul.matrices) {
        const r = await benchMatmul(gpu, config, N, K);
        console.error(`  ${r.T}×${r.K}→${r.N}: nf4 / ${r.dtype} ${x2(r.ratio)}`);
        report.matmul.push(r);
        trimPool(gpu);
      }
      printMatmul(report.matmul);
    }
    if (config.parts.includes("train")) {
      report.train = await benchTrain(gpu, config, tmp);
      printTrain(report, report.train);
    }
    if (config.parts.includes("quantize")) {
      report.quantize = await benchQuantize(config, tmp);
      printQuantize(report.quantize);
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  if (json !== null) {
    await writeJsonAtomic(json, report);
    console.log(`\nwritten: ${json}`);
  }
  return report;
}

if (import.meta.main) await runMain(async () => void await run(Deno.args));
