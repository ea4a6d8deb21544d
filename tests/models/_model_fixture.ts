// Shared fixtures of the model-graph tests: tiny random checkpoints, packed micro-batches with two
// documents per row (and padding), random non-zero LoRA B, and the CPU reference backend on the
// same checkpoint.
// B = rows, S = tokens per row, T = B·S, V = vocab.
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { loadModelConfig, type ModelConfig, PROJECTIONS } from "../../formats/model_config.ts";
import { loadHostModel } from "../../kernels/models/load.ts";
import { createReferenceModel, type ReferenceModel } from "../../kernels/models/reference_backend.ts";
import { type TinyArch, writeTinyModel } from "../../kernels/models/tiny.ts";
import type { Batch, LoraSpec, LoraWeights } from "../../kernels/models/trainable.ts";
import { randn, rng } from "../kernels/_harness.ts";
import { decoder_forward } from "../../kernels/reference/decoder.ts";
import type { LoraAdapter } from "../../kernels/reference/linear_lora.ts";
import { MODEL_DIR, step as quantizeStep } from "../../steps/quantize.ts";
import { runStep } from "../../steps/runner.ts";

const TOKENIZER = fileURLToPath(new URL("../../data/demo/tokenizer", import.meta.url));
const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** Sliding window of the test Mistral: shorter than a document, so the window masks keys. */
export const TEST_WINDOW = 5;

/** A tiny checkpoint on disk; `cleanup()` removes it. */
export interface TinyCheckpoint {
  dir: string;
  config: ModelConfig;
  cleanup: () => Promise<void>;
}

/**
 * A nano checkpoint of `arch` (D 64, L 2, H 4, Hkv 2, F 128, V 512) in a temp dir. Mistral's
 * sliding window is cut to {@link TEST_WINDOW}.
 */
export async function tinyCheckpoint(arch: TinyArch, seed = 3): Promise<TinyCheckpoint> {
  const dir = await Deno.makeTempDir({ prefix: `lathe-graph-${arch}-` });
  await writeTinyModel(dir, { arch, size: "nano", seed, tokenizerDir: TOKENIZER });
  if (arch === "mistral") {
    const path = join(dir, "config.json");
    const json = JSON.parse(await Deno.readTextFile(path));
    json.sliding_window = TEST_WINDOW;
    await Deno.writeTextFile(path, JSON.stringify(json, null, 2));
  }
  return { dir, config: await loadModelConfig(dir), cleanup: () => Deno.remove(dir, { recursive: true }) };
}

/** LoRA on all seven projections. */
export function allTargets(r = 4, alpha = 8, dropout = 0): LoraSpec {
  return { r, alpha, dropout, targets: [...PROJECTIONS], useRslora: false };
}

/**
 * A packed micro-batch: each row holds two documents (cut at a random point) and, in odd rows,
 * 3 padding tokens with their own document id. Targets are the next token inside a document, −100
 * at a document's last token, on the first token of each document (a "prompt") and on padding.
 */
export function packedBatch(V: number, rows: number, seqLen: number, seed: number): Batch {
  const next = rng(seed);
  const T = rows * seqLen;
  const tokens = new Uint32Array(T);
  const targets = new Int32Array(T).fill(-100);
  const positions = new Uint32Array(T);
  const docs = new Uint32Array(T);
  for (let b = 0; b < rows; b++) {
    const pad = b % 2 === 1 ? 3 : 0;
    const used = seqLen - pad;
    const cut = 3 + Math.floor(next() * (used - 6));
    for (let i = 0; i < seqLen; i++) {
      const t = b * seqLen + i;
      tokens[t] = Math.floor(next() * V);
      const doc = i < cut ? 0 : i < used ? 1 : 2;
      docs[t] = doc;
      positions[t] = doc === 0 ? i : doc === 1 ? i - cut : i - used;
    }
    for (let i = 0; i < used; i++) {
      const t = b * seqLen + i;
      const end = docs[t] === 0 ? cut : used;
      const first = docs[t] === 0 ? 0 : cut;
      if (i + 1 < end && i !== first) targets[t] = tokens[t + 1];
    }
  }
  return { rows, seqLen, tokens, targets, positions, docs };
}

/** The adapters with B replaced by seeded normal values (so every gradient path is live). */
export function withRandomB(weights: LoraWeights[], seed: number, std = 0.2): LoraWeights[] {
  return weights.map((w, i) => ({ ...w, A: w.A.slice(), B: randn(w.B.length, seed * 1000 + i, std) }));
}

/** The CPU reference backend on the checkpoint, with the same adapters as `weights`. */
export async function referenceModel(
  ckpt: TinyCheckpoint,
  lora: LoraSpec,
  seed: number,
  weights: LoraWeights[],
): Promise<ReferenceModel> {
  const host = await loadHostModel(ckpt.dir);
  const model = createReferenceModel(host.config, host.weights, lora, seed);
  await model.setLora(weights);
  return model;
}

/** Number of targets that are not −100. */
export function trainedTokens(batch: Batch): number {
  return batch.targets.reduce((n, y) => n + (y === -100 ? 0 : 1), 0);
}

/**
 * A {@link tinyCheckpoint} of `arch` quantized by the quantize step with `config` (NF4 with double
 * quantization by default); `body` gets the 4-bit model directory, removed afterwards.
 */
export async function quantizedCheckpoint(
  arch: TinyArch,
  config: Record<string, unknown>,
  body: (dir: string) => Promise<void>,
): Promise<void> {
  const ckpt = await tinyCheckpoint(arch);
  const runs = await Deno.makeTempDir({ prefix: "lathe-4bit-" });
  try {
    await runStep(quantizeStep, {
      runsRoot: runs,
      runId: "q",
      recipe: null,
      config: { model: ckpt.dir, ...config },
      seed: 1,
      projectRoot: ROOT,
      quiet: true,
    });
    await body(join(runs, "q", "quantize", MODEL_DIR));
  } finally {
    await Deno.remove(runs, { recursive: true });
    await ckpt.cleanup();
  }
}

/**
 * The CPU reference's logits of the last token of `ids` (f64), from a full forward with
 * `adapters` (by module path) on `weights`.
 */
export function referenceLastLogits(
  config: ModelConfig,
  weights: ReadonlyMap<string, Float32Array>,
  adapters: ReadonlyMap<string, LoraAdapter>,
  ids: number[],
): Float64Array {
  const f = decoder_forward(config, weights, adapters, {
    B: 1,
    S: ids.length,
    ids,
    targets: ids.map(() => -100),
    numItems: 1,
  });
  const { xF, head } = f.saved;
  const { vocabSize: V, hiddenSize: D } = config;
  const t = ids.length - 1;
  return Float64Array.from({ length: V }, (_, v) => {
    let s = 0;
    for (let d = 0; d < D; d++) s += xF[t * D + d] * head[v * D + d];
    return s;
  });
}
