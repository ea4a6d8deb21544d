// The NF4 benchmark (bench/nf4.ts): its command line and defaults by adapter kind, and a minimal
// run of all three parts on the current adapter (no timing assertions): the ratios are printed
// and finite, the 4-bit and 16-bit products agree, and the temp checkpoints are removed.
import assert from "node:assert/strict";
import { join } from "node:path";
import { type Nf4BenchReport, parseNf4Args, run } from "../../bench/nf4.ts";
import type { GpuInfo } from "../../kernels/device.ts";
import { LatheError } from "../../foundation/errors.ts";
import { gpuTest } from "../kernels/_harness.ts";

function fakeGpu(description: string, f16: boolean, software: boolean) {
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

Deno.test("parseNf4Args() defaults: small sizes on CPU adapters, 7B shapes at T 2048 on GPUs", () => {
  const cpu = parseNf4Args([], fakeGpu("llvmpipe (LLVM 15.0.6, 256 bits)", true, true)).config;
  assert.deepEqual(cpu.parts, ["matmul", "train", "quantize"]);
  assert.equal(cpu.matmul.tokens, 256);
  assert.deepEqual(cpu.matmul.matrices, [{ N: 512, K: 512 }, { N: 1792, K: 512 }]);
  assert.deepEqual([cpu.train.shape, cpu.train.layers], ["small", 2]);
  const s = cpu.train.settings;
  assert.deepEqual([s.rows, s.seqLen, s.steps, s.warmup, s.lora.r, s.reference], [1, 256, 4, 1, 8, false]);
  assert.equal(cpu.train.repeats, 3);
  assert.equal(cpu.quantize.megabytes, 24);

  const h100 = parseNf4Args(["--json", "n.json"], fakeGpu("NVIDIA H100 80GB HBM3", true, false));
  const gpu = h100.config;
  assert.equal(h100.json, "n.json");
  assert.equal(gpu.matmul.tokens, 2048);
  assert.deepEqual(gpu.matmul.matrices, [{ N: 4096, K: 4096 }, { N: 14336, K: 4096 }]);
  assert.deepEqual([gpu.train.shape, gpu.train.layers, gpu.train.repeats], ["mistral-7b", 4, 1]);
  assert.deepEqual([gpu.train.settings.seqLen, gpu.train.settings.lora.r], [2048, 16]);
  assert.equal(gpu.quantize.megabytes, 512);

  const some = parseNf4Args(
    ["--parts", "quantize,matmul", "--dtype", "f32", "--matrices", "64x32", "--layers", "32"],
    fakeGpu("NVIDIA H100 80GB HBM3", true, false),
  ).config;
  assert.deepEqual(some.parts, ["matmul", "quantize"], "parts run in their fixed order");
  assert.deepEqual([some.dtype, some.train.settings.dtype], ["f32", "f32"]);
  assert.deepEqual(some.matmul.matrices, [{ N: 64, K: 32 }]);
  assert.equal(some.train.layers, 32);
});

Deno.test("parseNf4Args() names the bad option and value", () => {
  const gpu = fakeGpu("llvmpipe", false, true);
  const cases: [string[], RegExp][] = [
    [["--parts", "matmul,speed"], /--parts names "speed"/],
    [["--matrices", "4096"], /--matrices item "4096"/],
    [["--shape", "gpt-5"], /--shape "gpt-5" is unknown/],
    [["--dtype", "f16"], /needs shader-f16/],
    [["--layers", "0"], /--layers "0" is not an integer ≥ 1/],
    [["--quantize-mb", "0"], /--quantize-mb "0" is not a positive number/],
    [["--bogus"], /bogus/],
  ];
  for (const [args, pattern] of cases) {
    assert.throws(
      () => parseNf4Args(args, gpu),
      (e) =>
        e instanceof LatheError && e.message.startsWith(`Cannot run benchmark "nf4"`) &&
        pattern.test(e.message),
      args.join(" "),
    );
  }
});

gpuTest(
  "a minimal NF4 benchmark prints the three ratios, all finite, and removes its checkpoints",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-bench-nf4-test-" });
    try {
      const json = join(dir, "nf4.json");
      let report: Nf4BenchReport | null = null;
      const lines = await captureLog(async () => {
        report = await run([
          ...[
            "--dtype",
            "f32",
            "--tokens",
            "16",
            "--matrices",
            "64x128",
            "--seconds",
            "0.02",
            "--rounds",
            "1",
          ],
          ...[
            "--shape",
            "small",
            "--layers",
            "1",
            "--seq",
            "32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--train-repeats",
            "2",
          ],
          ...["--quantize-mb", "1", "--quantize-rounds", "1", "--json", json, "--tmp", dir],
        ]);
      });
      const ratio = (prefix: string) => {
        const line = lines.find((l) => l.startsWith(prefix));
        assert.ok(line !== undefined, `no line "${prefix}…" in\n${lines.join("\n")}`);
        const m = /(\d+\.\d+(?:e-\d+)?)x$/.exec(line);
        assert.ok(m !== null && Number.isFinite(Number(m[1])) && Number(m[1]) > 0, line);
      };
      ratio("nf4 / f32 matmul time, forward + backward");
      ratio("QLoRA / LoRA tokens/s");
      ratio("quantize / read + write MB/s");

      const written = JSON.parse(await Deno.readTextFile(json)) as Nf4BenchReport;
      assert.deepEqual(written, JSON.parse(JSON.stringify(report)));
      assert.equal(written.benchmark, "nf4");
      const [m] = written.matmul;
      assert.deepEqual([m.T, m.N, m.K], [16, 64, 128]);
      assert.ok(m.sameOutput, "the 4-bit and the 16-bit forward differ");
      for (
        const x of [m.ratio, m.forward.ratio, m.backward.ratio, m.dequantizeGBps, m.copyGBps, m.ofCopy]
      ) assert.ok(Number.isFinite(x) && x > 0, JSON.stringify(m));
      const t = written.train!;
      assert.equal(t.runs.length, 2);
      assert.deepEqual([t.lora, t.qlora], [t.runs[0].lora, t.runs[0].qlora]);
      assert.ok(
        Number.isFinite(t.ratio) && t.ratio > 0 && t.memoryRatio > 0 && t.memoryRatio < 1,
        JSON.stringify(t),
      );
      assert.ok(t.qlora.memory!.loadedBytes < t.lora.memory!.loadedBytes, "4-bit weights take less memory");
      const q = written.quantize!;
      assert.ok(q.stepMBps > 0 && q.referenceMBps > 0 && Number.isFinite(q.ratio), JSON.stringify(q));
      assert.ok(q.bytesOut > 0 && q.bytesOut < q.bytes / 2);
      assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["nf4.json"], "checkpoints removed");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
