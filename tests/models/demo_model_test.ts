import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { sha256File } from "../../foundation/hash.ts";
import { loadModelConfig } from "../../formats/model_config.ts";
import { TINY_SIZES } from "../../kernels/models/tiny.ts";
import { loadTokenizer } from "../../steps/tokenize/tokenizer.ts";
import {
  DEMO_INIT,
  pretrainDemoBase,
  type PretrainingRecord,
  recipeHash,
  recordDifferences,
} from "../../scripts/make_demo_model.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const DEMO = join(ROOT, "data/demo/model");
const REGENERATE = "regenerate it: deno run -A scripts/make_demo_model.ts";

Deno.test("data/demo/model is what recipes/demo-base.yaml made from the corpus, as pretraining.json records", async () => {
  const record = JSON.parse(await Deno.readTextFile(join(DEMO, "pretraining.json"))) as PretrainingRecord;
  assert.equal(
    record.recipe_sha256,
    await recipeHash(ROOT),
    `recipes/demo-base.yaml changed since: ${REGENERATE}`,
  );
  assert.equal(
    record.corpus_sha256,
    (await sha256File(join(ROOT, "data/demo/corpus.jsonl"))).sha256,
    `data/demo/corpus.jsonl changed since: ${REGENERATE}`,
  );
  assert.deepEqual(record.init, DEMO_INIT);
  assert.deepEqual(record.overrides, [], "the committed model ran the recipe as written");
  const names = [...Deno.readDirSync(DEMO)].map((e) => e.name).filter((n) => n !== "pretraining.json").sort();
  assert.deepEqual(names, Object.keys(record.files).sort());
  for (const name of names) {
    assert.equal((await sha256File(join(DEMO, name))).sha256, record.files[name], `data/demo/model/${name}`);
  }
  // It learned: the recorded eval loss fell far below the random init's ln(512) ≈ 6.24.
  assert.ok((record.metrics.eval_loss_before as number) > 6);
  assert.ok((record.metrics.eval_loss as number) < 1, `eval loss ${record.metrics.eval_loss}`);
  const config = await loadModelConfig(DEMO);
  assert.equal(config.vocabSize, 512);
  assert.equal(config.hiddenSize, TINY_SIZES[DEMO_INIT.size].hidden);
  assert.equal(config.numLayers, TINY_SIZES[DEMO_INIT.size].layers);
});

Deno.test("regenerating the demo base is deterministic: two short pretrainings give the same bytes", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "lathe-demo-base-" });
  try {
    const short = [
      "train-sft.max_steps=2",
      "train-sft.per_device_train_batch_size=2",
      "train-sft.warmup_steps=1",
      "prepare.eval_max=4",
    ];
    const records: PretrainingRecord[] = [];
    for (const run of ["a", "b"]) {
      records.push(
        await pretrainDemoBase({
          projectRoot: ROOT,
          out: join(tmp, run, "model"),
          initDir: join(tmp, run, "init"),
          runsRoot: join(tmp, run, "runs"),
          overrides: short,
          quiet: true,
          print: () => {},
        }),
      );
    }
    const [a, b] = records;
    assert.deepEqual(recordDifferences(a, b), []);
    assert.deepEqual(a.files, b.files);
    assert.equal(a.metrics.steps, 2);
    // The run trained: the weights are not the init's.
    const init = (await sha256File(join(tmp, "a", "init", "model.safetensors"))).sha256;
    assert.notEqual(a.files["model.safetensors"], init);
    assert.deepEqual(
      [...Deno.readDirSync(join(tmp, "a", "model"))].map((e) => e.name).sort(),
      [...Object.keys(a.files), "pretraining.json"].sort(),
    );
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("recordDifferences() names the recipe, the corpus and each model file that differ", () => {
  const want: PretrainingRecord = {
    recipe: "recipes/demo-base.yaml",
    recipe_sha256: "r",
    corpus: "data/demo/corpus.jsonl",
    corpus_sha256: "c",
    init: DEMO_INIT,
    overrides: [],
    metrics: {},
    files: { "config.json": "1", "model.safetensors": "2", "tokenizer.json": "3" },
  };
  assert.deepEqual(recordDifferences(want, structuredClone(want)), []);
  const got = {
    ...want,
    recipe_sha256: "r2",
    corpus_sha256: "c2",
    files: { "config.json": "1", "model.safetensors": "9", "extra.json": "4" },
  };
  assert.deepEqual(recordDifferences(want, got), [
    "recipes/demo-base.yaml has other settings than when it ran",
    "data/demo/corpus.jsonl has other bytes than when it ran",
    "model/extra.json is new in the fresh model",
    "model/model.safetensors has other bytes",
    "model/tokenizer.json is not in the fresh model",
  ]);
});

Deno.test("the corpus holds every token of the demo's JSON answers, so pretraining trains each one", async () => {
  // A token the corpus never holds gets only the push-down of the softmax in pretraining: with tied
  // embeddings all such rows drift along one direction and SFT cannot tell `":"` from `","`.
  const { tokenizer } = await loadTokenizer(join(ROOT, "data/demo/tokenizer"));
  const ids = (text: string) => tokenizer.encode(text, { add_special_tokens: false }).ids as number[];
  const lines = async (file: string) =>
    (await Deno.readTextFile(join(ROOT, "data/demo", file))).split("\n").filter((l) => l !== "");
  const seen = new Set<number>();
  for (const line of await lines("corpus.jsonl")) for (const id of ids(JSON.parse(line).text)) seen.add(id);
  const missing = new Set<string>();
  for (const line of await lines("sft.jsonl")) {
    for (const m of JSON.parse(line).messages as { role: string; content: string }[]) {
      if (m.role !== "assistant") continue;
      for (const id of ids(m.content)) if (!seen.has(id)) missing.add(tokenizer.decode([id]));
    }
  }
  assert.deepEqual([...missing].sort(), [], "answer tokens the corpus never holds");
});
