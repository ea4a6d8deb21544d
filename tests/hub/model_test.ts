import assert from "node:assert/strict";
import { join } from "node:path";
import { repoFolderName as cacheFolderName } from "../../hub/cache.ts";
import { resolveModel } from "../../hub/model.ts";
import { type Env, hubSettings } from "../../hub/settings.ts";

/** The cache folder of a model repo. */
const repoFolderName = (name: string) => cacheFolderName({ type: "model", name });
import { LatheError } from "../../foundation/errors.ts";

const SHA = "0123456789abcdef0123456789abcdef01234567";

function envOf(vars: Record<string, string>): Env {
  return (name) => vars[name];
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-resolve-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes a snapshot the way huggingface_hub lays it out (blobs + symlinks in snapshots/). */
async function cacheSnapshot(cache: string, repo: string, files: Record<string, string>, ref = "main") {
  const repoDir = join(cache, repoFolderName(repo));
  await Deno.mkdir(join(repoDir, "refs"), { recursive: true });
  await Deno.mkdir(join(repoDir, "blobs"), { recursive: true });
  await Deno.mkdir(join(repoDir, "snapshots", SHA), { recursive: true });
  await Deno.writeTextFile(join(repoDir, "refs", ref), SHA);
  let i = 0;
  for (const [name, content] of Object.entries(files)) {
    const blob = join(repoDir, "blobs", `blob${i++}`);
    await Deno.writeTextFile(blob, content);
    await Deno.symlink(blob, join(repoDir, "snapshots", SHA, name));
  }
  return join(repoDir, "snapshots", SHA);
}

Deno.test("hubCacheDir() and hubToken() follow huggingface_hub's environment variables", async () => {
  assert.equal(hubSettings(envOf({ HF_HOME: "/h" })).cacheDir, "/h/hub");
  assert.equal(hubSettings(envOf({ XDG_CACHE_HOME: "/x" })).cacheDir, "/x/huggingface/hub");
  assert.equal(hubSettings(envOf({ HF_HOME: "/h", HF_HUB_CACHE: "/c" })).cacheDir, "/c");
  assert.match(hubSettings(envOf({})).cacheDir, /\.cache\/huggingface\/hub$/);
  assert.equal(repoFolderName("Qwen/Qwen2.5-0.5B"), "models--Qwen--Qwen2.5-0.5B");
  assert.equal(hubSettings(envOf({ HF_HUB_OFFLINE: "1" })).offline, true);
  assert.equal(hubSettings(envOf({ HF_HUB_OFFLINE: "0" })).offline, false);
  assert.equal(hubSettings(envOf({ TRANSFORMERS_OFFLINE: "true" })).offline, true);
  await withTempDir(async (home) => {
    assert.equal(hubSettings(envOf({ HF_HOME: home, HF_TOKEN: "hf_env" })).token, "hf_env");
    assert.equal(hubSettings(envOf({ HF_HOME: home })).token, undefined);
    await Deno.writeTextFile(join(home, "token"), "hf_file\n");
    assert.equal(hubSettings(envOf({ HF_HOME: home })).token, "hf_file");
  });
});

Deno.test("resolveModel() takes an existing directory as is, and names a bad path", async () => {
  await withTempDir(async (dir) => {
    const model = join(dir, "m");
    await Deno.mkdir(model);
    await assert.rejects(resolveModel(model), /Cannot use model directory ".*\/m": it has no config.json/);
    await Deno.writeTextFile(join(model, "config.json"), "{}");
    assert.deepEqual(await resolveModel(model), { dir: model, source: "path" });
    await assert.rejects(resolveModel(join(dir, "nope")), /Cannot use model ".*\/nope": no such directory/);
    await assert.rejects(resolveModel(join(model, "config.json")), /it is a file, not a directory/);
  });
});

Deno.test("resolveModel() finds a cached snapshot through refs/<branch> or a commit, offline", async () => {
  await withTempDir(async (home) => {
    const snapshot = await cacheSnapshot(join(home, "hub"), "org/tiny", {
      "config.json": "{}",
      "model.safetensors": "x",
    });
    const env = envOf({ HF_HOME: home, HF_HUB_OFFLINE: "1" });
    assert.deepEqual(await resolveModel("org/tiny", { env }), {
      dir: snapshot,
      source: "cache",
      repo: "org/tiny",
      commit: SHA,
    });
    assert.equal((await resolveModel("org/tiny", { env, revision: SHA })).dir, snapshot);
    assert.equal(
      (await resolveModel("org/tiny", {
        env: envOf({ HF_HUB_CACHE: join(home, "hub"), HF_HUB_OFFLINE: "1" }),
      })).dir,
      snapshot,
    );
    await assert.rejects(
      resolveModel("org/tiny", { env, revision: "dev" }),
      /no ref "dev" is recorded for it/,
    );
  });
});

Deno.test("resolveModel() offline names what the cache lacks: the repo, a shard, config.json", async () => {
  await withTempDir(async (home) => {
    const env = envOf({ HF_HOME: home, HF_HUB_OFFLINE: "1" });
    await assert.rejects(resolveModel("org/absent", { env }), (e: unknown) => {
      assert.ok(e instanceof LatheError);
      assert.match(
        e.message,
        /Cannot resolve model "org\/absent" \(revision "main"\): it is not in the Hugging Face cache/,
      );
      assert.match(e.message, /HF_HUB_OFFLINE is set/);
      assert.match(e.hint ?? "", /Download it while online/);
      return true;
    });
    await cacheSnapshot(join(home, "hub"), "org/sharded", {
      "config.json": "{}",
      "model.safetensors.index.json": JSON.stringify({
        weight_map: { a: "model-00001-of-00002.safetensors", b: "model-00002-of-00002.safetensors" },
      }),
      "model-00001-of-00002.safetensors": "x",
    });
    await assert.rejects(
      resolveModel("org/sharded", { env }),
      /snapshot 0123456789ab lacks "model-00002-of-00002.safetensors" in the Hugging Face cache/,
    );
    await cacheSnapshot(join(home, "hub"), "org/noconfig", { "model.safetensors": "x" });
    await assert.rejects(resolveModel("org/noconfig", { env }), /lacks "config.json"/);
  });
});

/** A minimal Hub: model info, tree listing, paths-info and resolve, for the files given. */
function fakeHub(files: Record<string, string>, opts: { status?: number } = {}) {
  const requests: { method: string; path: string; auth: string | null }[] = [];
  const enc = new TextEncoder();
  const oid = (name: string) => name.padEnd(40, "0").replace(/[^0-9a-f]/g, "a").slice(0, 40);
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const url = new URL(req.url);
    requests.push({ method: req.method, path: url.pathname, auth: req.headers.get("authorization") });
    if (opts.status) {
      return new Response("{}", { status: opts.status, headers: { "content-type": "application/json" } });
    }
    const json = (v: unknown) => Response.json(v);
    if (url.pathname === "/api/models/org/tiny/revision/main") {
      return json({ _id: "1", id: "org/tiny", sha: SHA });
    }
    if (url.pathname === `/api/models/org/tiny/tree/${SHA}`) {
      return json(
        Object.keys(files).map((path) => ({ type: "file", path, size: files[path].length, oid: oid(path) })),
      );
    }
    if (url.pathname === `/api/models/org/tiny/paths-info/${SHA}`) {
      const { paths } = await req.json();
      return json(
        paths.map((path: string) => ({ type: "file", path, size: files[path].length, oid: oid(path) })),
      );
    }
    const prefix = `/org/tiny/resolve/${SHA}/`;
    if (url.pathname.startsWith(prefix)) {
      const body = enc.encode(files[url.pathname.slice(prefix.length)]);
      const headers = { etag: `"${oid(url.pathname)}"`, "content-type": "application/octet-stream" };
      if (req.headers.get("range") === "bytes=0-0") {
        return new Response(body.slice(0, 1), {
          status: 206,
          headers: { ...headers, "content-range": `bytes 0-0/${body.length}` },
        });
      }
      return new Response(body, { headers });
    }
    return new Response("not found", { status: 404 });
  });
  const endpoint = `http://127.0.0.1:${server.addr.port}`;
  return { server, endpoint, requests };
}

Deno.test("resolveModel() downloads only config, tokenizer and indexed shards from the Hub into the cache", async () => {
  const files = {
    "config.json": `{"architectures":["LlamaForCausalLM"]}`,
    "tokenizer.json": "{}",
    "README.md": "readme",
    "model.safetensors.index.json": JSON.stringify({
      metadata: { total_size: 2 },
      weight_map: { a: "model-00001-of-00002.safetensors", b: "model-00002-of-00002.safetensors" },
    }),
    "model-00001-of-00002.safetensors": "shard one",
    "model-00002-of-00002.safetensors": "shard two",
    "consolidated.safetensors": "duplicate weights in another layout",
  };
  const hub = fakeHub(files);
  const debug = console.debug;
  console.debug = () => {};
  try {
    await withTempDir(async (home) => {
      const env = envOf({ HF_HOME: home, HF_ENDPOINT: hub.endpoint, HF_TOKEN: "hf_test" });
      const got = await resolveModel("org/tiny", { env, progress: false });
      const snapshot = join(home, "hub", "models--org--tiny", "snapshots", SHA);
      assert.deepEqual(got, { dir: snapshot, source: "hub", repo: "org/tiny", commit: SHA });
      assert.equal(await Deno.readTextFile(join(snapshot, "config.json")), files["config.json"]);
      assert.equal(await Deno.readTextFile(join(snapshot, "model-00002-of-00002.safetensors")), "shard two");
      assert.deepEqual([...Deno.readDirSync(snapshot)].map((e) => e.name).sort(), [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
      ]);
      assert.equal(await Deno.readTextFile(join(home, "hub", "models--org--tiny", "refs", "main")), SHA);
      assert.ok(hub.requests.every((r) => r.auth === "Bearer hf_test"), "every request carries HF_TOKEN");
      assert.ok(!hub.requests.some((r) => r.path.includes("consolidated") || r.path.includes("README")));
      // The snapshot now serves offline runs.
      const offline = await resolveModel("org/tiny", { env: envOf({ HF_HOME: home, HF_HUB_OFFLINE: "1" }) });
      assert.equal(offline.source, "cache");
      assert.equal(offline.dir, snapshot);
    });
  } finally {
    console.debug = debug;
    await hub.server.shutdown();
  }
});

Deno.test("resolveModel() turns Hub refusals and unreachable endpoints into actionable errors", async () => {
  const gated = fakeHub({}, { status: 401 });
  try {
    await withTempDir(async (home) => {
      const env = envOf({ HF_HOME: home, HF_ENDPOINT: gated.endpoint });
      await assert.rejects(resolveModel("org/tiny", { env, progress: false }), (e: unknown) => {
        assert.ok(e instanceof LatheError);
        assert.match(e.message, /Cannot download model "org\/tiny": the Hub refused access \(HTTP 401\)/);
        assert.match(e.hint ?? "", /HF_TOKEN/);
        return true;
      });
    });
  } finally {
    await gated.server.shutdown();
  }
  const missing = fakeHub({}, { status: 404 });
  try {
    await withTempDir(async (home) => {
      const env = envOf({ HF_HOME: home, HF_ENDPOINT: missing.endpoint });
      await assert.rejects(
        resolveModel("org/tiny", { env }),
        /\(revision "main"\): not found on http:\/\/127.0.0.1/,
      );
    });
  } finally {
    await missing.server.shutdown();
  }
  // A port nobody listens on: the connection is refused.
  const closed = fakeHub({});
  const endpoint = closed.endpoint;
  await closed.server.shutdown();
  await withTempDir(async (home) => {
    const env = envOf({ HF_HOME: home, HF_ENDPOINT: endpoint });
    await assert.rejects(resolveModel("org/tiny", { env }), (e: unknown) => {
      assert.ok(e instanceof LatheError);
      assert.match(e.message, /Cannot download model "org\/tiny" from http:\/\/127.0.0.1:\d+: /);
      assert.match(e.message, /no local directory "org\/tiny" exists, so it was taken for a Hub repo id/);
      assert.match(e.hint ?? "", /HF_HUB_OFFLINE=1/);
      return true;
    });
  });
});

Deno.test("resolveModel() online falls back to a cached snapshot when the Hub cannot be reached, as datasets do", async () => {
  await withTempDir(async (home) => {
    const snapshot = await cacheSnapshot(join(home, "hub"), "org/tiny", {
      "config.json": "{}",
      "model.safetensors": "x",
    });
    // A port nobody listens on: the connection is refused, so the cache serves (with a warning).
    const closed = fakeHub({});
    const endpoint = closed.endpoint;
    await closed.server.shutdown();
    const warn = console.error;
    const warnings: string[] = [];
    console.error = (line: string) => warnings.push(line);
    try {
      const got = await resolveModel("org/tiny", { env: envOf({ HF_HOME: home, HF_ENDPOINT: endpoint }) });
      assert.deepEqual(got, { dir: snapshot, source: "cache", repo: "org/tiny", commit: SHA });
    } finally {
      console.error = warn;
    }
    assert.match(
      warnings.join("\n"),
      /warning: cannot reach http:\/\/127\.0\.0\.1:\d+ .*using the cached snapshot/,
    );
  });
});
