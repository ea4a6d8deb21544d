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
 * ```
 * deno task bench generate [--sizes nano,micro] [--prompt 128] [--new 32] [--batches 1,8] [--json FILE]
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
  const sizes = values.sizes!.split(",").filter((s) => s);
  for (const s of sizes) if (!Object.hasOwn(TINY_SIZES, s)) usage(`--sizes names "${s}"`);
  return {
    sizes: sizes as TinySize[],
    prompt: int("prompt", values.prompt!),
    newTokens: int("new", values.new!),
    batches: values.batches!.split(",").map((b) => int("batches", b)),
    json: values.json ?? null,
  };
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
  const tmp = await Deno.makeTempDir({ prefix: "lathe-bench-generate-" });
  try {
    for (const size of cfg.sizes) {
      const dir = join(tmp, size);
      await Deno.mkdir(dir);
      const { config } = await writeTinyCheckpoint(dir, size, 1);
      const lora = { r: 8, alpha: 16, dropout: 0, targets: [...PROJECTIONS], useRslora: false };
      using model = await createGpuModel(config, dir, lora, 1, { dtype });
      const next = mulberry32(5);
      await model.setLora(
        (await model.getLora()).map((w) => ({ ...w, B: w.B.map(() => (next() - 0.5) * 0.02) })),
      );
      let params = 0;
      for (const shape of expectedTensors(config).values()) params += shape.reduce((a, b) => a * b, 1);
      const weightBytes = params * (dtype === "f16" ? 2 : 4);
      // The copy ceiling: read and write the weights' bytes once; 20 copies per submission so the
      // submission's own latency is spread (median of 5 rounds).
      const words = Math.ceil(weightBytes / 4);
      using src = Tensor.empty(gpu, [words], "f32", { label: "copy_src" });
      using dst = Tensor.empty(gpu, [words], "f32", { label: "copy_dst" });
      const copies: number[] = [];
      for (let i = 0; i < 6; i++) {
        const t0 = performance.now();
        for (let k = 0; k < 20; k++) recorder(gpu).copyBuffer(src.buffer, 0, dst.buffer, 0, words * 4);
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
          model: `llama-${size}`,
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
