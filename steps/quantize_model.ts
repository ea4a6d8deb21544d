/**
 * The work of the `quantize` step (steps/quantize.ts, which documents it), apart from the step's
 * definition and command line, so that programs that must not load the step runner (the
 * benchmark bundle, bench/nf4.ts) run the same code: its config schema, its output directory and
 * {@link quantizeModel}, its run.
 * @module
 */
import { dirname, join } from "node:path";
import * as z from "zod";
import { exists, writeJsonAtomic } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import { humanCount } from "../foundation/progress.ts";
import {
  blockAbsmaxOfBytes,
  bnb4bitTensors,
  encode4bitBytes,
  quantizationConfig,
  type Quantized4bitStats,
  statsOfAbsmax,
  TORCH_DTYPE_NAMES,
} from "../formats/bnb4bit.ts";
import { bnb4bitSettings, checkQuantizedWeights, isSkippedModule } from "../formats/bnb4bit_checkpoint.ts";
import { parseModelConfig, PROJECTIONS } from "../formats/model_config.ts";
import { ModelWeights, type TensorSource, toFloat32, writeModelWeights } from "../formats/safetensors.ts";
import { MODEL_FILES } from "../hub/model.ts";
import type { StepContext, StepResult } from "./define.ts";
import { modelSources } from "./model_source.ts";

/** The step's config; every default is written into the manifest. */
export const QuantizeConfig = z.strictObject({
  /** The base model: a directory (relative to the project root) or a Hub repo id. */
  model: z.string().min(1),
  /** Hub revision when `model` is a repo id (default "main"). */
  revision: z.string().min(1).default("main"),
  /** `bnb_4bit_quant_type` (default "nf4"). */
  quant_type: z.enum(["nf4", "fp4"]).default("nf4"),
  /** `bnb_4bit_use_double_quant`: quantize the absmax again, 8-bit in blocks of 256 (default true). */
  double_quant: z.boolean().default(true),
  /** Elements per absmax block (default 64, bitsandbytes' default for 4-bit). */
  blocksize: z.union([32, 64, 128, 256, 512, 1024, 2048, 4096].map((n) => z.literal(n)) as [
    z.ZodLiteral<number>,
    ...z.ZodLiteral<number>[],
  ]).default(64),
  /** `bnb_4bit_compute_dtype`, recorded in config.json (default "bfloat16"); lathe's kernels compute in f32. */
  compute_dtype: z.enum(["float16", "bfloat16"]).default("bfloat16"),
  /** Modules kept in 16 bit (`llm_int8_skip_modules`; default ["lm_head"]), matched as transformers matches them: a module's own name, a dotted path prefix, or a suffix. */
  skip_modules: z.array(z.string().min(1)).default(["lm_head"]),
  /** Largest weight file in bytes before sharding with an index (default 5e9, transformers' "5GB"). */
  max_shard_size: z.number().int().positive().default(5e9),
});
export type QuantizeConfig = z.infer<typeof QuantizeConfig>;

/** The output directory inside the step directory. */
export const MODEL_DIR = "model";

/**
 * True when module path `module` (e.g. `model.layers.0.mlp.down_proj`) is named by a skip entry,
 * under either of transformers' readings of `llm_int8_skip_modules` (its own name, `<entry>.`
 * inside its path, a regex match at its start, or a suffix).
 */
export function isSkipped(module: string, skip: readonly string[]): boolean {
  return isSkippedModule(module, skip);
}

/** The projection a tensor name is the weight of, or null (`model.layers.3.self_attn.q_proj.weight` -> "q_proj"). */
function projectionOf(name: string): string | null {
  const m = /\.([a-z_]+_proj)\.weight$/.exec(name);
  return m && (PROJECTIONS as readonly string[]).includes(m[1]) ? m[1] : null;
}

/** Per quantized tensor: what the report lists. */
interface TensorReport {
  name: string;
  shape: number[];
  dtype: string;
  rel_rms_error: number;
  bits_per_weight: number;
}

/** Copies the files of `names` that `from` has into `to`; returns the names copied. */
export async function copyModelFiles(from: string, to: string, names: readonly string[]): Promise<string[]> {
  const copied: string[] = [];
  for (const name of names) {
    if (!(await exists(join(from, name)))) continue;
    await Deno.copyFile(join(from, name), join(to, name));
    copied.push(name);
  }
  return copied;
}

/**
 * The quantize step's run: writes `model/` (and `quantize_report.json`) into the step directory
 * `ctx.out` gives, from the model directory of source `model/config.json`; returns the outputs
 * and the metrics (bytes in and out, bits per weight, relative RMS error, MB/s).
 */
export async function quantizeModel(ctx: StepContext, config: QuantizeConfig): Promise<StepResult> {
  const src = dirname(ctx.sources["model/config.json"]);
  const out = dirname(await ctx.out(`${MODEL_DIR}/config.json`));
  const raw = JSON.parse(await Deno.readTextFile(join(src, "config.json"))) as Record<string, unknown>;
  const outputs: Record<string, string> = {};
  // Validates the architecture and shapes (an unsupported model is a clear error here), and
  // refuses a quantization other than bitsandbytes 4-bit.
  const modelConfig = parseModelConfig(raw, join(src, "config.json"));
  const existing = bnb4bitSettings(modelConfig, src);
  if (existing) {
    // Already 4-bit (a *-bnb-4bit checkpoint): checked, then passed through unchanged, and said so.
    {
      using weights = await ModelWeights.open(src);
      checkQuantizedWeights(modelConfig, weights.names().map((n) => weights.info(n)), src);
    }
    console.error(
      `[quantize] "${config.model}" is already quantized (bitsandbytes ${existing.quantType}): copied unchanged`,
    );
    const weights = Object.keys(await modelSources(src)).map((s) => s.slice("model/".length));
    for (const file of await copyModelFiles(src, out, [...new Set([...weights, ...MODEL_FILES])])) {
      outputs[`${MODEL_DIR}/${file}`] = `${MODEL_DIR}/${file}`;
    }
    return {
      outputs,
      metrics: { already_quantized: true, quant_type: existing.quantType },
    };
  }
  const started = performance.now();
  using weights = await ModelWeights.open(src);
  const options = {
    quantType: config.quant_type,
    blocksize: config.blocksize,
    doubleQuant: config.double_quant,
  };

  // Pass 1: block statistics of every projection to quantize.
  const stats = new Map<string, Quantized4bitStats>();
  let bytesIn = 0, paramsQuantized = 0, paramsKept = 0;
  const names = weights.names();
  const quantizable = names.filter((n) =>
    projectionOf(n) !== null && !isSkipped(n.slice(0, -".weight".length), config.skip_modules)
  );
  let totalQuantBytes = 0;
  for (const name of quantizable) totalQuantBytes += weights.info(name).byteLength;
  const progress = ctx.progress(2 * totalQuantBytes, "B");
  const checkDtype = (name: string): void => {
    const info = weights.info(name);
    if (!(info.dtype in TORCH_DTYPE_NAMES)) {
      throw new LatheError(
        `Cannot quantize "${name}" of "${config.model}": its dtype is ${info.dtype}; expected F32, F16 or BF16`,
        {
          hint:
            "quantize a model in 16 or 32 bit (an 8-bit or other pre-quantized checkpoint cannot be quantized again)",
        },
      );
    }
    if (info.shape.length !== 2) {
      throw new LatheError(`Cannot quantize "${name}": shape [${info.shape.join(", ")}] is not [out, in]`);
    }
  };
  // The next projection is read while this one is computed: at most two are held.
  const ahead = <T>(fetch: (name: string) => Promise<T>) => {
    const pending = new Map<string, Promise<T>>();
    return (name: string): Promise<T> => {
      const got = pending.get(name) ?? fetch(name);
      pending.delete(name);
      const next = quantizable[quantizable.indexOf(name) + 1];
      if (next !== undefined && !pending.has(next)) {
        const p = fetch(next);
        p.catch(() => {}); // awaited when its turn comes; an error is thrown there
        pending.set(next, p);
      }
      return got;
    };
  };
  // Pass 1 needs only each block's absmax, read off the stored bits without converting them.
  const readBytesAhead = ahead(async (name: string) => {
    checkDtype(name);
    const bytes = await weights.readBytes(name);
    progress.tick(bytes.length);
    return bytes;
  });
  for (const name of quantizable) {
    const info = weights.info(name);
    const bytes = await readBytesAhead(name);
    const absmax = blockAbsmaxOfBytes(info.dtype as keyof typeof TORCH_DTYPE_NAMES, bytes, config.blocksize);
    if (absmax === null) {
      const values = toFloat32(info.dtype, bytes, `tensor "${name}"`);
      const bad = values.findIndex((v) => !Number.isFinite(v));
      throw new LatheError(
        `Cannot quantize "${name}" of "${config.model}": element ${bad} (row ${
          Math.floor(bad / info.shape[1])
        }) is ${values[bad]}`,
        { hint: "the checkpoint is damaged or was saved after a diverged training run" },
      );
    }
    stats.set(name, statsOfAbsmax(absmax, [...info.shape], options));
  }

  // Pass 2: lay the file out, then write; each projection is read again for its codes.
  const reports: TensorReport[] = [];
  let errSum = 0, refSum = 0;
  const tensors: TensorSource[] = [];
  for (const name of names) {
    const info = weights.info(name);
    bytesIn += info.byteLength;
    const s = stats.get(name);
    if (!s) {
      paramsKept += info.numel;
      tensors.push({ name, dtype: info.dtype, shape: info.shape, data: () => weights.readBytes(name) });
      continue;
    }
    paramsQuantized += info.numel;
    const dtype = info.dtype as keyof typeof TORCH_DTYPE_NAMES;
    const parts = bnb4bitTensors(name, s, dtype, async () => {
      // Codes and the relative RMS error of the weight as it will be dequantized (stored absmax),
      // in one sweep over the stored bytes.
      const { codes, squaredError: err, squaredNorm: ref } = encode4bitBytes(
        dtype,
        await readBytesAhead(name),
        s,
      );
      errSum += err;
      refSum += ref;
      const bits = parts.reduce(
        (a, t) => a + t.shape.reduce((x, y) => x * y, 1) * (t.dtype === "U8" ? 8 : 32),
        0,
      );
      const report = {
        name,
        shape: [...info.shape],
        dtype: TORCH_DTYPE_NAMES[dtype],
        rel_rms_error: ref > 0 ? Math.sqrt(err / ref) : 0,
        bits_per_weight: bits / info.numel,
      };
      reports.push(report);
      ctx.log("rel_rms_error", reports.length - 1, report.rel_rms_error);
      return codes;
    });
    tensors.push(...parts);
  }
  const files = await writeModelWeights(out, tensors, { maxShardBytes: config.max_shard_size });
  progress.done();
  let bytesOut = 0;
  for (const file of files) bytesOut += (await Deno.stat(join(out, file))).size;
  const quantBits = tensors.filter((t) =>
    stats.has(t.name.replace(/\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$/, ""))
  )
    .reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1) * (t.dtype === "U8" ? 8 : 32), 0);

  await writeJsonAtomic(join(out, "config.json"), {
    ...raw,
    quantization_config: quantizationConfig({
      quantType: config.quant_type,
      doubleQuant: config.double_quant,
      computeDtype: config.compute_dtype,
      skipModules: isSkipped("lm_head", config.skip_modules)
        ? config.skip_modules
        : [...config.skip_modules, "lm_head"],
    }),
  });
  const copied = await copyModelFiles(src, out, MODEL_FILES.filter((f) => f !== "config.json"));
  for (const file of ["config.json", ...files, ...copied]) {
    outputs[`${MODEL_DIR}/${file}`] = `${MODEL_DIR}/${file}`;
  }
  reports.sort((a, b) => names.indexOf(a.name) - names.indexOf(b.name));
  await writeJsonAtomic(await ctx.out("quantize_report.json"), { tensors: reports });
  outputs.report = "quantize_report.json";

  const seconds = (performance.now() - started) / 1000;
  const relRms = refSum > 0 ? Math.sqrt(errSum / refSum) : 0;
  console.error(
    `[quantize] ${reports.length} projections, ${
      humanCount(paramsQuantized)
    } parameters to ${config.quant_type}` +
      `${config.double_quant ? " (double quant)" : ""}: ${humanCount(bytesIn)}B -> ${
        humanCount(bytesOut)
      }B, ` +
      `relative RMS error ${relRms.toFixed(4)}`,
  );
  return {
    outputs,
    metrics: {
      already_quantized: false,
      quant_type: config.quant_type,
      tensors_quantized: reports.length,
      params_quantized: paramsQuantized,
      params_kept: paramsKept,
      bytes_in: bytesIn,
      bytes_out: bytesOut,
      bits_per_weight: paramsQuantized > 0 ? quantBits / paramsQuantized : 0,
      rel_rms_error: relRms,
      rel_rms_error_max: reports.reduce((m, r) => Math.max(m, r.rel_rms_error), 0),
      mb_per_s: seconds > 0 ? bytesIn / seconds / 1e6 : 0,
    },
  };
}
