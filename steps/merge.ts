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
 * The base is the 16- or 32-bit model `model` names (with a 4-bit quantize step upstream, the
 * original model the guides merge into). Merging into the dequantized NF4 weights
 * (`merge_base: dequantized`) is not built yet.
 * Adapters with a NaN or an Inf are refused before anything is written, and a merged tensor that
 * overflows `dtype` stops the step (no manifest claims success).
 * @module
 */
import { dirname, join, resolve } from "node:path";
import * as z from "zod";
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, loraScaling } from "../formats/peft.ts";
import { loadModelConfig, projectionPath, projectionShape } from "../formats/model_config.ts";
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
});
/** The parsed config. */
export type MergeConfig = z.output<typeof MergeConfig>;

/** One adapter to merge: its scaling and its pairs by weight name. */
interface MergeAdapter {
  dir: string;
  scaling: number;
  r: number;
  pairs: Map<string, LoraWeights>;
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
  return [dirname(last.path("adapter"))];
}

async function run(ctx: StepContext, config: MergeConfig, inputs: Record<string, Upstream>) {
  const src = dirname(ctx.sources["model/config.json"]);
  const modelConfig = await loadModelConfig(src);
  if (modelConfig.quantizationConfig) {
    throw new LatheError(`Cannot merge into "${config.model}": it is a 4-bit checkpoint`, {
      hint:
        "set merge.model to the 16-bit model it was quantized from (merging into dequantized NF4 weights is not built yet)",
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
    adapters.push({ dir, scaling: loraScaling(c.loraAlpha, c.r, c.useRslora), r: c.r, pairs });
  }
  const dtype: Dtype = DTYPES[config.dtype];
  const out = dirname(await ctx.out(`${MERGED_DIR}/config.json`));
  using weights = await ModelWeights.open(src);
  const names = weights.names();
  let merged = 0;
  const progress = ctx.progress(names.length, "tensors");
  const tensors: TensorSource[] = names.map((name) => {
    const info = weights.info(name);
    return {
      name,
      dtype,
      shape: info.shape,
      data: async () => {
        const values = toFloat32(info.dtype, await weights.readBytes(name), `${src}: ${name}`);
        const layer = /^model\.layers\.(\d+)\./.exec(name);
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
  return {
    outputs,
    metrics: {
      projections_merged: merged,
      adapters: adapters.length,
      dtype: config.dtype,
      tensors: names.length,
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
  optionalInputs: { sft: "train-sft", dpo: "train-dpo" },
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
