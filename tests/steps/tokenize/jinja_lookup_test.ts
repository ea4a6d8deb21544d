import assert from "node:assert/strict";
import { Template } from "@huggingface/jinja";
import { useFastLookup } from "../../../steps/tokenize/jinja_lookup.ts";

function render(source: string, vars: Record<string, unknown> = {}): string {
  useFastLookup();
  return new Template(source).render(vars);
}

Deno.test("undeclared names are undefined, declared ones resolve through every enclosing scope", () => {
  assert.equal(
    render("[{{ tools }}|{{ tools is defined }}|{% if tools %}t{% else %}f{% endif %}]"),
    "[|false|f]",
  );
  assert.equal(render("{{ x.y is defined }}", { x: { z: 1 } }), "false");
  assert.equal(
    render(
      "{% set a = 1 %}{% for m in ms %}{% for c in m %}{{ a }}{{ c }}{{ m|length }}{% endfor %}{% endfor %}",
      {
        ms: [["p", "q"], ["r"]],
      },
    ),
    "1p21q21r1",
  );
  assert.equal(render("{% for x in [1, 2] %}{% set y = x %}{% endfor %}{{ y is defined }}"), "false");
  assert.equal(render("{{ bos_token }}{{ none is none }}{{ true }}", { bos_token: "<s>" }), "<s>truetrue");
  const ns =
    "{% set ns = namespace(n=0) %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}";
  assert.equal(render(ns), "6");
});
