/**
 * What a training step trains, as the loop and the checkpoints handle it: LoRA adapters (the
 * default: PEFT's format) or, with `finetuning: full`, every weight of the model.
 *
 * - a host copy for the best model of `load_best_model_at_end` (`snapshot`, `restore`);
 * - the checkpoint's copy (`save`, `load`): the adapter in PEFT format, or every weight as f32 in
 *   `model.safetensors` (the f32 masters, so a resumed run continues on the same bits);
 * - the step's result (`writeResult`): the adapter directory, or a Hugging Face model directory in
 *   the base's dtype with its config, tokenizer and generation config (what `merge` writes, so every
 *   later step takes it as a model).
 * @module
 */
import { join } from "node:path";
import {
  type AdapterExtras,
  extraShapes,
  type LoraConfig,
  type LoraPair,
  readPeftAdapter,
  SAVED_MODULE_WEIGHTS,
  writePeftAdapter,
} from "../../formats/peft.ts";
import type { ModelConfig } from "../../formats/model_config.ts";
import {
  type Dtype,
  fromFloat32,
  ModelWeights,
  SINGLE_FILE,
  type TensorSource,
  writeModelWeights,
  writeSafetensors,
} from "../../formats/safetensors.ts";
import { writeJsonAtomic } from "../../foundation/atomic.ts";
import { LatheError } from "../../foundation/errors.ts";
import type { LoraWeights, TrainableModel } from "../../kernels/models/trainable.ts";
import { MODEL_FILES } from "../../hub/model.ts";
import { copyModelFiles } from "../quantize_model.ts";

/**
 * The trained values on the host: adapter pairs (with what trains beside them: peft's
 * modules_to_save and trainable token rows), or every weight by its Hugging Face name.
 */
export type TrainedWeights = LoraWeights[] | Map<string, Float32Array> | LoraWithExtras;

/** Adapter pairs and what trains beside them. */
export interface LoraWithExtras {
  pairs: LoraWeights[];
  extras: AdapterExtras;
}

/** A model training weights beside its adapters (the webgpu backend with a trained subset). */
interface ExtrasModel extends TrainableModel {
  getExtras(): Promise<Map<string, Float32Array>>;
  setExtras(extras: ReadonlyMap<string, Float32Array>): Promise<void>;
}

/** The model's extras (HF names, "tokens") as peft's adapter names them. */
function toAdapterExtras(map: ReadonlyMap<string, Float32Array>): AdapterExtras {
  const out: AdapterExtras = {};
  for (const [name, values] of map) {
    if (name === SAVED_MODULE_WEIGHTS.embed_tokens) out.embed_tokens = values;
    else if (name === SAVED_MODULE_WEIGHTS.lm_head) out.lm_head = values;
    else if (name === "tokens") out.tokens = values;
  }
  return out;
}

function fromAdapterExtras(extras: AdapterExtras): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  if (extras.embed_tokens) out.set(SAVED_MODULE_WEIGHTS.embed_tokens, extras.embed_tokens);
  if (extras.lm_head) out.set(SAVED_MODULE_WEIGHTS.lm_head, extras.lm_head);
  if (extras.tokens) out.set("tokens", extras.tokens);
  return out;
}

/** A model whose every weight trains (the webgpu backend with `full`). */
export interface FullModel extends TrainableModel {
  getWeights(): Promise<Map<string, Float32Array>>;
  setWeights(weights: ReadonlyMap<string, Float32Array>): Promise<void>;
}

/** How a step's trained values are copied, checkpointed and written. */
export interface Trained {
  readonly full: boolean;
  snapshot(model: TrainableModel): Promise<TrainedWeights>;
  restore(model: TrainableModel, weights: TrainedWeights): Promise<void>;
  /** Writes `weights` (default: the model's current ones) into checkpoint directory `dir`. */
  save(dir: string, model: TrainableModel, weights?: TrainedWeights): Promise<void>;
  /** Reads what {@link save} wrote. */
  load(dir: string, config: ModelConfig): Promise<TrainedWeights>;
}

function toPairs(weights: LoraWeights[]): LoraPair[] {
  return weights.map((w) => ({ layer: w.layer, module: w.module, a: w.A, b: w.B }));
}

/** LoRA adapters in PEFT format with `peft`'s config (and its modules_to_save / trainable tokens). */
export function loraTrained(peft: LoraConfig): Trained {
  const withExtras = extraShapes({ vocabSize: 1, hiddenSize: 1 } as ModelConfig, peft).length > 0;
  const extrasOf = async (model: TrainableModel) => toAdapterExtras(await (model as ExtrasModel).getExtras());
  return {
    full: false,
    snapshot: async (model) =>
      withExtras ? { pairs: await model.getLora(), extras: await extrasOf(model) } : await model.getLora(),
    restore: async (model, weights) => {
      if (!withExtras) return await model.setLora(weights as LoraWeights[]);
      const w = weights as LoraWithExtras;
      await model.setLora(w.pairs);
      await (model as ExtrasModel).setExtras(fromAdapterExtras(w.extras));
    },
    save: async (dir, model, weights) => {
      const w = weights ??
        await (withExtras
          ? { pairs: await model.getLora(), extras: await extrasOf(model) }
          : model.getLora());
      const pairs = Array.isArray(w) ? w : (w as LoraWithExtras).pairs;
      const extras = Array.isArray(w) ? {} : (w as LoraWithExtras).extras;
      await writePeftAdapter(dir, model.config, peft, toPairs(pairs), extras);
    },
    load: async (dir, config) => {
      const adapter = await readPeftAdapter(dir, config);
      const pairs = [...adapter.pairs.values()].map((p) => ({
        layer: p.layer,
        module: p.module,
        A: p.a,
        B: p.b,
      }));
      return withExtras ? { pairs, extras: adapter.extras } : pairs;
    },
  };
}

function asFull(model: TrainableModel): FullModel {
  const m = model as Partial<FullModel>;
  if (typeof m.getWeights !== "function" || typeof m.setWeights !== "function") {
    throw new Error(`the ${model.backend} model does not train every weight`);
  }
  return model as FullModel;
}

function f32Bytes(values: Float32Array): Uint8Array {
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
}

/** Every weight, as f32 masters in a checkpoint's `model.safetensors`. */
export function fullTrained(): Trained {
  return {
    full: true,
    snapshot: (model) => asFull(model).getWeights(),
    restore: (model, weights) => asFull(model).setWeights(weights as Map<string, Float32Array>),
    save: async (dir, model, weights) => {
      const w = (weights as Map<string, Float32Array> | undefined) ?? await asFull(model).getWeights();
      const tensors: TensorSource[] = [...w].map(([name, values]) => ({
        name,
        dtype: "F32",
        shape: [values.length],
        data: f32Bytes(values),
      }));
      await writeSafetensors(join(dir, SINGLE_FILE), tensors, { format: "lathe.weights/1" });
    },
    load: async (dir, config) => {
      using weights = await ModelWeights.open(join(dir, SINGLE_FILE));
      const out = new Map<string, Float32Array>();
      for (const name of weights.names()) out.set(name, await weights.readFloat32(name));
      if (out.size === 0) throw new LatheError(`Cannot resume from "${dir}": it holds no weights`);
      void config;
      return out;
    },
  };
}

const TORCH_DTYPES: Record<string, Dtype> = { float32: "F32", float16: "F16", bfloat16: "BF16" };

/**
 * Writes a fully fine-tuned model as a Hugging Face model directory `out`: the weights in the base's
 * `torch_dtype` (f32 when it has none) with their shapes, config.json, and the tokenizer, chat template
 * and generation config copied from `baseDir`. Returns the files written.
 */
export async function writeFullModel(
  out: string,
  baseDir: string,
  config: ModelConfig,
  weights: ReadonlyMap<string, Float32Array>,
  shapes: ReadonlyMap<string, readonly number[]>,
): Promise<string[]> {
  const dtype = TORCH_DTYPES[config.torchDtype ?? "float32"] ?? "F32";
  const tensors: TensorSource[] = [...weights].map(([name, values]) => ({
    name,
    dtype,
    shape: shapes.get(name) ?? [values.length],
    data: () => fromFloat32(values, dtype as "F32" | "F16" | "BF16"),
  }));
  await Deno.mkdir(out, { recursive: true });
  const files = await writeModelWeights(out, tensors);
  const raw = JSON.parse(await Deno.readTextFile(join(baseDir, "config.json"))) as Record<string, unknown>;
  delete raw.quantization_config;
  await writeJsonAtomic(join(out, "config.json"), {
    ...raw,
    torch_dtype: Object.entries(TORCH_DTYPES).find(([, d]) => d === dtype)![0],
  });
  const copied = await copyModelFiles(baseDir, out, MODEL_FILES.filter((f) => f !== "config.json"));
  return ["config.json", ...files, ...copied];
}
