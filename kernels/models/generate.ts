/**
 * Generation on the GPU model: prompts (token ids) in, continuations out, through the KV-cache
 * decoder (kernels/models/decode.ts) and transformers' sampling (kernels/models/sampling.ts).
 *
 * Prompts run in groups of `batchSize`; each group is one prefill and then one step per new
 * token for all its sequences, until every sequence has produced a stop id (generated and kept,
 * as transformers keeps the EOS) or `maxNewTokens`. A finished sequence is fed its last token
 * until the group ends, and what it would produce is ignored. Sequence i of the request samples
 * from PCG32(seed, SAMPLING_STREAM + i), so a seed gives the same tokens whatever the grouping.
 * @module
 */
import { Decoder } from "./decode.ts";
import type { GpuModel } from "./graph.ts";
import { checkSampling, nextToken, type SamplingOptions, samplingRng } from "./sampling.ts";

/** What to generate. */
export interface GenerateRequest {
  /** Prompt token ids, each at least one. */
  prompts: readonly (readonly number[])[];
  /** New tokens per prompt at most (transformers' `max_new_tokens`). */
  maxNewTokens: number;
  sampling: SamplingOptions;
  /** Token ids that end a sequence (the model's `eos_token_id`s and the template's end of turn). */
  stop: ReadonlySet<number>;
  seed: number;
  /** Prompts per prefill (default 8). */
  batchSize?: number;
}

/** One continuation. */
export interface Generation {
  /** The new token ids (ending with the stop id when one ended it). */
  tokens: number[];
  finishReason: "stop" | "length";
  /** Seconds of its group's prefill and decoding. */
  seconds: number;
}

/**
 * Generates a continuation of every prompt. `onToken(i, token)` is called as each token of prompt
 * i is chosen (streaming).
 */
export async function generate(
  model: GpuModel,
  request: GenerateRequest,
  onToken?: (index: number, token: number) => void,
): Promise<Generation[]> {
  checkSampling(request.sampling);
  if (!Number.isInteger(request.maxNewTokens) || request.maxNewTokens < 1) {
    throw new RangeError(
      `Cannot generate: max_new_tokens ${request.maxNewTokens} must be a positive integer`,
    );
  }
  const context = model.config.maxPositionEmbeddings;
  request.prompts.forEach((p, i) => {
    if (p.length === 0) throw new RangeError(`Cannot generate from prompt ${i}: it has no tokens`);
    if (p.length >= context) {
      throw new RangeError(
        `Cannot generate from prompt ${i}: its ${p.length} tokens fill the model's context of ${context} ` +
          "(max_position_embeddings)",
      );
    }
  });
  const size = request.batchSize ?? 8;
  const out: Generation[] = [];
  for (let g0 = 0; g0 < request.prompts.length; g0 += size) {
    const group = request.prompts.slice(g0, g0 + size);
    const started = performance.now();
    const longest = Math.max(...group.map((p) => p.length));
    const budget = Math.min(request.maxNewTokens, context - longest);
    using decoder = new Decoder(model, group.length, longest + budget);
    const rngs = group.map((_, b) => samplingRng(request.seed, g0 + b));
    const history = group.map((p) => [...p]);
    const made: number[][] = group.map(() => []);
    const done: ("stop" | "length" | null)[] = group.map(() => null);
    let logits = await decoder.prefill(group);
    for (let n = 0; n < budget; n++) {
      const next = logits.map((z, b) => {
        if (done[b] !== null) return history[b][history[b].length - 1];
        const t = nextToken(z, history[b], request.sampling, rngs[b]);
        made[b].push(t);
        history[b].push(t);
        onToken?.(g0 + b, t);
        if (request.stop.has(t)) done[b] = "stop";
        return t;
      });
      if (done.every((d) => d !== null) || n === budget - 1) break;
      logits = await decoder.step(next);
    }
    const seconds = (performance.now() - started) / 1000;
    made.forEach((tokens, b) => out.push({ tokens, finishReason: done[b] ?? "length", seconds }));
  }
  return out;
}
