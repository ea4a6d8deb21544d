/**
 * The `quantize` step: a base model -> `model/`, a complete Hugging Face model directory in
 * bitsandbytes' 4-bit layout as transformers saves it (config.json with `quantization_config`,
 * safetensors sharded with an index past `max_shard_size`, tokenizer, chat template and
 * generation config copied), so `AutoModelForCausalLM.from_pretrained(dir)` with bitsandbytes
 * loads it. Codes are bitsandbytes' own (formats/bnb4bit.ts, checked against
 * scripts/golden/nf4.py).
 *
 * Quantized: the linear projections (`q_proj` … `down_proj`) not named in `skip_modules`
 * (read as transformers reads `llm_int8_skip_modules`: formats/bnb4bit_checkpoint.ts
 * `isSkippedModule`). Kept as they are: embeddings, norms, biases, `lm_head` (transformers skips
 * the output embedding; "lm_head" is added to the written skip list when it is not there) and
 * every skipped module. A model that is already bitsandbytes 4-bit is checked and copied; other
 * quantized models (8-bit, GPTQ, AWQ) are refused.
 *
 * Streaming: a first pass reads each projection once for its block statistics (kept: 1/16 of
 * its f32 size), the file is laid out, and the writer reads each projection again when it
 * reaches its codes; host memory stays near the largest tensor plus the statistics.
 *
 * ```
 * deno task step quantize --run <id> --set model=mistralai/Mistral-7B-Instruct-v0.3
 * ```
 * @module
 */
import { runFromCli } from "./cli.ts";
import { defineStep } from "./define.ts";
import { modelDir, modelSources } from "./model_source.ts";
import { QuantizeConfig, quantizeModel } from "./quantize_model.ts";

export { isSkipped, MODEL_DIR, QuantizeConfig } from "./quantize_model.ts";

export const step = defineStep({
  name: "quantize",
  version: "1",
  description: "quantizes a base model to bitsandbytes 4-bit (NF4 or FP4, double quantization)",
  config: QuantizeConfig,
  inputs: {},
  sources: async (config, projectRoot) =>
    await modelSources(await modelDir(config.model, config.revision, projectRoot)),
  run: quantizeModel,
});

if (import.meta.main) await runFromCli(step);
