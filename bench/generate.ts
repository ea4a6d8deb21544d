/**
 * Generation benchmark: prefill and KV-cache decode throughput (kernels/models/decode.ts) on the
 * tiny Llamas (kernels/models/tiny.ts sizes, V = 512, random weights, an all-linear LoRA r 8 with
 * non-zero B), at batch 1 and 8, against two references measured in the same process:
 * - the same model's training-forward throughput on the adapter (`evaluate` on B × S tokens: the
 *   forward a prefill runs, without the cache writes);
 * - for decode, the time to read the model's weights once from GPU memory (a buffer copy of that
 *   many bytes, read + write counted as the copy moves them): the bound a batch-1 decoder can
 *   reach, since each step reads every weight once. Reported as decode step time / copy time.
 *
 * With `--shape mistral-7b` (or llama3-8b, qwen2-7b; `--layers N` keeps N layers) a random-weight
 * bf16 checkpoint of that model's config (bench/train_checkpoint.ts) runs instead of the tiny
 * sizes, loaded in f16 and, with `--nf4`, also as the quantize step's NF4 copy: the GPU phase of
 * bench/gpu.sh, where the decode step against the weights' copy is the memory-bandwidth bound.
 *
 * ```
 * deno task bench generate [--sizes nano,micro] [--prompt 128] [--new 32] [--batches 1,8] [--json FILE]
 * deno task bench generate --shape mistral-7b --nf4 --prompt 512 --new 64 --batches 1,8
 * ```
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { writeJsonAtomic } from "../foundation/atomic.ts";
import { runMain } from "../foundation/errors.ts";
import { mulberry32 } from "../foundation/random.ts";
import { getGpu } from "../kernels/device.ts";
import { Decoder } from "../kernels/models/decode.ts";
import { createGpuModel } from "../kernels/models/graph.ts";
import { TINY_SIZES, type TinySize } from "../kernels/models/tiny.ts";
import { recorder } from "../kernels/recorder.ts";
import { Tensor } from "../kernels/tensor.ts";
import { expectedTensors, PROJECTIONS } from "../formats/model_config.ts";
import { benchDevice, benchUsage, type Usage } from "./_common.ts";
import { writeTinyCheckpoint } from "./train.ts";
import { shapeConfigJson, SHAPES, writeRandomCheckpoint } from "./train_checkpoint.ts";
import { runQuantizeStep } from "./nf4.ts";
import { loadModelConfig, type ModelConfig } from "../formats/model_config.ts";

const usage: Usage = benchUsage("generate");

/** One model at one batch size. */
export interface GenerateResult {
  model: string;
  dtype: string;
  batch: number;
  promptTokens: number;
  newTokens: number;
  prefillTokensPerS: number;
  /** New tokens (all sequences) per second of decoding. */
  decodeTokensPerS: number;
  /** Milliseconds per decode step (one token of every sequence). */
  decodeStepMs: number;
  /** The training forward's tokens/s on B × S tokens (the reference of the prefill). */
  forwardTokensPerS: number;
  /** Bytes of the model's weights, and ms to copy them once on the GPU. */
  weightBytes: number;
  weightCopyMs: number;
  /** decodeStepMs / weightCopyMs: how far a step is from reading the weights once. */
  stepOverCopy: number;
}

/** The report `--json` writes. */
export interface GenerateBenchReport {
  benchmark: "generate";
  date: string;
  device: ReturnType<typeof benchDevice>;
  results: GenerateResult[];
}

function parse(args: string[]) {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        sizes: { type: "string", default: "nano,micro" },
        prompt: { type: "string", default: "128" },
        new: { type: "string", default: "32" },
        batches: { type: "string", default: "1,8" },
        shape: { type: "string" },
        layers: { type: "string" },
        nf4: { type: "boolean", default: false },
        tmp: { type: "string" },
        json: { type: "string" },
      },
      strict: true,
    }));
  } catch (error) {
    usage((error as Error).message);
  }
  const int = (name: string, raw: string) => {
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1) usage(`--${name} "${raw}" is not a positive integer`);
    return n;
  };
  const shape = values.shape ?? null;
  if (shape !== null && !Object.hasOwn(SHAPES, shape)) {
    usage(`--shape "${shape}" is unknown`, `Known shapes: ${Object.keys(SHAPES).join(", ")}.`);
  }
  const sizes = shape !== null ? [] : values.sizes!.split(",").filter((s) => s);
  for (const s of sizes) if (!Object.hasOwn(TINY_SIZES, s)) usage(`--sizes names "${s}"`);
  return {
    shape,
    layers: values.layers === undefined ? null : int("layers", values.layers),
    nf4: values.nf4!,
    tmp: values.tmp ?? null,
    sizes: sizes as TinySize[],
    prompt: int("prompt", values.prompt!),
    newTokens: int("new", values.new!),
    batches: values.batches!.split(",").map((b) => int("batches", b)),
    json: values.json ?? null,
  };
}

/**
 * Bytes of the weights as the GPU holds them: 16/32-bit tensors at the activation dtype's size,
 * 4-bit projections at their codes, absmax and tables (what a decode step reads).
 */
async function storedWeightBytes(dir: string, config: ModelConfig, dtype: "f16" | "f32"): Promise<number> {
  const quantized = await readQuantizedStats(dir).catch(() => null);
  let bytes = 0;
  for (const [name, shape] of expectedTensors(config)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const q = quantized?.get(name);
    bytes += q ? Math.ceil(n / 2) + q.absmaxBytes : n * (dtype === "f16" ? 2 : 4);
  }
  return bytes;
}

/** The absmax bytes of each 4-bit weight of a bitsandbytes checkpoint in `dir`, by weight name. */
async function readQuantizedStats(dir: string): Promise<Map<string, { absmaxBytes: number }>> {
  const { ModelWeights } = await import("../formats/safetensors.ts");
  const { quantizedWeightNames } = await import("../formats/bnb4bit_checkpoint.ts");
  using weights = await ModelWeights.open(dir);
  const out = new Map<string, { absmaxBytes: number }>();
  for (const name of quantizedWeightNames(weights.names())) {
    const absmax = `${name}.absmax`;
    out.set(name, { absmaxBytes: weights.has(absmax) ? weights.info(absmax).byteLength : 0 });
  }
  return out;
}

/** Median of a few timings. */
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** Runs the benchmark with command-line style arguments; prints a table; returns the figures. */
export async function run(args: string[]): Promise<GenerateBenchReport> {
  const cfg = parse(args);
  const gpu = await getGpu();
  const dtype = gpu.f16 ? "f16" : "f32";
  console.log(
    `generate benchmark on ${gpu.info.description}: ${dtype}, prompts of ${cfg.prompt} tokens, ${cfg.newTokens} new tokens, batches ${
      cfg.batches.join(", ")
    }`,
  );
  const results: GenerateResult[] = [];
  const tmp = await Deno.makeTempDir({ dir: cfg.tmp ?? undefined, prefix: "lathe-bench-generate-" });
  try {
    const models: { name: string; dir: string; config: ModelConfig }[] = [];
    for (const size of cfg.sizes) {
      const dir = join(tmp, size);
      await Deno.mkdir(dir);
      models.push({ name: `llama-${size}`, dir, config: (await writeTinyCheckpoint(dir, size, 1)).config });
    }
    if (cfg.shape !== null) {
      const dir = join(tmp, cfg.shape);
      await Deno.mkdir(dir);
      const overrides = cfg.layers === null ? {} : { num_hidden_layers: cfg.layers };
      const name = cfg.layers === null ? cfg.shape : `${cfg.shape} (${cfg.layers} layers)`;
      const ckpt = await writeRandomCheckpoint(dir, shapeConfigJson(cfg.shape, overrides), {
        seed: 1,
        progress: `write ${name}`,
      });
      models.push({ name, dir, config: ckpt.config });
      if (cfg.nf4) {
        const q = await runQuantizeStep(dir, join(tmp, "quantize"));
        models.push({ name: `${name} NF4`, dir: q.dir, config: await loadModelConfig(q.dir) });
      }
    }
    for (const { name, dir, config } of models) {
      const lora = { r: 8, alpha: 16, dropout: 0, targets: [...PROJECTIONS], useRslora: false };
      using model = await createGpuModel(config, dir, lora, 1, { dtype });
      const next = mulberry32(5);
      await model.setLora(
        (await model.getLora()).map((w) => ({ ...w, B: w.B.map(() => (next() - 0.5) * 0.02) })),
      );
      // The bytes a step reads: every weight once (NF4 projections at their stored size).
      const weightBytes = await storedWeightBytes(dir, config, dtype);
      // The copy ceiling: read and write the weights' bytes once; 20 copies per submission so the
      // submission's own latency is spread (median of 5 rounds).
      const words = Math.ceil(weightBytes / 4);
      using src = Tensor.empty(gpu, [words], "f32", { label: "copy_src" });
      using dst = Tensor.empty(gpu, [words], "f32", { label: "copy_dst" });
      const copies: number[] = [];
      for (let i = 0; i < 6; i++) {
        const t0 = performance.now();
        for (let k = 0; k < 20; k++) {
          src.chunks.forEach((c, j) =>
            recorder(gpu).copyBuffer(c.buffer, 0, dst.chunks[j].buffer, 0, c.byteLength)
          );
        }
        await recorder(gpu).sync();
        if (i > 0) copies.push((performance.now() - t0) / 20);
      }
      const weightCopyMs = median(copies);
      for (const B of cfg.batches) {
        const prompts = Array.from(
          { length: B },
          () => Array.from({ length: cfg.prompt }, () => Math.floor(next() * config.vocabSize)),
        );
        // Warm-up: compile every pipeline once.
        {
          using warm = new Decoder(model, B, cfg.prompt + 2);
          await warm.step((await warm.prefill(prompts)).map(() => 1));
        }
        using decoder = new Decoder(model, B, cfg.prompt + cfg.newTokens);
        const t0 = performance.now();
        let logits = await decoder.prefill(prompts);
        const prefillS = (performance.now() - t0) / 1000;
        const t1 = performance.now();
        for (let n = 1; n < cfg.newTokens; n++) {
          logits = await decoder.step(logits.map((z) => z.indexOf(Math.max(...z))));
        }
        const decodeS = (performance.now() - t1) / 1000;
        const steps = cfg.newTokens - 1;
        // The training forward on the same tokens (evaluate: no cache, no sampling).
        const T = B * cfg.prompt;
        const batch = {
          rows: B,
          seqLen: cfg.prompt,
          tokens: Uint32Array.from(prompts.flat()),
          targets: Int32Array.from(prompts.flat(), (_, i) => (i % cfg.prompt === cfg.prompt - 1 ? -100 : 1)),
          positions: Uint32Array.from({ length: T }, (_, i) => i % cfg.prompt),
          docs: new Uint32Array(T),
        };
        await model.evaluate(batch);
        const t2 = performance.now();
        await model.evaluate(batch);
        const forwardS = (performance.now() - t2) / 1000;
        const decodeStepMs = (1000 * decodeS) / steps;
        results.push({
          model: name,
          dtype,
          batch: B,
          promptTokens: cfg.prompt,
          newTokens: cfg.newTokens,
          prefillTokensPerS: T / prefillS,
          decodeTokensPerS: (B * steps) / decodeS,
          decodeStepMs,
          forwardTokensPerS: T / forwardS,
          weightBytes,
          weightCopyMs,
          stepOverCopy: decodeStepMs / weightCopyMs,
        });
      }
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  const header = [
    "model",
    "B",
    "prefill tok/s",
    "train fwd tok/s",
    "prefill/fwd",
    "decode tok/s",
    "step ms",
    "weights copy ms",
    "step/copy",
  ];
  const rows = results.map((r) => [
    r.model,
    String(r.batch),
    r.prefillTokensPerS.toFixed(0),
    r.forwardTokensPerS.toFixed(0),
    `${(r.prefillTokensPerS / r.forwardTokensPerS).toFixed(2)}x`,
    r.decodeTokensPerS.toFixed(1),
    r.decodeStepMs.toFixed(2),
    r.weightCopyMs.toFixed(3),
    `${r.stepOverCopy.toFixed(0)}x`,
  ]);
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)));
  console.log();
  for (const r of [header, widths.map((w) => "-".repeat(w)), ...rows]) {
    console.log(r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join("  "));
  }
  const report: GenerateBenchReport = {
    benchmark: "generate",
    date: new Date().toISOString(),
    device: benchDevice(gpu),
    results,
  };
  if (cfg.json) {
    await writeJsonAtomic(cfg.json, report);
    console.log(`\nwrote ${cfg.json}`);
  }
  return report;
}

if (import.meta.main) {
  await runMain(async () => {
    await run(Deno.args);
  });
}
