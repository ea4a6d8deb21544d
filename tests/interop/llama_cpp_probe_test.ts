// scripts/llama_cpp/probe.mjs (through tests/interop/_llama_cpp.ts) against a GGUF lathe wrote: the
// nano Llama with the demo tokenizer, converted to F16. llama.cpp loads it, reads the metadata and
// tensors lathe wrote, tokenizes text to the same ids as lathe's tokenizer, and answers next-token
// log-probabilities, greedy tokens and perplexity sums of the right shape that agree with each other;
// a LoRA GGUF changes the answers. (How close the numbers are to lathe's own forward is checked
// elsewhere.) Skipped, with the reason in its name, where Node.js is not installed.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { writeLoraGguf } from "../../formats/gguf_lora.ts";
import { writeModelGguf } from "../../formats/gguf_model.ts";
import { initLoraAdapters, type LoraConfig, writePeftAdapter } from "../../formats/peft.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { ropeFreqFactors } from "../../kernels/rope_frequencies.ts";
import { loadTokenizer } from "../../steps/tokenize/tokenizer.ts";
import { llamaCpp, llamaCppAvailable } from "./_llama_cpp.ts";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const TOKENIZER = join(REPO, "data/demo/tokenizer");
const available = await llamaCppAvailable();
const skipNote = available.ok ? "" : ` (skipped: ${available.reason})`;

const TEXTS = [
  "The quick brown fox jumps over the lazy dog. Ünïcödé — 123 + 4.5e6!\n\ttabs  and  spaces",
  "<|im_start|>user\nHello, llama.cpp!<|im_end|>\n<|im_start|>assistant\n",
];

/** Index of the largest finite entry. */
function argmax(values: readonly (number | null)[]): number {
  let best = -1;
  values.forEach((v, i) => {
    if (v !== null && (best < 0 || v > values[best]!)) best = i;
  });
  return best;
}

Deno.test({
  name: `llama.cpp probe: runs lathe's nano Llama F16 GGUF${skipNote}`,
  ignore: !available.ok,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-llama-cpp-" });
    try {
      const modelDir = join(dir, "model");
      const { config } = await writeTinyModel(modelDir, {
        arch: "llama",
        size: "nano",
        seed: 7,
        tokenizerDir: TOKENIZER,
      });
      const model = join(dir, "nano-f16.gguf");
      await writeModelGguf(modelDir, model, {
        fileType: "F16",
        name: "nano",
        addBos: false,
        addEos: false,
        chatTemplate: null,
        ropeFactors: config.ropeScaling?.type === "llama3"
          ? ropeFreqFactors({
            headDim: config.headDim,
            theta: config.ropeTheta,
            scaling: config.ropeScaling,
            maxPositionEmbeddings: config.maxPositionEmbeddings,
          })
          : null,
      });
      const { tokenizer } = await loadTokenizer(modelDir);
      const lathe = TEXTS.map((t) => tokenizer.encode(t, { add_special_tokens: false }).ids);

      const prompt = lathe[1].slice(0, 12);
      const sequences = [lathe[0].slice(0, 64), lathe[1], prompt.slice(0, 2), [prompt[0]]];
      const answer = await llamaCpp({
        model,
        lora: null,
        contextSize: 256,
        threads: 1,
        tasks: [
          { kind: "metadata" },
          { kind: "tokenize", text: TEXTS[0], special: true },
          { kind: "tokenize", text: TEXTS[1], special: true },
          { kind: "logits", tokens: prompt },
          { kind: "logits", tokens: prompt },
          { kind: "logits", tokens: prompt.slice(0, 1) },
          { kind: "greedy", tokens: prompt, n: 16 },
          { kind: "perplexity", sequences },
        ],
      });
      const [meta, tok0, tok1, logits, again, first, greedy, ppl] = answer.results;
      assert.match(answer.llamaCpp, /\S/);

      // Metadata: what lathe wrote, as llama.cpp's neighbour library parses it.
      assert.equal(meta.metadata["general.architecture"], "llama");
      assert.equal(meta.metadata["llama.block_count"], config.numLayers);
      assert.equal(meta.metadata["tensor_count"], meta.tensorInfos.length);
      // token_embd, 9 per layer (2 norms, q k v o, gate up down), output_norm, [output], [rope_freqs].
      const expected = 2 + 9 * config.numLayers + (config.tieWordEmbeddings ? 0 : 1) +
        (config.ropeScaling?.type === "llama3" ? 1 : 0);
      assert.equal(meta.tensorInfos.length, expected);
      const embd = meta.tensorInfos.find((t) => t.name === "token_embd.weight");
      assert.deepEqual(embd?.shape, [config.hiddenSize, config.vocabSize]);
      assert.equal(embd?.dtype, 1); // F16

      // Tokenizer: llama.cpp's ids are lathe's, special tokens included; nothing added.
      assert.deepEqual(tok0.tokens, lathe[0]);
      assert.deepEqual(tok1.tokens, lathe[1]);
      assert.equal(tok1.addBos, false);
      assert.equal(tok1.addEos, false);
      assert.equal(tok1.shouldPrependBos, false);
      assert.equal(tok1.eos, 511);

      // Next-token log-probabilities: one per vocabulary entry, finite, normalised, repeatable.
      assert.equal(logits.logprobs.length, config.vocabSize);
      assert.ok(logits.logprobs.every((v) => v !== null && Number.isFinite(v) && v <= 0));
      const total = logits.logprobs.reduce((s: number, v) => s + Math.exp(v!), 0);
      assert.ok(Math.abs(total - 1) < 1e-5, `probabilities sum to ${total}`);
      assert.deepEqual(again.logprobs, logits.logprobs, "a fresh context answers the same");

      // Greedy: n tokens, the first the argmax of the logits task on the same prompt.
      assert.equal(greedy.tokens.length, 16);
      assert.ok(greedy.tokens.every((t) => Number.isInteger(t) && t >= 0 && t < config.vocabSize));
      assert.equal(greedy.tokens[0], argmax(logits.logprobs));

      // Perplexity: Σ (len − 1) predictions; a 2-token sequence's term is the logits task's.
      assert.equal(ppl.count, sequences.reduce((s, q) => s + Math.max(0, q.length - 1), 0));
      assert.ok(ppl.nll !== null && Number.isFinite(ppl.nll) && ppl.nll > 0);
      const single = await llamaCpp({
        model,
        lora: null,
        contextSize: 256,
        threads: 1,
        tasks: [{ kind: "perplexity", sequences: [prompt.slice(0, 2)] }],
      });
      const [pair] = single.results;
      assert.equal(pair.count, 1);
      assert.ok(Math.abs(pair.nll! + first.logprobs[prompt[1]]!) < 1e-6);

      // A LoRA GGUF (B ≠ 0) is applied: the next-token distribution moves.
      const lora: LoraConfig = {
        baseModelNameOrPath: null,
        r: 4,
        loraAlpha: 8,
        loraDropout: 0,
        targetModules: "all-linear",
        useRslora: false,
      };
      const pairs = initLoraAdapters(config, lora, 3).map((p) => ({
        ...p,
        b: p.b.map((_, i) => 0.2 * Math.sin(0.37 * i + p.layer)),
      }));
      await writePeftAdapter(join(dir, "adapter"), config, lora, pairs);
      const loraPath = join(dir, "lora.gguf");
      await writeLoraGguf(join(dir, "adapter"), config, loraPath, { name: "nano-lora" });
      const adapted = await llamaCpp({
        model,
        lora: loraPath,
        contextSize: 256,
        threads: 1,
        tasks: [{ kind: "logits", tokens: prompt }],
      });
      const moved = Math.max(
        ...adapted.results[0].logprobs.map((v, i) => Math.abs(v! - logits.logprobs[i]!)),
      );
      assert.ok(moved > 1e-2, `the LoRA moved the log-probabilities by only ${moved}`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
