/**
 * PEFT LoRA adapters, as `PeftModel.save_pretrained` writes them and
 * `PeftModel.from_pretrained` loads them: `adapter_config.json` and
 * `adapter_model.safetensors` (F32, metadata `{"format": "pt"}`).
 *
 * Letters: D = hidden, F = ffn, H = heads, Hkv = kv heads, hd = head dim, r = LoRA rank.
 * Per adapted projection W[out, in] of layer i:
 * ```
 * base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight   A[r, in]
 * base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight   B[out, r]
 * y = W·x + s·B·(A·dropout(x)),   s = lora_alpha / r   (lora_alpha / √r with use_rslora)
 * ```
 * Init (PEFT `init_lora_weights=True`): A ~ Kaiming-uniform with a = √5 on fan_in = in,
 * i.e. gain = √(2 / (1 + a²)) = √(1/3), bound = √3 · gain / √in = 1 / √in, A ~ U(−bound, bound);
 * B = 0, so the adapted model starts equal to the base model.
 * @module
 */
import { join } from "node:path";
import { LatheError } from "../foundation/errors.ts";
import { writeFileAtomic } from "../foundation/atomic.ts";
import {
  type ModelConfig,
  type Projection,
  projectionPath,
  PROJECTIONS,
  projectionShape,
} from "./model_config.ts";
import { Pcg32 } from "../foundation/random.ts";
import { SafetensorsFile, type TensorSource, toFloat32, writeSafetensors } from "./safetensors.ts";

/** The adapter config file name. */
export const ADAPTER_CONFIG_FILE = "adapter_config.json";
/** The adapter weights file name. */
export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";

/** LoRA hyper-parameters, named as in peft's `LoraConfig` (camelCase). */
export interface LoraConfig {
  /** `base_model_name_or_path`: the hub id or path of the base model. */
  readonly baseModelNameOrPath: string | null;
  /** `r`: the rank. */
  readonly r: number;
  /** `lora_alpha`: the scale numerator. */
  readonly loraAlpha: number;
  /** `lora_dropout`: dropout on the adapter input, in [0, 1). */
  readonly loraDropout: number;
  /**
   * `target_modules`: projection names, or "all-linear" (the seven projections; lm_head
   * excluded as in PEFT). Read adapters keep what their file says, which may also be module
   * paths or a regular expression (see {@link matchTargetModules}).
   */
  readonly targetModules: readonly string[] | string;
  /** `use_rslora`: scale by lora_alpha / √r instead of lora_alpha / r. */
  readonly useRslora: boolean;
  /** `revision` of the base model; written as null when absent. */
  readonly revision?: string | null;
  /** `modules_to_save`: whole modules trained beside the adapters (`embed_tokens`, `lm_head`). */
  readonly modulesToSave?: readonly SavedModule[] | null;
  /** `trainable_token_indices`: rows of `embed_tokens` trained beside the adapters (peft's TrainableTokens). */
  readonly trainableTokenIndices?: readonly number[] | null;
}

/** Modules `modules_to_save` can hold in lathe. */
export const SAVED_MODULES = ["embed_tokens", "lm_head"] as const;
/** One of {@link SAVED_MODULES}. */
export type SavedModule = typeof SAVED_MODULES[number];

/** The model weight a saved module stands for. */
export const SAVED_MODULE_WEIGHTS: Record<SavedModule, string> = {
  embed_tokens: "model.embed_tokens.weight",
  lm_head: "lm_head.weight",
};

/**
 * The adapter file's keys of what trains beside the adapters, as peft saves them: a module of
 * `modules_to_save` under its own path (peft strips `modules_to_save.default.`), and the rows of
 * `trainable_token_indices` as `token_adapter.trainable_tokens_delta` [k, D] (the rows' new values,
 * in the order of the indices).
 */
export const EXTRA_KEYS = {
  embed_tokens: "base_model.model.model.embed_tokens.weight",
  lm_head: "base_model.model.lm_head.weight",
  tokens: "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
} as const;

/**
 * What an adapter trains beside its LoRA pairs: whole modules (`embed_tokens` [V, D], `lm_head`
 * [V, D]) and the trained token rows (`tokens`: [k, D] for `trainableTokenIndices`).
 */
export interface AdapterExtras {
  embed_tokens?: Float32Array;
  lm_head?: Float32Array;
  tokens?: Float32Array;
}

/** One adapted projection: A[r, in] and B[out, r], row-major. */
export interface LoraPair {
  readonly layer: number;
  readonly module: Projection;
  readonly a: Float32Array;
  readonly b: Float32Array;
}

/** The LoRA scale s: lora_alpha / r, or lora_alpha / √r with rsLoRA. */
export function loraScaling(loraAlpha: number, r: number, useRslora: boolean): number {
  return useRslora ? loraAlpha / Math.sqrt(r) : loraAlpha / r;
}

/**
 * Expands and validates `target_modules`: "all-linear" is the seven projections; a list
 * must name only projections. Returned sorted (PEFT stores a set; sorted keeps files
 * deterministic).
 */
export function resolveTargetModules(
  targets: readonly string[] | string,
  where = "target_modules",
): Projection[] {
  if (typeof targets === "string") {
    if (targets === "all-linear") return [...PROJECTIONS].sort();
    throw new LatheError(
      `Cannot use ${where} ${JSON.stringify(targets)}: only a list of names or "all-linear" is supported`,
      {
        hint: `Name projections from: ${PROJECTIONS.join(", ")}.`,
      },
    );
  }
  if (targets.length === 0) {
    throw new LatheError(`Cannot use ${where}: the list is empty`, {
      hint: `Use e.g. ["q_proj", "v_proj"] or "all-linear".`,
    });
  }
  const out = new Set<Projection>();
  for (const t of targets) {
    if (!(PROJECTIONS as readonly string[]).includes(t)) {
      throw new LatheError(`Cannot use ${where}: "${t}" is not a projection of this model family`, {
        hint: `LoRA applies to: ${PROJECTIONS.join(", ")} (lm_head and embeddings are not adapted).`,
      });
    }
    out.add(t as Projection);
  }
  return [...out].sort();
}

/** One adapted projection: layer index and projection name. */
export interface LoraSite {
  readonly layer: number;
  readonly module: Projection;
}

/**
 * The (layer, module) sites `target_modules` selects on `model`, matched as peft does
 * against module paths such as `model.layers.3.self_attn.q_proj`: a list entry matches a
 * path equal to it or ending in "." + entry (so "q_proj", "self_attn.q_proj" and full paths,
 * which newer peft versions save, all work); "all-linear" selects every projection; any
 * other string is a regular expression that must match the whole path. Layer-major order.
 */
export function matchTargetModules(
  model: ModelConfig,
  targets: readonly string[] | string,
  where = "target_modules",
): LoraSite[] {
  let matches: (path: string) => boolean;
  if (typeof targets === "string") {
    if (targets === "all-linear") matches = () => true;
    else {
      let re: RegExp;
      try {
        re = new RegExp(`^(?:${targets})$`);
      } catch (error) {
        throw new LatheError(`Cannot use ${where} ${JSON.stringify(targets)}: ${(error as Error).message}`);
      }
      matches = (path) => re.test(path);
    }
  } else {
    matches = (path) => targets.some((t) => path === t || path.endsWith(`.${t}`));
  }
  const sites: LoraSite[] = [];
  for (let layer = 0; layer < model.numLayers; layer++) {
    for (const module of PROJECTIONS) {
      if (matches(projectionPath(layer, module))) sites.push({ layer, module });
    }
  }
  if (sites.length === 0) {
    throw new LatheError(
      `Cannot use ${where} ${JSON.stringify(targets)}: it matches no projection of the model`,
      {
        hint: `LoRA applies to: ${PROJECTIONS.join(", ")} (lm_head and embeddings are not adapted).`,
      },
    );
  }
  return sites;
}

/** The safetensors key of a LoRA matrix, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. */
export function loraKey(layer: number, module: Projection, which: "A" | "B"): string {
  return `base_model.model.${projectionPath(layer, module)}.lora_${which}.weight`;
}

/** `[r, in]` of A and `[out, r]` of B for `module` under `model`. */
export function loraShapes(
  model: ModelConfig,
  module: Projection,
  r: number,
): { a: [number, number]; b: [number, number] } {
  const [out, inp] = projectionShape(model, module);
  return { a: [r, inp], b: [out, r] };
}

/**
 * The `adapter_config.json` object: exactly peft's long-standing fields (older peft
 * versions reject unknown keys), keys sorted as peft's `json.dumps(..., sort_keys=True)`.
 */
export function adapterConfigJson(config: LoraConfig): Record<string, unknown> {
  validateHyper(config.r, config.loraAlpha, config.loraDropout, "LoRA config");
  const fields: Record<string, unknown> = {
    alpha_pattern: {},
    base_model_name_or_path: config.baseModelNameOrPath,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    lora_alpha: config.loraAlpha,
    lora_dropout: config.loraDropout,
    modules_to_save: config.modulesToSave?.length ? [...config.modulesToSave] : null,
    peft_type: "LORA",
    r: config.r,
    rank_pattern: {},
    revision: config.revision ?? null,
    target_modules: resolveTargetModules(config.targetModules),
    task_type: "CAUSAL_LM",
    use_dora: false,
    use_rslora: config.useRslora,
  };
  // Written only when set: older peft versions reject the key.
  if (config.trainableTokenIndices?.length) {
    fields.trainable_token_indices = { embed_tokens: [...config.trainableTokenIndices] };
  }
  const sorted: Record<string, unknown> = {};
  for (const k of Object.keys(fields).sort()) sorted[k] = fields[k];
  return sorted;
}

function validateHyper(r: unknown, alpha: unknown, dropout: unknown, where: string): void {
  if (typeof r !== "number" || !Number.isInteger(r) || r <= 0) {
    throw new LatheError(`Cannot use ${where}: r is ${JSON.stringify(r)}; expected a positive integer`);
  }
  if (typeof alpha !== "number" || !Number.isFinite(alpha) || alpha <= 0) {
    throw new LatheError(
      `Cannot use ${where}: lora_alpha is ${JSON.stringify(alpha)}; expected a positive number`,
    );
  }
  if (typeof dropout !== "number" || !(dropout >= 0 && dropout < 1)) {
    throw new LatheError(
      `Cannot use ${where}: lora_dropout is ${JSON.stringify(dropout)}; expected a number in [0, 1)`,
    );
  }
}

/**
 * Fresh adapters for every layer × target module: A ~ U(−1/√in, 1/√in), B = 0.
 * Randomness: PCG32 seeded with `seed`, one stream per (layer, module)
 * (stream = layer · 7 + index in {@link PROJECTIONS}), so a pair's init does not depend on
 * which other modules are targeted.
 */
export function initLoraAdapters(model: ModelConfig, config: LoraConfig, seed: number): LoraPair[] {
  const targets = resolveTargetModules(config.targetModules);
  const pairs: LoraPair[] = [];
  for (let layer = 0; layer < model.numLayers; layer++) {
    for (const module of targets) {
      const { a, b } = loraShapes(model, module, config.r);
      const rng = new Pcg32(seed, layer * PROJECTIONS.length + PROJECTIONS.indexOf(module));
      const bound = 1 / Math.sqrt(a[1]);
      pairs.push({
        layer,
        module,
        a: rng.fillUniform(new Float32Array(a[0] * a[1]), -bound, bound),
        b: new Float32Array(b[0] * b[1]),
      });
    }
  }
  return pairs;
}

/**
 * Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (each atomically;
 * the config last). Every (layer, target module) must have exactly one pair with the
 * shapes of {@link loraShapes}.
 */
export async function writePeftAdapter(
  dir: string,
  model: ModelConfig,
  config: LoraConfig,
  pairs: Iterable<LoraPair>,
  extras: AdapterExtras = {},
): Promise<void> {
  const json = adapterConfigJson(config);
  const targets = json.target_modules as Projection[];
  const seen = new Map<string, LoraPair>();
  for (const p of pairs) {
    const where = `layer ${p.layer} ${p.module}`;
    if (!Number.isInteger(p.layer) || p.layer < 0 || p.layer >= model.numLayers) {
      throw new LatheError(`Cannot write LoRA adapter: layer ${p.layer} is outside [0, ${model.numLayers})`);
    }
    if (!targets.includes(p.module)) {
      throw new LatheError(
        `Cannot write LoRA adapter: ${where} is not in target_modules [${targets.join(", ")}]`,
      );
    }
    const key = `${p.layer}.${p.module}`;
    if (seen.has(key)) throw new LatheError(`Cannot write LoRA adapter: ${where} is given twice`);
    const { a, b } = loraShapes(model, p.module, config.r);
    if (p.a.length !== a[0] * a[1] || p.b.length !== b[0] * b[1]) {
      throw new LatheError(
        `Cannot write LoRA adapter: ${where} has ${p.a.length} A and ${p.b.length} B values; ` +
          `expected A [${a.join(", ")}] and B [${b.join(", ")}]`,
      );
    }
    seen.set(key, p);
  }
  const tensors: TensorSource[] = [];
  for (let layer = 0; layer < model.numLayers; layer++) {
    for (const module of targets) {
      const p = seen.get(`${layer}.${module}`);
      if (!p) throw new LatheError(`Cannot write LoRA adapter: layer ${layer} ${module} has no weights`);
      const { a, b } = loraShapes(model, module, config.r);
      tensors.push({ name: loraKey(layer, module, "A"), dtype: "F32", shape: a, data: f32Bytes(p.a) });
      tensors.push({ name: loraKey(layer, module, "B"), dtype: "F32", shape: b, data: f32Bytes(p.b) });
    }
  }
  for (const [what, shape] of extraShapes(model, config)) {
    const values = extras[what];
    const n = shape[0] * shape[1];
    if (!values || values.length !== n) {
      throw new LatheError(
        `Cannot write LoRA adapter: ${what} ${
          values ? `holds ${values.length} values` : "is missing"
        }; expected [${shape}]`,
      );
    }
    tensors.push({ name: EXTRA_KEYS[what], dtype: "F32", shape, data: f32Bytes(values) });
  }
  await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: "pt" });
  await writeFileAtomic(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(json, null, 2));
}

/** The extra tensors `config` trains beside its pairs, with their shapes. */
export function extraShapes(
  model: ModelConfig,
  config: LoraConfig,
): [keyof AdapterExtras, [number, number]][] {
  const { vocabSize: V, hiddenSize: D } = model;
  const out: [keyof AdapterExtras, [number, number]][] = [];
  for (const m of config.modulesToSave ?? []) out.push([m, [V, D]]);
  const k = config.trainableTokenIndices?.length ?? 0;
  if (k > 0) out.push(["tokens", [k, D]]);
  return out;
}

function f32Bytes(values: Float32Array): Uint8Array {
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
}

async function readJsonObject(
  path: string,
  bad: (what: string, hint?: string) => never,
): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      bad("the file does not exist", "Point to a directory written by PeftModel.save_pretrained.");
    }
    throw error;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    bad(`it is not valid JSON (${(error as Error).message})`);
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) bad("it is not a JSON object");
  return parsed as Record<string, unknown>;
}

/** A loaded adapter: its config and its pairs by (layer, module). */
export interface PeftAdapter {
  readonly config: LoraConfig;
  /** The projections adapted on at least one layer, sorted. */
  readonly targets: readonly Projection[];
  /** s = lora_alpha / r (or / √r). */
  readonly scaling: number;
  /** Every pair, by `${layer}.${module}`. */
  readonly pairs: ReadonlyMap<string, LoraPair>;
  /** The pair of (layer, module); a LatheError when the adapter does not touch it. */
  get(layer: number, module: Projection): LoraPair;
  /** What it trains beside the pairs (modules_to_save, trainable token rows). */
  readonly extras: AdapterExtras;
}

function isIndexList(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((i) => Number.isInteger(i) && i >= 0);
}

const KEY = /^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_(A|B)\.weight$/;

// Fields whose non-default values change what the adapter computes, which lathe does not model.
const UNSUPPORTED: [field: string, isDefault: (v: unknown) => boolean, what: string][] = [
  ["bias", (v) => v === undefined || v === "none", "bias training"],
  ["use_dora", (v) => v === undefined || v === false, "DoRA"],
  ["fan_in_fan_out", (v) => v === undefined || v === false, "fan_in_fan_out (Conv1D layouts)"],
  [
    "modules_to_save",
    (v) =>
      v == null || (Array.isArray(v) && v.every((m) => (SAVED_MODULES as readonly unknown[]).includes(m))),
    "modules_to_save beyond embed_tokens and lm_head",
  ],
  [
    "rank_pattern",
    (v) => v == null || (typeof v === "object" && Object.keys(v).length === 0),
    "rank_pattern",
  ],
  [
    "alpha_pattern",
    (v) => v == null || (typeof v === "object" && Object.keys(v).length === 0),
    "alpha_pattern",
  ],
  ["layers_to_transform", (v) => v == null, "layers_to_transform"],
  ["layer_replication", (v) => v == null, "layer_replication"],
  ["lora_bias", (v) => v == null || v === false, "lora_bias"],
  [
    "trainable_token_indices",
    (v) =>
      v == null || isIndexList(v) ||
      (typeof v === "object" && Object.keys(v).length === 1 &&
        isIndexList((v as Record<string, unknown>).embed_tokens)),
    "trainable_token_indices beyond a list of embed_tokens rows",
  ],
];

/**
 * Reads a PEFT LoRA adapter directory and checks it against `model`: config fields,
 * tensor names, dtypes (F32; F16/BF16 are converted) and shapes, and that every module
 * `target_modules` selects has both A and B and nothing else is stored.
 */
export async function readPeftAdapter(dir: string, model: ModelConfig): Promise<PeftAdapter> {
  const configPath = join(dir, ADAPTER_CONFIG_FILE);
  const weightsPath = join(dir, ADAPTER_WEIGHTS_FILE);
  const bad = (what: string, hint?: string): never => {
    throw new LatheError(`Cannot read LoRA adapter "${configPath}": ${what}`, { hint });
  };
  const raw = await readJsonObject(configPath, bad);
  if (raw.peft_type !== "LORA") {
    bad(`peft_type is ${JSON.stringify(raw.peft_type)}; only "LORA" is supported`);
  }
  if (raw.task_type !== undefined && raw.task_type !== null && raw.task_type !== "CAUSAL_LM") {
    bad(`task_type is ${JSON.stringify(raw.task_type)}; only "CAUSAL_LM" is supported`);
  }
  for (const [field, isDefault, what] of UNSUPPORTED) {
    if (!isDefault(raw[field])) bad(`${field} is ${JSON.stringify(raw[field])}; ${what} is not supported`);
  }
  validateHyper(raw.r, raw.lora_alpha, raw.lora_dropout ?? 0, `LoRA adapter "${configPath}"`);
  const tm = raw.target_modules;
  if (!(typeof tm === "string" || (Array.isArray(tm) && tm.every((t) => typeof t === "string")))) {
    bad(`target_modules is ${JSON.stringify(tm)}; expected a list of module names`);
  }
  const sites = matchTargetModules(model, tm as string[] | string, `target_modules of "${configPath}"`);
  const siteKeys = new Set(sites.map((t) => `${t.layer}.${t.module}`));
  const targets = [...new Set(sites.map((t) => t.module))].sort();
  const base = raw.base_model_name_or_path;
  const config: LoraConfig = {
    baseModelNameOrPath: typeof base === "string" ? base : null,
    r: raw.r as number,
    loraAlpha: raw.lora_alpha as number,
    loraDropout: (raw.lora_dropout as number | undefined) ?? 0,
    targetModules: tm as string[] | string,
    useRslora: raw.use_rslora === true,
    revision: typeof raw.revision === "string" ? raw.revision : null,
    modulesToSave: Array.isArray(raw.modules_to_save) && raw.modules_to_save.length
      ? raw.modules_to_save as SavedModule[]
      : null,
    trainableTokenIndices: raw.trainable_token_indices == null
      ? null
      : isIndexList(raw.trainable_token_indices)
      ? raw.trainable_token_indices
      : (raw.trainable_token_indices as { embed_tokens: number[] }).embed_tokens,
  };
  for (const i of config.trainableTokenIndices ?? []) {
    if (i >= model.vocabSize) {
      bad(`trainable_token_indices holds ${i}, beyond the model's vocab_size ${model.vocabSize}`);
    }
  }

  using st = await SafetensorsFile.open(weightsPath);
  const extras: AdapterExtras = {};
  const extraNames = new Map<string, { what: keyof AdapterExtras; shape: [number, number] }>(
    extraShapes(model, config).map(([what, shape]) => [EXTRA_KEYS[what], { what, shape }]),
  );
  const badTensor = (name: string, what: string): never => {
    throw new LatheError(`Cannot read LoRA adapter "${weightsPath}": tensor "${name}" ${what}`, {
      hint: "The adapter was trained for another model or with other settings than adapter_config.json says.",
    });
  };
  const found = new Map<string, { a?: Float32Array; b?: Float32Array }>();
  for (const name of st.names()) {
    const extra = extraNames.get(name);
    if (extra) {
      const info = st.info(name);
      if (info.shape.length !== 2 || info.shape[0] !== extra.shape[0] || info.shape[1] !== extra.shape[1]) {
        badTensor(name, `has shape [${info.shape.join(", ")}], expected [${extra.shape.join(", ")}]`);
      }
      extras[extra.what] = toFloat32(info.dtype, await st.readBytes(name), `tensor "${name}"`);
      continue;
    }
    const m = KEY.exec(name);
    if (!m) {
      badTensor(
        name,
        "is not a LoRA weight of a Llama-family decoder (expected base_model.model.model.layers.{i}.…lora_{A,B}.weight)",
      );
    }
    const [, layerText, block, module, which] = m!;
    const layer = Number(layerText);
    if (
      !(PROJECTIONS as readonly string[]).includes(module) ||
      projectionPath(layer, module as Projection) !== `model.layers.${layer}.${block}.${module}`
    ) {
      badTensor(name, `names no projection of this model family (${PROJECTIONS.join(", ")})`);
    }
    const proj = module as Projection;
    if (layer >= model.numLayers) {
      badTensor(name, `is for layer ${layer}, but the model has ${model.numLayers} layers`);
    }
    if (!siteKeys.has(`${layer}.${proj}`)) {
      badTensor(
        name,
        `adapts layer ${layer} "${proj}", which target_modules ${JSON.stringify(tm)} does not select`,
      );
    }
    const info = st.info(name);
    if (info.dtype !== "F32" && info.dtype !== "F16" && info.dtype !== "BF16") {
      badTensor(name, `has dtype ${info.dtype}; expected F32 (or F16/BF16)`);
    }
    const want = loraShapes(model, proj, config.r)[which === "A" ? "a" : "b"];
    if (info.shape.length !== 2 || info.shape[0] !== want[0] || info.shape[1] !== want[1]) {
      badTensor(name, `has shape [${info.shape.join(", ")}], expected [${want.join(", ")}] (r=${config.r})`);
    }
    const values = toFloat32(info.dtype, await st.readBytes(name), `tensor "${name}"`);
    const key = `${layer}.${proj}`;
    const entry = found.get(key) ?? {};
    if (which === "A") entry.a = values;
    else entry.b = values;
    found.set(key, entry);
  }
  for (const [name, { what }] of extraNames) {
    if (!extras[what]) {
      throw new LatheError(`Cannot read LoRA adapter "${weightsPath}": tensor "${name}" is missing`, {
        hint: "adapter_config.json's modules_to_save / trainable_token_indices name it",
      });
    }
  }
  const pairs = new Map<string, LoraPair>();
  for (const { layer, module } of sites) {
    const e = found.get(`${layer}.${module}`);
    for (const which of ["A", "B"] as const) {
      if (!e?.[which === "A" ? "a" : "b"]) {
        throw new LatheError(
          `Cannot read LoRA adapter "${weightsPath}": tensor "${loraKey(layer, module, which)}" is missing`,
          { hint: "Every module that target_modules selects needs lora_A and lora_B." },
        );
      }
    }
    pairs.set(`${layer}.${module}`, { layer, module, a: e!.a!, b: e!.b! });
  }
  return {
    config,
    targets,
    scaling: loraScaling(config.loraAlpha, config.r, config.useRslora),
    pairs,
    extras,
    get(layer: number, module: Projection): LoraPair {
      const p = pairs.get(`${layer}.${module}`);
      if (!p) {
        throw new LatheError(`Cannot use LoRA adapter "${dir}": it does not adapt layer ${layer} ${module}`, {
          hint: `It adapts ${pairs.size} modules: ${[...pairs.keys()].slice(0, 6).join(", ")}${
            pairs.size > 6 ? ", …" : ""
          }.`,
        });
      }
      return p;
    },
  };
}
