import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../../foundation/errors.ts";
import { PrepareConfig } from "../../../steps/prepare/config.ts";
import { selectDataFiles } from "../../../steps/prepare/files.ts";
import { resolveSources } from "../../../steps/prepare/sources.ts";
import { COMMIT, writeCachedDataset } from "../../fixtures/prepare/hf_cache.ts";

async function withProject(
  files: Record<string, string>,
  body: (root: string) => Promise<void>,
): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "lathe-sources-" });
  try {
    for (const [path, text] of Object.entries(files)) {
      await Deno.mkdir(join(root, path, ".."), { recursive: true });
      await Deno.writeTextFile(join(root, path), text);
    }
    await body(root);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

const labels = async (root: string, sources: unknown[]) =>
  (await resolveSources(PrepareConfig.parse({ sources }), root, { hub: offlineHub(root) }))
    .map((s) => s.files.map((f) => f.label));

const offlineHub = (root: string) => ({
  cacheDir: join(root, "hf"),
  endpoint: "http://127.0.0.1:9",
  offline: true,
});

Deno.test("selectDataFiles() picks a split's files the way datasets names them", () => {
  const repo = [
    "README.md",
    "data/test-00000-of-00001.parquet",
    "data/train-00000-of-00002.parquet",
    "data/train-00001-of-00002.parquet",
    "dataset_infos.json",
    "validation.jsonl",
    "train/extra.csv",
  ];
  assert.deepEqual(selectDataFiles(repo, "train"), [
    "data/train-00000-of-00002.parquet",
    "data/train-00001-of-00002.parquet",
    "train/extra.csv",
  ]);
  assert.deepEqual(selectDataFiles(repo, "validation"), ["validation.jsonl"]);
  assert.deepEqual(selectDataFiles(repo, "dev"), []);
  assert.deepEqual(selectDataFiles(repo, "train", ["data/*.parquet"]), [
    "data/test-00000-of-00001.parquet",
    "data/train-00000-of-00002.parquet",
    "data/train-00001-of-00002.parquet",
  ]);
  // no split names at all: everything is training data
  assert.deepEqual(selectDataFiles(["a.jsonl", "b/c.json", "notes.txt", "state.json"], "train"), [
    "a.jsonl",
    "b/c.json",
  ]);
  assert.deepEqual(selectDataFiles(["a.jsonl"], "test"), []);
});

Deno.test("resolveSources() reads files, directories and globs relative to the project root", async () => {
  await withProject({
    "data/a.jsonl": "",
    "data/set/train.jsonl": "",
    "data/set/test.jsonl": "",
    "data/shards/p1.csv": "",
    "data/shards/p2.csv": "",
    "data/shards/notes.txt": "",
  }, async (root) => {
    assert.deepEqual(
      await labels(root, [
        "data/a.jsonl",
        "data/set",
        { path: "data/set", split: "test" },
        "data/shards/*.csv",
        { path: "data/shards", files: ["p2.*"] },
      ]),
      [
        ["data/a.jsonl"],
        ["data/set/train.jsonl"],
        ["data/set/test.jsonl"],
        ["data/shards/p1.csv", "data/shards/p2.csv"],
        ["data/shards/p2.csv"],
      ],
    );
    const [resolved] = await resolveSources(PrepareConfig.parse({ sources: ["data/shards/p1.csv"] }), root);
    assert.deepEqual(resolved.files, [{
      label: "data/shards/p1.csv",
      path: join(root, "data/shards/p1.csv"),
      format: "csv",
    }]);
  });
});

Deno.test("resolveSources() names the source key and the path it cannot use", async () => {
  await withProject({ "data/a.txt": "", "data/a.jsonl": "", "empty/.keep": "" }, async (root) => {
    const fails = (sources: unknown[], text: string) =>
      assert.rejects(
        () => labels(root, sources),
        (e: Error) => e instanceof LatheError && e.message === text,
      );
    await fails(
      ["data/a.jsonl", "data/nope.jsonl"],
      `Cannot read prepare.sources[1]: "data/nope.jsonl" does not exist (looked for "${
        join(root, "data/nope.jsonl")
      }")`,
    );
    await fails(
      ["data/a.txt"],
      'Cannot read prepare.sources[0]: "data/a.txt" is not a data file (readable: .jsonl, .ndjson, .json, .csv, .tsv, .parquet)',
    );
    await fails(
      [{ path: "data/a.jsonl", files: ["*.jsonl"] }],
      'Cannot read prepare.sources[0]: "files" chooses files in a directory, but "data/a.jsonl" is a file',
    );
    await fails(["empty"], 'Cannot read prepare.sources[0]: "empty" holds no data files to read');
    await fails(
      ["data/*.parquet"],
      'Cannot read prepare.sources[0]: "data/*.parquet" holds no data files to read',
    );
  });
});

Deno.test("resolveSources() labels Hub files hf://datasets/<repo>@<revision>/<path>", async () => {
  await withProject({}, async (root) => {
    const snapshot = await writeCachedDataset(join(root, "hf"), "acme/orders", {
      "data/train-00000-of-00001.jsonl": "{}\n",
      "data/test-00000-of-00001.jsonl": "{}\n",
    });
    const [resolved] = await resolveSources(
      PrepareConfig.parse({ sources: [{ hub: "acme/orders" }] }),
      root,
      { hub: offlineHub(root) },
    );
    assert.deepEqual(resolved.files, [{
      label: "hf://datasets/acme/orders@main/data/train-00000-of-00001.jsonl",
      path: join(snapshot, "data/train-00000-of-00001.jsonl"),
      format: "jsonl",
    }]);
    assert.ok(snapshot.endsWith(COMMIT));
  });
});

Deno.test("PrepareConfig fills documented defaults and rejects sources with both or neither of path and hub", () => {
  const config = PrepareConfig.parse({ sources: ["a.jsonl", { hub: "org/name" }] });
  assert.deepEqual(config, {
    sources: ["a.jsonl", { hub: "org/name", revision: "main", split: "train", weight: 1 }],
    format: "auto",
    on_bad_rows: "error",
    dedupe: true,
    eval_fraction: 0.1,
  });
  assert.equal(PrepareConfig.safeParse({ sources: [{ path: "a", hub: "o/n" }] }).success, false);
  assert.equal(PrepareConfig.safeParse({ sources: [{ split: "train" }] }).success, false);
  assert.equal(PrepareConfig.safeParse({ sources: [{ hub: "o/n", revision: "../x" }] }).success, false);
  assert.equal(PrepareConfig.safeParse({ sources: ["a"], eval_fraction: 1 }).success, false);
  assert.equal(PrepareConfig.safeParse({ sources: ["a"], shuffle: true }).success, false);
  assert.equal(PrepareConfig.safeParse({ sources: [] }).success, false);
});
