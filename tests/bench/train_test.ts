// The training benchmark (bench/train.ts): its command line, its synthetic packed batches, and
// minimal runs on the current adapter (one step, no timing assertions): the tiny nano Llama on
// the GPU and the CPU reference, and the random-checkpoint path on a Qwen2 shrunk by config
// overrides.
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  benchRandomCheckpoint,
  parseTrainArgs,
  run,
  syntheticBatch,
  type TrainBenchReport,
} from "../../bench/train.ts";
import { shapeConfigJson } from "../../bench/train_checkpoint.ts";
import type { GpuInfo } from "../../kernels/device.ts";
import { LatheError } from "../../foundation/errors.ts";
import { gpuTest } from "../kernels/_harness.ts";

function fakeGpu(description: string, f16 = true, software = false) {
  const info: GpuInfo = {
    description,
    vendor: "",
    architecture: "",
    backend: "vulkan",
    features: [],
    fallback: false,
  };
  return { info, f16, software };
}

/** Runs `fn` with LATHE_PEAK_TFLOPS unset, restoring it after. */
function withoutPeakEnv<T>(fn: () => T): T {
  const saved = Deno.env.get("LATHE_PEAK_TFLOPS");
  Deno.env.delete("LATHE_PEAK_TFLOPS");
  try {
    return fn();
  } finally {
    if (saved !== undefined) Deno.env.set("LATHE_PEAK_TFLOPS", saved);
  }
}

/** Runs `fn` with console.log captured; returns the printed lines. */
async function captureLog(fn: () => Promise<unknown>): Promise<string[]> {
  const lines: string[] = [];
  const log = console.log;
  console.log = (...args: unknown[]) => lines.push(...args.map(String).join(" ").split("\n"));
  try {
    await fn();
  } finally {
    console.log = log;
  }
  return lines;
}

Deno.test("parseTrainArgs() defaults: tiny sizes at 4×256 r 8, shapes at 1×2048 r 16, H100 peak", () => {
  withoutPeakEnv(() => {
    const h100 = fakeGpu("NVIDIA H100 80GB HBM3");
    const tiny = parseTrainArgs([], h100).config;
    assert.deepEqual(tiny.sizes, ["nano", "micro"]);
    assert.equal(tiny.shape, null);
    assert.deepEqual([tiny.rows, tiny.seqLen, tiny.steps, tiny.warmup, tiny.lora.r], [4, 256, 10, 2, 8]);
    assert.equal(tiny.lora.targets.length, 7);
    assert.equal(tiny.gradientCheckpointing, true);
    assert.equal(tiny.dtype, "f16");
    assert.equal(tiny.peakTflops, 133.8);
    const big = parseTrainArgs(["--shape", "mistral-7b", "--json", "out.json"], h100);
    assert.deepEqual(big.config.sizes, []);
    assert.deepEqual(
      [big.config.rows, big.config.seqLen, big.config.docsPerRow, big.config.lora.r, big.config.lora.alpha],
      [1, 2048, 1, 16, 32],
    );
    assert.equal(big.json, "out.json");
    const cpu =
      parseTrainArgs(["--no-checkpointing"], fakeGpu("llvmpipe (LLVM 15.0.6, 256 bits)", false, true))
        .config;
    assert.equal(cpu.dtype, "f32");
    assert.equal(cpu.peakTflops, null);
    assert.equal(cpu.gradientCheckpointing, false);
    assert.equal(cpu.steps, 3);
  });
  const peak = parseTrainArgs(["--peak", "50"], fakeGpu("NVIDIA H100 80GB HBM3")).config;
  assert.equal(peak.peakTflops, 50);
});

Deno.test("parseTrainArgs() names the bad option and value", () => {
  const gpu = fakeGpu("llvmpipe", true, true);
  const cases: [string[], RegExp][] = [
    [["--shape", "gpt-5"], /--shape "gpt-5" is unknown/],
    [["--sizes", "nano,huge"], /--sizes names "huge"/],
    [["--steps", "0"], /--steps "0" is not an integer ≥ 1/],
    [["--rows", "1.5"], /--rows "1.5"/],
    [["--dtype", "bf16"], /--dtype "bf16"/],
    [["--peak", "fast"], /peak "fast"/],
    [["--bogus"], /bogus/],
    [["--objectives", "sft,kto"], /--objectives names "kto"/],
  ];
  for (const [args, pattern] of cases) {
    assert.throws(
      () => parseTrainArgs(args, gpu),
      (e) =>
        e instanceof LatheError && e.message.startsWith(`Cannot run benchmark "train"`) &&
        pattern.test(e.message),
      args.join(" "),
    );
  }
  assert.throws(() => parseTrainArgs(["--dtype", "f16"], fakeGpu("old", false)), /needs shader-f16/);
});

Deno.test("syntheticBatch() packs documents with restarting positions and next-token targets inside each", () => {
  const [rows, S, d, V] = [3, 50, 4, 97];
  const batch = syntheticBatch(V, rows, S, d, 9);
  assert.deepEqual(syntheticBatch(V, rows, S, d, 9), batch, "deterministic");
  for (let b = 0; b < rows; b++) {
    const docs = [...batch.docs.subarray(b * S, (b + 1) * S)];
    assert.deepEqual([...new Set(docs)], [0, 1, 2, 3], "contiguous documents in order");
    for (let i = 0; i < S; i++) {
      const t = b * S + i;
      assert.ok(batch.tokens[t] < V);
      const first = i === 0 || docs[i - 1] !== docs[i];
      assert.equal(batch.positions[t], first ? 0 : batch.positions[t - 1] + 1);
      const last = i === S - 1 || docs[i + 1] !== docs[i];
      assert.equal(batch.targets[t], last ? -100 : batch.tokens[t + 1]);
    }
  }
  // More documents than tokens: one token each, none trained.
  const tight = syntheticBatch(V, 1, 3, 5, 1);
  assert.deepEqual([...tight.docs], [0, 1, 2]);
  assert.deepEqual([...tight.targets], [-100, -100, -100]);
});

gpuTest(
  "run() prints a row per model, backend and objective, the GPU / reference and DPO / SFT ratios, and the JSON figures",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-bench-train-test-" });
    try {
      const json = join(dir, "train.json");
      let report: TrainBenchReport | null = null;
      const lines = await captureLog(async () => {
        report = await run([
          ...["--sizes", "nano", "--steps", "1", "--warmup", "0", "--rows", "2", "--seq", "32"],
          ...["--json", json, "--tmp", dir],
        ]);
      });
      const header = lines.findIndex((l) => /^model\s+backend\s+objective\s+dtype\s+B×S/.test(l));
      assert.ok(header >= 0, lines.join("\n"));
      assert.match(lines[header + 2], /^llama-nano\s+webgpu\s+sft\s+f(16|32)\s+2×32\s/);
      assert.match(lines[header + 3], /^llama-nano\s+webgpu\s+dpo\s+f(16|32)\s+2×32\s/);
      assert.match(lines[header + 4], /^llama-nano\s+webgpu\s+dpo-live\s+f(16|32)\s+2×32\s/);
      assert.match(lines[header + 5], /^llama-nano\s+webgpu\s+full\s+f(16|32)\s+2×32\s/);
      assert.match(lines[header + 6], /^llama-nano\s+cpu-reference\s+sft\s+f64\s+2×32\s/);
      assert.ok(lines.some((l) => /^full fine-tuning \/ LoRA tokens\/s, llama-nano: \d+\.\d\dx$/.test(l)));
      assert.ok(lines.some((l) => /^webgpu \/ cpu-reference tokens\/s, llama-nano: \d+\.\d\dx$/.test(l)));
      for (const how of ["reference precomputed", "reference scored each step"]) {
        assert.ok(
          lines.some((l) =>
            new RegExp(`^DPO / SFT tokens/s, llama-nano \\(${how}\\): \\d+\\.\\d\\dx$`).test(l)
          ),
          how,
        );
      }
      assert.ok(lines.some((l) => l.includes("layers bwd =")), "the FLOP model is printed");

      const written = JSON.parse(await Deno.readTextFile(json)) as TrainBenchReport;
      assert.deepEqual(written, JSON.parse(JSON.stringify(report)));
      assert.equal(written.benchmark, "train");
      assert.ok(!Number.isNaN(Date.parse(written.date)));
      assert.ok(written.device.description.length > 0);
      assert.deepEqual(written.results.map((r) => [r.model, r.backend, r.objective]), [
        ["llama-nano", "webgpu", "sft"],
        ["llama-nano", "webgpu", "dpo"],
        ["llama-nano", "webgpu", "dpo-live"],
        ["llama-nano", "webgpu", "full"],
        ["llama-nano", "cpu-reference", "sft"],
      ]);
      const [gpu, dpo, live, full, ref] = written.results;
      assert.equal(written.dpoRatios["llama-nano full"], full.tokensPerSecond / gpu.tokensPerSecond);
      for (const r of written.results) {
        assert.equal(r.tokensPerStep, 64, "a DPO step runs as many tokens as an SFT step");
        assert.equal(r.stepSeconds.all.length, 1);
        assert.ok(r.tokensPerSecond > 0 && r.flopsPerStep.total > 0 && r.tflops.total > 0);
        // Random init: the loss per token is about ln V (V = 512); DPO's first step is near ln 2
        // (the reference is the initial policy; LoRA dropout moves the policy's forward a little).
        const expected = r.objective === "sft" || r.objective === "full" ? Math.log(512) : Math.LN2;
        assert.ok(Math.abs(r.loss.last - expected) < 0.1, `${r.objective} loss ${r.loss.last}`);
      }
      for (const r of [dpo, live]) {
        assert.equal(written.dpoRatios[`llama-nano ${r.objective}`], r.tokensPerSecond / gpu.tokensPerSecond);
      }
      assert.ok(
        gpu.memory !== null && gpu.memory.peakBytes >= gpu.memory.loadedBytes && gpu.memory.loadedBytes > 0,
      );
      assert.equal(ref.memory, null);
      assert.ok(gpu.flopsPerStep.total > ref.flopsPerStep.total, "the GPU run recomputes the forward");
      assert.equal(gpu.flopsPerStep.model, ref.flopsPerStep.total);
      assert.equal(written.ratios["llama-nano"], gpu.tokensPerSecond / ref.tokensPerSecond);
      assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["train.json"], "checkpoints removed");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

gpuTest(
  "benchRandomCheckpoint() writes a shrunk Qwen2 shape once, trains it with SFT and DPO, then deletes it",
  async (gpu) => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-bench-train-test-" });
    try {
      const { config } = parseTrainArgs(
        [
          ...[
            "--shape",
            "qwen2-7b",
            "--rows",
            "2",
            "--seq",
            "16",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--peak",
            "1",
          ],
          ...["--objectives", "sft,dpo"],
        ],
        gpu,
      );
      const json = shapeConfigJson("qwen2-7b", {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 256,
      });
      const results = await benchRandomCheckpoint(gpu, dir, "qwen2-small", json, config);
      assert.deepEqual(results.map((x) => x.objective), ["sft", "dpo"]);
      assert.equal(results[1].checkpointBytes, results[0].checkpointBytes, "one checkpoint for both");
      const [r] = results;
      assert.equal(r.backend, "webgpu");
      assert.ok(r.generateSeconds !== null && r.generateSeconds >= 0);
      assert.ok(r.checkpointBytes > 0 && r.loadSeconds >= 0);
      assert.ok(r.peakFraction !== null && r.peakFraction === r.tflops.total / 1);
      // Random N(0, 0.02²) weights at D = 64: logits are nearly flat, so the loss is about ln V.
      assert.ok(Math.abs(r.loss.first - Math.log(256)) < 0.5, `loss ${r.loss.first}`);
      assert.deepEqual([...Deno.readDirSync(dir)], [], "the checkpoint is deleted");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
