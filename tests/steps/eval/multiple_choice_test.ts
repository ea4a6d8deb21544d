// Multiple-choice scoring as lm-evaluation-harness scores it (steps/eval/multiple_choice.ts):
// - with a model whose log-probability of a token is −id/100, every ll is hand-computed, and acc
//   and acc_norm (ll divided by the choice's length in characters) follow;
// - on the tiny Llama, the GPU's lls equal the CPU reference's (f32 tolerance);
// - malformed rows name their line.
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Batch, TrainableModel } from "../../../kernels/models/trainable.ts";
import { mcContext, parseMcFile, scoreMultipleChoice } from "../../../steps/eval/multiple_choice.ts";
import { assertClose, gpuTest } from "../../kernels/_harness.ts";
import { allTargets, referenceModel, tinyCheckpoint, withRandomB } from "../../models/_model_fixture.ts";
import { createGpuModel } from "../../../kernels/models/graph.ts";
import { LatheError } from "../../../foundation/errors.ts";

/** A "model" whose log-prob of predicting token id is −id/100. */
const fake = {
  scoreTokens(batch: Batch) {
    const logp = Float64Array.from(batch.targets, (y) => (y === -100 ? 0 : -y / 100));
    return Promise.resolve({ logp, logitSum: new Float64Array(batch.targets.length) });
  },
} as unknown as TrainableModel;

/** One token per character code (so "ab" is [97, 98]): context and continuation split cleanly. */
const encode = (text: string) => Array.from(text, (c) => c.codePointAt(0)!);

Deno.test("acc and acc_norm from hand-computed log-likelihoods", async () => {
  const items = parseMcFile(
    [
      JSON.stringify({ question: "Q1", choices: ["b", "a"], answer: 1 }), // ll: ' b' = -(32+98)/100, ' a' = -(32+97)/100
      JSON.stringify({ question: "Q2", choices: ["aaaa", "z"], label: 0 }), // ll: -(32+4·97)/100 = -4.2 vs -(32+122)/100 = -1.54
    ].join("\n"),
    "mc.jsonl",
  );
  const s = await scoreMultipleChoice(fake, encode, items, 3);
  assertClose(s.loglikelihoods.flat(), [-1.3, -1.29, -4.2, -1.54], { atol: 1e-12, rtol: 0, name: "ll" });
  // Q1: 'a' wins either way (right). Q2: raw ll picks 'z' (wrong); per character 'aaaa' (-1.05) beats 'z' (-1.54): right.
  assert.deepEqual([s.acc, s.acc_norm, s.questions], [0.5, 1, 2]);
  assert.equal(mcContext("Q1"), "Q1\nAnswer:");
});

Deno.test("malformed benchmark rows name their line", () => {
  for (
    const [row, pattern] of [
      ['{"question": 1, "choices": ["a", "b"], "answer": 0}', /mc\.jsonl:2: "question" is not a string/],
      [
        '{"question": "q", "choices": ["a"], "answer": 0}',
        /mc\.jsonl:2: "choices" is not a list of at least two/,
      ],
      ['{"question": "q", "choices": ["a", "b"], "answer": 2}', /mc\.jsonl:2: "answer" 2 is not the index/],
      ["{broken", /mc\.jsonl:2: /],
    ] as const
  ) {
    assert.throws(
      () => parseMcFile(`\n${row}`, "mc.jsonl"),
      (e) => e instanceof LatheError && pattern.test(e.message),
    );
  }
});

gpuTest(
  "multiple-choice log-likelihoods on the GPU equal the CPU reference's (tiny Llama with an adapter)",
  async () => {
    const ckpt = await tinyCheckpoint("llama");
    try {
      const lora = allTargets();
      using gpu = await createGpuModel(ckpt.config, ckpt.dir, lora, 1, { dtype: "f32" });
      const weights = withRandomB(await gpu.getLora(), 3, 0.3);
      await gpu.setLora(weights);
      using ref = await referenceModel(ckpt, lora, 1, weights);
      const V = ckpt.config.vocabSize;
      const enc = (text: string) => Array.from(text, (c) => (c.codePointAt(0)! * 7) % V);
      const items = parseMcFile(
        [
          JSON.stringify({ question: "Which is red?", choices: ["apple", "sky", "grass"], answer: 0 }),
          JSON.stringify({ question: "2+2?", choices: ["4", "five"], answer: 0 }),
        ].join("\n"),
        join("x", "mc.jsonl"),
      );
      const g = await scoreMultipleChoice(gpu, enc, items, 2);
      const r = await scoreMultipleChoice(ref, enc, items, 5);
      assertClose(g.loglikelihoods.flat(), r.loglikelihoods.flat(), { atol: 1e-3, rtol: 1e-5, name: "ll" });
      assert.deepEqual([g.acc, g.acc_norm], [r.acc, r.acc_norm]);
    } finally {
      await ckpt.cleanup();
    }
  },
);
