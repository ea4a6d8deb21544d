/**
 * Variable lookup for `@huggingface/jinja` without exceptions. The library resolves a name by
 * walking the scope chain and throwing at its root when the name is not declared, then turns the
 * exception into `undefined`; chat templates test undeclared names on every render (`tools`,
 * `enable_thinking`, `documents`, ...), and capturing a stack trace each time costs a third of
 * rendering a short conversation with Qwen3's template. {@link useFastLookup} replaces the
 * lookup with a loop over the same chain that returns the same values.
 * @module
 */
import { Environment } from "@huggingface/jinja";

// deno-lint-ignore no-explicit-any
type Any = any;

/** The value of `name` in the nearest scope of `env`'s chain that declares it, or undefined. */
function lookup(env: Any, name: string): Any {
  for (; env; env = env.parent) if (env.variables.has(name)) return env.variables.get(name);
  return undefined;
}

let installed = false;

/** Installs the exception-free lookup into the library's `Environment`; idempotent. */
export function useFastLookup(): void {
  if (installed) return;
  installed = true;
  const proto = Environment.prototype as Any;
  // The library's UndefinedValue class, which it does not export: what a missing name gives.
  const UndefinedValue = (new Environment() as Any).lookupVariable("\u0000missing").constructor;
  proto.lookupVariable = function (this: Any, name: string): Any {
    return lookup(this, name) ?? new UndefinedValue();
  };
}
