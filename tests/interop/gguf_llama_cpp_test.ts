// llama.cpp (node-llama-cpp 3.21.1, prebuilt CPU binaries) runs what `export` writes and computes what
// lathe computes. For the tiny Llama, Mistral and Qwen2 (nano, demo tokenizer) with a LoRA adapter on
// all seven projections, merged into float16:
// - F16 GGUF: llama.cpp's next-token log-probabilities on sample prompts equal the f64 CPU reference's
//   forward of the merged model within LOGPROB_TOL (llama.cpp computes in f16/f32: F16 weights times
//   activations rounded to f16, an F16 KV cache); greedy continuations agree token for token for
//   GREEDY_TOKENS tokens;
// - the LoRA GGUF applied in llama.cpp to the base's F16 GGUF gives the merged model's
//   log-probabilities (within LORA_TOL: the merge rounds W + s·B·A to f16 once, llama.cpp adds the
//   LoRA term to f16 products);
// - @huggingface/gguf (inside the probe) reads back the metadata and tensor infos lathe wrote.
// For the quantized types, on the milli Llama (rows of 256, so Q4_K/Q5_K/Q6_K blocks are real) and on
// the nano Llama (rows of 64: llama.cpp's fallbacks to Q5_0/Q5_1/Q8_0):
// - llama.cpp's log-probabilities equal the reference forward on lathe's own dequantization of the
//   same blocks within QUANT_TOL (llama.cpp also rounds activations to 8 bits for quantized
//   products): llama.cpp decodes every block as lathe encoded it;
// - the perplexity of the eval texts stays within PPL_BOUND[type] of F16's (|Δ ln ppl|).
// Skipped, with the reason in the name, only where Node.js is absent.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { writeLoraGguf } from "../../formats/gguf_lora.ts";
import { ggufTensorName, writeModelGguf } from "../../formats/gguf_model.ts";
import {
  dequantize,
  GGML_TYPE,
  type GgmlTypeName,
  type GgufFileType,
  quantize,
} from "../../formats/gguf_quants.ts";
import type { ModelConfig } from "../../formats/model_config.ts";
import { initLoraAdapters, type LoraConfig, writePeftAdapter } from "../../formats/peft.ts";
import { loadHostModel } from "../../kernels/models/load.ts";
import { type TinySize, writeTinyModel } from "../../kernels/models/tiny.ts";
import { ropeFreqFactors } from "../../kernels/rope_frequencies.ts";
import { MERGED_DIR, step as mergeStep } from "../../steps/merge.ts";
import { runStep } from "../../steps/runner.ts";
import { loadTokenizer } from "../../steps/tokenize/tokenizer.ts";
import { randn } from "../kernels/_harness.ts";
import { referenceLastLogits } from "../models/_model_fixture.ts";
import { llamaCpp, llamaCppAvailable } from "./_llama_cpp.ts";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const TOKENIZER = join(REPO, "data/demo/tokenizer");
const available = await llamaCppAvailable();
const skipNote = available.ok ? "" : ` (skipped: ${available.reason})`;

/** Largest |Δ log p| over the vocabulary, F16 GGUF against the f64 reference. */
const LOGPROB_TOL = 2e-3;
/** The same for base + LoRA GGUF against the merged model's reference. */
const LORA_TOL = 4e-3;
/** Quantized GGUF against the reference on lathe's dequantized weights. */
const QUANT_TOL = 5e-2;
/**
 * For the 4- and 5-bit types, whose rounding dwarfs llama.cpp's own: the mean distance to lathe's
 * dequantized weights is at most this share of the distance to the unquantized ones (measured 0.06–0.25).
 */
const DECODE_RATIO = 0.4;
const GREEDY_TOKENS = 16;
/** Bound on |ln ppl(type) − ln ppl(F16)| over the eval texts. */
const PPL_BOUND: Record<string, number> = {
  Q8_0: 0.002,
  Q6_K: 0.005,
  Q5_K_M: 0.01,
  Q4_K_M: 0.02,
  Q4_0: 0.03,
};

/** Sample prompts (the demo's task; each under Mistral's test window of 32 tokens). */
const PROMPTS = [
  "<|im_start|>user\nExtract the order as JSON: Send 3 red mugs to Ana in Oslo.<|im_end|>\n",
  "Please ship 5 pillows to Omar in Hanoi by 12th March.",
  '<|im_start|>assistant\n{"name":"Omar","item":"pillow"',
];

function logSoftmax(logits: Float64Array): Float64Array {
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  let sum = 0;
  for (const v of logits) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return logits.map((v) => v - lse);
}

function maxDiff(a: readonly (number | null)[], b: Float64Array): number {
  let worst = 0;
  for (let i = 0; i < b.length; i++) {
    const v = a[i];
    if (v === null) continue; // below float32's smallest probability in llama.cpp
    worst = Math.max(worst, Math.abs(v - b[i]));
  }
  return worst;
}

function argmax(v: Float64Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

function ropeFactors(config: ModelConfig): Float32Array | null {
  return config.ropeScaling?.type === "llama3"
    ? ropeFreqFactors({
      headDim: config.headDim,
      theta: config.ropeTheta,
      scaling: config.ropeScaling,
      maxPositionEmbeddings: config.maxPositionEmbeddings,
    })
    : null;
}

async function gguf(dir: string, path: string, fileType: GgufFileType, config: ModelConfig) {
  const tok = await loadTokenizer(dir);
  return await writeModelGguf(dir, path, {
    fileType,
    name: "interop",
    addBos: false,
    addEos: false,
    chatTemplate: tok.chatTemplate,
    ropeFactors: ropeFactors(config),
  });
}

/** A tiny model, an adapter on all projections with non-zero B, and the model merged into float16. */
async function fixture(dir: string, arch: "llama" | "mistral" | "qwen2", size: TinySize = "nano") {
  const base = join(dir, "base");
  const { config } = await writeTinyModel(base, { arch, size, seed: 11, tokenizerDir: TOKENIZER });
  const lora: LoraConfig = {
    baseModelNameOrPath: base,
    r: 4,
    loraAlpha: 8,
    loraDropout: 0,
    targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    useRslora: false,
  };
  const pairs = initLoraAdapters(config, lora, 5).map((p, i) => ({
    ...p,
    b: randn(p.b.length, 900 + i, 0.3),
  }));
  const adapter = join(dir, "adapter");
  await writePeftAdapter(adapter, config, lora, pairs);
  await runStep(mergeStep, {
    runsRoot: join(dir, "runs"),
    runId: "m",
    recipe: null,
    config: { model: base, adapters: [adapter], dtype: "float16", check_rows: 0 },
    seed: 1,
    projectRoot: REPO,
    quiet: true,
  });
  const merged = join(dir, "runs", "m", "merge", MERGED_DIR);
  const { tokenizer } = await loadTokenizer(base);
  const prompts = PROMPTS.map((p) => tokenizer.encode(p, { add_special_tokens: false }).ids as number[]);
  return { base, adapter, merged, config, prompts };
}

for (const arch of ["llama", "mistral", "qwen2"] as const) {
  Deno.test({
    name: `llama.cpp runs lathe's ${arch} export: F16 log-probs, greedy tokens, the LoRA GGUF${skipNote}`,
    ignore: !available.ok,
    fn: async () => {
      const dir = await Deno.makeTempDir({ prefix: `lathe-interop-${arch}-` });
      try {
        const f = await fixture(dir, arch);
        const mergedGguf = join(dir, "merged-F16.gguf");
        const written = await gguf(f.merged, mergedGguf, "F16", f.config);
        if (arch === "mistral") assert.match(written.warnings.join(), /sliding window of 32 tokens/);
        const baseGguf = join(dir, "base-F16.gguf");
        await gguf(f.base, baseGguf, "F16", f.config);
        const loraGguf = join(dir, "lora.gguf");
        await writeLoraGguf(f.adapter, f.config, loraGguf, { name: "interop-lora" });

        const host = await loadHostModel(f.merged);
        const ref = (ids: number[]) =>
          logSoftmax(referenceLastLogits(host.config, host.weights, new Map(), ids));
        const refGreedy: number[] = [];
        // The shortest prompt: with its continuation it stays inside the test Mistral's window of 32.
        assert.ok(f.prompts[2].length + GREEDY_TOKENS <= 32);
        const ctx = [...f.prompts[2]];
        for (let i = 0; i < GREEDY_TOKENS; i++) {
          const next = argmax(ref(ctx));
          refGreedy.push(next);
          ctx.push(next);
        }
        const tasks = [
          { kind: "metadata" as const },
          ...f.prompts.map((tokens) => ({ kind: "logits" as const, tokens })),
          { kind: "greedy" as const, tokens: f.prompts[2], n: GREEDY_TOKENS },
        ];
        const merged = await llamaCpp({ model: mergedGguf, lora: null, contextSize: 256, threads: 1, tasks });
        const meta = merged.results[0] as {
          metadata: Record<string, unknown>;
          tensorInfos: { name: string }[];
        };
        assert.equal(meta.metadata["general.architecture"], arch === "qwen2" ? "qwen2" : "llama");
        const c = f.config;
        const expected = 1 + c.numLayers * (9 + (c.qkvBias ? 3 : 0)) + 1 + (c.tieWordEmbeddings ? 0 : 1) +
          (c.ropeScaling?.type === "llama3" ? 1 : 0);
        assert.equal(meta.tensorInfos.length, expected, "every tensor lathe wrote");
        assert.equal(meta.metadata["tokenizer.ggml.pre"], "gpt-2");
        for (const [i, ids] of f.prompts.entries()) {
          const got = (merged.results[1 + i] as { logprobs: (number | null)[] }).logprobs;
          const d = maxDiff(got, ref(ids));
          assert.ok(d <= LOGPROB_TOL, `${arch} prompt ${i}: max |Δ log p| ${d} > ${LOGPROB_TOL}`);
        }
        const greedy = (merged.results.at(-1) as { tokens: number[] }).tokens;
        assert.deepEqual(greedy, refGreedy, `${arch}: greedy tokens`);

        const withLora = await llamaCpp({
          model: baseGguf,
          lora: loraGguf,
          contextSize: 256,
          threads: 1,
          tasks: f.prompts.map((tokens) => ({ kind: "logits" as const, tokens })),
        });
        for (const [i, ids] of f.prompts.entries()) {
          const got = (withLora.results[i] as { logprobs: (number | null)[] }).logprobs;
          const d = maxDiff(got, ref(ids));
          assert.ok(d <= LORA_TOL, `${arch} + LoRA GGUF prompt ${i}: max |Δ log p| ${d} > ${LORA_TOL}`);
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

for (const size of ["milli", "nano"] as const) {
  Deno.test({
    name: `llama.cpp decodes lathe's quantized GGUF blocks (${size} Llama), perplexity near F16's${skipNote}`,
    ignore: !available.ok,
    fn: async () => {
      const dir = await Deno.makeTempDir({ prefix: `lathe-interop-quant-${size}-` });
      try {
        const f = await fixture(dir, "llama", size);
        const host = await loadHostModel(f.merged);
        // Eval texts: the demo's chats, 48 tokens each.
        const { tokenizer } = await loadTokenizer(f.base);
        const rows = (await Deno.readTextFile(join(REPO, "data/demo/sft.jsonl"))).split("\n").slice(0, 6);
        const texts = rows.map((l) =>
          JSON.parse(l).messages.map((m: { content: string }) => m.content).join("\n")
        );
        const sequences = texts.map((t) =>
          (tokenizer.encode(t, { add_special_tokens: false }).ids as number[]).slice(0, 48)
        );
        let f16Nll = 0;
        for (const type of ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"] as const) {
          const path = join(dir, `m-${type}.gguf`);
          await gguf(f.merged, path, type, f.config);
          const answer = await llamaCpp({
            model: path,
            lora: null,
            contextSize: 256,
            threads: 1,
            tasks: [
              { kind: "metadata" as const },
              { kind: "perplexity" as const, sequences },
              ...f.prompts.map((tokens) => ({ kind: "logits" as const, tokens })),
            ],
          });
          const infos = (answer.results[0] as { tensorInfos: { name: string; dtype: number }[] }).tensorInfos;
          const typeOf = new Map(infos.map((t) => [t.name, t.dtype]));
          const names = Object.keys(GGML_TYPE) as GgmlTypeName[];
          // The reference on lathe's dequantization of each tensor's blocks (rows permute as wholes, so
          // dequantize(quantize(W)) in transformers' row order is what llama.cpp holds, un-permuted).
          const weights = new Map<string, Float32Array>();
          for (const [name, w] of host.weights) {
            const g = ggufTensorName(name);
            const t = names.find((n) => GGML_TYPE[n] === typeOf.get(g ?? ""));
            if (!g || !t) throw new Error(`no GGUF tensor for ${name}`);
            const rowLength = w.length / rowsOf(name, host.config);
            weights.set(name, t === "F32" ? w : dequantize(t, quantize(t, w, rowLength), w.length));
          }
          const { nll, count } = answer.results[1] as { nll: number; count: number };
          if (type === "F16") f16Nll = nll;
          else {
            const delta = Math.abs(nll / count - f16Nll / count);
            assert.ok(delta <= PPL_BOUND[type], `${size} ${type}: |Δ ln ppl| ${delta} > ${PPL_BOUND[type]}`);
          }
          let toDequantized = 0, toUnquantized = 0;
          for (const [i, ids] of f.prompts.entries()) {
            const got = (answer.results[2 + i] as { logprobs: (number | null)[] }).logprobs;
            const d = maxDiff(got, logSoftmax(referenceLastLogits(host.config, weights, new Map(), ids)));
            assert.ok(d <= QUANT_TOL, `${size} ${type} prompt ${i}: max |Δ log p| ${d} > ${QUANT_TOL}`);
            toDequantized += d;
            toUnquantized += maxDiff(
              got,
              logSoftmax(referenceLastLogits(host.config, host.weights, new Map(), ids)),
            );
          }
          if (/^Q[45]/.test(type)) {
            assert.ok(
              toDequantized <= DECODE_RATIO * toUnquantized,
              `${size} ${type}: llama.cpp is ${toDequantized} from lathe's dequantized weights, ${toUnquantized} from the unquantized`,
            );
          }
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

/** Rows (out features) of a weight by its transformers name. */
function rowsOf(name: string, c: ModelConfig): number {
  if (/embed_tokens|lm_head/.test(name)) return c.vocabSize;
  if (/q_proj/.test(name)) return c.numHeads * c.headDim;
  if (/[kv]_proj/.test(name)) return c.numKvHeads * c.headDim;
  if (/gate_proj|up_proj/.test(name)) return c.intermediateSize;
  if (/o_proj|down_proj/.test(name)) return c.hiddenSize;
  return 1;
}
