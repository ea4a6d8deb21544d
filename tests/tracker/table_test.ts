import assert from "node:assert/strict";
import { formatCsv, formatNumber, formatTable } from "../../tracker/table.ts";

Deno.test("formatTable() aligns columns, right-aligns numeric ones and shows null as a dash", () => {
  const out = formatTable(["step", "seconds", "note"], [["tokenize", 1.5, null], [
    "train-sft",
    312,
    "slow · gpu",
  ]]);
  assert.equal(
    out,
    [
      "step       seconds  note",
      "---------  -------  ----------",
      "tokenize       1.5  -",
      "train-sft      312  slow · gpu",
    ].join("\n"),
  );
});

Deno.test("formatNumber() keeps integers and rounds others to 6 significant digits", () => {
  assert.equal(formatNumber(51200), "51200");
  assert.equal(formatNumber(0.1 + 0.2), "0.3");
  assert.equal(formatNumber(2.718281828), "2.71828");
  assert.equal(formatNumber(0.00001234), "1.2340e-5");
});

Deno.test("formatCsv() quotes fields with commas, quotes or newlines (RFC 4180)", () => {
  assert.equal(
    formatCsv(["a", "b"], [["x,y", 'say "hi"'], ["line\nbreak", null]]),
    'a,b\r\n"x,y","say ""hi"""\r\n"line\nbreak",\r\n',
  );
});
