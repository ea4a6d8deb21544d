/**
 * lathe: LLM fine-tuning (LoRA, QLoRA, SFT, DPO) as a Deno workflow of composable steps,
 * training on WebGPU with lathe's own WGSL kernels, every run indexed in DuckDB.
 *
 * This module is the public library API. Programs use the tasks (`deno task recipe`,
 * `step`, `runs`, `demo`); libraries compose the same pieces:
 *
 * @example Run a recipe from code
 * ```ts ignore
 * import { loadRecipe, runPipeline, newRunId, trackerHook } from "./mod.ts";
 * const projectRoot = Deno.cwd();
 * const recipe = await loadRecipe("tiny-demo", { projectRoot });
 * const runsRoot = `${projectRoot}/runs`;
 * const result = await runPipeline(recipe, {
 *   runsRoot, projectRoot, runId: newRunId(recipe.name), onFinish: trackerHook(runsRoot),
 * });
 * console.log(result.runDir);
 * ```
 *
 * @example Define a step
 * ```ts ignore
 * import * as z from "zod";
 * import { defineStep, runFromCli } from "./mod.ts";
 * export const step = defineStep({
 *   name: "count", version: "1", description: "counts training rows",
 *   config: z.strictObject({}), inputs: { data: "prepare" },
 *   run: async (ctx, _config, inputs) => {
 *     const rows = (await Deno.readTextFile(inputs.data.path("train"))).split("\n").length - 1;
 *     await Deno.writeTextFile(await ctx.out("count.txt"), `${rows}\n`);
 *     return { outputs: { count: "count.txt" }, metrics: { rows } };
 *   },
 * });
 * if (import.meta.main) await runFromCli(step);
 * ```
 * @module
 */

// The step contract: definitions, manifests, running, caching, reruns.
export {
  defineStep,
  type StepContext,
  type StepDef,
  type StepResult,
  type Upstream,
} from "./steps/define.ts";
export {
  FAILURE_FILE,
  Manifest,
  MANIFEST_FILE,
  MANIFEST_SCHEMA,
  parseManifest,
  readManifest,
} from "./foundation/manifest.ts";
export { type RunOptions, type RunOutcome, runStep, stepKey, verifyOutputs } from "./steps/runner.ts";
export { rerunFromManifest, type RerunOptions } from "./steps/rerun.ts";
export { runFromCli } from "./steps/cli.ts";
export { LatheError, runMain } from "./foundation/errors.ts";
export { loadStep, STEP_NAMES } from "./steps/registry.ts";
export { isRunId, newRunId } from "./steps/run_id.ts";
export { applyOverrides, parseOverride } from "./steps/overrides.ts";
export { Progress } from "./foundation/progress.ts";
export { canonicalJson, sha256File, sha256Hex } from "./foundation/hash.ts";

// Recipes and pipelines.
export { listRecipes, loadRecipe, type Recipe, type RecipeStep } from "./steps/recipe.ts";
export { type PipelineResult, planPipeline, runPipeline } from "./steps/pipeline.ts";
export { INSTANCE_NAME, stepOfInstance } from "./steps/define.ts";

// The tracker.
export * as tracker from "./tracker/mod.ts";
export { trackerHook } from "./tracker/hook.ts";

// Steps.
export { step as prepare } from "./steps/prepare.ts";
export { step as tokenize } from "./steps/tokenize.ts";
export { step as quantize } from "./steps/quantize.ts";
export { type ShardIndex, ShardReader, type ShardRow, ShardWriter } from "./steps/tokenize/shards.ts";

// File formats lathe reads and writes.
export { ModelWeights, SafetensorsFile, writeModelWeights, writeSafetensors } from "./formats/safetensors.ts";
export * as peft from "./formats/peft.ts";
export * as bnb4bit from "./formats/bnb4bit.ts";
export {
  checkQuantizedWeights,
  quantizedWeightNames,
  readQuantized4bit,
} from "./formats/bnb4bit_checkpoint.ts";

// Models: configs, resolution (path, Hugging Face cache, Hub), tiny checkpoints, the training contract.
export { loadModelConfig, type ModelConfig, parseModelConfig } from "./formats/model_config.ts";
export { resolveModel } from "./hub/model.ts";

// The Hugging Face Hub and cache: the HF_* environment, one download path and offline rule.
export { hubCredentials, type HubSettings, hubSettings } from "./hub/settings.ts";
export { type HubRepo, repoCacheDir } from "./hub/cache.ts";
export { type FileChooser, type Snapshot, snapshot, type SnapshotRequest } from "./hub/snapshot.ts";
export { hubSnapshot } from "./hub/dataset.ts";
export { writeTinyModel } from "./kernels/models/tiny.ts";
export type {
  Batch,
  LoraSpec,
  TokenScores,
  TokenWeighting,
  TrainableModel,
} from "./kernels/models/trainable.ts";

// The WebGPU engine: device, tensors, kernels, model graphs.
export * as kernels from "./kernels/mod.ts";
export { step as trainSft } from "./steps/train_sft.ts";
export { step as trainDpo } from "./steps/train_dpo.ts";

// Training: the loop over an objective (SFT, DPO), shared by the training steps.
export {
  type Objective,
  type ObjectiveStep,
  sftObjective,
  trainLoop,
  type TrainLoopOptions,
} from "./steps/train/loop.ts";
export {
  DPO_METRICS,
  dpoObjective,
  type DpoSettings,
  pairLoss,
  type ReferenceSource,
  scoreSplit,
} from "./steps/train/dpo.ts";
export { TrainDpoConfig, TrainSftConfig } from "./steps/train/config.ts";
export { step as evaluate } from "./steps/eval.ts";

// Generation: the KV-cache decoder, sampling, and sessions (a model, adapters, tokenizer, template).
export { Decoder } from "./kernels/models/decode.ts";
export { generate, type GenerateRequest, type Generation } from "./kernels/models/generate.ts";
export {
  DEFAULT_SAMPLING,
  nextToken,
  processLogits,
  type SamplingOptions,
} from "./kernels/models/sampling.ts";
export { type Adapter, stackAdapters } from "./kernels/models/stack_adapters.ts";
export { type Answer, openSession, Session, type SessionSetup } from "./steps/generate/session.ts";
export { corpusBleu, exactMatch, jsonMetrics, rougeL } from "./steps/eval/metrics.ts";
export { parseMcFile, scoreMultipleChoice } from "./steps/eval/multiple_choice.ts";
export { readGenerationConfig } from "./formats/generation_config.ts";
