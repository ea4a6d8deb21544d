/**
 * Training benchmark: LoRA SFT steps (`forwardBackward` + `optimizerStep`, as steps/train_sft.ts
 * runs them) on the WebGPU backend (kernels/models/graph.ts) on whatever adapter the machine has.
 *
 * 1. Tiny Llamas (kernels/models/tiny.ts sizes nano and micro, V = 512, written to a temp dir):
 *    tokens/s on synthetic packed micro-batches, and for nano the same steps through the CPU
 *    reference backend (kernels/models/reference_backend.ts) with the ratio GPU / reference.
 * 2. `--shape mistral-7b` (or llama3-8b, qwen2-7b): a random-weight bf16 checkpoint with that
 *    model's real config.json (bench/train_checkpoint.ts; Mistral 7B's 14.5 GB take ~30 s on
 *    2 cores and a 0.3 GB/s disk), loaded with `createGpuModel`; load time, step time, tokens/s,
 *    the tensor pool's peak GPU memory, and TFLOP/s from the FLOP model of bench/train_flops.ts
 *    (printed with the figures), as a fraction of `LATHE_PEAK_TFLOPS` (default: the adapter's
 *    non-tensor-core peak where known, e.g. H100).
 *
 * 3. DPO beside SFT on the same tiny models (`--objectives`, default sft,dpo,dpo-live for the tiny
 *    sizes, sft for a shape): a DPO step (steps/train/dpo.ts, sigmoid, β 0.1) on B/2 synthetic
 *    preference pairs of S tokens (prompt S/4, answer the rest), chosen and rejected in one
 *    micro-batch, so a step runs the same B·S tokens as SFT's; "dpo" with the reference log-probs
 *    precomputed (scored once before the clock starts, as train-dpo's precompute_ref_log_probs),
 *    "dpo-live" with the reference scored in every step (a forward of the pairs under the
 *    reference adapter). The ratios to SFT's tokens/s are printed.
 *
 * Tokens/s counts every token of the packed micro-batch (B·S per step). A step is timed from the
 * start of `forwardBackward` to the gradient norm's readback at the end of `optimizerStep`, after
 * `--warmup` untimed steps (which compile the pipelines and fill the buffer pool).
 *
 * ```
 * deno task bench train [-- options]         or   deno run -A bench/train.ts [options]
 *   --sizes nano,micro    tiny sizes to run (default: both, or none with --shape)
 *   --shape NAME          mistral-7b | llama3-8b | qwen2-7b       --layers N: keep only N layers
 *   --rows B --seq S      micro-batch (tiny 4 × 256, shape 1 × 2048)
 *   --docs N              packed documents per row (tiny 4, shape 1)
 *   --steps N --warmup N  timed and untimed steps (tiny 10 and 2, 3 and 1 on CPU adapters; shape 5 and 1)
 *   --rank r              LoRA rank on all seven projections, alpha 2r (tiny 8, shape 16)
 *   --dropout p           LoRA dropout (0.05)
 *   --dtype f16|f32       weights and activations (f16 where the adapter has shader-f16)
 *   --no-checkpointing    keep activations instead of recomputing them in the backward
 *   --no-reference        skip the CPU reference run
 *   --objectives LIST     sft, dpo (reference precomputed), dpo-live (reference each step), full
 *                         (every weight trains; its ratio to sft is printed; "% peak" counts LoRA FLOPs)
 *   --peak TFLOPS         peak for the "% peak" figures (default LATHE_PEAK_TFLOPS, or known)
 *   --tmp DIR             where checkpoints are written (default: the system temp dir)
 *   --json FILE           also write the figures as JSON (device, date, config, results)
 * ```
 *
 * One self-contained file for a machine without network: npm packages (zod) are inlined, and the
 * only files it reads are the WGSL kernels, which the kernels find with
 * `new URL("../wgsl/<name>.wgsl", import.meta.url)`; so the bundle must sit in kernels/ops/ beside
 * kernels/wgsl/ (the two are all a machine needs, with `deno`):
 * ```
 * deno bundle bench/main.ts -o kernels/ops/bench.bundle.js
 * deno run -A kernels/ops/bench.bundle.js train --steps 2
 * deno run -A kernels/ops/bench.bundle.js train --shape mistral-7b --json train.json
 * ```
 * (The tokenize benchmark in the same bundle does not run from there: it reads its tokenizer
 * from node_modules/ and starts steps/tokenize/worker.ts, both relative to its own module.)
 * @module
 */
import { benchUsage, type Usage } from "./_common.ts";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { expectedTensors, type ModelConfig, parseModelConfig, PROJECTIONS } from "../formats/model_config.ts";
import { getGpu, type Gpu } from "../kernels/device.ts";
import { writeModelWeights } from "../formats/safetensors.ts";
import { createGpuModel } from "../kernels/models/graph.ts";
import { loadHostModel } from "../kernels/models/load.ts";
import { mulberry32 } from "../foundation/random.ts";
import { createReferenceModel } from "../kernels/models/reference_backend.ts";
import { TINY_SIZES, tinyConfigJson, tinyModelTensors, type TinySize } from "../kernels/models/tiny.ts";
import type { AdamWStep, Batch, LoraSpec, TrainableModel } from "../kernels/models/trainable.ts";
import { recorder } from "../kernels/recorder.ts";
import { memoryStats, resetPeakMemory, trimPool } from "../kernels/tensor.ts";
import { writeFileAtomic, writeJsonAtomic } from "../foundation/atomic.ts";
import { runMain } from "../foundation/errors.ts";
import { Progress } from "../foundation/progress.ts";
import { shapeConfigJson, SHAPES, writeRandomCheckpoint } from "./train_checkpoint.ts";
import type { Split } from "../steps/train/batches.ts";
import type { ShardRow } from "../steps/tokenize/shards.ts";
import { dpoObjective, type DpoSettings, pairBatch, scoreSplit, tableReference } from "../steps/train/dpo.ts";
import { liveReference } from "../steps/train_dpo.ts";
import {
  FLOP_FORMULA,
  frozenMatmulParams,
  knownPeakTflops,
  loraParams,
  trainingFlops,
} from "./train_flops.ts";

/** Vocabulary of the tiny models (the demo tokenizer's size; no tokenizer file is needed). */
export const TINY_VOCAB = 512;

/** The optimizer step of every run (PyTorch AdamW semantics, clipping at 1 as trl's default). */
const ADAMW: AdamWStep = { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 };

/** The benchmark's settings after defaults. */
export interface TrainBenchConfig {
  sizes: TinySize[];
  shape: string | null;
  /** Layers kept of the shape (null: all). */
  layers: number | null;
  rows: number;
  seqLen: number;
  docsPerRow: number;
  steps: number;
  warmup: number;
  lora: LoraSpec;
  /** Weights and activations of the GPU runs. */
  dtype: "f16" | "f32";
  gradientCheckpointing: boolean;
  reference: boolean;
  /** What the GPU runs train: "sft", "dpo" (reference precomputed), "dpo-live" (reference each step). */
  objectives: Objective[];
  /** Peak TFLOP/s the "% peak" figures divide by, or null. */
  peakTflops: number | null;
  seed: number;
}

/** What a run trains; see the module documentation. */
export type Objective = "sft" | "dpo" | "dpo-live" | "full";
const OBJECTIVES: readonly Objective[] = ["sft", "dpo", "dpo-live", "full"];

/** The figures of one model on one backend. */
export interface TrainResult {
  model: string;
  backend: "webgpu" | "cpu-reference";
  objective: Objective;
  /** dtype of the weights and activations (the reference computes in f64 on f32 weights). */
  dtype: string;
  rows: number;
  seqLen: number;
  tokensPerStep: number;
  params: { frozen: number; lora: number };
  /** Seconds to write the checkpoint (random-weight shapes only). */
  generateSeconds: number | null;
  /** Bytes of weights on disk. */
  checkpointBytes: number;
  /** Seconds from opening the checkpoint to a model ready to train. */
  loadSeconds: number;
  stepSeconds: { mean: number; min: number; max: number; all: number[] };
  tokensPerSecond: number;
  /** FLOPs of one step (bench/train_flops.ts). */
  flopsPerStep: { total: number; model: number };
  /** Achieved TFLOP/s with and without the recomputed forward. */
  tflops: { total: number; model: number };
  /** `tflops.total / peakTflops`, or null without a peak. */
  peakFraction: number | null;
  /** The tensor pool's bytes (GPU runs): live once loaded, and the peak during the timed steps. */
  memory: { loadedBytes: number; peakBytes: number } | null;
  /** Mean loss per trained token of the first and last timed step (a sanity check: ≈ ln V at init). */
  loss: { first: number; last: number };
}

/** Everything the benchmark measured, as written by `--json`. */
export interface TrainBenchReport {
  benchmark: "train";
  date: string;
  device: { description: string; vendor: string; backend: string; features: string[]; software: boolean };
  deno: string;
  config: TrainBenchConfig;
  flopFormula: string;
  results: TrainResult[];
  /** tokens/s of the GPU over the CPU reference, by model. */
  ratios: Record<string, number>;
  /** tokens/s of each DPO run over SFT's on the same model (GPU), by "model objective". */
  dpoRatios: Record<string, number>;
}

const usage: Usage = benchUsage("train");

/** The command line: the settings, and where to write the JSON and the checkpoints. */
export interface TrainBenchArgs {
  config: TrainBenchConfig;
  /** `--json` file, or null. */
  json: string | null;
  /** `--tmp` directory, or null for the system temp dir. */
  tmp: string | null;
}

/** Parses the command line; `gpu` supplies the dtype and peak defaults. */
export function parseTrainArgs(args: string[], gpu: Pick<Gpu, "f16" | "info" | "software">): TrainBenchArgs {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        sizes: { type: "string" },
        shape: { type: "string" },
        layers: { type: "string" },
        rows: { type: "string" },
        seq: { type: "string" },
        docs: { type: "string" },
        steps: { type: "string" },
        warmup: { type: "string" },
        rank: { type: "string" },
        dropout: { type: "string", default: "0.05" },
        dtype: { type: "string" },
        "no-checkpointing": { type: "boolean", default: false },
        "no-reference": { type: "boolean", default: false },
        objectives: { type: "string" },
        peak: { type: "string" },
        seed: { type: "string", default: "0" },
        tmp: { type: "string" },
        json: { type: "string" },
      },
      strict: true,
    }));
  } catch (error) {
    usage((error as Error).message);
  }
  const shape = values.shape ?? null;
  if (shape !== null && !Object.hasOwn(SHAPES, shape)) {
    usage(`--shape "${shape}" is unknown`, `Known shapes: ${Object.keys(SHAPES).join(", ")}.`);
  }
  const big = shape !== null;
  const int = (key: keyof typeof values, fallback: number, min = 1): number => {
    const raw = values[key];
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min) usage(`--${key} "${raw}" is not an integer ≥ ${min}`);
    return n;
  };
  const sizes = (values.sizes ?? (big ? "" : "nano,micro")).split(",").filter((s) => s);
  for (const s of sizes) {
    if (!Object.hasOwn(TINY_SIZES, s)) {
      usage(`--sizes names "${s}"`, `Tiny sizes: ${Object.keys(TINY_SIZES).join(", ")}.`);
    }
  }
  if (sizes.length === 0 && !big) {
    usage("nothing to run", "Give --sizes nano,micro and/or --shape mistral-7b.");
  }
  const dtype = values.dtype ?? (gpu.f16 ? "f16" : "f32");
  if (dtype !== "f16" && dtype !== "f32") usage(`--dtype "${dtype}" is not f16 or f32`);
  if (dtype === "f16" && !gpu.f16) {
    usage(`--dtype f16 needs shader-f16, which "${gpu.info.description}" lacks`);
  }
  const dropout = Number(values.dropout);
  if (!(dropout >= 0 && dropout < 1)) usage(`--dropout "${values.dropout}" is not in [0, 1)`);
  const r = int("rank", big ? 16 : 8);
  const peakRaw = values.peak ?? Deno.env.get("LATHE_PEAK_TFLOPS");
  let peakTflops = knownPeakTflops(gpu.info.description, dtype);
  if (peakRaw !== undefined && peakRaw !== "") {
    peakTflops = Number(peakRaw);
    if (!(peakTflops > 0)) {
      usage(`the peak "${peakRaw}" (--peak or LATHE_PEAK_TFLOPS) is not a positive number`);
    }
  }
  const objectives = (values.objectives ?? (big ? "sft" : OBJECTIVES.join(","))).split(",").filter((o) => o);
  for (const o of objectives) {
    if (!(OBJECTIVES as readonly string[]).includes(o)) {
      usage(`--objectives names "${o}"`, `Known: ${OBJECTIVES.join(", ")}.`);
    }
  }
  const config: TrainBenchConfig = {
    sizes: sizes as TinySize[],
    shape,
    layers: values.layers === undefined ? null : int("layers", 0),
    rows: int("rows", big ? 1 : 4),
    seqLen: int("seq", big ? 2048 : 256),
    docsPerRow: int("docs", big ? 1 : 4),
    steps: int("steps", big ? 5 : gpu.software ? 3 : 10),
    warmup: int("warmup", big || gpu.software ? 1 : 2, 0),
    lora: { r, alpha: 2 * r, dropout, targets: [...PROJECTIONS], useRslora: false },
    dtype,
    gradientCheckpointing: !values["no-checkpointing"],
    reference: !values["no-reference"],
    objectives: objectives as Objective[],
    peakTflops,
    seed: int("seed", 0, 0),
  };
  return { config, json: values.json ?? null, tmp: values.tmp ?? null };
}

/**
 * A synthetic packed micro-batch: each row holds `docsPerRow` documents of random lengths
 * (between half and 1.5 times the average), positions restarting at 0 in each, random tokens
 * in [0, V), and next-token targets inside a document (−100 at its last token).
 */
export function syntheticBatch(
  V: number,
  rows: number,
  seqLen: number,
  docsPerRow: number,
  seed: number,
): Batch {
  const next = mulberry32(seed);
  const T = rows * seqLen;
  const tokens = new Uint32Array(T);
  const targets = new Int32Array(T).fill(-100);
  const positions = new Uint32Array(T);
  const docs = new Uint32Array(T);
  const d = Math.min(docsPerRow, seqLen);
  for (let b = 0; b < rows; b++) {
    const weights = Array.from({ length: d }, () => 0.5 + next());
    const sum = weights.reduce((a, w) => a + w, 0);
    // Document k ends at ends[k], after document k − 1 and leaving a token for each one after it.
    const ends: number[] = [];
    let acc = 0;
    for (let k = 0; k < d; k++) {
      acc += weights[k];
      const want = k === d - 1 ? seqLen : Math.round(seqLen * acc / sum);
      ends.push(Math.min(seqLen - (d - 1 - k), Math.max((ends[k - 1] ?? 0) + 1, want)));
    }
    let start = 0;
    for (let k = 0; k < d; k++) {
      for (let i = start; i < ends[k]; i++) {
        const t = b * seqLen + i;
        tokens[t] = Math.floor(next() * V);
        positions[t] = i - start;
        docs[t] = k;
      }
      start = ends[k];
    }
    for (let i = 0; i + 1 < seqLen; i++) {
      const t = b * seqLen + i;
      if (docs[t] === docs[t + 1]) targets[t] = tokens[t + 1];
    }
  }
  return { rows, seqLen, tokens, targets, positions, docs };
}

function trained(batch: Batch): number {
  let n = 0;
  for (const y of batch.targets) if (y !== -100) n++;
  return n;
}

/** Writes tiny Llama `size` (f32, V = {@link TINY_VOCAB}) into `dir`; returns its config and bytes. */
export async function writeTinyCheckpoint(
  dir: string,
  size: TinySize,
  seed: number,
): Promise<{ config: ModelConfig; bytes: number }> {
  const json = tinyConfigJson("llama", size, {
    vocabSize: TINY_VOCAB,
    bosTokenId: 1,
    eosTokenId: 2,
    padTokenId: null,
  });
  const config = parseModelConfig(json, `tiny llama-${size}`);
  await writeModelWeights(dir, tinyModelTensors(config, seed, "f32"));
  await writeFileAtomic(join(dir, "config.json"), JSON.stringify(json, null, 2) + "\n");
  let bytes = 0;
  for (const shape of expectedTensors(config).values()) bytes += 4 * shape.reduce((a, b) => a * b, 1);
  return { config, bytes };
}

/** What {@link timeSteps} measured. */
interface StepTimes {
  seconds: number[];
  /** Mean loss per trained token of each timed step. */
  losses: number[];
  /** FLOPs per timed step, averaged (bench/train_flops.ts). */
  flops: { total: number; model: number };
}

/** One timed step of a run: its loss per trained token. */
type Stepper = (step: number) => Promise<number>;

/**
 * SFT steps on `model`: forwardBackward + optimizerStep on micro-batches alternating between two
 * seeds, made before the clock starts.
 */
function sftStepper(model: TrainableModel, cfg: TrainBenchConfig, checkpointing: boolean) {
  const batches = [0, 1].map((i) => {
    const batch = syntheticBatch(
      model.config.vocabSize,
      cfg.rows,
      cfg.seqLen,
      cfg.docsPerRow,
      cfg.seed * 2 + i,
    );
    return {
      batch,
      tokens: trained(batch),
      flops: trainingFlops(model.config, cfg.lora, batch, checkpointing),
    };
  });
  const step: Stepper = async (s) => {
    const { batch, tokens } = batches[s % 2];
    const { lossSum } = await model.forwardBackward(batch, Math.max(1, tokens), s + 1);
    await model.optimizerStep(ADAMW);
    return lossSum / tokens;
  };
  return { step, flops: batches[0].flops };
}

/**
 * A synthetic preference split: `pairs` pairs whose rows are `seqLen` tokens, a shared prompt of
 * seqLen/4 and different answers (random tokens in [0, V)).
 */
export function syntheticPairs(V: number, pairs: number, seqLen: number, seed: number): Split {
  const next = mulberry32(seed);
  const prompt = Math.max(1, Math.floor(seqLen / 4));
  const rows: ShardRow[] = [];
  for (let p = 0; p < pairs; p++) {
    const head = Array.from({ length: prompt }, () => Math.floor(next() * V));
    for (let side = 0; side < 2; side++) {
      const tokens = Uint32Array.from(
        { length: seqLen },
        (_, i) => i < prompt ? head[i] : Math.floor(next() * V),
      );
      const mask = Uint8Array.from(tokens, (_, i) => i >= prompt ? 1 : 0);
      rows.push({ index: rows.length, tokens, mask, bounds: Uint32Array.from([0, seqLen]) });
    }
  }
  return { index: { pad_id: 0 } as Split["index"], rows };
}

/**
 * DPO steps on `model` (sigmoid, β 0.1): B/2 pairs per step from two alternating halves of a
 * synthetic split; the reference is the model's adapter before the first step, its log-probs
 * scored once before the clock starts ("dpo") or in every step ("dpo-live").
 */
async function dpoStepper(
  model: TrainableModel,
  cfg: TrainBenchConfig,
  checkpointing: boolean,
  live: boolean,
) {
  const pairs = Math.max(1, Math.floor(cfg.rows / 2));
  const split = syntheticPairs(model.config.vocabSize, 2 * pairs, cfg.seqLen, cfg.seed * 2 + 7);
  const reference = live
    ? liveReference(model, await model.getLora(), split, null)
    : tableReference({ train: await scoreSplit(model, split, pairs) });
  const settings: DpoSettings = {
    lossType: "sigmoid",
    beta: 0.1,
    labelSmoothing: 0,
    referenceFree: false,
    rpoAlpha: null,
  };
  const objective = dpoObjective(split, null, settings, reference, model.config.vocabSize);
  const halves = [0, 1].map((h) => Uint32Array.from({ length: pairs }, (_, i) => h * pairs + i));
  const step: Stepper = async (s) => {
    const r = await objective.step(model, halves[s % 2], pairs, [s + 1]);
    await model.optimizerStep(ADAMW);
    return r.loss;
  };
  const batch = pairBatch(split, halves[0]);
  return { step, flops: trainingFlops(model.config, cfg.lora, batch, checkpointing) };
}

/** Runs warm-up and timed steps of `step`; `flops` are one step's (bench/train_flops.ts). */
async function timeSteps(
  step: Stepper,
  flops: { total: number; model: number },
  cfg: TrainBenchConfig,
  label: string,
): Promise<StepTimes> {
  const out: StepTimes = { seconds: [], losses: [], flops };
  const progress = new Progress(label, cfg.warmup + cfg.steps, "steps");
  for (let s = 0; s < cfg.warmup + cfg.steps; s++) {
    const t0 = performance.now();
    const loss = await step(s);
    const dt = (performance.now() - t0) / 1000;
    if (s >= cfg.warmup) {
      out.seconds.push(dt);
      out.losses.push(loss);
    }
    progress.tick(1, `${dt.toFixed(3)} s/step`);
  }
  progress.done();
  return out;
}

function summarise(
  base: Omit<
    TrainResult,
    "stepSeconds" | "tokensPerSecond" | "flopsPerStep" | "tflops" | "peakFraction" | "loss"
  >,
  cfg: TrainBenchConfig,
  run: StepTimes,
): TrainResult {
  const total = run.seconds.reduce((a, b) => a + b, 0);
  const mean = total / run.seconds.length;
  const tflops = { total: run.flops.total / mean / 1e12, model: run.flops.model / mean / 1e12 };
  return {
    ...base,
    stepSeconds: { mean, min: Math.min(...run.seconds), max: Math.max(...run.seconds), all: run.seconds },
    tokensPerSecond: base.tokensPerStep * run.seconds.length / total,
    flopsPerStep: run.flops,
    tflops,
    peakFraction: cfg.peakTflops === null || base.backend !== "webgpu" ? null : tflops.total / cfg.peakTflops,
    loss: { first: run.losses[0], last: run.losses[run.losses.length - 1] },
  };
}

/**
 * Loads `dir` on the GPU (a 16-bit or a bitsandbytes 4-bit checkpoint), runs `afterLoad` (e.g.
 * deleting the checkpoint), times the steps of `objective`, frees the model.
 */
export async function benchGpu(
  gpu: Gpu,
  name: string,
  dir: string,
  config: ModelConfig,
  checkpointBytes: number,
  generateSeconds: number | null,
  cfg: TrainBenchConfig,
  afterLoad: () => Promise<void> = async () => {},
  objective: Objective = "sft",
): Promise<TrainResult> {
  trimPool(gpu);
  let progress = null as Progress | null;
  let lastRead = 0;
  const t0 = performance.now();
  // "full": every weight trains (f32 masters, gradients and moments); no adapter.
  const full = objective === "full";
  const lora = full ? { ...cfg.lora, targets: [] } : cfg.lora;
  const model = await createGpuModel(config, dir, lora, cfg.seed, {
    full,
    dtype: cfg.dtype,
    gradientCheckpointing: cfg.gradientCheckpointing,
    onLoadProgress: generateSeconds === null ? undefined : (read, total) => {
      progress ??= new Progress(`load ${name}`, total, "B");
      progress.tick(read - lastRead);
      lastRead = read;
    },
  });
  try {
    await recorder(gpu).sync(); // the uploads are done
    const loadSeconds = (performance.now() - t0) / 1000;
    progress?.done();
    await afterLoad();
    resetPeakMemory(gpu);
    const loadedBytes = memoryStats(gpu).liveBytes;
    const stepper = objective === "sft" || full
      ? sftStepper(model, cfg, cfg.gradientCheckpointing)
      : await dpoStepper(model, cfg, cfg.gradientCheckpointing, objective === "dpo-live");
    const label = `train ${name} webgpu${objective === "sft" ? "" : ` ${objective}`}`;
    const run = await timeSteps(stepper.step, stepper.flops, cfg, label);
    const rows = objective === "sft" || full ? cfg.rows : 2 * Math.max(1, Math.floor(cfg.rows / 2));
    return summarise(
      {
        model: name,
        backend: "webgpu",
        objective,
        dtype: model.dtype,
        rows,
        seqLen: cfg.seqLen,
        tokensPerStep: rows * cfg.seqLen,
        params: paramCounts(config, cfg),
        generateSeconds,
        checkpointBytes,
        loadSeconds,
        memory: { loadedBytes, peakBytes: memoryStats(gpu).peakBytes },
      },
      cfg,
      run,
    );
  } finally {
    model[Symbol.dispose]();
    trimPool(gpu);
  }
}

/** The same steps through the CPU reference backend. */
async function benchReference(
  name: string,
  dir: string,
  checkpointBytes: number,
  cfg: TrainBenchConfig,
): Promise<TrainResult> {
  const t0 = performance.now();
  const host = await loadHostModel(dir);
  using model = createReferenceModel(host.config, host.weights, cfg.lora, cfg.seed);
  const loadSeconds = (performance.now() - t0) / 1000;
  const stepper = sftStepper(model, cfg, false);
  const run = await timeSteps(stepper.step, stepper.flops, cfg, `train ${name} cpu-reference`);
  return summarise(
    {
      model: name,
      backend: "cpu-reference",
      objective: "sft",
      dtype: "f64",
      rows: cfg.rows,
      seqLen: cfg.seqLen,
      tokensPerStep: cfg.rows * cfg.seqLen,
      params: paramCounts(host.config, cfg),
      generateSeconds: null,
      checkpointBytes,
      loadSeconds,
      memory: null,
    },
    cfg,
    run,
  );
}

/**
 * Writes a random bf16 checkpoint of `configJson` under `parent` (bench/train_checkpoint.ts),
 * loads it on the GPU once per objective of `cfg.objectives`, deletes it once the last is loaded,
 * and times the steps of each.
 */
export async function benchRandomCheckpoint(
  gpu: Gpu,
  parent: string,
  name: string,
  configJson: Record<string, unknown>,
  cfg: TrainBenchConfig,
): Promise<TrainResult[]> {
  const dir = await Deno.makeTempDir({ dir: parent, prefix: "checkpoint-" });
  try {
    const t0 = performance.now();
    const ckpt = await writeRandomCheckpoint(dir, configJson, { seed: cfg.seed, progress: `write ${name}` });
    const generateSeconds = (performance.now() - t0) / 1000;
    const results: TrainResult[] = [];
    for (const [i, objective] of cfg.objectives.entries()) {
      // The checkpoint is not needed once the last weights are on the GPU: free the disk early.
      const afterLoad = i === cfg.objectives.length - 1
        ? async () => await Deno.remove(dir, { recursive: true })
        : undefined;
      results.push(
        await benchGpu(
          gpu,
          name,
          dir,
          ckpt.config,
          ckpt.weightBytes,
          generateSeconds,
          cfg,
          afterLoad,
          objective,
        ),
      );
    }
    return results;
  } finally {
    await Deno.remove(dir, { recursive: true }).catch((error) => {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    });
  }
}

function paramCounts(config: ModelConfig, cfg: TrainBenchConfig): { frozen: number; lora: number } {
  return {
    frozen: frozenMatmulParams(config).total,
    lora: loraParams(config, cfg.lora.r, cfg.lora.targets).total,
  };
}

const gb = (bytes: number) => `${(bytes / 1e9).toFixed(2)} GB`;
const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);
/** A rate with 3 significant digits below 100, whole above. */
const rate = (x: number) => (x >= 100 ? x.toFixed(0) : x.toPrecision(3));

function printTable(header: string[], rows: string[][], leftColumns: number): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i < leftColumns ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ").trimEnd();
  console.log(line(header));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of rows) console.log(line(r));
}

/** Prints the figures of `report` as a table, the ratios and the FLOP model. */
export function printReport(report: TrainBenchReport): void {
  const { config: cfg, results } = report;
  const peak = cfg.peakTflops;
  const header = [
    "model",
    "backend",
    "objective",
    "dtype",
    "B×S",
    "load s",
    "step ms",
    "tokens/s",
    "TFLOP/s",
    ...(peak === null ? [] : ["% peak"]),
    "live MiB",
    "peak MiB",
    "loss",
  ];
  const rows = results.map((r) => [
    r.model,
    r.backend,
    r.objective,
    r.dtype,
    `${r.rows}×${r.seqLen}`,
    r.loadSeconds.toFixed(2),
    (r.stepSeconds.mean * 1000).toFixed(1),
    rate(r.tokensPerSecond),
    rate(r.tflops.total),
    ...(peak === null ? [] : [r.peakFraction === null ? "-" : `${(100 * r.peakFraction).toFixed(1)}%`]),
    r.memory ? mib(r.memory.loadedBytes) : "-",
    r.memory ? mib(r.memory.peakBytes) : "-",
    r.loss.last.toFixed(3),
  ]);
  console.log();
  printTable(header, rows, 4);
  for (const [model, ratio] of Object.entries(report.ratios)) {
    console.log(`\nwebgpu / cpu-reference tokens/s, ${model}: ${ratio.toFixed(2)}x`);
  }
  for (const [what, ratio] of Object.entries(report.dpoRatios)) {
    const [model, objective] = what.split(" ");
    if (objective === "full") {
      console.log(`full fine-tuning / LoRA tokens/s, ${model}: ${ratio.toFixed(2)}x`);
      continue;
    }
    const how = objective === "dpo" ? "reference precomputed" : "reference scored each step";
    console.log(`DPO / SFT tokens/s, ${model} (${how}): ${ratio.toFixed(2)}x`);
  }
  for (const r of results.filter((r) => r.generateSeconds !== null)) {
    console.log(
      `\n${r.model}: ${(r.params.frozen / 1e9).toFixed(2)} B frozen matmul params, ` +
        `${(r.params.lora / 1e6).toFixed(1)} M LoRA params (r ${cfg.lora.r}, all-linear)`,
    );
    console.log(
      `  checkpoint  ${gb(r.checkpointBytes)} bf16 written in ${r.generateSeconds!.toFixed(1)} s ` +
        `(${(r.checkpointBytes / 1e9 / r.generateSeconds!).toFixed(2)} GB/s)`,
    );
    console.log(`  load        ${r.loadSeconds.toFixed(1)} s as ${r.dtype}`);
    console.log(
      `  step        ${r.stepSeconds.mean.toFixed(3)} s mean (min ${r.stepSeconds.min.toFixed(3)}, ` +
        `max ${r.stepSeconds.max.toFixed(3)}) over ${cfg.steps} steps after ${cfg.warmup} warm-up; ` +
        `${rate(r.tokensPerSecond)} tokens/s`,
    );
    const { total, model } = r.flopsPerStep;
    const ofPeak = peak === null ? "" : `, ${(100 * r.peakFraction!).toFixed(1)}% of ${peak} TFLOP/s`;
    console.log(
      `  FLOPs/step  ${total.toExponential(3)} (model ${model.toExponential(3)}): ` +
        `${rate(r.tflops.total)} TFLOP/s achieved (model ${rate(r.tflops.model)})${ofPeak}`,
    );
    if (r.memory) {
      console.log(
        `  GPU memory  ${r.memory.loadedBytes} B after load, peak ${r.memory.peakBytes} B (tensor pool)`,
      );
    }
  }
  console.log(`\nFLOP model (per step; T = B·S):\n  ${FLOP_FORMULA.replaceAll("\n", "\n  ")}`);
}

/** Runs the benchmark with command-line style arguments; prints a table; returns the figures. */
export async function run(args: string[]): Promise<TrainBenchReport> {
  const gpu = await getGpu();
  const { config: cfg, json, tmp: tmpParent } = parseTrainArgs(args, gpu);
  console.log(
    `train benchmark on ${gpu.info.description} (${gpu.info.backend}${gpu.software ? ", CPU" : ""}): ` +
      `${cfg.dtype}, LoRA r ${cfg.lora.r} alpha ${cfg.lora.alpha} dropout ${cfg.lora.dropout} on all-linear, ` +
      `checkpointing ${cfg.gradientCheckpointing ? "on" : "off"}, B×S ${cfg.rows}×${cfg.seqLen} ` +
      `(${cfg.docsPerRow} docs/row), ${cfg.steps} steps after ${cfg.warmup} warm-up` +
      (cfg.peakTflops === null ? "" : `, peak ${cfg.peakTflops} TFLOP/s`),
  );
  const tmp = await Deno.makeTempDir({ dir: tmpParent ?? undefined, prefix: "lathe-bench-train-" });
  const results: TrainResult[] = [];
  try {
    for (const size of cfg.sizes) {
      const name = `llama-${size}`;
      const dir = join(tmp, name);
      await Deno.mkdir(dir);
      const { config, bytes } = await writeTinyCheckpoint(dir, size, cfg.seed);
      for (const objective of cfg.objectives) {
        results.push(await benchGpu(gpu, name, dir, config, bytes, null, cfg, undefined, objective));
      }
      if (size === "nano" && cfg.reference) results.push(await benchReference(name, dir, bytes, cfg));
      await Deno.remove(dir, { recursive: true });
    }
    if (cfg.shape !== null) {
      const overrides = cfg.layers === null ? {} : { num_hidden_layers: cfg.layers };
      const name = cfg.layers === null
        ? cfg.shape
        : `${cfg.shape} (${cfg.layers} layer${cfg.layers === 1 ? "" : "s"})`;
      results.push(
        ...await benchRandomCheckpoint(gpu, tmp, name, shapeConfigJson(cfg.shape, overrides), cfg),
      );
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  const ratios: Record<string, number> = {};
  const sftOf = (model: string) =>
    results.find((x) => x.model === model && x.backend === "webgpu" && x.objective === "sft");
  for (const r of results.filter((r) => r.backend === "cpu-reference")) {
    const g = sftOf(r.model);
    if (g) ratios[r.model] = g.tokensPerSecond / r.tokensPerSecond;
  }
  const dpoRatios: Record<string, number> = {};
  for (const r of results.filter((r) => r.objective !== "sft")) {
    const sft = sftOf(r.model);
    if (sft) dpoRatios[`${r.model} ${r.objective}`] = r.tokensPerSecond / sft.tokensPerSecond;
  }
  const report: TrainBenchReport = {
    benchmark: "train",
    date: new Date().toISOString(),
    device: {
      description: gpu.info.description,
      vendor: gpu.info.vendor,
      backend: gpu.info.backend,
      features: gpu.info.features,
      software: gpu.software,
    },
    deno: Deno.version.deno,
    config: cfg,
    flopFormula: FLOP_FORMULA,
    results,
    ratios,
    dpoRatios,
  };
  printReport(report);
  if (json !== null) {
    await writeJsonAtomic(json, report);
    console.log(`\nwrote ${json}`);
  }
  return report;
}

if (import.meta.main) {
  await runMain(async () => {
    await run(Deno.args);
  });
}
