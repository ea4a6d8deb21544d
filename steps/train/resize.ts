/**
 * New tokens in the vocabulary: a model whose embedding table (and untied lm_head) grows from V to
 * V' rows, as transformers' `resize_token_embeddings(V', mean_resizing=True)` grows it: each new row
 * is the mean of the existing rows (accumulated in f64, rounded once to the tensor's dtype).
 * transformers draws the new rows from N(mean, 1e-9·Σ) when the covariance Σ is positive definite;
 * lathe takes the mean itself, so the result is deterministic and within that 1e-9-scaled noise.
 *
 * Every other tensor is copied byte for byte (a 4-bit checkpoint's codes and companions included),
 * config.json gets `vocab_size` V', and the tokenizer files come from the tokenizer that has the new
 * tokens (the tokenize step's copy).
 * @module
 */
import { join } from "node:path";
import {
  type Dtype,
  fromFloat32,
  ModelWeights,
  type TensorSource,
  toFloat32,
  writeModelWeights,
} from "../../formats/safetensors.ts";
import { writeJsonAtomic } from "../../foundation/atomic.ts";
import { LatheError } from "../../foundation/errors.ts";
import { MODEL_FILES } from "../../hub/model.ts";
import { copyModelFiles } from "../quantize_model.ts";

/** Tensors that grow with the vocabulary. */
const VOCAB_TENSORS = new Set(["model.embed_tokens.weight", "lm_head.weight"]);

/** `values` [V, D] grown to [V', D] with each new row the mean of the V existing ones. */
export function meanResize(values: Float32Array, V: number, D: number, newV: number): Float32Array {
  const mean = new Float64Array(D);
  for (let v = 0; v < V; v++) for (let d = 0; d < D; d++) mean[d] += values[v * D + d];
  const out = new Float32Array(newV * D);
  out.set(values.subarray(0, V * D));
  for (let v = V; v < newV; v++) for (let d = 0; d < D; d++) out[v * D + d] = mean[d] / V;
  return out;
}

/**
 * Writes `src` with its vocabulary grown to `newV` rows into `out` (see the module doc), with the
 * tokenizer files of `tokenizerDir`. Returns the files written.
 */
export async function writeResizedModel(
  src: string,
  out: string,
  newV: number,
  tokenizerDir: string,
): Promise<string[]> {
  const raw = JSON.parse(await Deno.readTextFile(join(src, "config.json"))) as Record<string, unknown>;
  const V = raw.vocab_size as number;
  if (!(newV > V)) {
    throw new LatheError(`Cannot resize "${src}" to ${newV} tokens: it already has ${V}`);
  }
  await Deno.mkdir(out, { recursive: true });
  using weights = await ModelWeights.open(src);
  const tensors: TensorSource[] = weights.names().map((name) => {
    const info = weights.info(name);
    if (!VOCAB_TENSORS.has(name)) {
      return { name, dtype: info.dtype, shape: info.shape, data: () => weights.readBytes(name) };
    }
    const D = info.shape[1];
    const dtype = info.dtype as Dtype;
    if (dtype !== "F32" && dtype !== "F16" && dtype !== "BF16") {
      throw new LatheError(`Cannot resize "${name}" of "${src}": it is ${dtype}, not a float tensor`);
    }
    return {
      name,
      dtype,
      shape: [newV, D],
      data: async () => {
        const values = toFloat32(dtype, await weights.readBytes(name), `${src}: ${name}`);
        return fromFloat32(meanResize(values, V, D, newV), dtype);
      },
    };
  });
  const files = await writeModelWeights(out, tensors);
  await writeJsonAtomic(join(out, "config.json"), { ...raw, vocab_size: newV });
  const tokenizerFiles = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
  ];
  const fromTokenizer = await copyModelFiles(tokenizerDir, out, tokenizerFiles);
  const rest = await copyModelFiles(
    src,
    out,
    MODEL_FILES.filter((f) => f !== "config.json" && !tokenizerFiles.includes(f)),
  );
  return ["config.json", ...files, ...fromTokenizer, ...rest];
}

/**
 * The vocabulary an adapter needs: the rows its trainable tokens reach, or the rows of its saved
 * embed_tokens / lm_head; 0 when it adds no tokens. Read from its config and safetensors header only.
 */
export async function adapterVocabSize(adapterDir: string): Promise<number> {
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(await Deno.readTextFile(join(adapterDir, "adapter_config.json")));
  } catch {
    return 0;
  }
  const indices = config.trainable_token_indices;
  const rows = Array.isArray(indices)
    ? indices
    : indices && typeof indices === "object"
    ? (indices as Record<string, unknown>).embed_tokens
    : null;
  let need = Array.isArray(rows) && rows.length ? Math.max(...(rows as number[])) + 1 : 0;
  if (Array.isArray(config.modules_to_save) && config.modules_to_save.length) {
    using weights = await ModelWeights.open(join(adapterDir, "adapter_model.safetensors"));
    for (const key of ["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"]) {
      if (weights.names().includes(key)) need = Math.max(need, weights.info(key).shape[0]);
    }
  }
  return need;
}

/**
 * The base the adapters in `adapterDirs` run on: `baseDir` itself, or, when one of them added tokens
 * (train-sft grew the vocabulary), `baseDir` grown the same way (mean rows) in a temp directory with
 * that adapter's tokenizer; `cleanup` removes it.
 */
export async function baseForAdapters(
  baseDir: string,
  adapterDirs: readonly string[],
): Promise<
  { dir: string; vocabSize: number | null; tokenizerDir: string | null; cleanup: () => Promise<void> }
> {
  const raw = JSON.parse(await Deno.readTextFile(join(baseDir, "config.json"))) as { vocab_size: number };
  let need = raw.vocab_size;
  let tokenizerDir: string | null = null;
  for (const dir of adapterDirs) {
    const v = await adapterVocabSize(dir);
    if (v > need) {
      need = v;
      tokenizerDir = dir;
    }
  }
  if (tokenizerDir === null) {
    return { dir: baseDir, vocabSize: null, tokenizerDir: null, cleanup: async () => {} };
  }
  try {
    await Deno.stat(join(tokenizerDir, "tokenizer.json"));
  } catch {
    throw new LatheError(`Cannot use adapter "${tokenizerDir}": it adds tokens but holds no tokenizer.json`, {
      hint: "an adapter that grew the vocabulary carries the tokenizer that has the new tokens",
    });
  }
  const dir = await Deno.makeTempDir({ prefix: "lathe-resized-" });
  await writeResizedModel(baseDir, dir, need, tokenizerDir);
  return { dir, vocabSize: need, tokenizerDir, cleanup: () => Deno.remove(dir, { recursive: true }) };
}
