/**
 * The memory check of a training step: the planned peak GPU memory of one optimizer step
 * (kernels/models/memory_plan.ts) from the model's config.json and the training config, compared
 * with what the adapter has before any weight is loaded, and the lines a dry run prints.
 *
 * WebGPU does not say how much memory a device has. The figure comes from, in order:
 * `LATHE_GPU_MEMORY` (bytes, or a number with GB/GiB/MB/MiB), the size the adapter's name states
 * ("NVIDIA H100 80GB HBM3" → 80 GB), and for a software adapter (lavapipe, llvmpipe), whose
 * buffers live in host memory, the host's total memory. Otherwise it is unknown and the step runs
 * unchecked, saying how to set it.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { ModelConfig } from "../../formats/model_config.ts";
import type { Projection } from "../../formats/model_config.ts";
import {
  fitAdvice,
  formatBytes,
  formatMemoryPlan,
  type MemoryLimits,
  type MemoryPlan,
  planTrainingMemory,
  type QuantizationSettings,
} from "../../kernels/models/memory_plan.ts";
import type { TrainingArgs } from "./config.ts";

/** The adapter's memory and where the figure came from, or null when unknown. */
export interface GpuMemory {
  bytes: number;
  source: string;
}

const UNITS: Record<string, number> = { gb: 1e9, gib: 2 ** 30, mb: 1e6, mib: 2 ** 20, b: 1 };

/** Parses "24GiB", "80 GB", "8589934592"; null when it is not a size. */
export function parseMemorySize(text: string): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb|b)?\s*$/i.exec(text);
  if (!m) return null;
  return Math.round(Number(m[1]) * UNITS[(m[2] ?? "b").toLowerCase()]);
}

/**
 * What the adapter has (see the module documentation).
 *
 * @param info the adapter's description and whether it is a software adapter
 * @param env environment lookup (default Deno.env)
 */
export function gpuMemory(
  info: { description: string; software: boolean },
  env: (name: string) => string | undefined = (n) => Deno.env.get(n),
): GpuMemory | null {
  const set = env("LATHE_GPU_MEMORY");
  if (set !== undefined && set !== "") {
    const bytes = parseMemorySize(set);
    if (bytes === null || bytes <= 0) {
      throw new LatheError(`Cannot read LATHE_GPU_MEMORY "${set}": expected a size such as 24GiB or 80GB`);
    }
    return { bytes, source: "LATHE_GPU_MEMORY" };
  }
  const named = /(\d+)\s*GB\b/i.exec(info.description);
  if (named && !info.software) return { bytes: Number(named[1]) * 1e9, source: `the adapter's name` };
  if (info.software) {
    return { bytes: Deno.systemMemoryInfo().total, source: "host memory (software adapter)" };
  }
  return null;
}

/** The 4-bit settings of a quantize step's config (its validated config, as the manifest records it). */
export function quantizeSettings(config: Record<string, unknown>): QuantizationSettings {
  return {
    quantType: config.quant_type === "fp4" ? "fp4" : "nf4",
    doubleQuant: config.double_quant !== false,
    blocksize: typeof config.blocksize === "number" ? config.blocksize : 64,
    skipModules: Array.isArray(config.skip_modules) ? config.skip_modules.map(String) : ["lm_head"],
  };
}

/**
 * The plan of one optimizer step of train-sft: per_device_train_batch_size rows of `seqLen`
 * tokens (the shards' length: the longest a micro-batch can be).
 *
 * @param quantization the quantize step's settings; undefined: from the model's quantization_config
 */
export function planTrainSft(
  model: ModelConfig,
  config: TrainingArgs,
  targets: readonly Projection[],
  seqLen: number,
  dtype: "f16" | "f32",
  limits: MemoryLimits,
  quantization?: QuantizationSettings,
): MemoryPlan {
  return planTrainingMemory(model, {
    batchRows: config.per_device_train_batch_size,
    seqLen,
    gradientCheckpointing: config.gradient_checkpointing,
    offloadLayerInputs: config.offload_layer_inputs,
    dtype,
    lora: {
      r: config.lora.r,
      targets: config.finetuning === "full" ? [] : targets,
      dropout: config.lora.dropout,
    },
    full: config.finetuning === "full",
    ...(quantization === undefined ? {} : { quantization }),
  }, limits);
}

/**
 * Stops a step that cannot fit, before any weight is loaded: the planned figure, the adapter's
 * memory and the settings that would make it fit.
 */
export function checkFits(plan: MemoryPlan, memory: GpuMemory | null, adapter: string): void {
  if (memory === null || plan.total <= memory.bytes) return;
  const advice = fitAdvice(plan, memory.bytes);
  throw new LatheError(
    `Cannot train on ${adapter}: one training step needs ${formatBytes(plan.total)} of GPU memory ` +
      `(at the ${plan.peakAt}), the adapter has ${formatBytes(memory.bytes)} (${memory.source})\n` +
      formatMemoryPlan(plan),
    {
      hint: advice.length > 1
        ? `${advice.slice(1).join("; ")}. Set LATHE_GPU_MEMORY if the adapter's memory is misread.`
        : "Set LATHE_GPU_MEMORY if the adapter's memory is misread.",
    },
  );
}
