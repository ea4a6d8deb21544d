import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { DuckDBInstance } from "@duckdb/node-api";
import { LatheError } from "../../foundation/errors.ts";
import { readManifest } from "../../foundation/manifest.ts";
import { step } from "../../steps/prepare.ts";
import { type RunOutcome, runStep, verifyOutputs } from "../../steps/runner.ts";
import { demoDatasets } from "../../scripts/make_demo_data.ts";
import { COMMIT, writeCachedDataset } from "../fixtures/prepare/hf_cache.ts";

interface Project {
  root: string;
  runs: string;
  write(path: string, text: string): Promise<void>;
}

async function withProject(body: (p: Project) => Promise<void>): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "lathe-prepare-" });
  const project: Project = {
    root,
    runs: join(root, "runs"),
    async write(path, text) {
      await Deno.mkdir(join(root, path, ".."), { recursive: true });
      await Deno.writeTextFile(join(root, path), text);
    },
  };
  try {
    await body(project);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

function prepare(
  p: Project,
  config: Record<string, unknown>,
  runId = "run-a",
  seed = 42,
): Promise<RunOutcome> {
  return runStep(step, {
    runsRoot: p.runs,
    runId,
    recipe: null,
    config,
    seed,
    projectRoot: p.root,
    quiet: true,
  });
}

async function readJsonl(path: string): Promise<Record<string, unknown>[]> {
  const text = await Deno.readTextFile(path);
  return text.split("\n").filter((l) => l !== "").map((l) => JSON.parse(l));
}

async function outputs(
  outcome: RunOutcome,
): Promise<{ train: Record<string, unknown>[]; eval: Record<string, unknown>[] }> {
  const dir = join(outcome.manifestPath, "..");
  return { train: await readJsonl(join(dir, "train.jsonl")), eval: await readJsonl(join(dir, "eval.jsonl")) };
}

const jsonl = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).join("\n") + "\n";
const chat = (q: string, a: string) => ({
  messages: [{ role: "user", content: q }, { role: "assistant", content: a }],
});
const sha256 = (text: string) => createHash("sha256").update(text).digest("hex");
/** The split rule, written out independently: sha256(seed:id) as a fraction < eval_fraction. */
const inEval = (seed: number, id: string, fraction: number) =>
  parseInt(sha256(`${seed}:${id}`).slice(0, 13), 16) / 2 ** 52 < fraction;

async function writeParquet(path: string, selectSql: string): Promise<void> {
  const instance = await DuckDBInstance.create(":memory:");
  const connection = await instance.connect();
  try {
    await connection.run(`COPY (${selectSql}) TO '${path}' (FORMAT parquet)`);
  } finally {
    connection.closeSync();
    instance.closeSync();
  }
}

Deno.test("prepare() writes canonical train and eval JSONL from mixed sft formats, with stats and metrics", async () => {
  await withProject(async (p) => {
    await p.write("data/chat.jsonl", jsonl([chat("hi", "hello"), chat("2+2?", "4")]));
    await p.write("data/alpaca.csv", 'instruction,input,output\nTranslate.,chat,cat\n"Say ""hi"".",,hi\n');
    await writeParquet(
      join(p.root, "data/pc.parquet"),
      "SELECT 'capital of France?' AS prompt, 'Paris' AS completion",
    );
    const outcome = await prepare(p, {
      sources: ["data/chat.jsonl", "data/alpaca.csv", { path: "data/pc.parquet" }],
      eval_fraction: 0.5,
    });
    assert.equal(outcome.status, "ran");
    const { train, eval: evalRows } = await outputs(outcome);
    const want = [
      { source: "data/chat.jsonl:1", messages: [["user", "hi"], ["assistant", "hello"]] },
      { source: "data/chat.jsonl:2", messages: [["user", "2+2?"], ["assistant", "4"]] },
      { source: "data/alpaca.csv:row 1", messages: [["user", "Translate.\n\nchat"], ["assistant", "cat"]] },
      { source: "data/alpaca.csv:row 2", messages: [["user", 'Say "hi".'], ["assistant", "hi"]] },
      { source: "data/pc.parquet:row 1", messages: [["user", "capital of France?"], ["assistant", "Paris"]] },
    ].map((w) => {
      const messages = w.messages.map(([role, content]) => ({ role, content }));
      const canonical = JSON.stringify({
        messages: messages.map(({ role, content }) => ({ content, role })),
      });
      return { id: sha256(canonical).slice(0, 16), messages, source: w.source };
    });
    for (const row of [...train, ...evalRows]) {
      assert.deepEqual(Object.keys(row), ["id", "messages", "source"]);
    }
    assert.deepEqual(train, want.filter((w) => !inEval(42, w.id, 0.5)));
    assert.deepEqual(evalRows, want.filter((w) => inEval(42, w.id, 0.5)));

    const m = outcome.manifest;
    assert.deepEqual(Object.keys(m.outputs).sort(), ["eval", "stats", "train"]);
    assert.deepEqual(Object.keys(m.sources), ["data/chat.jsonl", "data/alpaca.csv", "data/pc.parquet"]);
    assert.equal(
      m.sources["data/chat.jsonl"].sha256,
      sha256(await Deno.readTextFile(join(p.root, "data/chat.jsonl"))),
    );
    assert.equal(m.metrics.kind, "sft");
    assert.equal(m.metrics.rows_in, 5);
    assert.equal(m.metrics.rows_out, 5);
    assert.equal(m.metrics.train_rows, train.length);
    assert.equal(m.metrics.eval_rows, evalRows.length);
    assert.equal(m.metrics.duplicates, 0);
    assert.equal(m.metrics.bad_rows, 0);
    assert.equal(m.metrics.chars_user_max, "capital of France?".length);
    assert.equal(m.metrics.chars_assistant_p50, 3); // nearest rank: lengths 1 2 [3] 5 5
    assert.equal(m.metrics.chars_assistant_mean, (5 + 1 + 3 + 2 + 5) / 5);
    assert.equal(m.metrics.turns_mean, 1);
    const stats = JSON.parse(await Deno.readTextFile(join(outcome.manifestPath, "../stats.json")));
    assert.deepEqual(stats.sources.map((s: { files: { format: string }[] }) => s.files[0].format), [
      "messages",
      "alpaca",
      "prompt_response",
    ]);
    assert.deepEqual(stats.lengths.assistant, { count: 5, mean: 3.2, p50: 3, p95: 5, max: 5 });
  });
});

Deno.test("prepare() names the file and line of a malformed JSONL row, leaves failure.json and keeps earlier outputs", async () => {
  await withProject(async (p) => {
    await p.write("data/a.jsonl", jsonl([chat("q1", "a1"), chat("q2", "a2"), chat("q3", "a3")]));
    const good = await prepare(p, { sources: ["data/a.jsonl"] }, "run-a");
    const before = await Deno.readTextFile(join(good.manifestPath, "../train.jsonl"));
    await p.write("data/a.jsonl", jsonl([chat("q1", "a1")]) + '{"messages": [\n' + jsonl([chat("q3", "a3")]));

    for (const runId of ["run-b", "run-a"]) {
      await assert.rejects(
        () => prepare(p, { sources: ["data/a.jsonl"] }, runId),
        (e: Error) =>
          e instanceof LatheError &&
          e.message.startsWith('Cannot prepare "data/a.jsonl:2": is not valid JSON'),
      );
      const failure = await readManifest(join(p.runs, runId, "prepare", "failure.json"));
      assert.equal(failure.status, "failed");
      assert.match(failure.error ?? "", /data\/a\.jsonl:2/);
    }
    // the fresh run has no manifest claiming success and no staging leftovers
    const left = [...Deno.readDirSync(join(p.runs, "run-b"))].map((e) => e.name);
    assert.deepEqual(left, ["prepare"]);
    assert.deepEqual([...Deno.readDirSync(join(p.runs, "run-b", "prepare"))].map((e) => e.name), [
      "failure.json",
    ]);
    // the earlier success is untouched
    const kept = await readManifest(good.manifestPath);
    assert.equal(kept.status, "success");
    assert.equal(kept.key, good.manifest.key);
    assert.deepEqual(await verifyOutputs(kept, join(good.manifestPath, "..")), []);
    assert.equal(await Deno.readTextFile(join(good.manifestPath, "../train.jsonl")), before);
  });
});

Deno.test("prepare() names file, row and field of a bad row", async () => {
  await withProject(async (p) => {
    await p.write("data/a.csv", "instruction,output\nAdd 1 and 2.,3\nSay hi.,\n");
    await assert.rejects(
      () => prepare(p, { sources: ["data/a.csv"] }),
      (e: Error) =>
        e instanceof LatheError && e.message === 'Cannot prepare "data/a.csv:row 2": output: is missing' &&
        /on_bad_rows/.test((e as LatheError).hint ?? ""),
    );
    await p.write("data/b.jsonl", jsonl([chat("q", "a"), { messages: [{ role: "user", content: "q" }] }]));
    await assert.rejects(
      () => prepare(p, { sources: ["data/b.jsonl"] }),
      (e: Error) =>
        e.message ===
          'Cannot prepare "data/b.jsonl:2": messages: ends with a "user" message; the last message must be "assistant"',
    );
    await p.write(
      "data/c.json",
      JSON.stringify([{ messages: [{ role: "user", content: "q" }, { role: "robot", content: "a" }] }]),
    );
    await assert.rejects(
      () => prepare(p, { sources: ["data/c.json"] }),
      (e: Error) =>
        e.message ===
          'Cannot prepare "data/c.json:row 1": messages[1].role: "robot" is not one of "system", "user", "assistant"',
    );
  });
});

Deno.test("prepare() with on_bad_rows: skip counts bad rows and lists the first ones in stats.json", async () => {
  await withProject(async (p) => {
    await p.write(
      "data/a.jsonl",
      [
        "not json",
        JSON.stringify({ question: "?" }),
        JSON.stringify(chat("q1", "a1")),
        JSON.stringify({ messages: [{ role: "user", content: "q2" }, { role: "assistant", content: "" }] }),
        JSON.stringify(chat("q3", "a3")),
      ].join("\n") + "\n",
    );
    const outcome = await prepare(p, { sources: ["data/a.jsonl"], on_bad_rows: "skip", eval_fraction: 0 });
    assert.equal(outcome.manifest.metrics.bad_rows, 3);
    assert.equal(outcome.manifest.metrics.rows_in, 5);
    assert.equal(outcome.manifest.metrics.rows_out, 2);
    const { train } = await outputs(outcome);
    assert.deepEqual(train.map((r) => r.source), ["data/a.jsonl:3", "data/a.jsonl:5"]);
    const stats = JSON.parse(await Deno.readTextFile(join(outcome.manifestPath, "../stats.json")));
    assert.deepEqual(stats.bad_row_examples.map((b: { where: string }) => b.where), [
      "data/a.jsonl:1",
      "data/a.jsonl:2",
      "data/a.jsonl:4",
    ]);
    assert.equal(stats.bad_row_examples[2].error, "messages[1].content: is empty");
    // nothing valid at all is still an error
    await p.write("data/b.jsonl", "nope\n");
    await assert.rejects(
      () => prepare(p, { sources: ["data/b.jsonl"], on_bad_rows: "skip" }, "run-b"),
      (e: Error) => e.message.startsWith("Cannot prepare: no rows left (1 read, 1 bad"),
    );
  });
});

Deno.test("prepare() drops rows that are equal after normalisation, keeping the first, unless dedupe is off", async () => {
  await withProject(async (p) => {
    await p.write("data/a.jsonl", jsonl([chat("Say hi.", "hi"), chat("other", "x"), chat("Say hi.", "hi")]));
    await p.write("data/b.json", JSON.stringify([{ instruction: "Say hi.", input: "", output: "hi" }]));
    const config = { sources: ["data/a.jsonl", "data/b.json"], eval_fraction: 0 };
    const deduped = await prepare(p, config, "run-a");
    assert.equal(deduped.manifest.metrics.duplicates, 2);
    assert.deepEqual((await outputs(deduped)).train.map((r) => r.source), [
      "data/a.jsonl:1",
      "data/a.jsonl:2",
    ]);
    const kept = await prepare(p, { ...config, dedupe: false }, "run-b");
    assert.equal(kept.manifest.metrics.duplicates, 0);
    const rows = (await outputs(kept)).train;
    assert.deepEqual(rows.map((r) => r.source), [
      "data/a.jsonl:1",
      "data/a.jsonl:2",
      "data/a.jsonl:3",
      "data/b.json:row 1",
    ]);
    assert.equal(rows[0].id, rows[3].id);
  });
});

Deno.test("prepare() splits by a seeded hash: stable when rows are added, different under another seed", async () => {
  await withProject(async (p) => {
    const rows = Array.from({ length: 300 }, (_, i) => chat(`question ${i}`, `answer ${i}`));
    await p.write("data/a.jsonl", jsonl(rows.slice(0, 200)));
    const first = await outputs(await prepare(p, { sources: ["data/a.jsonl"] }, "run-a"));
    // new rows before and after the old ones
    await p.write("data/a.jsonl", jsonl([...rows.slice(250), ...rows.slice(0, 250)]));
    const second = await outputs(await prepare(p, { sources: ["data/a.jsonl"] }, "run-b"));
    const evalIds = (o: typeof first) => new Set(o.eval.map((r) => r.id as string));
    const before = evalIds(first);
    const after = evalIds(second);
    for (const row of [...first.train, ...first.eval]) {
      assert.equal(after.has(row.id as string), before.has(row.id as string), `row ${row.source} moved`);
    }
    assert.ok(before.size > 5 && before.size < 40, `eval rows ${before.size}`);
    for (const row of [...second.train, ...second.eval]) {
      assert.equal(inEval(42, row.id as string, 0.1), after.has(row.id as string));
    }
    // output keeps input order
    const order = (o: typeof first) => o.train.map((r) => Number(String(r.source).split(":")[1]));
    assert.deepEqual(order(second), [...order(second)].sort((a, b) => a - b));
    const reseeded = await outputs(await prepare(p, { sources: ["data/a.jsonl"], split_seed: 7 }, "run-c"));
    assert.notDeepEqual(evalIds(reseeded), after);
  });
});

Deno.test("prepare() refuses to mix sft and preference sources", async () => {
  await withProject(async (p) => {
    await p.write("data/sft.jsonl", jsonl([chat("q", "a")]));
    await p.write("data/pref.jsonl", jsonl([{ prompt: "q", chosen: "good", rejected: "bad" }]));
    await assert.rejects(
      () => prepare(p, { sources: ["data/sft.jsonl", "data/pref.jsonl"] }),
      (e: Error) =>
        e.message === 'Cannot prepare "data/pref.jsonl:1": it is a preference row (format "preference"), ' +
            'but "data/sft.jsonl:1" is a sft row; one dataset holds one kind',
    );
  });
});

Deno.test("prepare() writes preference rows with message lists and preference stats", async () => {
  await withProject(async (p) => {
    await p.write(
      "data/pref.jsonl",
      jsonl([
        { prompt: "Q1", chosen: "good", rejected: "bad" },
        {
          chosen: [{ role: "user", content: "Q2" }, { role: "assistant", content: "yes" }],
          rejected: [{ role: "user", content: "Q2" }, { role: "assistant", content: "no" }],
        },
      ]),
    );
    const outcome = await prepare(p, {
      sources: ["data/pref.jsonl"],
      eval_fraction: 0,
      system_prompt: "Be terse.",
    });
    const { train } = await outputs(outcome);
    assert.deepEqual(
      train.map((r) => Object.keys(r)),
      [0, 1].map(() => ["id", "prompt", "chosen", "rejected", "source"]),
    );
    assert.deepEqual(train[1].prompt, [{ role: "system", content: "Be terse." }, {
      role: "user",
      content: "Q2",
    }]);
    assert.deepEqual(train[1].chosen, [{ role: "assistant", content: "yes" }]);
    assert.equal(outcome.manifest.metrics.kind, "preference");
    assert.equal(outcome.manifest.metrics.chars_chosen_max, 4);
    assert.equal(outcome.manifest.metrics.chars_rejected_max, 3);
  });
});

Deno.test("prepare() caps eval rows at eval_max, stops at max_rows, and weights sources", async () => {
  await withProject(async (p) => {
    const rows = Array.from({ length: 400 }, (_, i) => chat(`q${i}`, `a${i}`));
    await p.write("data/a.jsonl", jsonl(rows));
    const capped = await prepare(p, { sources: ["data/a.jsonl"], eval_fraction: 0.5, eval_max: 10 }, "run-a");
    assert.equal(capped.manifest.metrics.eval_rows, 10);
    assert.equal(capped.manifest.metrics.train_rows, 390);
    const short = await prepare(p, { sources: ["data/a.jsonl"], max_rows: 25 }, "run-b");
    assert.equal(short.manifest.metrics.rows_in, 25);
    assert.equal(short.manifest.metrics.rows_out, 25);

    await p.write("data/b.jsonl", jsonl(Array.from({ length: 10 }, (_, i) => chat(`extra ${i}`, "x"))));
    const weighted = await prepare(p, {
      sources: [{ path: "data/a.jsonl", weight: 0.5 }, { path: "data/b.jsonl", weight: 3 }],
      eval_fraction: 0,
    }, "run-c");
    const { train } = await outputs(weighted);
    const fromB = train.filter((r) => String(r.source).startsWith("data/b.jsonl"));
    assert.equal(fromB.length, 30);
    assert.deepEqual(fromB.slice(0, 3).map((r) => r.source), [
      "data/b.jsonl:1",
      "data/b.jsonl:1",
      "data/b.jsonl:1",
    ]);
    const fromA = train.length - fromB.length;
    assert.ok(fromA > 160 && fromA < 240, `kept ${fromA} of 400`);
    assert.equal(weighted.manifest.metrics.dropped_by_weight, 400 - fromA);
  });
});

Deno.test("prepare() is a cache hit for unchanged sources and reruns when a source changes", async () => {
  await withProject(async (p) => {
    await p.write("data/a.jsonl", jsonl([chat("q1", "a1"), chat("q2", "a2")]));
    const first = await prepare(p, { sources: ["data/a.jsonl"] });
    assert.equal((await prepare(p, { sources: ["data/a.jsonl"] })).status, "cached");
    await p.write("data/a.jsonl", jsonl([chat("q1", "a1"), chat("q2", "a2"), chat("q3", "a3")]));
    const third = await prepare(p, { sources: ["data/a.jsonl"] });
    assert.equal(third.status, "ran");
    assert.notEqual(third.manifest.key, first.manifest.key);
  });
});

Deno.test("prepare() reads a Hub dataset from the Hugging Face cache offline and hashes the snapshot file", async () => {
  await withProject(async (p) => {
    const saved = { HF_HOME: Deno.env.get("HF_HOME"), HF_HUB_OFFLINE: Deno.env.get("HF_HUB_OFFLINE") };
    const hfHome = await Deno.makeTempDir({ prefix: "lathe-hf-home-" });
    const train = jsonl([{ text: "first document" }, { text: "second document" }]);
    Deno.env.set("HF_HOME", hfHome);
    Deno.env.set("HF_HUB_OFFLINE", "1");
    try {
      await assert.rejects(
        () => prepare(p, { sources: [{ hub: "acme/notes" }] }, "run-a"),
        (e: Error) =>
          e instanceof LatheError &&
          e.message.includes('dataset "acme/notes" (revision "main") in the Hugging Face cache'),
      );
      const snapshot = await writeCachedDataset(join(hfHome, "hub"), "acme/notes", {
        "train.jsonl": train,
        "test.jsonl": jsonl([{ text: "held out" }]),
      });
      const outcome = await prepare(p, { sources: [{ hub: "acme/notes" }], eval_fraction: 0 }, "run-b");
      const label = "hf://datasets/acme/notes@main/train.jsonl";
      assert.deepEqual(Object.keys(outcome.manifest.sources), [label]);
      assert.equal(outcome.manifest.sources[label].path, join(snapshot, "train.jsonl"));
      assert.equal(outcome.manifest.sources[label].sha256, sha256(train));
      assert.ok(snapshot.includes(COMMIT));
      const rows = (await outputs(outcome)).train;
      assert.deepEqual(rows.map((r) => [r.text, r.source]), [
        ["first document", `${label}:1`],
        ["second document", `${label}:2`],
      ]);
      assert.equal(outcome.manifest.metrics.kind, "text");
    } finally {
      for (const [k, v] of Object.entries(saved)) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
      await Deno.remove(hfHome, { recursive: true });
    }
  });
});

Deno.test("the demo datasets match their generator and prepare without bad rows or duplicates", async () => {
  const root = new URL("../../", import.meta.url).pathname;
  const generated = demoDatasets();
  for (const [name, text] of Object.entries(generated)) {
    const committed = await Deno.readFile(join(root, "data/demo", name));
    const limit = name === "corpus.jsonl" ? 2_000_000 : 1_000_000;
    assert.ok(committed.length < limit, `${name} is ${committed.length} bytes`);
    assert.deepEqual(
      committed,
      new TextEncoder().encode(text),
      `data/demo/${name} differs from scripts/make_demo_data.ts`,
    );
  }
  const sft = generated["sft.jsonl"].trimEnd().split("\n").map((l) => JSON.parse(l));
  assert.equal(sft.length, 2000);
  assert.ok(sft.filter((r) => r.messages[0].role === "system").length > 100);
  assert.ok(sft.filter((r) => r.messages.length >= 4).length > 30);
  await withProject(async (p) => {
    await p.write("data/demo/sft.jsonl", generated["sft.jsonl"]);
    await p.write("data/demo/preference.jsonl", generated["preference.jsonl"]);
    const a = await prepare(p, { sources: ["data/demo/sft.jsonl"] }, "run-a");
    assert.deepEqual([
      a.manifest.metrics.rows_out,
      a.manifest.metrics.bad_rows,
      a.manifest.metrics.duplicates,
    ], [2000, 0, 0]);
    const b = await prepare(p, { sources: ["data/demo/preference.jsonl"] }, "run-b");
    assert.deepEqual([b.manifest.metrics.rows_out, b.manifest.metrics.kind], [600, "preference"]);
    // each rejected answer is a wrong extraction, never the chosen one
    for (const row of (await outputs(b)).train) assert.notDeepEqual(row.chosen, row.rejected);
  });
});
