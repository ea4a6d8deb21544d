import assert from "node:assert/strict";
import { samplesText } from "../../../steps/eval/report.ts";

Deno.test("samplesText() lines each model's answer up under the prompt and the reference, cut to the width", () => {
  const lines = samplesText(
    [{
      prompt: "Order: Ada wants a mug.\nJSON:",
      reference: '{"name":"Ada"}',
      outputs: { base: "The buyer is Ada.", "train-sft": '{"name":"Ada","item":"mug","quantity":1}' },
    }],
    ["base", "train-sft", "train-dpo"],
    24,
  );
  assert.deepEqual(lines, [
    "  #1         Order: Ada wants a mug.…",
    '  reference  {"name":"Ada"}',
    "  base       The buyer is Ada.",
    '  train-sft  {"name":"Ada","item":"m…',
    "  train-dpo  ",
  ]);
});

Deno.test("samplesText() shows a newline as ⏎ and leaves a line within the width whole", () => {
  const lines = samplesText([{ prompt: "Order: Ada.\nJSON:", reference: "{}", outputs: {} }], ["base"], 100);
  assert.deepEqual(lines, ["  #1         Order: Ada. ⏎ JSON:", "  reference  {}", "  base       "]);
});
