/**
 * The `generate` and `chat` programs as a user runs them, in separate processes, on the demo
 * model: JSON lines out, the same tokens as the session in-process for the same seed, a chat fed
 * through stdin keeping its conversation, and clear errors for an adapter of another base, an
 * unknown option and an out-of-range sampling option.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { writePeftAdapter } from "../../formats/peft.ts";
import { loadModelConfig } from "../../formats/model_config.ts";
import { initialAdapters } from "../../kernels/models/trainable.ts";
import { openSession } from "../../steps/generate/session.ts";
import { gpuTest } from "../kernels/_harness.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const MODEL = join(ROOT, "data", "demo", "model");

async function lathe(program: string, args: string[], stdin?: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, program), ...args],
    cwd: ROOT,
    env: { LATHE_QUIET: "1" },
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(stdin));
    await w.close();
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, out: dec.decode(out.stdout), err: dec.decode(out.stderr) };
}

gpuTest("deno task generate prints a JSON line per prompt, as the session generates in-process", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-generate-" });
  try {
    await Deno.writeTextFile(
      join(dir, "prompts.jsonl"),
      JSON.stringify({ prompt: "Ship 3 mugs to Ana." }) + "\n" +
        JSON.stringify({ messages: [{ role: "user", content: "Order: Ben, 2 lamps." }] }) + "\n",
    );
    const args = [
      "--file",
      join(dir, "prompts.jsonl"),
      "--prompt",
      "Hi",
      "--max-new-tokens",
      "8",
      "--dtype",
      "f32",
    ];
    const r = await lathe("cli/generate.ts", [
      MODEL,
      ...args,
      "--do-sample",
      "--temperature",
      "0.8",
      "--seed",
      "3",
    ]);
    assert.equal(r.code, 0, r.err);
    const rows = r.out.trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(rows.map((x) => x.source), [
      "--prompt 1",
      `${join(dir, "prompts.jsonl")}:1`,
      `${join(dir, "prompts.jsonl")}:2`,
    ]);
    assert.deepEqual(rows.map((x) => x.prompt), ["Hi", "Ship 3 mugs to Ana.", "Order: Ben, 2 lamps."]);
    for (const x of rows) {
      assert.ok(x.tokens >= 1 && x.tokens <= 8 && ["stop", "length"].includes(x.finish_reason));
      assert.equal(typeof x.output, "string");
    }
    using session = await openSession({ model: MODEL, projectRoot: ROOT, dtype: "f32" });
    const inProcess = await session.answer(
      [[{ role: "user", content: "Hi" }], [{ role: "user", content: "Ship 3 mugs to Ana." }]],
      { maxNewTokens: 8, doSample: true, temperature: 0.8, seed: 3 },
    );
    assert.deepEqual(rows.slice(0, 2).map((x) => x.output), inProcess.map((a) => a.text));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTest("deno task chat answers each line of stdin in one conversation, and /reset starts over", async () => {
  const r = await lathe(
    "cli/chat.ts",
    [MODEL, "--max-new-tokens", "6", "--dtype", "f32"],
    "Ship 3 mugs.\nAnd 2 lamps?\n/reset\nHi\n/exit\nnever read\n",
  );
  assert.equal(r.code, 0, r.err);
  // The same turns in-process: turn i samples with seed i, the conversation carried until /reset.
  using session = await openSession({ model: MODEL, projectRoot: ROOT, dtype: "f32" });
  const ask = async (messages: { role: string; content: string }[], seed: number) =>
    (await session.answer([messages], { maxNewTokens: 6, seed }))[0];
  const u1 = { role: "user", content: "Ship 3 mugs." };
  const a1 = await ask([u1], 0);
  const a2 = await ask([u1, { role: "assistant", content: a1.text }, {
    role: "user",
    content: "And 2 lamps?",
  }], 1);
  const a3 = await ask([{ role: "user", content: "Hi" }], 2);
  const note = (a: { finishReason: string }) =>
    a.finishReason === "length" ? "(stopped at max_new_tokens)\n" : "";
  const expected = `chat with ${MODEL} (/reset starts over, /exit ends)\n` +
    `${a1.text}\n${note(a1)}${a2.text}\n${note(a2)}(conversation reset)\n${a3.text}\n${note(a3)}`;
  assert.equal(r.out, expected);
});

Deno.test("generate refuses an adapter of another base, a prompt longer than the context, an unknown option and a bad sampling option", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-generate-" });
  try {
    const other = join(dir, "other");
    await writeTinyModel(other, {
      arch: "llama",
      size: "nano", // the demo model is micro: D 64 cannot fit it
      seed: 1,
      tokenizerDir: join(ROOT, "data", "demo", "tokenizer"),
    });
    const config = await loadModelConfig(other);
    const spec = { r: 2, alpha: 4, dropout: 0, targets: ["q_proj" as const], useRslora: false };
    const adapter = join(dir, "adapter");
    await writePeftAdapter(adapter, config, {
      baseModelNameOrPath: other,
      r: 2,
      loraAlpha: 4,
      loraDropout: 0,
      targetModules: ["q_proj"],
      useRslora: false,
    }, initialAdapters(config, spec, 1));
    const r = await lathe("cli/generate.ts", [MODEL, "--adapter", adapter, "--prompt", "Hi"]);
    assert.equal(r.code, 1);
    assert.match(r.err, /Cannot apply adapter ".*adapter" to ".*demo\/model"/);
    assert.doesNotMatch(r.err, /\n\s+at /, "no stack trace");
    const long = await lathe("cli/generate.ts", [
      MODEL,
      "--prompt",
      "ship mugs ".repeat(1200),
      "--dtype",
      "f32",
    ]);
    assert.equal(long.code, 1);
    assert.match(long.err, /Cannot answer prompt 1: it is \d+ tokens long, the model's context is 2048/);
    assert.doesNotMatch(long.err, /\n\s+at /, "no stack trace");
    const bogus = await lathe("cli/generate.ts", [MODEL, "--prompt", "Hi", "--top-q", "3"]);
    assert.match(bogus.err, /Cannot run generate: Unknown option '--top-q'/);
    const range = await lathe("cli/generate.ts", [MODEL, "--prompt", "Hi", "--top-p=1.5"]);
    assert.match(range.err, /Cannot run generate: Cannot sample with top_p 1\.5: it must be in \(0, 1\]/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
