import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { selectDataFiles } from "../../steps/prepare/files.ts";
import { type HubSettings, hubSettings, hubSnapshot, repoCacheDir } from "../../hub/dataset.ts";
import { COMMIT, serveFakeHub, writeCachedDataset } from "../fixtures/prepare/hf_cache.ts";

const FILES = {
  "README.md": "# orders\n",
  "data/train-00000-of-00001.jsonl": '{"text":"one"}\n{"text":"two"}\n',
  "data/test-00000-of-00001.jsonl": '{"text":"three"}\n',
};
const trainSplit = (paths: string[]) => selectDataFiles(paths, "train");

async function withTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-hub-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function settings(cacheDir: string, more: Partial<HubSettings> = {}): HubSettings {
  return { cacheDir, endpoint: "http://127.0.0.1:9", offline: true, ...more };
}

Deno.test("hubSettings() reads HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE", async () => {
  await withTempDir(async (dir) => {
    const env = (vars: Record<string, string>) => (name: string) => vars[name];
    assert.deepEqual(hubSettings(env({ HOME: "/home/u" })), {
      cacheDir: "/home/u/.cache/huggingface/hub",
      endpoint: "https://huggingface.co",
      token: undefined,
      offline: false,
    });
    await Deno.writeTextFile(join(dir, "token"), "hf_fromfile\n");
    assert.deepEqual(
      hubSettings(env({ HOME: "/home/u", HF_HOME: dir, HF_ENDPOINT: "http://mirror/", HF_HUB_OFFLINE: "1" })),
      {
        cacheDir: join(dir, "hub"),
        endpoint: "http://mirror",
        token: "hf_fromfile",
        offline: true,
      },
    );
    const s = hubSettings(env({ HF_HOME: dir, HF_HUB_CACHE: "/c", HF_TOKEN: "hf_env", HF_HUB_OFFLINE: "0" }));
    assert.equal(s.cacheDir, "/c");
    assert.equal(s.token, "hf_env");
    assert.equal(s.offline, false);
    assert.equal(hubSettings(env({ XDG_CACHE_HOME: "/x" })).cacheDir, "/x/huggingface/hub");
  });
});

Deno.test("hubSnapshot() offline resolves refs/main to its snapshot and chooses the split's files", async () => {
  await withTempDir(async (dir) => {
    const snapshot = await writeCachedDataset(dir, "acme/orders", FILES);
    const found = await hubSnapshot(settings(dir), "acme/orders", "main", trainSplit);
    assert.deepEqual(found, { commit: COMMIT, dir: snapshot, files: ["data/train-00000-of-00001.jsonl"] });
    assert.equal(
      await Deno.readTextFile(join(found.dir, found.files[0])),
      FILES["data/train-00000-of-00001.jsonl"],
    );
    const test = await hubSnapshot(settings(dir), "acme/orders", "main", (p) => selectDataFiles(p, "test"));
    assert.deepEqual(test.files, ["data/test-00000-of-00001.jsonl"]);
  });
});

Deno.test("hubSnapshot() reads a cached commit hash without a ref, and only from the cache when asked", async () => {
  await withTempDir(async (dir) => {
    await writeCachedDataset(dir, "acme/orders", FILES, { ref: null });
    const online = settings(dir, { offline: false });
    const found = await hubSnapshot(online, "acme/orders", COMMIT, trainSplit, true);
    assert.equal(found.commit, COMMIT);
    assert.deepEqual(found.files, ["data/train-00000-of-00001.jsonl"]);
  });
});

Deno.test("hubSnapshot() offline names what is missing from the cache", async () => {
  await withTempDir(async (dir) => {
    await assert.rejects(
      () => hubSnapshot(settings(dir), "acme/orders", "main", trainSplit),
      (e: Error) =>
        e instanceof LatheError &&
        e.message.startsWith(
          'Cannot find dataset "acme/orders" (revision "main") in the Hugging Face cache',
        ) &&
        e.message.includes(join(repoCacheDir(dir, "acme/orders"), "refs", "main")) &&
        /HF_HUB_OFFLINE/.test(e.hint ?? ""),
    );
    await writeCachedDataset(dir, "acme/orders", { "README.md": "x" });
    await assert.rejects(
      () => hubSnapshot(settings(dir), "acme/orders", "main", trainSplit),
      (e: Error) =>
        e instanceof LatheError && e.message.startsWith('Cannot find data files of dataset "acme/orders"'),
    );
  });
});

Deno.test("hubSnapshot() downloads through HF_ENDPOINT with the token into the cache layout", async () => {
  await withTempDir(async (dir) => {
    const hub = serveFakeHub("acme/orders", FILES, "hf_secret");
    try {
      const online = settings(dir, { endpoint: hub.url, token: "hf_secret", offline: false });
      const found = await hubSnapshot(online, "acme/orders", "main", trainSplit);
      const storage = repoCacheDir(dir, "acme/orders");
      assert.deepEqual(found, {
        commit: COMMIT,
        dir: join(storage, "snapshots", COMMIT),
        files: ["data/train-00000-of-00001.jsonl"],
      });
      assert.equal((await Deno.readTextFile(join(storage, "refs", "main"))).trim(), COMMIT);
      const pointer = join(found.dir, "data/train-00000-of-00001.jsonl");
      assert.ok((await Deno.lstat(pointer)).isSymlink);
      assert.equal(await Deno.readTextFile(pointer), FILES["data/train-00000-of-00001.jsonl"]);
      // only the chosen split was downloaded
      assert.ok(!hub.requests.some((r) => r.includes("test-00000")));
      assert.ok(hub.requests.includes("GET /api/datasets/acme/orders/revision/main"));
      // the same files now resolve offline
      const offline = await hubSnapshot(settings(dir), "acme/orders", "main", trainSplit);
      assert.deepEqual(offline, found);
      // a wrong token is the Hub's answer, reported as such (no silent fallback to the cache)
      await assert.rejects(
        () => hubSnapshot({ ...online, token: "hf_wrong" }, "acme/orders", "main", trainSplit),
        (e: Error) =>
          e instanceof LatheError &&
          e.message.startsWith(`Cannot download dataset "acme/orders" (revision "main") from ${hub.url}`),
      );
    } finally {
      await hub.close();
    }
  });
});

Deno.test("hubSnapshot() falls back to the cache when the Hub cannot be reached", async () => {
  await withTempDir(async (dir) => {
    // a port that was just free: connections to it are refused
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (listener.addr as Deno.NetAddr).port;
    listener.close();
    const unreachable = settings(dir, { offline: false, endpoint: `http://127.0.0.1:${port}` });
    await assert.rejects(
      () => hubSnapshot(unreachable, "acme/orders", "main", trainSplit),
      (e: Error) =>
        e instanceof LatheError && e.message.startsWith('Cannot download dataset "acme/orders"') &&
        e.message.includes("the Hub cannot be reached") && e.message.includes("not cached"),
    );
    await writeCachedDataset(dir, "acme/orders", FILES);
    const found = await hubSnapshot(unreachable, "acme/orders", "main", trainSplit);
    assert.deepEqual(found.files, ["data/train-00000-of-00001.jsonl"]);
    await assert.rejects(
      () => hubSnapshot({ ...unreachable, token: "not-a-token" }, "acme/orders", "main", trainSplit),
      (e: Error) => e instanceof LatheError && e.message.includes('does not start with "hf_"'),
    );
  });
});
