import assert from "node:assert/strict";
import { Template } from "@huggingface/jinja";
import { pyStrip, usePythonStripping } from "../../../steps/tokenize/jinja_strings.ts";

function render(source: string, vars: Record<string, unknown> = {}): string {
  usePythonStripping();
  return new Template(source).render(vars);
}

Deno.test("pyStrip removes Python's whitespace set or the code points of chars", () => {
  assert.equal(pyStrip("\ufeff\x1f a \x85", null, true, true), "\ufeff\x1f a");
  assert.equal(pyStrip("\x1c\u3000a\u2003", null, true, true), "a");
  assert.equal(pyStrip("\n\n  a \n", "\n", true, true), "  a ");
  assert.equal(pyStrip("xyaxy", "yx", true, false), "axy");
  assert.equal(pyStrip("xyaxy", "yx", false, true), "xya");
  assert.equal(pyStrip("😀a😀", "😀", true, true), "a");
  assert.equal(pyStrip("", null, true, true), "");
});

Deno.test("templates strip, lstrip and rstrip with a chars argument as jinja2 does", () => {
  const s = "\n  think  \n\n";
  assert.equal(render("[{{ s.strip('\\n') }}]", { s }), "[  think  ]");
  assert.equal(render("[{{ s.lstrip('\\n') }}]", { s }), "[  think  \n\n]");
  assert.equal(render("[{{ s.rstrip('\\n') }}]", { s }), "[\n  think  ]");
  assert.equal(render("[{{ s.strip() }}|{{ s.strip(none) }}]", { s }), "[think|think]");
  assert.equal(render("[{{ 'xy</answer>'.strip('</answer>') }}]"), "[xy]");
  assert.throws(() => render("{{ 'a'.strip(1) }}"), /strip\(\) argument must be a string or None/);
});

Deno.test("the trim filter strips Python whitespace and honours chars", () => {
  assert.equal(render("[{{ s | trim }}]", { s: "\ufeff hi \x85" }), "[\ufeff hi]");
  assert.equal(render("[{{ s | trim('-') }}]", { s: "--hi -" }), "[hi ]");
  assert.equal(render("[{{ s | upper }}]", { s: "hi" }), "[HI]");
});

Deno.test("pyStrip keeps astral characters and lone surrogates whole at either end", () => {
  assert.equal(pyStrip(" \u{1F600} a \u{1F600}\n", null, true, true), "\u{1F600} a \u{1F600}");
  assert.equal(pyStrip("\ud800 x \udc00", " ", true, true), "\ud800 x \udc00");
  assert.equal(pyStrip("\ud800 x \ud800", "\ud800", true, true), " x ");
  assert.equal(pyStrip("\u{1F600}\u{1F601}x\u{1F600}", "\u{1F600}", true, true), "\u{1F601}x");
  const long = "  " + "word ".repeat(10_000) + "\n";
  assert.equal(pyStrip(long, null, true, false), long.slice(2));
  assert.equal(pyStrip(long, null, false, true), long.slice(0, -2));
});
