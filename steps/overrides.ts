/**
 * `--set a.b=c` overrides: dotted key paths into nested config objects, values parsed as
 * YAML scalars or flow collections (`3` is a number, `true` a boolean, `[q_proj, v_proj]`
 * a list, `"3"` a string).
 * @module
 */
import { parse as parseYaml } from "yaml";
import { LatheError } from "../foundation/errors.ts";

/** One parsed override. */
export interface Override {
  path: string[];
  value: unknown;
  /** The text as given, for messages. */
  text: string;
}

/** Parses `key.path=value`; errors say what is wrong with the text. */
export function parseOverride(text: string): Override {
  const eq = text.indexOf("=");
  if (eq <= 0) {
    throw new LatheError(`Cannot parse --set "${text}": expected key.path=value`, {
      hint: 'for example --set tokenize.max_seq_len=512 or --set "prepare.sources=[data/a.jsonl]"',
    });
  }
  const path = text.slice(0, eq).trim().split(".");
  if (path.some((p) => p === "")) {
    throw new LatheError(`Cannot parse --set "${text}": empty key in "${text.slice(0, eq)}"`);
  }
  let value: unknown;
  try {
    value = parseYaml(text.slice(eq + 1));
  } catch (error) {
    throw new LatheError(
      `Cannot parse --set "${text}": the value is not valid YAML (${(error as Error).message})`,
    );
  }
  return { path, value: value === undefined ? null : value, text };
}

/** Returns a deep copy of `target` with `value` set at `path` (objects created on the way). */
export function setPath(
  target: Record<string, unknown>,
  path: string[],
  value: unknown,
): Record<string, unknown> {
  const root = structuredClone(target);
  let node: Record<string, unknown> = root;
  for (const key of path.slice(0, -1)) {
    const next = node[key];
    if (next === undefined || next === null) node[key] = {};
    else if (typeof next !== "object" || Array.isArray(next)) {
      throw new LatheError(
        `Cannot set "${path.join(".")}": "${key}" is a ${
          Array.isArray(next) ? "list" : typeof next
        }, not a section`,
      );
    }
    node = node[key] as Record<string, unknown>;
  }
  node[path[path.length - 1]] = value;
  return root;
}

/** Applies overrides in order. */
export function applyOverrides(
  target: Record<string, unknown>,
  overrides: Override[],
): Record<string, unknown> {
  return overrides.reduce((acc, o) => setPath(acc, o.path, o.value), target);
}
