/**
 * Reading bitsandbytes 4-bit checkpoints as transformers saves them: the `*-bnb-4bit` models on
 * the Hub and the quantize step's output (../shared/FORMATS.md, "bitsandbytes 4-bit").
 *
 * config.json carries `quantization_config` with `quant_method: "bitsandbytes"` and
 * `load_in_4bit: true`. Per 4-bit linear weight `W = <module>.weight` of shape [out, in],
 * n = out·in, B = blocksize, nb = ⌈n / B⌉, N = nested blocksize:
 * ```
 * W                                      U8  [⌈n/2⌉, 1] (or [⌈n/2⌉])  packed codes, element 2j in the high nibble
 * W.absmax                               U8  [nb]  double quantization: codes into nested_quant_map
 *                                        F32 [nb]  without
 * W.quant_map                            F32 [16]  the value of each 4-bit code (NF4 or FP4)
 * W.nested_absmax                        F32 [⌈nb/N⌉]  double quantization only
 * W.nested_quant_map                     F32 [256]     double quantization only (the dynamic 8-bit map)
 * W.quant_state.bitsandbytes__<nf4|fp4>  U8  [len]  UTF-8 JSON: {"quant_type", "blocksize", "dtype",
 *                                                   "shape": [out, in], and with double quantization
 *                                                   "nested_blocksize", "nested_dtype", "nested_offset"}
 * ```
 * Dequantize: absmax[b] = nested_quant_map[absmax_u8[b]] · nested_absmax[b / N] + nested_offset
 * (or the F32 absmax), w[k] = quant_map[code_k] · absmax[k / B] (formats/bnb4bit.ts
 * `dequantize4bit`). The maps stored in the file are the source of truth.
 *
 * Every other tensor (embeddings, norms, biases, and the linear weights of skipped modules) is a
 * plain float tensor of its expected shape. Which linear modules stay in 16 bit is
 * `llm_int8_skip_modules`, or, when it is null, transformers' default: the output embedding
 * `lm_head`. transformers reads the list two ways: 4.x (`_replace_with_bnb_linear`, under which
 * the published checkpoints were written) keeps a linear module whose own name is an entry or
 * whose dotted path contains `<entry>.` or equals it; 5.x (`should_convert_module`) keeps one
 * whose path an entry matches as a regex at its start, or ends with. The stored tensors say which
 * modules are 4-bit; a checkpoint is refused where both readings agree and the file disagrees
 * (transformers cannot load it either: a packed weight into a float layer, or a float weight
 * into a 4-bit layer without its quant_state).
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import {
  BLOCKSIZES,
  type Bnb4bitSettings,
  type Quantized4bit,
  type QuantType,
  TORCH_DTYPE_NAMES,
  type TorchDtypeName,
} from "./bnb4bit.ts";
import {
  checkWeights,
  expectedTensors,
  type ModelConfig,
  projectionPath,
  PROJECTIONS,
} from "./model_config.ts";
import type { ModelWeights } from "./safetensors.ts";

const QUANT_STATE = /\.quant_state\.bitsandbytes__([a-z0-9]+)$/;
const COMPANION = /\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__[a-z0-9]+)$/;
const QUANT_TYPES: readonly QuantType[] = ["nf4", "fp4"];
const TORCH_DTYPES: readonly string[] = Object.values(TORCH_DTYPE_NAMES);
const FLOAT_DTYPES: readonly string[] = ["F32", "F16", "BF16", "F64"];

const DAMAGED =
  "The checkpoint is damaged or was not written by transformers' save_pretrained; download it again.";
const SKIP_HINT =
  "config.json's quantization_config.llm_int8_skip_modules does not describe the stored weights; " +
  "fix the list, or download the checkpoint again.";

/**
 * The stored weight names (`…_proj.weight`) that a checkpoint holds in bitsandbytes 4-bit (they
 * have a `.quant_state.bitsandbytes__nf4|fp4` companion). Every other expected tensor is stored as
 * a plain float tensor. (A checkpoint whose skip list leaves `lm_head` out holds `lm_head.weight`
 * in 4 bit as well, as transformers 4.x quantizes it then.)
 *
 * @example
 * ```ts
 * quantizedWeightNames(["a.q_proj.weight", "a.q_proj.weight.quant_state.bitsandbytes__nf4"]);
 * // Set {"a.q_proj.weight"}
 * ```
 */
export function quantizedWeightNames(names: Iterable<string>): Set<string> {
  const out = new Set<string>();
  for (const name of names) {
    const m = QUANT_STATE.exec(name);
    if (m && (QUANT_TYPES as readonly string[]).includes(m[1])) out.add(name.slice(0, m.index));
  }
  return out;
}

/**
 * True when `name` is one of the companion tensors of a 4-bit weight (`.absmax`, `.quant_map`,
 * `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__*`).
 */
export function isQuantCompanion(name: string): boolean {
  return COMPANION.test(name);
}

/** The weight a companion belongs to (`…q_proj.weight.absmax` -> `…q_proj.weight`), or null. */
export function companionOf(name: string): string | null {
  const m = COMPANION.exec(name);
  return m ? name.slice(0, m.index) : null;
}

// ---------------------------------------------------------------------------------------
// quantization_config

function unsupported(source: string, what: string, hint?: string): never {
  throw new LatheError(`Cannot load model "${source}": ${what}`, {
    hint: hint ??
      "lathe loads unquantized checkpoints and bitsandbytes 4-bit ones (load_in_4bit, NF4 or FP4). " +
        "Use the model's 16-bit original; the quantize step makes a 4-bit copy of it.",
  });
}

/**
 * The 4-bit settings of `config.quantization_config` (BitsAndBytesConfig's defaults where a key
 * is absent), or null for an unquantized model. Any other quantization (bitsandbytes 8-bit, GPTQ,
 * AWQ, …) or a 4-bit storage dtype other than uint8 is a LatheError saying it is not supported.
 */
export function bnb4bitSettings(config: ModelConfig, source: string): Bnb4bitSettings | null {
  const q = config.quantizationConfig;
  if (q === null) return null;
  const method = q.quant_method;
  if (method !== "bitsandbytes") {
    unsupported(source, `quantization_config.quant_method ${JSON.stringify(method)} is not supported`);
  }
  if (q.load_in_8bit === true || q._load_in_8bit === true) {
    unsupported(source, "bitsandbytes 8-bit checkpoints (load_in_8bit, LLM.int8()) are not supported");
  }
  if (q.load_in_4bit !== true && q._load_in_4bit !== true) {
    unsupported(
      source,
      "quantization_config is bitsandbytes, but neither load_in_4bit nor load_in_8bit is true",
    );
  }
  const storage = q.bnb_4bit_quant_storage ?? "uint8";
  if (storage !== "uint8") {
    unsupported(
      source,
      `bnb_4bit_quant_storage ${JSON.stringify(storage)} is not supported (the packed codes must be uint8)`,
    );
  }
  const quantType = q.bnb_4bit_quant_type ?? "fp4";
  if (quantType !== "nf4" && quantType !== "fp4") {
    unsupported(source, `bnb_4bit_quant_type ${JSON.stringify(quantType)} is not "nf4" or "fp4"`);
  }
  let skip = q.llm_int8_skip_modules ?? null;
  if (typeof skip === "string") skip = [skip]; // transformers wraps a lone string in a list
  if (skip !== null && !(Array.isArray(skip) && skip.every((s) => typeof s === "string"))) {
    unsupported(
      source,
      `quantization_config.llm_int8_skip_modules is ${
        JSON.stringify(skip)
      }; expected null or a list of module names`,
      "Fix config.json, or download the checkpoint again.",
    );
  }
  return {
    quantType,
    doubleQuant: q.bnb_4bit_use_double_quant === true,
    computeDtype: String(q.bnb_4bit_compute_dtype ?? "float32"),
    skipModules: skip as string[] | null,
  };
}

// ---------------------------------------------------------------------------------------
// llm_int8_skip_modules

/** transformers 4.x: the entry that keeps linear module `path` in 16 bit, or null. */
function skipEntryV4(path: string, skip: readonly string[]): string | null {
  const name = path.slice(path.lastIndexOf(".") + 1);
  return skip.find((s) => s === name || path.includes(`${s}.`) || path === s) ?? null;
}

/** transformers 5.x: the entry that keeps module `path` in 16 bit (`re.match(entry)` or a suffix), or null. */
function skipEntryV5(path: string, skip: readonly string[]): string | null {
  return skip.find((s) => {
    let atStart: boolean;
    try {
      atStart = new RegExp(`^(?:${s})`).test(path);
    } catch {
      atStart = path.startsWith(s);
    }
    return atStart || path.endsWith(s);
  }) ?? null;
}

/**
 * True when linear module `path` (e.g. `model.layers.0.mlp.down_proj`) is kept in 16 bit by the
 * skip list `skip` under either of transformers' readings (see the module doc).
 */
export function isSkippedModule(path: string, skip: readonly string[]): boolean {
  return skipEntryV4(path, skip) !== null || skipEntryV5(path, skip) !== null;
}

/** The linear weights of the model: transformers' candidates for 4 bit, by their module path. */
function linearWeights(config: ModelConfig): Map<string, string> {
  const out = new Map<string, string>();
  for (let i = 0; i < config.numLayers; i++) {
    for (const proj of PROJECTIONS) out.set(`${projectionPath(i, proj)}.weight`, projectionPath(i, proj));
  }
  if (!config.tieWordEmbeddings) out.set("lm_head.weight", "lm_head");
  return out;
}

// ---------------------------------------------------------------------------------------
// Checking the tensor list

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
const sameShape = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length && a.every((d, i) => d === b[i]);
const fmt = (shape: readonly number[]) => `[${shape.join(", ")}]`;

/** True when `shape` is the packed codes of n elements: [⌈n/2⌉, 1] or [⌈n/2⌉]. */
function isCodesShape(shape: readonly number[], n: number): boolean {
  const bytes = Math.ceil(n / 2);
  return sameShape(shape, [bytes, 1]) || sameShape(shape, [bytes]);
}

/**
 * Checks a 4-bit checkpoint's tensors against the config: every expected tensor present, the
 * quantized ones as codes + companions with the right dtypes and shapes, the rest as float tensors
 * with their expected shape; nothing unexpected. The set of quantized weights must agree with
 * `llm_int8_skip_modules` as transformers reads it: a 4-bit weight inside a module both of
 * transformers' readings keep in 16 bit, or a float linear weight that neither keeps, is an error
 * (transformers refuses both). An unquantized config may have no 4-bit weight; a quantization
 * other than bitsandbytes 4-bit is refused ({@link bnb4bitSettings}). Throws one LatheError
 * listing every problem; `source` names the checkpoint. The blocksize-dependent lengths and the
 * quant_state JSON are checked when a weight is read ({@link readQuantized4bit}).
 *
 * @example
 * ```ts
 * using file = await ModelWeights.open(dir);
 * checkQuantizedWeights(config, file.names().map((n) => file.info(n)), dir);
 * ```
 */
export function checkQuantizedWeights(
  config: ModelConfig,
  tensors: Iterable<{ name: string; shape: readonly number[]; dtype: string }>,
  source: string,
): void {
  const settings = bnb4bitSettings(config, source);
  const byName = new Map<string, { name: string; shape: readonly number[]; dtype: string }>();
  for (const t of tensors) byName.set(t.name, t);
  const quantized = quantizedWeightNames(byName.keys());
  const expected = expectedTensors(config);
  const linear = linearWeights(config);
  const layout: string[] = [];
  const skipProblems: string[] = [];
  // What checkWeights sees: a 4-bit weight counts as its logical [out, in] once its own layout is checked.
  const logical = new Map<string, readonly number[]>();
  const entry = (name: string) => byName.get(name);
  const is = (name: string, dtype: string, shape: readonly number[] | null): boolean => {
    const t = entry(name);
    if (!t) {
      layout.push(`"${name}" is missing`);
      return false;
    }
    if (
      t.dtype !== dtype || (shape !== null && !sameShape(t.shape, shape)) ||
      (shape === null && t.shape.length !== 1)
    ) {
      layout.push(
        `"${name}" is ${t.dtype} ${fmt(t.shape)}, expected ${dtype} ${shape ? fmt(shape) : "[length]"}`,
      );
      return false;
    }
    return true;
  };

  if (settings === null && quantized.size > 0) {
    layout.push(
      `${quantized.size} weights are stored in bitsandbytes 4-bit (e.g. "${[...quantized][0]}"), ` +
        "but config.json has no quantization_config",
    );
  }
  for (const name of quantized) {
    const want = expected.get(name);
    if (want === undefined) continue; // reported as unexpected by checkWeights
    logical.set(name, want);
    if (!linear.has(name)) {
      layout.push(`"${name}" is stored in 4 bit, but only linear layers' weights are quantized`);
      continue;
    }
    const n = numel(want);
    const codes = entry(name);
    if (!codes) {
      layout.push(`"${name}": the packed codes are missing (its quant_state is there)`);
    } else if (codes.dtype !== "U8" || !isCodesShape(codes.shape, n)) {
      layout.push(
        `"${name}" is ${codes.dtype} ${fmt(codes.shape)}, expected the packed codes of ${fmt(want)}: ` +
          `U8 [${Math.ceil(n / 2)}, 1]`,
      );
    }
    const states = QUANT_TYPES.filter((t) => byName.has(`${name}.quant_state.bitsandbytes__${t}`));
    if (states.length > 1) layout.push(`"${name}" has both an nf4 and an fp4 quant_state`);
    for (const t of states) is(`${name}.quant_state.bitsandbytes__${t}`, "U8", null);
    const nested = byName.has(`${name}.nested_absmax`) || byName.has(`${name}.nested_quant_map`);
    if (is(`${name}.absmax`, nested ? "U8" : "F32", null)) {
      const length = entry(`${name}.absmax`)!.shape[0];
      if (!BLOCKSIZES.some((b) => Math.ceil(n / b) === length)) {
        layout.push(
          `"${name}.absmax" has ${length} blocks; no blocksize (${
            BLOCKSIZES.join(", ")
          }) gives that for ${n} elements`,
        );
      }
    }
    is(`${name}.quant_map`, "F32", [16]);
    if (nested) {
      is(`${name}.nested_absmax`, "F32", null);
      is(`${name}.nested_quant_map`, "F32", [256]);
    }
  }
  // Companions of a weight without a quant_state: the weight looks 4-bit, but cannot be read.
  const orphans = new Map<string, string[]>();
  for (const name of byName.keys()) {
    const base = companionOf(name);
    if (base !== null && !quantized.has(base)) {
      orphans.set(base, [...(orphans.get(base) ?? []), name.slice(base.length)]);
    }
  }
  for (const [base, parts] of orphans) {
    layout.push(
      `"${base}" has 4-bit companions (${parts.join(", ")}) but no .quant_state.bitsandbytes__nf4 or __fp4`,
    );
    const want = expected.get(base);
    if (want !== undefined && byName.has(base)) logical.set(base, want);
  }
  // Float tensors must be floats.
  for (const [name, t] of byName) {
    if (expected.has(name) && !logical.has(name) && !FLOAT_DTYPES.includes(t.dtype)) {
      layout.push(`"${name}" is ${t.dtype}; expected a float tensor (F32, F16 or BF16) or a 4-bit weight`);
    }
  }
  // The 4-bit set against llm_int8_skip_modules.
  if (settings !== null) {
    const skip = settings.skipModules ?? ["lm_head"];
    const list = JSON.stringify(settings.skipModules);
    for (const [name, module] of linear) {
      const v4 = skipEntryV4(module, skip), v5 = skipEntryV5(module, skip);
      if (quantized.has(name) && v4 !== null && v5 !== null) {
        skipProblems.push(
          `"${name}" is stored in 4 bit, but llm_int8_skip_modules ${list} keeps module "${module}" ` +
            `in 16 bit (entry "${v4}")`,
        );
      } else if (
        !quantized.has(name) && !orphans.has(name) && byName.has(name) && v4 === null && v5 === null
      ) {
        skipProblems.push(
          `"${name}" is stored as ${byName.get(name)!.dtype}, but llm_int8_skip_modules ${list} does not ` +
            `name module "${module}", so transformers expects it in 4 bit`,
        );
      }
    }
  }
  const present = [...byName.values()].map((t) => ({ name: t.name, shape: logical.get(t.name) ?? t.shape }));
  // A 4-bit weight whose codes are missing is reported above, not again as missing.
  for (const [name, shape] of logical) if (!byName.has(name)) present.push({ name, shape });
  checkWeights(
    config,
    present,
    source,
    {
      ignore: (name) => isQuantCompanion(name),
      problems: [
        { label: "4-bit layout", items: layout },
        { label: "4-bit vs llm_int8_skip_modules", items: skipProblems },
      ],
      hint: skipProblems.length > 0 && layout.length === 0 ? SKIP_HINT : DAMAGED,
    },
  );
}

// ---------------------------------------------------------------------------------------
// Reading one weight

/** The quant_state JSON, validated. */
interface QuantState {
  quantType: QuantType;
  blocksize: number;
  dtype: TorchDtypeName;
  shape: number[];
  nested: { blocksize: number; offset: number } | null;
}

const isCount = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

function parseQuantState(
  bytes: Uint8Array,
  suffixType: QuantType,
  fail: (what: string) => never,
): QuantState {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    fail(`its quant_state is not valid UTF-8 JSON (${(error as Error).message})`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    fail("its quant_state is not a JSON object");
  }
  const s = raw as Record<string, unknown>;
  const field = (key: string, ok: boolean, want: string): void => {
    if (!ok) fail(`its quant_state has "${key}": ${JSON.stringify(s[key])}; expected ${want}`);
  };
  field("quant_type", s.quant_type === suffixType, `"${suffixType}" (as its name says)`);
  field(
    "blocksize",
    typeof s.blocksize === "number" && BLOCKSIZES.includes(s.blocksize),
    `one of ${BLOCKSIZES.join(", ")}`,
  );
  field("dtype", typeof s.dtype === "string" && TORCH_DTYPES.includes(s.dtype), TORCH_DTYPES.join(", "));
  field("shape", Array.isArray(s.shape) && s.shape.length > 0 && s.shape.every(isCount), "[out, in]");
  const nestedKeys = ["nested_blocksize", "nested_dtype", "nested_offset"].filter((k) => k in s);
  let nested: QuantState["nested"] = null;
  if (nestedKeys.length > 0) {
    if (nestedKeys.length < 3) {
      fail(
        `its quant_state has ${
          nestedKeys.join(", ")
        } but not all of nested_blocksize, nested_dtype, nested_offset`,
      );
    }
    field("nested_blocksize", isCount(s.nested_blocksize) && s.nested_blocksize > 0, "a positive integer");
    field("nested_dtype", s.nested_dtype === "float32", `"float32"`);
    field(
      "nested_offset",
      typeof s.nested_offset === "number" && Number.isFinite(s.nested_offset),
      "a finite number",
    );
    // bitsandbytes: torch.tensor(float(nested_offset)), a float32 scalar.
    nested = { blocksize: s.nested_blocksize as number, offset: Math.fround(s.nested_offset as number) };
  }
  return {
    quantType: suffixType,
    blocksize: s.blocksize as number,
    dtype: s.dtype as TorchDtypeName,
    shape: s.shape as number[],
    nested,
  };
}

async function readParts(
  file: ModelWeights,
  name: string,
  expectShape: readonly number[],
  where: string,
  withCodes: boolean,
): Promise<Quantized4bit> {
  const fileOf = (t: string) => (file.has(t) ? ` (file "${file.info(t).file}")` : "");
  const fail = (what: string, hint = DAMAGED): never => {
    throw new LatheError(`Cannot read 4-bit weight "${name}" of "${where}"${fileOf(name)}: ${what}`, {
      hint,
    });
  };
  const states = QUANT_TYPES.filter((t) => file.has(`${name}.quant_state.bitsandbytes__${t}`));
  if (states.length === 0) fail(`"${name}.quant_state.bitsandbytes__nf4" (or __fp4) is missing`);
  if (states.length > 1) fail("it has both an nf4 and an fp4 quant_state");
  const stateName = `${name}.quant_state.bitsandbytes__${states[0]}`;
  const tensor = (suffix: string, dtype: string, shape: readonly number[] | null) => {
    const t = `${name}${suffix}`;
    if (!file.has(t)) fail(`"${t}" is missing`);
    const info = file.info(t);
    const shapeOk = shape === null ? info.shape.length === 1 : sameShape(info.shape, shape);
    if (info.dtype !== dtype || !shapeOk) {
      fail(
        `"${t}"${fileOf(t)} is ${info.dtype} ${fmt(info.shape)}, expected ${dtype} ${
          shape ? fmt(shape) : "[length]"
        }`,
      );
    }
    return t;
  };
  tensor(stateName.slice(name.length), "U8", null);
  const state = parseQuantState(await file.readBytes(stateName), states[0], fail);
  if (!sameShape(state.shape, expectShape)) {
    fail(
      `its quant_state gives shape ${fmt(state.shape)}, but config.json expects ${fmt(expectShape)}`,
      "The checkpoint and config.json come from different models; download the checkpoint again.",
    );
  }
  // Packed codes: one byte per two elements (bitsandbytes stores [⌈n/2⌉, 1]; a flat [⌈n/2⌉] is read too).
  const n = numel(expectShape);
  if (!file.has(name)) fail("the packed codes are missing");
  const codesInfo = file.info(name);
  if (codesInfo.dtype !== "U8" || !isCodesShape(codesInfo.shape, n)) {
    fail(
      `the packed codes are ${codesInfo.dtype} ${fmt(codesInfo.shape)}, expected U8 [${
        Math.ceil(n / 2)
      }, 1] for ${fmt(expectShape)}`,
    );
  }
  const nb = Math.ceil(n / state.blocksize);
  const hasNested = file.has(`${name}.nested_absmax`) || file.has(`${name}.nested_quant_map`);
  if (hasNested !== (state.nested !== null)) {
    fail(
      state.nested
        ? `its quant_state is double-quantized, but "${name}.nested_absmax" or ".nested_quant_map" is missing`
        : `it has nested_absmax/nested_quant_map, but its quant_state has no nested_* keys`,
    );
  }
  const finite = (values: Float32Array, t: string): Float32Array => {
    const bad = values.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) fail(`"${t}" element ${bad} is ${values[bad]}`);
    return values;
  };
  const quantMap = finite(await file.readFloat32(tensor(".quant_map", "F32", [16])), `${name}.quant_map`);
  let absmax: Float32Array | Uint8Array;
  let nested: Quantized4bit["nested"];
  if (state.nested) {
    absmax = await file.readBytes(tensor(".absmax", "U8", [nb]));
    const nn = Math.ceil(nb / state.nested.blocksize);
    nested = {
      blocksize: state.nested.blocksize,
      absmax: finite(await file.readFloat32(tensor(".nested_absmax", "F32", [nn])), `${name}.nested_absmax`),
      quantMap: finite(
        await file.readFloat32(tensor(".nested_quant_map", "F32", [256])),
        `${name}.nested_quant_map`,
      ),
      offset: state.nested.offset,
    };
  } else {
    absmax = finite(await file.readFloat32(tensor(".absmax", "F32", [nb])), `${name}.absmax`);
  }
  const codes = withCodes ? await file.readBytes(name) : new Uint8Array(0);
  return {
    quantType: state.quantType,
    blocksize: state.blocksize,
    shape: [...expectShape],
    codes,
    quantMap,
    absmax,
    ...(nested ? { nested } : {}),
    dtype: state.dtype,
  };
}

/**
 * Reads one 4-bit weight `name` (its codes and companions) from an open checkpoint;
 * `expectShape` is the [out, in] the config expects; `where` names the checkpoint in errors.
 * Validates everything: the quant_state JSON (quant_type as its name says, blocksize, dtype,
 * shape, the nested_* keys together with the nested tensors), the codes U8 [⌈n/2⌉, 1] (or flat
 * [⌈n/2⌉]), the absmax U8 with double quantization and F32 without, [⌈n/B⌉] long, the maps of
 * 16 and 256 finite values, and the shape equal to `expectShape`; a damaged checkpoint is a
 * LatheError naming the tensor, the file and what is wrong. The result's `dtype` is the
 * quant_state's (the weight's original torch dtype).
 *
 * @example
 * ```ts
 * using file = await ModelWeights.open(dir);
 * const q = await readQuantized4bit(file, "model.layers.0.mlp.up_proj.weight", [F, D], dir);
 * const w = dequantize4bit(q); // Float32Array [F·D]
 * ```
 */
export async function readQuantized4bit(
  file: ModelWeights,
  name: string,
  expectShape: readonly number[],
  where: string,
): Promise<Quantized4bit> {
  return await readParts(file, name, expectShape, where, true);
}

/**
 * {@link readQuantized4bit} without the codes (statistics only: quantType, blocksize, shape,
 * quantMap, absmax, nested, dtype), for callers that stream the codes themselves with
 * `file.readRows` (one byte per row) or a byte read. The codes tensor's dtype and shape are
 * checked all the same.
 */
export async function readQuantized4bitStats(
  file: ModelWeights,
  name: string,
  expectShape: readonly number[],
  where: string,
): Promise<Omit<Quantized4bit, "codes">> {
  const { codes: _, ...stats } = await readParts(file, name, expectShape, where, false);
  return stats;
}
