import assert from "node:assert/strict";
import { join } from "node:path";
import { runStep } from "../../steps/runner.ts";
import { rerunFromManifest } from "../../steps/rerun.ts";
import { loadStep } from "../../steps/registry.ts";
import { parseOverride } from "../../steps/overrides.ts";
import { LatheError } from "../../foundation/errors.ts";
import { step, TokenizeConfig } from "../../steps/tokenize.ts";
import { ShardReader, type ShardRow } from "../../steps/tokenize/shards.ts";
import { fakePrepare, ROOT, syntheticChats, writeJsonl } from "./tokenize/_fixtures.ts";

interface Setup {
  dir: string;
  runs: string;
}

async function withPrepared(
  kind: string,
  train: unknown[],
  evalRows: unknown[] | null,
  body: (s: Setup) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    const runs = join(dir, "runs");
    await writeJsonl(join(dir, "train.jsonl"), train);
    if (evalRows) await writeJsonl(join(dir, "eval.jsonl"), evalRows);
    await runStep(fakePrepare, {
      runsRoot: runs,
      runId: "r1",
      recipe: null,
      config: { train: join(dir, "train.jsonl"), eval: evalRows ? join(dir, "eval.jsonl") : null, kind },
      seed: 1,
      projectRoot: ROOT,
      quiet: true,
    });
    await body({ dir, runs });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function tokenize(s: Setup, config: Record<string, unknown>, runId = "r1") {
  return runStep(step, {
    runsRoot: s.runs,
    runId,
    recipe: null,
    config,
    seed: 1,
    projectRoot: ROOT,
    quiet: true,
  });
}

const shaOf = (outputs: Record<string, { sha256: string }>) =>
  Object.fromEntries(Object.entries(outputs).map(([k, v]) => [k, v.sha256]));

Deno.test("tokenize config fills documented defaults", () => {
  assert.deepEqual(TokenizeConfig.parse({ tokenizer: "t" }), {
    tokenizer: "t",
    revision: "main",
    max_seq_len: 2048,
    train_on: "completions",
    overlong: "drop",
    packing: true,
    chat_template: null,
    workers: 0,
    shard_tokens: 1 << 26,
    add_special_tokens: [],
  });
  assert.throws(() => TokenizeConfig.parse({ tokenizer: "t", trainon: "all" }));
});

Deno.test("tokenize step writes shards, index and metrics for train and eval", async () => {
  await withPrepared("sft", syntheticChats(300), syntheticChats(20), async (s) => {
    const out = await tokenize(s, { tokenizer: "data/demo/tokenizer", max_seq_len: 256, workers: 2 });
    assert.equal(out.status, "ran");
    const m = out.manifest;
    assert.ok(m.sources.tokenizer_json.path.endsWith("data/demo/tokenizer/tokenizer.json"));
    assert.deepEqual(Object.keys(m.outputs).sort(), [
      "eval",
      "eval/docs-00000.bin",
      "eval/mask-00000.bin",
      "eval/tokens-00000.bin",
      "train",
      "train/docs-00000.bin",
      "train/mask-00000.bin",
      "train/tokens-00000.bin",
    ]);
    const reader = await ShardReader.open(join(s.runs, "r1", "tokenize", m.outputs.train.path));
    assert.equal(reader.index.rows, m.metrics.rows);
    assert.equal(reader.index.trained_tokens, m.metrics.trained_tokens);
    assert.equal(reader.index.seq_len, 256);
    assert.equal(reader.index.vocab_size, 512);
    assert.equal(reader.index.pad_id, 509);
    assert.equal(m.metrics.input_rows, 300);
    assert.equal(m.metrics.documents, 300);
    assert.equal(m.metrics.eval_input_rows, 20);
    assert.equal(m.metrics.overlong_rows, 0);
    const eff = m.metrics.packing_efficiency as number;
    assert.ok(eff > 0.8 && eff <= 1, `packing efficiency ${eff}`);
    const masked = m.metrics.masked_fraction as number;
    assert.ok(masked > 0 && masked < 1);
    for (const k of ["doc_len_p50", "doc_len_p90", "doc_len_p99", "doc_len_max", "tokens_per_s"]) {
      assert.equal(typeof m.metrics[k], "number", k);
    }
    assert.ok((m.metrics.doc_len_p50 as number) <= (m.metrics.doc_len_max as number));
    // Unchanged inputs and config: a cache hit.
    assert.equal(
      (await tokenize(s, { tokenizer: "data/demo/tokenizer", max_seq_len: 256, workers: 2 })).status,
      "cached",
    );
  });
});

Deno.test("rerunning from the manifest gives the same sha256 for every output, with 1 or 2 workers", async () => {
  await withPrepared("sft", syntheticChats(2500), null, async (s) => {
    const first = await tokenize(s, { tokenizer: "data/demo/tokenizer", max_seq_len: 512, workers: 2 });
    const again = await rerunFromManifest(first.manifestPath, {
      overrides: [],
      projectRoot: ROOT,
      quiet: true,
      loadStep,
    });
    assert.deepEqual(shaOf(again.manifest.outputs), shaOf(first.manifest.outputs));
    const one = await rerunFromManifest(first.manifestPath, {
      overrides: [parseOverride("workers=1")],
      projectRoot: ROOT,
      quiet: true,
      loadStep,
    });
    assert.equal(one.status, "ran");
    assert.equal(one.manifest.config.workers, 1);
    assert.deepEqual(shaOf(one.manifest.outputs), shaOf(first.manifest.outputs));
  });
});

Deno.test("preference data is stored as unpacked chosen/rejected pairs", async () => {
  const rows = Array.from({ length: 10 }, (_, i) => ({
    id: `p${i}`,
    prompt: [{ role: "user", content: `Ship ${i} mugs` }],
    chosen: [{ role: "assistant", content: `{"quantity":${i}}` }],
    rejected: [{ role: "assistant", content: `{"quantity":${i + 1}}` }],
    source: `pref.jsonl:${i + 1}`,
  }));
  await withPrepared("preference", rows, null, async (s) => {
    const out = await tokenize(s, { tokenizer: "data/demo/tokenizer", max_seq_len: 256, workers: 1 });
    const reader = await ShardReader.open(join(s.runs, "r1", "tokenize", "train", "index.json"));
    assert.deepEqual([reader.index.paired, reader.index.packed, reader.index.rows], [true, false, 20]);
    assert.equal(out.manifest.metrics.kind, "preference");
    const all: ShardRow[] = [];
    for await (const row of reader.rows()) all.push(row);
    for (let i = 0; i < 10; i++) {
      const [c, r] = [all[2 * i], all[2 * i + 1]];
      assert.equal(c.bounds.length, 2);
      const promptLen = c.mask.indexOf(1);
      assert.deepEqual([...c.tokens.subarray(0, promptLen)], [...r.tokens.subarray(0, promptLen)]);
      assert.notDeepEqual([...c.tokens], [...r.tokens]);
    }
  });
});

Deno.test("text data trains on every token and appends EOS", async () => {
  const rows = [{ id: "t1", text: "Hello there.", source: "t.jsonl:1" }, {
    id: "t2",
    text: "Bye.",
    source: "t.jsonl:2",
  }];
  await withPrepared("text", rows, null, async (s) => {
    await tokenize(s, { tokenizer: "data/demo/tokenizer", max_seq_len: 64, workers: 1 });
    const reader = await ShardReader.open(join(s.runs, "r1", "tokenize", "train", "index.json"));
    const row = (await reader.rows().next()).value as ShardRow;
    assert.equal(row.bounds.length, 3);
    for (let d = 0; d < 2; d++) {
      const [a, b] = [row.bounds[d], row.bounds[d + 1]];
      assert.equal(row.tokens[b - 1], 511, "EOS ends each document");
      assert.deepEqual([...row.mask.subarray(a, b)], [0, ...Array(b - a - 1).fill(1)]);
    }
  });
});

Deno.test("tokenize explains a missing tokenizer and an unknown data kind", async () => {
  await withPrepared("sft", syntheticChats(3), null, async (s) => {
    await assert.rejects(
      () => tokenize(s, { tokenizer: "no/such/dir" }),
      (e: unknown) => e instanceof LatheError && /tokenizer\.json" is missing/.test(e.message),
    );
  });
  await withPrepared("audio", syntheticChats(3), null, async (s) => {
    await assert.rejects(
      () => tokenize(s, { tokenizer: "data/demo/tokenizer", workers: 1 }),
      (e: unknown) => e instanceof LatheError && e.message.includes(`metrics.kind is "audio"`),
    );
  });
});

Deno.test("the demo data goes through the real prepare step and tokenize", async () => {
  const { step: prepare } = await import("../../steps/prepare.ts");
  const dir = await Deno.makeTempDir();
  try {
    const runs = join(dir, "runs");
    const common = { runsRoot: runs, runId: "demo", recipe: null, seed: 7, projectRoot: ROOT, quiet: true };
    for (
      const [source, kind] of [["data/demo/sft.jsonl", "sft"], ["data/demo/preference.jsonl", "preference"]]
    ) {
      const runId = `demo-${kind}`;
      await runStep(prepare, { ...common, runId, config: { sources: [source] } });
      const out = await runStep(step, {
        ...common,
        runId,
        config: { tokenizer: "data/demo/tokenizer", max_seq_len: 256, workers: 2 },
      });
      assert.equal(out.manifest.metrics.kind, kind);
      assert.ok((out.manifest.metrics.trained_tokens as number) > 0);
      assert.ok((out.manifest.metrics.eval_rows as number) > 0);
      const reader = await ShardReader.open(join(runs, runId, "tokenize", "train", "index.json"));
      assert.equal(reader.index.paired, kind === "preference");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
