// The eval step's text metrics against published and hand-computed values.
import assert from "node:assert/strict";
import {
  corpusBleu,
  exactMatch,
  jsonMetrics,
  normalizeAnswer,
  rougeL,
  tokenize13a,
} from "../../../steps/eval/metrics.ts";

Deno.test("corpus BLEU equals sacreBLEU's published example: 48.53 82.4/50.0/45.5/37.5 (BP 0.943, 17/18)", () => {
  // sacreBLEU's README: BLEU().corpus_score(sys, refs), signature nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp.
  const refs = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
  ];
  const sys = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."];
  const b = corpusBleu(sys, refs);
  assert.equal(b.score.toFixed(2), "48.53");
  assert.deepEqual(b.precisions.map((p) => p.toFixed(1)), ["82.4", "50.0", "45.5", "37.5"]);
  assert.equal(b.bp.toFixed(3), "0.943");
  assert.deepEqual([b.sysLen, b.refLen], [17, 18]);
  // Identical output and reference: 100.
  assert.ok(
    Math.abs(corpusBleu(["the cat sat on the mat"], [["the cat sat on the mat"]]).score - 100) < 1e-9,
  );
  // A 4-gram that matches nothing: exp smoothing (100 / (2·1) for it), not 0.
  const smoothed = corpusBleu(["the cat sat on"], [["the cat sat in the hat"]]);
  assert.deepEqual(smoothed.precisions, [75, 200 / 3, 50, 50]);
  // Shorter than 4 tokens: no 4-gram to count, so 0 without effective order (sacreBLEU's default).
  assert.equal(corpusBleu(["the cat"], [["the cat sat"]]).score, 0);
});

Deno.test("13a tokenisation splits punctuation, keeps apostrophes and digit-bound periods, commas and dashes", () => {
  assert.deepEqual(tokenize13a("It wasn't surprising."), ["It", "wasn't", "surprising", "."]);
  assert.deepEqual(tokenize13a("Pay 3.50, then 1,000 (ok)!"), [
    "Pay",
    "3.50",
    ",",
    "then",
    "1,000",
    "(",
    "ok",
    ")",
    "!",
  ]);
  assert.deepEqual(tokenize13a("5-day &amp; x/y"), ["5", "-", "day", "&", "x", "/", "y"]);
});

Deno.test("ROUGE-L F1 on rouge_score's tokens: LCS precision and recall", () => {
  // Output tokens [the cat sat], reference [the cat was sat]: LCS 3, P 1, R 3/4, F 6/7.
  assert.equal(rougeL("The cat sat.", "the cat was sat"), 6 / 7);
  assert.equal(rougeL("A B C", "a b c"), 1);
  assert.equal(rougeL("x", "y"), 0);
  assert.equal(rougeL("", "y"), 0);
});

Deno.test("exact match, and SQuAD's normalised match", () => {
  assert.equal(normalizeAnswer("The  Eiffel-Tower!"), "eiffeltower");
  const m = exactMatch([" Paris ", "the Louvre.", "Rome"], ["Paris", "Louvre", "Milan"]);
  assert.deepEqual(m, { exact: 1 / 3, normalized: 2 / 3 });
});

Deno.test("JSON metrics: valid objects and the reference fields with equal values", () => {
  const refs = ['{"name":"Ana","quantity":2,"color":null}', '{"name":"Ben","quantity":1}', "not json"];
  const outs = ['{"name":"Ana","quantity":3,"color":null}', "{broken", "whatever"];
  // Two JSON references: 1 of 2 outputs valid; fields: Ana 2 of 3 right, Ben 0 of 2 → 2/5.
  assert.deepEqual(jsonMetrics(outs, refs), { valid: 0.5, fields: 0.4 });
  assert.equal(jsonMetrics(["x"], ["plain text"]), null);
});
