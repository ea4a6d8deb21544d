import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { detectFormat, normaliseRow, type RowFormat, undetectable } from "../../../steps/prepare/formats.ts";
import { type Example, exampleId, exampleLine } from "../../../steps/prepare/example.ts";
import { RowError } from "../../../steps/prepare/row_error.ts";

const u = (content: string) => ({ role: "user" as const, content });
const a = (content: string) => ({ role: "assistant" as const, content });
const s = (content: string) => ({ role: "system" as const, content });

/** The RowError a bad row raises, as `field: message`. */
function problem(format: RowFormat, row: unknown, systemPrompt?: string): string {
  try {
    normaliseRow(format, row, { systemPrompt });
  } catch (error) {
    assert.ok(error instanceof RowError, `expected a RowError, got ${error}`);
    return error.describe();
  }
  assert.fail(`row was accepted: ${JSON.stringify(row)}`);
}

Deno.test("detectFormat() tells every format from the keys of a row", () => {
  assert.equal(detectFormat({ messages: [u("hi"), a("yo")] }), "messages");
  assert.equal(detectFormat({ conversations: [{ from: "human", value: "hi" }] }), "messages");
  assert.equal(detectFormat({ instruction: "do", input: "", output: "done" }), "alpaca");
  assert.equal(detectFormat({ prompt: "p", response: "r" }), "prompt_response");
  assert.equal(detectFormat({ prompt: "p", completion: "r" }), "prompt_response");
  assert.equal(detectFormat({ text: "raw" }), "text");
  assert.equal(detectFormat({ prompt: "p", chosen: "c", rejected: "r" }), "preference");
  assert.equal(detectFormat({ chosen: [u("p"), a("c")], rejected: [u("p"), a("r")] }), "preference");
});

Deno.test("detectFormat() prefers the most specific format and ignores null columns", () => {
  // a preference row also has `prompt`, an alpaca row may carry `text` too
  assert.equal(detectFormat({ prompt: "p", chosen: "c", rejected: "r", text: "t" }), "preference");
  assert.equal(detectFormat({ instruction: "i", output: "o", text: "t" }), "alpaca");
  // CSV columns that are empty in this row arrive as null
  assert.equal(detectFormat({ instruction: null, output: null, text: "t" }), "text");
  assert.equal(detectFormat({ question: "q", answer: "a" }), null);
  assert.equal(detectFormat(["not", "an", "object"]), null);
  assert.match(undetectable({ question: "q" }).message, /"question".*expected "messages"/);
  assert.match(undetectable(3).message, /expected a JSON object, got a number/);
});

Deno.test("normaliseRow() keeps messages as given, drops extra keys, keeps whitespace", () => {
  const ex = normaliseRow("messages", {
    messages: [{ role: "user", content: " hi\n", name: "x" }, { ...a("yo "), weight: 1 }],
    meta: 3,
  });
  assert.deepEqual(ex, { kind: "sft", messages: [u(" hi\n"), a("yo ")] });
});

Deno.test("normaliseRow() maps ShareGPT conversations to roles", () => {
  const ex = normaliseRow("messages", {
    conversations: [
      { from: "system", value: "be brief" },
      { from: "human", value: "hi" },
      { from: "gpt", value: "yo" },
    ],
  });
  assert.deepEqual(ex, { kind: "sft", messages: [s("be brief"), u("hi"), a("yo")] });
  assert.equal(
    problem("messages", { conversations: [{ from: "bot", value: "x" }] }),
    'conversations[0].from: "bot" is not one of "system", "human", "gpt"',
  );
});

Deno.test("normaliseRow() joins alpaca instruction and input with a blank line", () => {
  assert.deepEqual(
    normaliseRow("alpaca", { instruction: "Translate.", input: "chat", output: "cat" }),
    { kind: "sft", messages: [u("Translate.\n\nchat"), a("cat")] },
  );
  for (const input of ["", "  ", null, undefined]) {
    assert.deepEqual(
      normaliseRow("alpaca", { instruction: "Say hi.", input, output: "hi" }),
      { kind: "sft", messages: [u("Say hi."), a("hi")] },
    );
  }
  assert.equal(problem("alpaca", { instruction: "x", output: 3 }), "output: expected a string, got a number");
  assert.equal(
    problem("alpaca", { instruction: "x", input: ["a"], output: "y" }),
    "input: expected a string, got a list",
  );
  assert.equal(problem("alpaca", { instruction: " ", output: "y" }), "instruction: is empty");
});

Deno.test("normaliseRow() reads prompt/response and prompt/completion, as strings or message lists", () => {
  const want: Example = { kind: "sft", messages: [u("2+2?"), a("4")] };
  assert.deepEqual(normaliseRow("prompt_response", { prompt: "2+2?", response: "4" }), want);
  assert.deepEqual(normaliseRow("prompt_response", { prompt: "2+2?", completion: "4" }), want);
  assert.deepEqual(normaliseRow("prompt_response", { prompt: [u("2+2?")], completion: [a("4")] }), want);
  assert.deepEqual(
    normaliseRow("prompt_response", { prompt: [s("math"), u("2+2?")], completion: [a("4")] }),
    { kind: "sft", messages: [s("math"), u("2+2?"), a("4")] },
  );
  assert.equal(problem("prompt_response", { prompt: "p" }), 'response: is missing (or give "completion")');
  assert.equal(
    problem("prompt_response", { prompt: [u("a")], completion: [u("b")] }),
    'completion[0].role: expected "assistant" after a "user" message, got "user"',
  );
});

Deno.test("normaliseRow() keeps text rows as raw text", () => {
  assert.deepEqual(normaliseRow("text", { text: "Once upon a time." }), {
    kind: "text",
    text: "Once upon a time.",
  });
  assert.equal(problem("text", { text: "" }), "text: is empty");
  assert.equal(problem("text", { body: "x" }), "text: is missing");
});

Deno.test("normaliseRow() turns string preference fields into single messages", () => {
  assert.deepEqual(normaliseRow("preference", { prompt: "Q", chosen: "good", rejected: "bad" }), {
    kind: "preference",
    prompt: [u("Q")],
    chosen: [a("good")],
    rejected: [a("bad")],
  });
});

Deno.test("normaliseRow() splits the prompt prefix off full preference conversations", () => {
  const want = { kind: "preference", prompt: [u("Q")], chosen: [a("good")], rejected: [a("bad")] };
  // string prompt repeated at the start of both conversations
  assert.deepEqual(
    normaliseRow("preference", { prompt: "Q", chosen: [u("Q"), a("good")], rejected: [u("Q"), a("bad")] }),
    want,
  );
  // implicit prompt: no prompt key, the shared turns are the prompt
  assert.deepEqual(
    normaliseRow("preference", { chosen: [u("Q"), a("good")], rejected: [u("Q"), a("bad")] }),
    want,
  );
  // multi-turn: the shared prefix is cut after the last shared user message
  assert.deepEqual(
    normaliseRow("preference", {
      chosen: [s("sys"), u("Q1"), a("A1"), u("Q2"), a("good")],
      rejected: [s("sys"), u("Q1"), a("A1"), u("Q2"), a("bad"), u("more?"), a("no")],
    }),
    {
      kind: "preference",
      prompt: [s("sys"), u("Q1"), a("A1"), u("Q2")],
      chosen: [a("good")],
      rejected: [a("bad"), u("more?"), a("no")],
    },
  );
  // a list prompt with the conversations holding only the replies
  assert.deepEqual(
    normaliseRow("preference", { prompt: [u("Q")], chosen: [a("good")], rejected: [a("bad")] }),
    want,
  );
});

Deno.test("normaliseRow() rejects preference rows without a prompt, with equal replies, or out of turn", () => {
  assert.equal(
    problem("preference", { chosen: "good", rejected: "bad" }),
    "prompt: is missing, and chosen and rejected share no turns that could be the prompt",
  );
  assert.equal(
    problem("preference", { prompt: "Q", chosen: "same", rejected: "same" }),
    "rejected: is identical to chosen",
  );
  assert.equal(
    problem("preference", { prompt: "Q", chosen: [u("other"), a("x")], rejected: "bad" }),
    'chosen[0].role: expected "assistant" after a "user" message, got "user"',
  );
  assert.equal(
    problem("preference", { prompt: [u("Q"), a("A")], chosen: "c", rejected: "r" }),
    'prompt: ends with an "assistant" message; the last message must be "user"',
  );
  assert.equal(problem("preference", { prompt: "Q", chosen: "", rejected: "r" }), "chosen: is empty");
  assert.equal(
    problem("preference", { prompt: "Q", chosen: 5, rejected: "r" }),
    "chosen: expected a string or a list of messages, got a number",
  );
});

Deno.test("normaliseRow() checks roles, turn order and content of conversations", () => {
  const bad = (messages: unknown) => problem("messages", { messages });
  assert.equal(
    bad([u("hi"), { role: "bot", content: "x" }]),
    'messages[1].role: "bot" is not one of "system", "user", "assistant"',
  );
  assert.equal(
    bad([u("hi"), u("again"), a("x")]),
    'messages[1].role: expected "assistant" after a "user" message, got "user"',
  );
  assert.equal(
    bad([a("first"), u("x")]),
    'messages[0].role: expected "user" as the first turn, got "assistant"',
  );
  assert.equal(
    bad([u("hi"), a("yo"), u("bye")]),
    'messages: ends with a "user" message; the last message must be "assistant"',
  );
  assert.equal(bad([u("hi"), a("  ")]), "messages[1].content: is empty");
  assert.equal(
    bad([u("hi"), { role: "assistant", content: null }]),
    "messages[1].content: expected a string, got null",
  );
  assert.equal(bad([u("hi"), { role: "assistant" }]), "messages[1].content: is missing");
  assert.equal(
    bad([u("hi"), s("late"), a("x")]),
    'messages[1].role: a "system" message is only allowed first',
  );
  assert.equal(bad([]), "messages: has no messages");
  assert.equal(bad("hi"), "messages: expected a list of messages, got a string");
  assert.equal(bad([u("hi"), "yo"]), "messages[1]: expected a message object, got a string");
  assert.equal(
    problem("messages", { text: "x" }),
    'messages: is missing (format "messages" reads "messages" or "conversations")',
  );
});

Deno.test("normaliseRow() prepends the system prompt only where a conversation has none", () => {
  assert.deepEqual(
    normaliseRow("messages", { messages: [u("hi"), a("yo")] }, { systemPrompt: "be kind" }),
    { kind: "sft", messages: [s("be kind"), u("hi"), a("yo")] },
  );
  assert.deepEqual(
    normaliseRow("messages", { messages: [s("own"), u("hi"), a("yo")] }, { systemPrompt: "be kind" }),
    { kind: "sft", messages: [s("own"), u("hi"), a("yo")] },
  );
  const pref = normaliseRow("preference", { prompt: "Q", chosen: "c", rejected: "r" }, {
    systemPrompt: "be kind",
  });
  assert.deepEqual(pref.kind === "preference" && pref.prompt, [s("be kind"), u("Q")]);
});

Deno.test("exampleId() hashes the canonical content; exampleLine() writes keys in fixed order", () => {
  const ex: Example = {
    kind: "sft",
    messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "yo" }],
  };
  const canonical = '{"messages":[{"content":"hi","role":"user"},{"content":"yo","role":"assistant"}]}';
  const id = createHash("sha256").update(canonical).digest("hex").slice(0, 16);
  assert.equal(exampleId(ex), id);
  assert.equal(
    exampleLine(ex, id, "a.jsonl:3"),
    `{"id":"${id}","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],"source":"a.jsonl:3"}`,
  );
  const pref: Example = {
    kind: "preference",
    prompt: [{ role: "user", content: "Q" }],
    chosen: [],
    rejected: [],
  };
  assert.deepEqual(Object.keys(JSON.parse(exampleLine(pref, "x", "s"))), [
    "id",
    "prompt",
    "chosen",
    "rejected",
    "source",
  ]);
  assert.equal(
    exampleLine({ kind: "text", text: "é" }, "x", "t.csv:row 2"),
    '{"id":"x","text":"é","source":"t.csv:row 2"}',
  );
});
