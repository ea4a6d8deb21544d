/**
 * `deno task chat`: talk to a model in the terminal. Each line typed is the next user turn; the
 * answer streams as it is generated; the conversation so far is kept in the model's chat
 * template. `/reset` starts over, `/exit` (or end of input) ends.
 *
 * ```
 * deno task chat <run-id | model dir | Hub id> [--adapter DIR ...] [--system TEXT] [sampling options]
 * ```
 * Options as `deno task generate` (steps/generate/cli_options.ts).
 * @module
 */
import { runMain } from "../foundation/errors.ts";
import { projectRoot } from "../foundation/paths.ts";
import { parseSessionArgs } from "../steps/generate/cli_options.ts";
import { openSession } from "../steps/generate/session.ts";
import type { Message } from "../steps/tokenize/chat.ts";

const USAGE = "usage: deno task chat <run id | model dir | Hub id> [--adapter DIR ...] [--system TEXT] " +
  "[--max-new-tokens N] [--do-sample] [--temperature T] [--top-k K] [--top-p P] [--min-p M] " +
  "[--repetition-penalty R] [--seed N]";

/** The lines of standard input, as they arrive. */
async function* stdinLines(): AsyncGenerator<string> {
  let pending = "";
  for await (const chunk of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) {
    pending += chunk;
    let nl;
    while ((nl = pending.indexOf("\n")) !== -1) {
      yield pending.slice(0, nl).replace(/\r$/, "");
      pending = pending.slice(nl + 1);
    }
  }
  if (pending !== "") yield pending;
}

if (import.meta.main) {
  await runMain(async () => {
    const args = await parseSessionArgs("chat", USAGE, Deno.args, {}, projectRoot());
    using session = await openSession(args.setup);
    const out = (s: string) => {
      try {
        Deno.stdout.writeSync(new TextEncoder().encode(s));
      } catch (error) {
        // The reader went away (`| head`): nothing more to say.
        if (error instanceof Deno.errors.BrokenPipe) Deno.exit(0);
        throw error;
      }
    };
    const start: Message[] = args.system === null ? [] : [{ role: "system", content: args.system }];
    let messages = [...start];
    const tty = Deno.stdin.isTerminal();
    out(
      `chat with ${args.setup.model}${
        args.setup.adapters?.length ? ` + ${args.setup.adapters.join(" + ")}` : ""
      }` +
        " (/reset starts over, /exit ends)\n",
    );
    if (tty) out("> ");
    let turn = 0;
    for await (const line of stdinLines()) {
      const text = line.trim();
      if (text === "/exit") break;
      if (text === "/reset") {
        messages = [...start];
        out("(conversation reset)\n");
      } else if (text !== "") {
        messages.push({ role: "user", content: text });
        const [answer] = await session.answer([messages], {
          ...args.options,
          seed: (args.options.seed ?? 0) + turn++,
        }, (_, piece) => out(piece));
        out("\n");
        messages.push({ role: "assistant", content: answer.text });
        if (answer.finishReason === "length") out("(stopped at max_new_tokens)\n");
      }
      if (tty) out("> ");
    }
  });
}
