/**
 * Python's stripping semantics for `@huggingface/jinja`, which chat templates are written against
 * (transformers renders them with jinja2 on Python strings):
 * - `s.strip(chars)`, `s.lstrip(chars)`, `s.rstrip(chars)` remove any of the characters in `chars`
 *   (Qwen3's template uses `content.lstrip('\n')` and `reasoning_content.strip('\n')`);
 *   `@huggingface/jinja` 0.5.11 ignores the argument and strips all whitespace;
 * - without `chars`, and in the `trim` filter, "whitespace" is Python's `str.isspace` set, which
 *   holds U+001C..U+001F and U+0085 but not U+FEFF (JavaScript's `trim` is the other way round).
 *
 * {@link usePythonStripping} installs both into the library's runtime classes, once per process.
 * @module
 */
import { Environment, Interpreter } from "@huggingface/jinja";

// deno-lint-ignore no-explicit-any
type Any = any;

/** The characters of Python's `str.isspace`. */
const PY_SPACE = new Set(
  [0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2028, 0x2029, 0x202f, 0x205f]
    .concat(Array.from({ length: 11 }, (_, i) => 0x2000 + i), [0x3000])
    .map((c) => String.fromCodePoint(c)),
);

/** Python's `str.strip` / `lstrip` / `rstrip`: `chars` null strips whitespace; else its code points. */
export function pyStrip(s: string, chars: string | null, left: boolean, right: boolean): string {
  // Scanning UTF-16 units is exact when no stripped character is astral: a surrogate half then
  // never matches, so a pair is never split. Templates strip long contents once per message, so
  // this path (no per-code-point array) is the common one.
  const set = chars === null ? PY_SPACE : new Set(Array.from(chars));
  if (chars === null || !/[\ud800-\udfff]/.test(chars)) {
    let start = 0;
    let end = s.length;
    if (left) { while (start < end && set.has(s[start])) start++; }
    if (right) { while (end > start && set.has(s[end - 1])) end--; }
    return start === 0 && end === s.length ? s : s.slice(start, end);
  }
  const cps = Array.from(s);
  let start = 0;
  let end = cps.length;
  if (left) { while (start < end && set.has(cps[start])) start++; }
  if (right) { while (end > start && set.has(cps[end - 1])) end--; }
  return start === 0 && end === cps.length ? s : cps.slice(start, end).join("");
}

/** The `chars` argument of a strip call: a string, None / undefined (whitespace), else an error. */
function charsArg(value: Any, name: string): string | null {
  if (value === undefined || value.type === "NullValue" || value.type === "UndefinedValue") return null;
  if (value.type === "StringValue") return value.value;
  throw new Error(`${name}() argument must be a string or None, not ${value.type}`);
}

let installed = false;

/** Makes `@huggingface/jinja` strip strings as Python does (see the module doc); idempotent. */
export function usePythonStripping(): void {
  if (installed) return;
  installed = true;
  const env = new Environment();
  const probe: Any = (new Interpreter(env) as Any).evaluate({ type: "StringLiteral", value: "" }, env);
  const StringValue = probe.constructor;
  const FunctionValue = probe.builtins.get("upper").constructor;

  const original = Object.getOwnPropertyDescriptor(StringValue.prototype, "builtins")!.get!;
  const patched = new WeakSet<Map<string, Any>>();
  const sides: [string, boolean, boolean][] = [
    ["strip", true, true],
    ["lstrip", true, false],
    ["rstrip", false, true],
  ];
  Object.defineProperty(StringValue.prototype, "builtins", {
    configurable: true,
    get(this: Any) {
      const map: Map<string, Any> = original.call(this);
      if (!patched.has(map)) {
        patched.add(map);
        for (const [name, left, right] of sides) {
          map.set(
            name,
            new FunctionValue((args: Any[]) =>
              new StringValue(pyStrip(this.value, charsArg(args[0], name), left, right))
            ),
          );
        }
      }
      return map;
    },
  });

  const proto = Interpreter.prototype as Any;
  const applyFilter = proto.applyFilter;
  proto.applyFilter = function (this: Any, operand: Any, filter: Any, environment: Any): Any {
    if (operand?.type === "StringValue") {
      if (filter.type === "Identifier" && filter.value === "trim") {
        return new StringValue(pyStrip(operand.value, null, true, true));
      }
      if (filter.type === "CallExpression" && filter.callee?.value === "trim") {
        const [args, kwargs] = this.evaluateArguments(filter.args, environment);
        return new StringValue(
          pyStrip(operand.value, charsArg(args[0] ?? kwargs.get("chars"), "trim"), true, true),
        );
      }
    }
    return applyFilter.call(this, operand, filter, environment);
  };
}
