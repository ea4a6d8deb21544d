/**
 * What the training steps (train-sft, train-dpo) share around the loop: the base directory (a
 * quantize step's 4-bit model or the named model), the model on its backend, the memory check
 * before any weight loads, the measured peak, and the resume decision.
 * @module
 */
import { dirname, join, resolve } from "node:path";
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  type LoraConfig,
  resolveTargetModules,
} from "../../formats/peft.ts";
import { exists, writeFileAtomic, writeJsonAtomic } from "../../foundation/atomic.ts";
import { writeAdapter } from "./checkpoint.ts";
import { fullTrained, writeFullModel } from "./trained.ts";
import { writeResizedModel } from "./resize.ts";
import { copyModelFiles } from "../quantize_model.ts";
import type { TrainedSubset } from "../../kernels/models/full_params.ts";
import { SAVED_MODULE_WEIGHTS } from "../../formats/peft.ts";

/** The model directory a full fine-tune writes inside its step directory. */
export const FULL_MODEL_DIR = "model";
import { finalTrainerState, type TrainLoopResult } from "./loop.ts";
import { lossSvg } from "./plot.ts";
import { resolveModel } from "../../hub/model.ts";
import { modelDir, modelSources } from "../model_source.ts";
import {
  checkSequenceLength,
  expectedTensors,
  loadModelConfig,
  type ModelConfig,
  type Projection,
} from "../../formats/model_config.ts";
import type { ShardIndex } from "../tokenize/shards.ts";
import { loadSplit, type Split } from "./batches.ts";
import type { LoraSpec, TrainableModel } from "../../kernels/models/trainable.ts";
import type { DescribeContext, StepContext, Upstream } from "../define.ts";
import { LatheError } from "../../foundation/errors.ts";
import type { Progress } from "../../foundation/progress.ts";
import { MODEL_DIR as QUANTIZED_MODEL_DIR } from "../quantize.ts";
import { listCheckpoints } from "./checkpoint.ts";
import type { TrainingArgs } from "./config.ts";
import { checkFits, gpuMemory, planTrainSft, quantizeSettings } from "./memory.ts";
import {
  fitAdvice,
  formatBytes,
  formatMemoryPlan,
  type MemoryPlan,
} from "../../kernels/models/memory_plan.ts";

/** The step's model: the CPU reference or the GPU graph on `dir`, with fresh adapters from the step's seed. */
export async function createModel(
  config: TrainingArgs,
  ctx: StepContext,
  dir: string,
  model: ModelConfig,
  spec: LoraSpec,
): Promise<TrainableModel> {
  const subset = trainedSubsetOf(config, model);
  if (config.backend === "cpu-reference") {
    if (subset !== null) {
      throw new LatheError(
        "Cannot train modules_to_save or trainable_token_indices on the cpu-reference backend",
        {
          hint: "use backend webgpu",
        },
      );
    }
    if (config.finetuning === "full") {
      throw new LatheError("Cannot fine-tune every weight on the cpu-reference backend", {
        hint: "use backend webgpu for finetuning: full (the reference checks its gradients in the tests)",
      });
    }
    const { loadHostModel } = await import("../../kernels/models/load.ts");
    const { createReferenceModel } = await import("../../kernels/models/reference_backend.ts");
    const host = await loadHostModel(dir, { progress: (total) => ctx.progress(total, "B") });
    return createReferenceModel(host.config, host.weights, spec, ctx.seed);
  }
  const { getGpu } = await import("../../kernels/device.ts");
  const { createGpuModel } = await import("../../kernels/models/graph.ts");
  ctx.setGpu((await getGpu()).info);
  // Weight upload progress, in bytes read from disk.
  const load: { progress: Progress | null; read: number } = { progress: null, read: 0 };
  const gpuModel = await createGpuModel(model, dir, spec, ctx.seed, {
    full: config.finetuning === "full",
    trainedSubset: subset,
    gradientCheckpointing: config.gradient_checkpointing,
    offloadLayerInputs: config.offload_layer_inputs,
    onLoadProgress: (read, total) => {
      load.progress ??= ctx.progress(total, "B");
      load.progress.tick(read - load.read);
      load.read = read;
    },
  });
  load.progress?.done();
  return gpuModel;
}

/**
 * The base weights trained beside LoRA adapters (`lora.modules_to_save`, `lora.trainable_token_indices`),
 * or null. A tied lm_head is embed_tokens' table: name embed_tokens; the two keys cannot both
 * take embed_tokens (as peft refuses).
 */
export function trainedSubsetOf(config: TrainingArgs, model: ModelConfig): TrainedSubset | null {
  if (config.finetuning === "full") return null;
  const modules = config.lora.modules_to_save ?? [];
  const rows = config.lora.trainable_token_indices ?? null;
  if (modules.length === 0 && rows === null) return null;
  if (modules.includes("lm_head") && model.tieWordEmbeddings) {
    throw new LatheError("Cannot save lm_head beside the adapters: this model ties it to embed_tokens", {
      hint: "set lora.modules_to_save to [embed_tokens]: the one table serves both",
    });
  }
  if (modules.includes("embed_tokens") && rows !== null) {
    throw new LatheError(
      "Cannot use lora.trainable_token_indices with embed_tokens in lora.modules_to_save",
      {
        hint:
          "train the whole table (modules_to_save) or some of its rows (trainable_token_indices), not both",
      },
    );
  }
  for (const r of rows ?? []) {
    if (r >= model.vocabSize) {
      throw new LatheError(
        `Cannot train token ${r} (lora.trainable_token_indices): the vocabulary has ${model.vocabSize} ids`,
      );
    }
  }
  const names = modules.map((m) => SAVED_MODULE_WEIGHTS[m]);
  if (rows !== null) names.push(SAVED_MODULE_WEIGHTS.embed_tokens);
  return { names, ...(rows !== null ? { embedRows: rows } : {}) };
}

/**
 * Refuses what full fine-tuning does not do: a 4-bit base (QLoRA trains adapters), an init_adapter,
 * the cpu-reference backend.
 */
export function checkFullFinetuning(step: string, config: TrainingArgs, model: ModelConfig): void {
  if (model.quantizationConfig) {
    throw new LatheError(`Cannot fine-tune every weight of a 4-bit base (${step}.finetuning: full)`, {
      hint:
        "drop the quantize step (full fine-tuning trains the 16/32-bit weights), or use finetuning: lora (QLoRA)",
    });
  }
  if (config.init_adapter !== null) {
    throw new LatheError(
      `Cannot use ${step}.init_adapter with finetuning: full: there is no adapter to start from`,
      {
        hint: `drop ${step}.init_adapter, or merge the adapter into the model and train that`,
      },
    );
  }
  if (config.backend === "cpu-reference") {
    throw new LatheError(`Cannot fine-tune every weight on the cpu-reference backend (${step}.backend)`, {
      hint: "use backend webgpu for finetuning: full",
    });
  }
}

/** Plans the step's GPU memory, prints the plan and stops a step that cannot fit (steps/train/memory.ts). */
export async function checkMemory(
  step: string,
  config: TrainingArgs,
  model: ModelConfig,
  targets: Projection[],
  seqLen: number,
): Promise<MemoryPlan> {
  const { getGpu } = await import("../../kernels/device.ts");
  const { memoryLimits } = await import("../../kernels/models/memory_plan.ts");
  const { resetPeakMemory } = await import("../../kernels/tensor.ts");
  const gpu = await getGpu();
  const plan = planTrainSft(
    model,
    config,
    config.finetuning === "full" ? [] : targets,
    seqLen,
    gpu.f16 ? "f16" : "f32",
    memoryLimits(gpu),
  );
  const memory = gpuMemory({ description: gpu.info.description, software: gpu.software });
  console.error(
    `[${step}] planned peak GPU memory ${formatBytes(plan.total)} of ${
      memory ? `${formatBytes(memory.bytes)} (${memory.source})` : "unknown (set LATHE_GPU_MEMORY to check)"
    }`,
  );
  checkFits(plan, memory, gpu.info.description);
  resetPeakMemory(gpu);
  return plan;
}

/** The pool's peak since {@link checkMemory}: what the plan is checked against. */
export async function measuredPeak(): Promise<number> {
  const { getGpu } = await import("../../kernels/device.ts");
  const { memoryStats } = await import("../../kernels/tensor.ts");
  return memoryStats(await getGpu()).peakBytes;
}

/** Decides between resuming and starting over, from `LATHE_RESUME` and the checkpoints present. */
export async function resumeChoice(step: string, checkpointDir: string): Promise<boolean> {
  const env = Deno.env.get("LATHE_RESUME") ?? "";
  if (!["", "0", "1"].includes(env)) {
    throw new LatheError(`Cannot read LATHE_RESUME "${env}": expected 1 (resume) or 0 (start over)`);
  }
  if (env === "1") return true;
  const found = await listCheckpoints(checkpointDir);
  if (found.length === 0) return false;
  if (env === "0") {
    await Deno.remove(checkpointDir, { recursive: true });
    return false;
  }
  const last = found[found.length - 1];
  throw new LatheError(
    `Cannot start ${step}: an interrupted run with the same key left ${found.length} checkpoint(s) in ` +
      `"${checkpointDir}" (latest: step ${last.step})`,
    {
      hint:
        "rerun with --resume (LATHE_RESUME=1) to continue from it, or --restart (LATHE_RESUME=0) to delete them",
    },
  );
}

/**
 * The directory of the base the step trains on: the 4-bit model of a quantize step upstream
 * (which must have quantized `config.model`), else `config.model` itself.
 */
export function baseDir(
  step: string,
  ctx: StepContext,
  config: { model: string; revision: string },
  inputs: Record<string, Upstream>,
): string {
  const base = inputs.base;
  if (base === undefined) return dirname(ctx.sources["model/config.json"]);
  const quantized = base.manifest.config as { model?: unknown; revision?: unknown };
  if (quantized.model !== config.model || (quantized.revision ?? "main") !== config.revision) {
    throw new LatheError(
      `Cannot ${step} on the quantize step's model: it quantized "${String(quantized.model)}" ` +
        `(revision ${String(quantized.revision ?? "main")}), ${step}.model is "${config.model}" ` +
        `(revision ${config.revision})`,
      { hint: `set ${step}.model to the model quantize.model names (the adapter records it as its base)` },
    );
  }
  return dirname(base.path(`${QUANTIZED_MODEL_DIR}/config.json`));
}

/**
 * The sources of a step that runs a model (training, eval): the model's files (none with a
 * quantize step upstream, whose key covers the model) and an init_adapter's.
 */
export async function trainingSources(
  config: { model: string; revision: string; init_adapter?: string | null },
  projectRoot: string,
  inputs: ReadonlySet<string>,
): Promise<Record<string, string>> {
  // With a quantize step upstream, its key already covers the model: nothing to hash (or download) here.
  const out = inputs.has("base")
    ? {}
    : await modelSources(await modelDir(config.model, config.revision, projectRoot));
  if (config.init_adapter !== undefined && config.init_adapter !== null) {
    const dir = resolve(projectRoot, config.init_adapter);
    out["init_adapter/config"] = join(dir, ADAPTER_CONFIG_FILE);
    out["init_adapter/weights"] = join(dir, ADAPTER_WEIGHTS_FILE);
  }
  return out;
}

/**
 * The dry run's lines of a training step (`rowsPerExample`: 2 for preference pairs): the planned peak GPU memory of one optimizer step, from the model's
 * config.json alone (downloaded alone, or read from the Hugging Face cache offline), the
 * tokenize step's max_seq_len and the quantize step's settings when it is upstream.
 */
export async function describeTraining(
  step: string,
  config: TrainingArgs,
  ctx: DescribeContext,
  rowsPerExample = 1,
): Promise<string[]> {
  const local = resolve(ctx.projectRoot, config.model);
  const ref = (await exists(join(local, "config.json"))) ? local : config.model;
  const { dir } = await resolveModel(ref, { revision: config.revision, configOnly: true, progress: false });
  const model = await loadModelConfig(dir);
  const seqLen = Number(ctx.inputs.data?.max_seq_len ?? model.maxPositionEmbeddings);
  const targets = resolveTargetModules(config.lora.target_modules, `${step}.lora.target_modules`);
  const { tryGetGpu } = await import("../../kernels/device.ts");
  const gpu = await tryGetGpu();
  const limits = gpu ? { maxBindingBytes: gpu.maxBindingBytes, software: gpu.software } : DEFAULT_LIMITS;
  const quantization = ctx.inputs.base ? quantizeSettings(ctx.inputs.base) : undefined;
  const plan = planTrainSft(
    model,
    { ...config, per_device_train_batch_size: rowsPerExample * config.per_device_train_batch_size },
    targets,
    seqLen,
    gpu && !gpu.f16 ? "f32" : "f16",
    limits,
    quantization,
  );
  const memory = gpu ? gpuMemory({ description: gpu.info.description, software: gpu.software }) : null;
  const on = gpu ? gpu.info.description : "a GPU with 2 GiB storage bindings (no adapter here)";
  const verdict = memory === null
    ? "the adapter's memory is unknown (set LATHE_GPU_MEMORY to check)"
    : plan.total <= memory.bytes
    ? `fits the ${formatBytes(memory.bytes)} of ${memory.source}`
    : `does not fit the ${formatBytes(memory.bytes)} of ${memory.source}: ${
      fitAdvice(plan, memory.bytes).slice(1).join("; ")
    }`;
  return [`memory on ${on}: ${verdict}`, ...formatMemoryPlan(plan).split("\n")];
}

/** New tokens the tokenize step added (`tokenize.add_special_tokens`): the new vocabulary size and ids. */
export interface AddedTokens {
  vocabSize: number;
  ids: number[];
  /** The tokenize step's tokenizer copy, which has them. */
  tokenizerDir: string;
}

/** The tokens `data` (a tokenize step) added beyond `model`'s vocabulary, or null. */
export async function addedTokens(data: Upstream, model: ModelConfig): Promise<AddedTokens | null> {
  if (!("new_tokens" in data.manifest.outputs)) return null;
  const info = JSON.parse(await Deno.readTextFile(data.path("new_tokens"))) as {
    vocab_size: number;
    new_tokens: { content: string; id: number }[];
  };
  if (info.vocab_size <= model.vocabSize) return null;
  return {
    vocabSize: info.vocab_size,
    ids: info.new_tokens.map((t) => t.id).filter((id) => id >= model.vocabSize),
    tokenizerDir: dirname(data.path("tokenizer/tokenizer.json")),
  };
}

/**
 * With new tokens: the base grown to their vocabulary (steps/train/resize.ts: mean rows, the
 * tokenize step's tokenizer) in `<run>/.resized/<key>/`, where later steps find it again; else `dir`.
 */
export async function resizedBase(
  ctx: StepContext,
  dir: string,
  added: AddedTokens | null,
  step: string,
): Promise<string> {
  if (added === null) return dir;
  const out = join(ctx.runDir, ".resized", ctx.key);
  if (!(await exists(join(out, "config.json")))) {
    const tmp = `${out}.tmp-${crypto.randomUUID().slice(0, 8)}`;
    await writeResizedModel(dir, tmp, added.vocabSize, added.tokenizerDir);
    await Deno.rename(tmp, out).catch(async (error) => {
      await Deno.remove(tmp, { recursive: true });
      if (!(await exists(join(out, "config.json")))) throw error;
    });
  }
  console.error(
    `[${step}] vocabulary grown to ${added.vocabSize} for ${added.ids.length} new token(s): mean rows`,
  );
  return out;
}

/** Limits a plan assumes without an adapter: a discrete GPU's 2 GiB bindings. */
const DEFAULT_LIMITS = { maxBindingBytes: 2 ** 31, software: false };

/**
 * The train and (when tokenize wrote one) eval splits of a tokenize step, each checked by `check`
 * (the kind of rows the step trains on), against the model's vocabulary and its positions.
 */
export async function openSplits(
  data: Upstream,
  model: ModelConfig,
  check: (index: ShardIndex) => void,
): Promise<{ train: Split; eval: Split | null }> {
  const train = await loadSplit(data.path("train"));
  const evalSplit = "eval" in data.manifest.outputs ? await loadSplit(data.path("eval")) : null;
  for (const split of [train, evalSplit]) {
    if (!split) continue;
    const i = split.index;
    check(i);
    if (i.vocab_size > model.vocabSize && !("new_tokens" in data.manifest.outputs)) {
      throw new LatheError(
        `Cannot train on split "${i.split}": its tokenizer has ${i.vocab_size} token ids, ` +
          `the model's vocab_size is ${model.vocabSize}`,
        { hint: "tokenize with the model's own tokenizer (tokenize.tokenizer = the model directory)" },
      );
    }
    checkSequenceLength(model, i.seq_len);
  }
  return { train, eval: evalSplit };
}

/**
 * Writes a training step's outputs once its loop is done: the adapter (PEFT), trainer_state.json,
 * loss.svg (with the `curves` metrics beside the loss) and, when the loop wrote checkpoints, moves
 * them from `checkpointDir` (outside the staging directory) into the step's `checkpoints/`.
 * Returns the outputs by name.
 */
export async function writeTrainingOutputs(
  ctx: StepContext,
  model: TrainableModel,
  peft: LoraConfig,
  result: TrainLoopResult,
  config: TrainingArgs,
  title: string,
  checkpointDir: string,
  curves: readonly string[] = [],
  baseModelDir: string | null = null,
  tokenizerDir: string | null = null,
): Promise<Record<string, string>> {
  const outputs: Record<string, string> = {};
  if (config.finetuning === "full") {
    // Every weight trained: a Hugging Face model directory in the base's dtype (what merge writes).
    const dir = dirname(await ctx.out(join(FULL_MODEL_DIR, "config.json")));
    const weights = await fullTrained().snapshot(model) as Map<string, Float32Array>;
    const files = await writeFullModel(
      dir,
      baseModelDir!,
      model.config,
      weights,
      expectedTensors(model.config),
    );
    for (const f of files) outputs[`${FULL_MODEL_DIR}/${f}`] = `${FULL_MODEL_DIR}/${f}`;
    outputs.model = `${FULL_MODEL_DIR}/config.json`;
  } else {
    const dir = dirname(await ctx.out(join("adapter", ADAPTER_CONFIG_FILE)));
    await writeAdapter(dir, model, peft);
    outputs.adapter = join("adapter", ADAPTER_CONFIG_FILE);
    outputs.adapter_weights = join("adapter", ADAPTER_WEIGHTS_FILE);
    // New tokens: the tokenizer that has them goes with the adapter (as trl saves it).
    if (tokenizerDir !== null) {
      for (
        const f of await copyModelFiles(tokenizerDir, dir, [
          "tokenizer.json",
          "tokenizer_config.json",
          "chat_template.jinja",
        ])
      ) {
        outputs[`adapter/${f}`] = `adapter/${f}`;
      }
    }
  }
  await writeJsonAtomic(await ctx.out("trainer_state.json"), finalTrainerState(result, config));
  await writeFileAtomic(await ctx.out("loss.svg"), lossSvg(result.history, title, curves));
  if (await exists(checkpointDir)) {
    await Deno.rename(checkpointDir, await ctx.out("checkpoints"));
    await Deno.remove(dirname(checkpointDir)).catch(() => {}); // only when empty
  }
  return { ...outputs, trainer_state: "trainer_state.json", loss_plot: "loss.svg" };
}
