/**
 * Merge and GGUF export throughput against a plain read + write of the same bytes, in one process:
 *
 * - reference: every tensor of a random bf16 model read and its bytes written to a temp file,
 *   synced (bench/nf4.ts `readWrite`; the same files, the same page cache);
 * - merge: the merge step's run (steps/merge.ts) with a random r-16 adapter on q_proj and v_proj into
 *   float16, as the mistral-qlora recipe merges;
 * - gguf Q8_0, gguf Q4_K_M: formats/gguf_model.ts `writeModelGguf` of the same model (every tensor
 *   read, converted to f32, permuted, quantized as llama-quantize chooses, written).
 *
 * Each figure is MB/s of source bf16 bytes and its ratio to the reference (the median over rounds of
 * reference time / contender time, contenders in a rotating order). The last line estimates a
 * Mistral-7B (14.5 GB of bf16) Q4_K_M export from the measured rate.
 *
 * ```
 * deno task bench export [-- options]
 *   --mb MB        bytes of the random bf16 model (default 64)
 *   --rounds N     rounds of all contenders (default 3)
 *   --tmp DIR      where files are written (default: the system temp dir)
 *   --json FILE    also write the figures as JSON (date, config, results)
 * ```
 * The model is Mistral 7B's architecture at D 512, F 1792 (bench/nf4.ts's quantize shape), with as
 * many layers as `--mb` allows: every row is a multiple of 256, so Q4_K_M writes real K-quants.
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { writeJsonAtomic } from "../foundation/atomic.ts";
import { runMain } from "../foundation/errors.ts";
import { writeModelGguf } from "../formats/gguf_model.ts";
import { loadModelConfig } from "../formats/model_config.ts";
import { type LoraConfig, writePeftAdapter } from "../formats/peft.ts";
import { initialAdapters } from "../kernels/models/trainable.ts";
import { MergeConfig, step as mergeStep } from "../steps/merge.ts";
import { modelSources } from "../steps/model_source.ts";
import { median } from "./lora.ts";
import { QUANTIZE_SHAPE, readWrite } from "./nf4.ts";
import { shapeConfigJson, writeRandomCheckpoint } from "./train_checkpoint.ts";
import { benchStepContext, benchUsage } from "./_common.ts";

const usage = benchUsage("export");
const CONTENDERS = ["read + write", "merge f16", "gguf Q8_0", "gguf Q4_K_M"] as const;
type Contender = typeof CONTENDERS[number];
/** Mistral-7B's bf16 weights, bytes. */
const MISTRAL_7B_BYTES = 14.48e9;

/** The merge step's run on `model` + `adapter` into `stepDir`, without the runner's bookkeeping. */
async function runMerge(model: string, adapter: string, stepDir: string): Promise<void> {
  const config = MergeConfig.parse({ model, adapters: [adapter], dtype: "float16", check_rows: 0 });
  const ctx = benchStepContext(stepDir, await modelSources(model), "merge");
  await mergeStep.run(ctx, config, {});
}

/** Runs the benchmark; returns the figures. */
export async function run(args: string[]) {
  const { values } = parseArgs({
    args,
    options: {
      mb: { type: "string", default: "64" },
      rounds: { type: "string", default: "3" },
      tmp: { type: "string" },
      json: { type: "string" },
    },
  });
  const megabytes = Number(values.mb), rounds = Number(values.rounds);
  if (!(megabytes > 0)) usage("--mb must be a positive number");
  if (!Number.isInteger(rounds) || rounds < 1) usage("--rounds must be a positive integer");
  const tmp = await Deno.makeTempDir({ dir: values.tmp, prefix: "lathe-bench-export-" });
  try {
    const D = QUANTIZE_SHAPE.hidden_size, F = QUANTIZE_SHAPE.intermediate_size;
    const kv = QUANTIZE_SHAPE.num_key_value_heads * (D / QUANTIZE_SHAPE.num_attention_heads);
    const layerBytes = 2 * (2 * D * D + 2 * D * kv + 3 * D * F);
    const embedBytes = 2 * 2 * QUANTIZE_SHAPE.vocab_size * D;
    const layers = Math.max(1, Math.round((megabytes * 1e6 - embedBytes) / layerBytes));
    const source = join(tmp, "model");
    await Deno.mkdir(source);
    const ckpt = await writeRandomCheckpoint(
      source,
      shapeConfigJson("mistral-7b", { ...QUANTIZE_SHAPE, num_hidden_layers: layers }),
      { seed: 1 },
    );
    const tokenizer = new URL("../data/demo/tokenizer/", import.meta.url);
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
      await Deno.copyFile(new URL(f, tokenizer), join(source, f));
    }
    const config = await loadModelConfig(source);
    const lora = { r: 16, alpha: 32, dropout: 0, targets: ["q_proj", "v_proj"] as const, useRslora: false };
    const pairs = initialAdapters(config, { ...lora, targets: [...lora.targets] }, 3).map((p) => ({
      ...p,
      b: p.b.map((_, i) => Math.sin(i) * 0.01),
    }));
    const adapter = join(tmp, "adapter");
    const peft: LoraConfig = {
      baseModelNameOrPath: source,
      r: 16,
      loraAlpha: 32,
      loraDropout: 0,
      targetModules: ["q_proj", "v_proj"],
      useRslora: false,
    };
    await writePeftAdapter(adapter, config, peft, pairs);
    const seconds: Record<Contender, number[]> = Object.fromEntries(CONTENDERS.map((c) => [c, []])) as never;
    const once = async (c: Contender, r: number) => {
      const out = join(tmp, `out-${r}`);
      await Deno.mkdir(out, { recursive: true });
      const t0 = performance.now();
      if (c === "read + write") await readWrite(source, join(out, "copy.bin"));
      else if (c === "merge f16") await runMerge(source, adapter, out);
      else {
        await writeModelGguf(source, join(out, "m.gguf"), {
          fileType: c === "gguf Q8_0" ? "Q8_0" : "Q4_K_M",
          name: "bench",
          addBos: false,
          addEos: false,
          chatTemplate: null,
        });
      }
      seconds[c].push((performance.now() - t0) / 1000);
      await Deno.remove(out, { recursive: true });
    };
    console.log(
      `export bench: random bf16 Mistral-7B architecture, D ${D}, F ${F}, ${layers} layers, ${
        (ckpt.weightBytes / 1e6).toFixed(1)
      } MB, ${rounds} rounds`,
    );
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < CONTENDERS.length; i++) await once(CONTENDERS[(i + r) % CONTENDERS.length], r);
    }
    const mbps = (s: number) => ckpt.weightBytes / 1e6 / s;
    const results = CONTENDERS.map((c) => ({
      contender: c,
      mbps: mbps(median(seconds[c])),
      ratio: median(seconds[c].map((s, i) => seconds["read + write"][i] / s)),
      seconds: seconds[c],
    }));
    const rows = [
      ["", "MB/s", "× read + write", "seconds"],
      ...results.map((r) => [
        r.contender,
        r.mbps.toFixed(1),
        r.ratio.toFixed(2),
        r.seconds.map((s) => s.toFixed(2)).join(" "),
      ]),
    ];
    const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => row[c].length)));
    for (const row of rows) {
      console.log(
        "  " + row.map((cell, c) => c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c])).join("  "),
      );
    }
    const q4 = results.find((r) => r.contender === "gguf Q4_K_M")!;
    const merge = results.find((r) => r.contender === "merge f16")!;
    const estimate = {
      mergeSeconds: MISTRAL_7B_BYTES / 1e6 / merge.mbps,
      q4kmSeconds: MISTRAL_7B_BYTES / 1e6 / q4.mbps,
    };
    console.log(
      `  Mistral-7B (14.5 GB bf16) at these rates: merge ${(estimate.mergeSeconds / 60).toFixed(1)} min, ` +
        `Q4_K_M export ${(estimate.q4kmSeconds / 60).toFixed(1)} min`,
    );
    const report = {
      date: new Date().toISOString(),
      config: { megabytes, layers, rounds, bytes: ckpt.weightBytes },
      results,
      estimate,
    };
    if (values.json) await writeJsonAtomic(values.json, report);
    return report;
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
}

if (import.meta.main) {
  await runMain(async () => {
    await run(Deno.args);
  });
}
