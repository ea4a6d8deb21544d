/**
 * The `merge` step: a base model and its LoRA adapter(s) → one Hugging Face model directory, as
 * peft's `merge_and_unload` makes it. For every adapted projection
 *   W' = W + Σ_i s_i·(B_i·A_i)      (f32, rounded once to `dtype`)
 * with the adapters in order (train-sft's, then train-dpo's when it is a separate one; by default
 * the adapter of the last training step upstream, which for train-dpo already continues train-sft's).
 * Every other tensor is converted to `dtype`. Streaming, tensor by tensor: host memory holds a
 * few tensors, never the model. Writes `model/` (safetensors, sharded with an index past
 * `max_shard_size`), config.json with `torch_dtype` set (and no `quantization_config`), and the
 * tokenizer, chat template and generation config copied.
 *
 * With a 4-bit base (a quantize step upstream), `merge_base` chooses what W is:
 * - `original` (default, what the QLoRA guides do): the 16-bit model `model` names, the one the NF4
 *   weights were made from;
 * - `dequantized`: the NF4 weights the adapter was trained against, dequantized to f32
 *   (quantize's model: its 16-bit tensors as stored, each 4-bit projection through its codebook).
 * To show what the choice costs, the manifest records the loss on the first `check_rows` rows of
 * the SFT eval split of the model as trained (base + adapters, unmerged, 4-bit when trained 4-bit)
 * and of the merged model (`check_loss_unmerged`, `check_loss_merged`, and their difference).
 * Adapters with a NaN or an Inf are refused before anything is written, and a merged tensor that
 * overflows `dtype` stops the step (no manifest claims success).
 * @module
 */
import { dirname, join, resolve } from "node:path";
import * as z from "zod";
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  type AdapterExtras,
  loraScaling,
} from "../formats/peft.ts";
import {
  expectedTensors,
  loadModelConfig,
  projectionPath,
  projectionShape,
} from "../formats/model_config.ts";
import { dequantize4bit } from "../formats/bnb4bit.ts";
import { quantizedWeightNames, readQuantized4bit } from "../formats/bnb4bit_checkpoint.ts";
import { type Manifest, MANIFEST_FILE, readManifest } from "../foundation/manifest.ts";
import { openSession } from "./generate/session.ts";
import { loadSplit } from "./train/batches.ts";
import { evaluateSplit } from "./train/loop.ts";
import { MODEL_DIR as QUANTIZED_DIR } from "./quantize_model.ts";
import { baseForAdapters } from "./train/resize.ts";
import {
  type Dtype,
  fromFloat32,
  ModelWeights,
  type TensorSource,
  toFloat32,
  writeModelWeights,
} from "../formats/safetensors.ts";
import { writeJsonAtomic } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import { MODEL_FILES } from "../hub/model.ts";
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type Upstream } from "./define.ts";
import { modelDir, modelSources } from "./model_source.ts";
import { copyModelFiles } from "./quantize_model.ts";
import { readAdapterWeights } from "./train/checkpoint.ts";
import type { LoraWeights } from "../kernels/models/trainable.ts";

/** The directory of the merged model inside the step directory. */
export const MERGED_DIR = "model";

const DTYPES = { float16: "F16", bfloat16: "BF16", float32: "F32" } as const;

/** The step's config. */
export const MergeConfig = z.strictObject({
  /** The base model the adapters were trained on (a directory, a cache snapshot or a Hub id). */
  model: z.string().min(1),
  revision: z.string().min(1).default("main"),
  /**
   * Adapter directories to merge, in order (relative to the project root); null (default): the
   * adapter of the last training step upstream (train-dpo, else train-sft).
   */
  adapters: z.array(z.string().min(1)).min(1).nullable().default(null),
  /** dtype of the merged weights (default float16). */
  dtype: z.enum(["float16", "bfloat16", "float32"]).default("float16"),
  /** Largest weight file in bytes before sharding with an index (default 5e9, transformers' "5GB"). */
  max_shard_size: z.number().int().positive().default(5e9),
  /** With a 4-bit base upstream: merge into the original 16-bit weights or the dequantized NF4 ones. */
  merge_base: z.enum(["original", "dequantized"]).default("original"),
  /** SFT eval rows on which merged and unmerged losses are compared (0: no check). */
  check_rows: z.number().int().nonnegative().default(8),
});
/** The parsed config. */
export type MergeConfig = z.output<typeof MergeConfig>;

/** One adapter to merge: its scaling and its pairs by weight name. */
interface MergeAdapter {
  dir: string;
  scaling: number;
  r: number;
  pairs: Map<string, LoraWeights>;
  /** What it trained beside the pairs (modules_to_save, trainable token rows) and those rows. */
  extras: AdapterExtras;
  tokenRows: readonly number[];
}

/** The adapter directories: the config's, else the last training step upstream's. */
function adapterDirs(ctx: StepContext, config: MergeConfig, inputs: Record<string, Upstream>): string[] {
  if (config.adapters !== null) return config.adapters.map((a) => resolve(ctx.projectRoot, a));
  const last = inputs.dpo ?? inputs.sft;
  if (!last) {
    throw new LatheError(
      "Cannot merge: there is no adapter (no train-sft or train-dpo step upstream, and merge.adapters is null)",
      {
        hint: "put merge after a training step in the recipe, or list adapter directories in merge.adapters",
      },
    );
  }
  if (!("adapter" in last.manifest.outputs) && "model" in last.manifest.outputs) {
    throw new LatheError(
      `Cannot merge after step "${last.manifest.step}": it fine-tuned every weight (finetuning: full) and ` +
        `wrote a model, ${dirname(last.path("model"))}, so there is no adapter to merge`,
      { hint: "drop the merge step: export and eval take that model as it is" },
    );
  }
  return [dirname(last.path("adapter"))];
}

/** The SFT data the adapters were trained on: train-sft's tokenize (directly, or behind train-dpo). */
async function sftData(inputs: Record<string, Upstream>): Promise<string | null> {
  let sft: { manifest: Manifest; dir: string } | null = inputs.sft ?? null;
  if (!sft && inputs.dpo?.manifest.inputs.sft) {
    const dir = join(inputs.dpo.dir, "..", inputs.dpo.manifest.inputs.sft.step);
    sft = { manifest: await readManifest(join(dir, MANIFEST_FILE)), dir };
  }
  const data = sft?.manifest.inputs.data;
  if (!sft || !data) return null;
  const dir = join(sft.dir, "..", data.step);
  const manifest = await readManifest(join(dir, MANIFEST_FILE));
  const evalOut = manifest.outputs.eval;
  return evalOut ? join(dir, evalOut.path) : null;
}

/**
 * Loss of the model as trained (`trainedOn` + adapters, unmerged) and of the merged model on the
 * first `rows` rows of the SFT eval split; null when there is no such split.
 */
async function mergedVsUnmerged(
  ctx: StepContext,
  inputs: Record<string, Upstream>,
  trainedOn: string,
  adapterDirs: string[],
  merged: string,
  rows: number,
  baseName: string,
): Promise<Record<string, number> | null> {
  if (rows === 0) return null;
  const index = await sftData(inputs);
  if (!index) return null;
  const split = await loadSplit(index);
  const part = { ...split, rows: split.rows.slice(0, rows) };
  if (part.rows.length === 0) return null;
  const loss = async (model: string, adapters: string[]) => {
    using session = await openSession({
      model,
      adapters,
      projectRoot: ctx.projectRoot,
      seed: ctx.seed,
      baseName,
    });
    return (await evaluateSplit(session.model, part, 4))?.eval_loss ?? null;
  };
  const unmerged = await loss(trainedOn, adapterDirs);
  const mergedLoss = await loss(merged, []);
  if (unmerged === null || mergedLoss === null) return null;
  return {
    check_rows: part.rows.length,
    check_loss_unmerged: unmerged,
    check_loss_merged: mergedLoss,
    check_loss_delta: mergedLoss - unmerged,
  };
}

async function run(ctx: StepContext, config: MergeConfig, inputs: Record<string, Upstream>) {
  const quantized = inputs.quantize ? dirname(inputs.quantize.path(`${QUANTIZED_DIR}/config.json`)) : null;
  // After a full train-sft its model is the base train-dpo's adapter was trained on.
  const sftModel = inputs.sft && "model" in inputs.sft.manifest.outputs
    ? dirname(inputs.sft.path("model"))
    : null;
  const original = sftModel
    ? sftModel
    : config.merge_base === "dequantized" && quantized
    ? quantized
    : dirname(ctx.sources["model/config.json"]);
  // An adapter that added tokens merges into the base grown the same way (mean rows, its tokenizer).
  const grown = await baseForAdapters(original, adapterDirs(ctx, config, inputs));
  try {
    return await mergeInto(ctx, config, inputs, grown.dir, quantized);
  } finally {
    await grown.cleanup();
  }
}

async function mergeInto(
  ctx: StepContext,
  config: MergeConfig,
  inputs: Record<string, Upstream>,
  src: string,
  quantized: string | null,
) {
  const modelConfig = await loadModelConfig(src);
  if (config.merge_base === "dequantized" && !modelConfig.quantizationConfig) {
    throw new LatheError(
      `Cannot merge with merge_base "dequantized": the base "${config.model}" is not 4-bit`,
      {
        hint:
          "put a quantize step before merge (its NF4 weights are the ones dequantized), or use merge_base: original",
      },
    );
  }
  if (config.merge_base === "original" && modelConfig.quantizationConfig) {
    throw new LatheError(`Cannot merge into "${config.model}": it is a 4-bit checkpoint`, {
      hint:
        "set merge.model to the 16-bit model it was quantized from, or merge_base: dequantized to merge into its dequantized weights",
    });
  }
  // Every adapter read and checked before anything is written.
  const adapters: MergeAdapter[] = [];
  for (const dir of adapterDirs(ctx, config, inputs)) {
    let loaded;
    try {
      loaded = await readAdapterWeights(dir, modelConfig);
    } catch (error) {
      if (!(error instanceof LatheError)) throw error;
      throw new LatheError(`Cannot merge adapter "${dir}" into "${config.model}": ${error.message}`, {
        hint: "merge an adapter into the base it was trained on",
      });
    }
    const pairs = new Map<string, LoraWeights>();
    for (const w of loaded.weights) {
      for (const [which, values] of [["A", w.A], ["B", w.B]] as const) {
        const bad = values.findIndex((x) => !Number.isFinite(x));
        if (bad !== -1) {
          throw new LatheError(
            `Cannot merge adapter "${dir}": layer ${w.layer} ${w.module} lora_${which}[${bad}] is ${
              values[bad]
            }`,
            { hint: "the adapter holds non-finite values; train it again (lower learning_rate, clipping)" },
          );
        }
      }
      pairs.set(`${projectionPath(w.layer, w.module)}.weight`, w);
    }
    const c = loaded.config;
    adapters.push({
      dir,
      scaling: loraScaling(c.loraAlpha, c.r, c.useRslora),
      r: c.r,
      pairs,
      extras: loaded.extras,
      tokenRows: c.trainableTokenIndices ?? [],
    });
  }
  const dtype: Dtype = DTYPES[config.dtype];
  const out = dirname(await ctx.out(`${MERGED_DIR}/config.json`));
  using weights = await ModelWeights.open(src);
  const fourBit = quantizedWeightNames(weights.names());
  const expected = expectedTensors(modelConfig);
  // A 4-bit checkpoint's tensors are its model's (the companions fold into their weight).
  const names = fourBit.size ? [...expected.keys()] : weights.names();
  let merged = 0;
  const progress = ctx.progress(names.length, "tensors");
  const tensors: TensorSource[] = names.map((name) => {
    const shape = fourBit.has(name) ? expected.get(name)! : weights.info(name).shape;
    return {
      name,
      dtype,
      shape,
      data: async () => {
        const values = fourBit.has(name)
          ? dequantize4bit(await readQuantized4bit(weights, name, shape, src))
          : toFloat32(weights.info(name).dtype, await weights.readBytes(name), `${src}: ${name}`);
        const layer = /^model\.layers\.(\d+)\./.exec(name);
        // modules_to_save replace their module; trainable token rows replace their rows (in order).
        const D = modelConfig.hiddenSize;
        for (const a of adapters) {
          if (name === "model.embed_tokens.weight") {
            if (a.extras.embed_tokens) values.set(a.extras.embed_tokens);
            a.tokenRows.forEach((r, i) => values.set(a.extras.tokens!.subarray(i * D, i * D + D), r * D));
          }
          if (name === "lm_head.weight" && a.extras.lm_head) values.set(a.extras.lm_head);
        }
        for (const a of adapters) {
          const w = a.pairs.get(name);
          if (!w || !layer) continue;
          const [N, K] = projectionShape(modelConfig, w.module);
          // W[N,K] += s·B[N,r]·A[r,K], accumulated in f32 as peft's merge does.
          for (let n = 0; n < N; n++) {
            const row = n * K;
            for (let j = 0; j < a.r; j++) {
              const b = a.scaling * w.B[n * a.r + j];
              if (b === 0) continue;
              const aRow = j * K;
              for (let k = 0; k < K; k++) values[row + k] += b * w.A[aRow + k];
            }
          }
          merged++;
        }
        const bytes = fromFloat32(values, dtype === "F32" ? "F32" : dtype);
        if (dtype !== "F32") {
          const back = toFloat32(dtype, bytes, name);
          const bad = back.findIndex((x) => !Number.isFinite(x));
          if (bad !== -1) {
            throw new LatheError(
              `Cannot merge: "${name}"[${bad}] is ${values[bad]}, beyond ${config.dtype}`,
              {
                hint: "merge in float32 or bfloat16",
              },
            );
          }
        }
        progress.tick(1, name);
        return bytes;
      },
    };
  });
  const files = await writeModelWeights(out, tensors, { maxShardBytes: config.max_shard_size });
  progress.done(`${merged} projections merged`);
  const raw = JSON.parse(await Deno.readTextFile(join(src, "config.json"))) as Record<string, unknown>;
  delete raw.quantization_config;
  await writeJsonAtomic(join(out, "config.json"), { ...raw, torch_dtype: config.dtype });
  const copied = await copyModelFiles(src, out, MODEL_FILES.filter((f) => f !== "config.json"));
  const outputs: Record<string, string> = {};
  for (const file of ["config.json", ...files, ...copied]) {
    outputs[`${MERGED_DIR}/${file}`] = `${MERGED_DIR}/${file}`;
  }
  // The model as trained: the 4-bit one when a quantize step made the training base.
  const trainedOn = quantized ?? src;
  const check = await mergedVsUnmerged(
    ctx,
    inputs,
    trainedOn,
    adapters.map((a) => a.dir),
    out,
    config.check_rows,
    config.model,
  );
  if (check) {
    console.log(
      `merge: loss on ${check.check_rows} eval rows: unmerged ${
        check.check_loss_unmerged.toFixed(6)
      }, merged ${check.check_loss_merged.toFixed(6)} (${config.merge_base}, ${config.dtype})`,
    );
  }
  return {
    outputs,
    metrics: {
      projections_merged: merged,
      adapters: adapters.length,
      dtype: config.dtype,
      merge_base: quantized ? config.merge_base : "original",
      tensors: names.length,
      ...(check ?? {}),
    },
  };
}

/** The merge step. */
export const step = defineStep({
  name: "merge",
  version: "1",
  description:
    "Merges LoRA adapters into their base (W + s·B·A in f32, rounded once) as a Hugging Face model directory",
  config: MergeConfig,
  inputs: {},
  optionalInputs: { sft: "train-sft", dpo: "train-dpo", quantize: "quantize" },
  sources: async (config: MergeConfig, projectRoot: string) => {
    const out = await modelSources(await modelDir(config.model, config.revision, projectRoot));
    for (const [i, a] of (config.adapters ?? []).entries()) {
      out[`adapter${i}/config`] = join(resolve(projectRoot, a), ADAPTER_CONFIG_FILE);
      out[`adapter${i}/weights`] = join(resolve(projectRoot, a), ADAPTER_WEIGHTS_FILE);
    }
    return out;
  },
  run,
});

if (import.meta.main) await runFromCli(step);
