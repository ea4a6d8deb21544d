/**
 * Shared fixtures of the training tests: a nano model on disk, token shards written directly
 * with the tokenize shard writer, configs for the cpu-reference backend, an in-memory metric
 * log, and a model wrapper that injects faults.
 * @module
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type HostModel, loadHostModel } from "../../../kernels/models/load.ts";
import { createReferenceModel, type ReferenceModel } from "../../../kernels/models/reference_backend.ts";
import { type TinyArch, writeTinyModel } from "../../../kernels/models/tiny.ts";
import type {
  AdamWStep,
  Batch,
  LoraSpec,
  LoraWeights,
  MicroBatchResult,
  OptimizerState,
  TokenWeighting,
  TrainableModel,
} from "../../../kernels/models/trainable.ts";
import { Progress } from "../../../foundation/progress.ts";
import { ShardWriter } from "../../../steps/tokenize/shards.ts";
import { TrainSftConfig } from "../../../steps/train/config.ts";
import type { LoopIo } from "../../../steps/train/loop.ts";
import { loadSplit, type Split } from "../../../steps/train/batches.ts";
import { resolveTargetModules } from "../../../formats/peft.ts";

/** Absolute path of the project root. */
export const ROOT = fileURLToPath(new URL("../../../", import.meta.url)).replace(/\/$/, "");
/** The demo tokenizer (V = 512, pad 509, eos 511). */
export const DEMO_TOKENIZER = join(ROOT, "data", "demo", "tokenizer");
/** Padding id of the shards written here (the demo tokenizer's pad). */
export const PAD = 509;

/** Runs `fn` in a fresh temp directory, removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-train-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes a nano tiny model into `dir` and loads it. */
export async function nanoModel(dir: string, arch: TinyArch = "llama"): Promise<HostModel> {
  await writeTinyModel(dir, { arch, size: "nano", seed: 3, tokenizerDir: DEMO_TOKENIZER });
  return await loadHostModel(dir);
}

/** One stored row: tokens, loss mask, document bounds [0, e1, ..., em]. */
export interface RowSpec {
  tokens: number[];
  mask: number[];
  bounds: number[];
}

/** A document of `length` tokens cycling through 8 ids from `start` (a pattern a model can learn). */
export function patternDoc(start: number, length: number): number[] {
  return Array.from({ length }, (_, i) => 20 + ((start + i) % 8));
}

/**
 * A packed row of `seqLen` tokens: documents of the given lengths back to back (each trained
 * on every token but its first), then padding.
 */
export function packedRow(seqLen: number, docs: number[][]): RowSpec {
  const tokens: number[] = [];
  const mask: number[] = [];
  const bounds = [0];
  for (const d of docs) {
    tokens.push(...d);
    mask.push(0, ...d.slice(1).map(() => 1));
    bounds.push(tokens.length);
  }
  while (tokens.length < seqLen) {
    tokens.push(PAD);
    mask.push(0);
  }
  return { tokens, mask, bounds };
}

/** `n` packed rows of repetitive pattern documents. */
export function patternRows(n: number, seqLen: number, offset = 0): RowSpec[] {
  return Array.from({ length: n }, (_, i) => {
    const a = 8 + ((i + offset) % 5);
    const b = seqLen - a - 3 - (i % 3);
    return packedRow(seqLen, [patternDoc(i + offset, a), patternDoc(3 * i + offset, b)]);
  });
}

/** Writes a split's shards into `<dir>/<split>/`; returns the index.json path. */
export async function writeSplit(
  dir: string,
  split: string,
  rows: RowSpec[],
  options: { seqLen: number; packed: boolean; kind?: "sft" | "text" | "preference"; shardTokens?: number },
): Promise<string> {
  const out = join(dir, split);
  const writer = new ShardWriter(out, 512, options.shardTokens ?? 1 << 20);
  for (const r of rows) await writer.add(r.tokens, Uint8Array.from(r.mask), r.bounds);
  await writer.finish({
    split,
    kind: options.kind ?? "sft",
    vocab_size: 512,
    seq_len: options.seqLen,
    packed: options.packed,
    paired: false,
    pad_id: PAD,
    bos_id: null,
    eos_id: 511,
    special_ids: {},
    tokenizer_sha256: "0".repeat(64),
  });
  return join(out, "index.json");
}

/** Writes and loads a split. */
export async function makeSplit(
  dir: string,
  split: string,
  rows: RowSpec[],
  options: { seqLen: number; packed: boolean },
): Promise<Split> {
  return await loadSplit(await writeSplit(dir, split, rows, options));
}

/** A cpu-reference config with no checkpoints, quiet defaults and `over` applied. */
export function trainConfig(over: Record<string, unknown> = {}): TrainSftConfig {
  return TrainSftConfig.parse({
    model: "tiny",
    backend: "cpu-reference",
    save_steps: null,
    ...over,
  });
}

/** The LoRA spec of a config. */
export function loraSpec(config: TrainSftConfig): LoraSpec {
  return {
    r: config.lora.r,
    alpha: config.lora.alpha,
    dropout: config.lora.dropout,
    targets: resolveTargetModules(config.lora.target_modules),
    useRslora: config.lora.use_rslora,
  };
}

/** A reference model of `host` for `config`. */
export function referenceModel(host: HostModel, config: TrainSftConfig, seed: number): ReferenceModel {
  return createReferenceModel(host.config, host.weights, loraSpec(config), seed);
}

/** One logged metric point. */
export interface Point {
  name: string;
  step: number;
  value: number;
}

/** A {@link LoopIo} that keeps the points in memory and prints nothing. */
export function memoryIo(): { io: LoopIo; points: Point[] } {
  const points: Point[] = [];
  return {
    points,
    io: {
      log: (name, step, value) => points.push({ name, step, value }),
      progress: (total, unit) => new Progress("test", total, unit, true),
    },
  };
}

/** What {@link FaultyModel} does, by 1-based optimizer step. */
export interface Faults {
  /** forwardBackward of this step returns a NaN loss. */
  nanAtStep?: number;
  /** forwardBackward of this step throws (a killed process). */
  throwAtStep?: number;
  /** Called before each optimizer step with the model (e.g. to read gradients). */
  beforeStep?: (step: number) => void;
  /** Receives every forwardBackward result. */
  onMicroBatch?: (result: MicroBatchResult, batch: Batch) => void;
}

/** Delegates to a model and injects {@link Faults}. */
export class FaultyModel implements TrainableModel {
  readonly inner: TrainableModel;
  readonly faults: Faults;
  #steps = 0;

  constructor(inner: TrainableModel, faults: Faults) {
    this.inner = inner;
    this.faults = faults;
  }

  get config() {
    return this.inner.config;
  }
  get lora() {
    return this.inner.lora;
  }
  get backend() {
    return this.inner.backend;
  }

  async forwardBackward(batch: Batch, normaliser: number, dropoutSeed: number) {
    const step = this.#steps + 1;
    if (step === this.faults.throwAtStep) throw new Error(`injected kill at step ${step}`);
    const r = await this.inner.forwardBackward(batch, normaliser, dropoutSeed);
    this.faults.onMicroBatch?.(r, batch);
    return step === this.faults.nanAtStep ? { ...r, lossSum: NaN } : r;
  }
  evaluate(batch: Batch) {
    return this.inner.evaluate(batch);
  }
  scoreTokens(batch: Batch) {
    return this.inner.scoreTokens(batch);
  }
  async forwardBackwardWeighted(batch: Batch, dropoutSeed: number, weigh: TokenWeighting) {
    const step = this.#steps + 1;
    if (step === this.faults.throwAtStep) throw new Error(`injected kill at step ${step}`);
    // A NaN forward: every score of the micro-batch is NaN.
    const poisoned: TokenWeighting = step === this.faults.nanAtStep
      ? (s) => weigh({ logp: s.logp.map(() => NaN), logitSum: s.logitSum })
      : weigh;
    const scores = await this.inner.forwardBackwardWeighted(batch, dropoutSeed, poisoned);
    return step === this.faults.nanAtStep ? { ...scores, logp: scores.logp.map(() => NaN) } : scores;
  }
  optimizerStep(hp: AdamWStep) {
    this.faults.beforeStep?.(this.#steps + 1);
    this.#steps++;
    return this.inner.optimizerStep(hp);
  }
  zeroGrad() {
    return this.inner.zeroGrad();
  }
  getLora(): Promise<LoraWeights[]> {
    return this.inner.getLora();
  }
  setLora(weights: LoraWeights[]) {
    return this.inner.setLora(weights);
  }
  /** Full fine-tuning's weights, when the inner model trains every weight. */
  getWeights(): Promise<Map<string, Float32Array>> {
    return (this.inner as unknown as { getWeights(): Promise<Map<string, Float32Array>> }).getWeights();
  }
  setWeights(weights: ReadonlyMap<string, Float32Array>): Promise<void> {
    return (this.inner as unknown as { setWeights(w: ReadonlyMap<string, Float32Array>): Promise<void> })
      .setWeights(weights);
  }
  /** What the inner model trains beside its adapters, when it does. */
  getExtras(): Promise<Map<string, Float32Array>> {
    return (this.inner as unknown as { getExtras(): Promise<Map<string, Float32Array>> }).getExtras();
  }
  setExtras(extras: ReadonlyMap<string, Float32Array>): Promise<void> {
    return (this.inner as unknown as { setExtras(e: ReadonlyMap<string, Float32Array>): Promise<void> })
      .setExtras(extras);
  }
  async getOptimizerState(): Promise<OptimizerState> {
    return await this.inner.getOptimizerState();
  }
  async setOptimizerState(state: OptimizerState) {
    this.#steps = state.step;
    await this.inner.setOptimizerState(state);
  }
  [Symbol.dispose](): void {
    this.inner[Symbol.dispose]();
  }
}

/** All adapter values of a model, concatenated (A then B per adapter, in the model's order). */
export async function flatLora(model: TrainableModel): Promise<Float32Array> {
  const parts = (await model.getLora()).flatMap((w) => [w.A, w.B]);
  const out = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
