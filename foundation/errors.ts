/**
 * User-facing errors. A `LatheError` is a mistake the user can fix (bad config, missing
 * file, changed input); programs print its message and hint, never a stack trace.
 * Anything else is a bug and keeps its stack.
 * @module
 */
import type { ZodError } from "zod";

/** An error caused by input the user controls; printed without a stack trace. */
export class LatheError extends Error {
  /** What to do about it, printed under the message. */
  readonly hint?: string;
  constructor(message: string, options: { hint?: string; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = "LatheError";
    this.hint = options.hint;
  }
}

/** Formats zod issues as `key.path: message` lines. */
export function formatZodIssues(error: ZodError, prefix = ""): string {
  return error.issues.map((issue) => {
    const path = [prefix, ...issue.path.map(String)].filter((p) => p !== "").join(".");
    return `${path || "(root)"}: ${issue.message}`;
  }).join("\n");
}

/**
 * Runs a program's body: a `LatheError` prints `error: <message>` (and its hint) on
 * stderr and exits 1; other errors propagate with their stack.
 */
export async function runMain(body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    if (error instanceof LatheError) {
      console.error(`error: ${error.message}`);
      if (error.hint) console.error(`hint: ${error.hint}`);
      Deno.exit(1);
    }
    throw error;
  }
}
