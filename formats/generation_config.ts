/**
 * `generation_config.json`, the file transformers' `generate` takes its defaults from: the stop
 * ids (`eos_token_id`, an id or a list: Llama 3 Instruct lists `<|end_of_text|>`, `<|eom_id|>` and
 * `<|eot_id|>`) and the sampling defaults a model ships with (`do_sample`, `temperature`,
 * `top_k`, `top_p`, `min_p`, `repetition_penalty`, `max_new_tokens`). Keys it does not hold keep
 * transformers' defaults.
 * @module
 */
import { join } from "node:path";
import { exists } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";

/** File name inside a model directory. */
export const GENERATION_CONFIG_FILE = "generation_config.json";

/** What lathe reads of it (null: not given). */
export interface GenerationConfig {
  eosTokenIds: number[];
  doSample: boolean | null;
  temperature: number | null;
  topK: number | null;
  topP: number | null;
  minP: number | null;
  repetitionPenalty: number | null;
  maxNewTokens: number | null;
}

/** Parses the JSON text of `where` (for messages). */
export function parseGenerationConfig(text: string, where: string): GenerationConfig {
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new LatheError(`Cannot read "${where}": ${(error as Error).message}`, {
      hint: "the file is damaged; download the model again",
    });
  }
  const num = (key: string): number | null => {
    const v = json[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== "number" || !Number.isFinite(v)) {
      throw new LatheError(`Cannot read "${where}": ${key} is ${JSON.stringify(v)}, not a number`);
    }
    return v;
  };
  const eos = json.eos_token_id;
  const eosTokenIds = eos === undefined || eos === null ? [] : Array.isArray(eos) ? eos : [eos];
  if (!eosTokenIds.every((x) => Number.isInteger(x) && x >= 0)) {
    throw new LatheError(
      `Cannot read "${where}": eos_token_id ${JSON.stringify(eos)} is not a token id or a list of them`,
    );
  }
  return {
    eosTokenIds: eosTokenIds as number[],
    doSample: typeof json.do_sample === "boolean" ? json.do_sample : null,
    temperature: num("temperature"),
    topK: num("top_k"),
    topP: num("top_p"),
    minP: num("min_p"),
    repetitionPenalty: num("repetition_penalty"),
    maxNewTokens: num("max_new_tokens"),
  };
}

/** The generation config of the model in `dir`, or null when it has none. */
export async function readGenerationConfig(dir: string): Promise<GenerationConfig | null> {
  const path = join(dir, GENERATION_CONFIG_FILE);
  if (!(await exists(path))) return null;
  return parseGenerationConfig(await Deno.readTextFile(path), path);
}
