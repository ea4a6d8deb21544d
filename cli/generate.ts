/**
 * `deno task generate`: one-shot generation, scriptable. Prompts come from `--prompt` (repeatable)
 * or a JSONL file (`--file`: rows with "prompt" (text), or "messages" (a conversation)); each
 * answer is one JSON line on stdout: {"prompt", "output", "tokens", "finish_reason", "seconds"}.
 *
 * ```
 * deno task generate runs/<id>|<run-id>|<model dir|Hub id> [--adapter DIR ...] --prompt "Hi" [--prompt ...]
 * deno task generate data/demo/model --file prompts.jsonl --max-new-tokens 64 --do-sample --temperature 0.7 --seed 1
 * ```
 * Options: steps/generate/cli_options.ts (`--max-new-tokens`, `--temperature`, `--top-k`, `--top-p`,
 * `--min-p`, `--repetition-penalty`, `--do-sample`, `--seed`, `--system`, `--dtype`, `--runs`).
 * @module
 */
import { runMain } from "../foundation/errors.ts";
import { LatheError } from "../foundation/errors.ts";
import { projectRoot } from "../foundation/paths.ts";
import { parseSessionArgs } from "../steps/generate/cli_options.ts";
import { openSession } from "../steps/generate/session.ts";
import type { Message } from "../steps/tokenize/chat.ts";

const USAGE = "usage: deno task generate <model dir | Hub id | run id> [--adapter DIR ...] " +
  "(--prompt TEXT ... | --file PROMPTS.jsonl) [--max-new-tokens N] [--do-sample] [--temperature T] " +
  "[--top-k K] [--top-p P] [--min-p M] [--repetition-penalty R] [--seed N] [--system TEXT]";

/** The conversations of `--prompt`s and `--file`; each names where it came from. */
async function conversations(prompts: string[], file: string | undefined, system: string | null) {
  const out: { source: string; messages: Message[] }[] = [];
  const withSystem = (m: Message[]) => system === null ? m : [{ role: "system", content: system }, ...m];
  prompts.forEach((p, i) =>
    out.push({ source: `--prompt ${i + 1}`, messages: withSystem([{ role: "user", content: p }]) })
  );
  if (file !== undefined) {
    const lines = (await Deno.readTextFile(file)).split("\n");
    lines.forEach((line, i) => {
      if (line.trim() === "") return;
      const where = `${file}:${i + 1}`;
      let row: { prompt?: unknown; messages?: unknown };
      try {
        row = JSON.parse(line);
      } catch (error) {
        throw new LatheError(`Cannot read ${where}: ${(error as Error).message}`);
      }
      if (typeof row.prompt === "string") {
        out.push({ source: where, messages: withSystem([{ role: "user", content: row.prompt }]) });
      } else if (Array.isArray(row.messages)) {
        out.push({ source: where, messages: row.messages as Message[] });
      } else {throw new LatheError(
          `Cannot read ${where}: a row needs "prompt" (text) or "messages" (a conversation)`,
        );}
    });
  }
  if (out.length === 0) throw new LatheError("Cannot generate: no prompt", { hint: USAGE });
  return out;
}

if (import.meta.main) {
  await runMain(async () => {
    const root = projectRoot();
    const args = await parseSessionArgs("generate", USAGE, Deno.args, {
      prompt: { type: "string", multiple: true },
      file: { type: "string" },
      "batch-size": { type: "string" },
    }, root);
    const convs = await conversations(
      (args.values.prompt as string[] | undefined) ?? [],
      args.values.file as string | undefined,
      args.system,
    );
    using session = await openSession(args.setup);
    const batch = args.values["batch-size"] === undefined ? undefined : Number(args.values["batch-size"]);
    const answers = await session.answer(convs.map((c) => c.messages), { ...args.options, batchSize: batch });
    answers.forEach((a, i) => {
      const last = convs[i].messages.at(-1)!;
      console.log(JSON.stringify({
        source: convs[i].source,
        prompt: last.content,
        output: a.text,
        tokens: a.tokens,
        finish_reason: a.finishReason,
        seconds: a.seconds,
      }));
    });
  });
}
