/**
 * A PEFT LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora`, Ollama's `ADAPTER`), as
 * llama.cpp's `convert_lora_to_gguf.py` writes it (FORMATS.md "GGUF", LoRA adapters).
 *
 * Metadata: `general.architecture` (the base's), `general.type = "adapter"`, `adapter.type = "lora"`,
 * `adapter.lora.alpha`. llama.cpp scales each product by alpha / r, so an rsLoRA adapter
 * (scale alpha/√r) is written with alpha·√r: the scale is peft's either way.
 * Tensors, for each adapted weight `<base>` (its GGUF name, formats/gguf_model.ts):
 *   `<base>.lora_a`  A[r, in]  → ne [in, r]
 *   `<base>.lora_b`  B[out, r] → ne [r, out]
 * For the `llama` architecture the rows of B for Q and K are permuted as the base's Q and K are
 * (B·A's rows are the weight's rows); A is unchanged.
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import { gguf, type GgufTensor, type GgufValue, writeGguf } from "./gguf.ts";
import { ggufArchitecture, ggufTensorName, permuteRope } from "./gguf_model.ts";
import { GGML_TYPE, quantize } from "./gguf_quants.ts";
import { type ModelConfig, projectionPath } from "./model_config.ts";
import { loraScaling, readPeftAdapter } from "./peft.ts";

/** Options for {@link writeLoraGguf}. */
export interface WriteLoraGgufOptions {
  /** `general.name`. */
  name: string;
  /** Storage type of A and B (default F32; F16 halves the file). */
  type?: "F32" | "F16";
  /** Extra `general.*` metadata. */
  extra?: [string, GgufValue][];
}

/** Writes the PEFT adapter in `adapterDir` (trained on a base with `config`) as a LoRA GGUF at `path`. */
export async function writeLoraGguf(
  adapterDir: string,
  config: ModelConfig,
  path: string,
  options: WriteLoraGgufOptions,
): Promise<{ path: string; bytes: number; tensors: number; alpha: number }> {
  const arch = ggufArchitecture(config);
  const adapter = await readPeftAdapter(adapterDir, config);
  if (adapter.extras.embed_tokens || adapter.extras.lm_head || adapter.extras.tokens) {
    throw new LatheError(
      `Cannot export adapter "${adapterDir}" as a LoRA GGUF: it trains embed_tokens or lm_head beside its pairs`,
      { hint: "export gguf from the merged model (a merge step before export) instead of gguf-lora" },
    );
  }
  const { r, loraAlpha, useRslora } = adapter.config;
  const alpha = loraScaling(loraAlpha, r, useRslora) * r;
  const type = options.type ?? "F32";
  const tensors: GgufTensor[] = [];
  const pairs = [...adapter.pairs.values()].sort((a, b) => a.layer - b.layer);
  for (const p of pairs) {
    const base = ggufTensorName(`${projectionPath(p.layer, p.module)}.weight`);
    if (base === null) throw new LatheError(`Cannot export adapter: no GGUF name for ${p.module}`);
    const rowsOut = p.b.length / r;
    const cols = p.a.length / r;
    const heads = arch !== "llama"
      ? null
      : p.module === "q_proj"
      ? config.numHeads
      : p.module === "k_proj"
      ? config.numKvHeads
      : null;
    const b = heads === null ? p.b : permuteRope(p.b, heads, r);
    const entry = (suffix: string, ne: number[], values: Float32Array): GgufTensor => ({
      name: `${base}.${suffix}`,
      ne,
      type: GGML_TYPE[type],
      bytes: values.length * (type === "F32" ? 4 : 2),
      data: () => quantize(type, values, ne[0]),
    });
    tensors.push(entry("lora_a", [cols, r], p.a), entry("lora_b", [r, rowsOut], b));
  }
  const metadata: [string, GgufValue][] = [
    ["general.architecture", gguf.str(arch)],
    ["general.type", gguf.str("adapter")],
    ["general.name", gguf.str(options.name)],
    ...(options.extra ?? []),
    ["adapter.type", gguf.str("lora")],
    ["adapter.lora.alpha", gguf.f32(alpha)],
  ];
  const bytes = await writeGguf(path, metadata, tensors);
  return { path, bytes, tensors: tensors.length, alpha };
}
