/**
 * Runs `runs` commands in-process against a fixture runs root and captures what they print.
 * @module
 */
import { runsCli } from "../../tracker/cli.ts";

/** Runs `deno task runs <args>` with `--runs root`; returns stdout as one string. */
export async function runs(root: string, ...args: string[]): Promise<string> {
  const lines: string[] = [];
  await runsCli(["--runs", root, ...args], (text) => lines.push(text));
  return lines.join("\n");
}

/** A temp runs root for `body`, with LATHE_DB unset so the index lives in the root. */
export async function withRoot(body: (root: string) => Promise<void>): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "lathe-tracker-" });
  const savedDb = Deno.env.get("LATHE_DB");
  Deno.env.delete("LATHE_DB");
  try {
    await body(root);
  } finally {
    if (savedDb !== undefined) Deno.env.set("LATHE_DB", savedDb);
    await Deno.remove(root, { recursive: true });
  }
}
