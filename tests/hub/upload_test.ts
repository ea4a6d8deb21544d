import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { type Env, type HubSettings, hubSettings } from "../../hub/settings.ts";
import {
  HubUploadError,
  type UploadOptions,
  type UploadRequest,
  type UploadResult,
  uploadToHub,
} from "../../hub/upload.ts";
import { type FakeHub, type FakeHubOptions, startFakeHub } from "./_fake_hub.ts";

const TOKEN = "hf_SECRETxyz";
const MiB = 1 << 20;

/** Pseudo-random bytes (xorshift), so a misplaced slice cannot compare equal. */
function bytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed | 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** A temp dir holding the given files; removed afterwards. */
async function withFiles(
  files: Record<string, Uint8Array | string>,
  body: (dir: string, local: (name: string) => string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-upload-" });
  try {
    for (const [name, content] of Object.entries(files)) {
      const data = typeof content === "string" ? new TextEncoder().encode(content) : content;
      await Deno.writeFile(join(dir, name), data);
    }
    await body(dir, (name) => join(dir, name));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Runs the fake Hub around `body`. */
async function withHub(options: Partial<FakeHubOptions>, body: (hub: FakeHub) => Promise<void>) {
  const hub = startFakeHub({ token: "hf_valid", namespaces: ["me", "my-org"], ...options });
  try {
    await body(hub);
  } finally {
    await hub.close();
  }
}

function settings(endpoint: string, token: string | undefined = "hf_valid"): HubSettings {
  return { cacheDir: "/nonexistent", endpoint, offline: false, ...(token ? { token } : {}) };
}

/** Everything printed while `body` runs (console.* replaced), so it can be searched for the token. */
async function capture<T>(body: () => Promise<T>): Promise<{ value?: T; error?: unknown; printed: string }> {
  const lines: string[] = [];
  const names = ["log", "info", "warn", "error", "debug"] as const;
  const saved = names.map((name) => console[name]);
  for (const name of names) console[name] = (...args: unknown[]) => lines.push(args.map(String).join(" "));
  try {
    return { value: await body(), printed: lines.join("\n") };
  } catch (error) {
    return { error, printed: lines.join("\n") };
  } finally {
    names.forEach((name, i) => console[name] = saved[i]);
  }
}

/** Uploads, expects a LatheError, and checks that no part of it nor anything printed holds `token`. */
async function uploadFails(
  s: HubSettings,
  request: UploadRequest,
  options: UploadOptions = {},
  token = TOKEN,
): Promise<LatheError> {
  const { value, error, printed } = await capture(() => uploadToHub(s, request, options));
  assert.equal(value, undefined, "the upload should have failed");
  assert.ok(error instanceof LatheError, `expected a LatheError, got ${Deno.inspect(error)}`);
  for (
    const text of [String(error), error.message, error.hint ?? "", Deno.inspect(error, { depth: 8 }), printed]
  ) {
    assert.ok(!text.includes(token), `the token leaked into: ${text}`);
  }
  assert.ok(error.hint, "every upload error has a hint");
  return error;
}

function request(
  repo: string,
  files: UploadRequest["files"],
  more: Partial<UploadRequest> = {},
): UploadRequest {
  return { repo, private: true, files, commitMessage: "Upload from lathe", ...more };
}

Deno.test("uploadToHub() creates a private repo and commits every file's bytes, large ones through LFS", async () => {
  const gguf = bytes(5 * MiB + 123, 7); // multipart: 3 parts of 2 MiB
  const adapter = bytes(MiB + 5, 11); // LFS, one PUT
  const config = '{"model_type":"llama"}\n'; // regular, inside the commit
  await withFiles(
    { "model.gguf": gguf, "adapter.safetensors": adapter, "config.json": config },
    async (_, local) => {
      await withHub({ lfsThreshold: MiB, multipartChunk: 2 * MiB }, async (hub) => {
        const progress: [number, number, string][] = [];
        const { value, printed } = await capture(() =>
          uploadToHub(
            settings(hub.url),
            request("me/tiny-sft", [
              { path: "model.gguf", local: local("model.gguf") },
              { path: "lora/adapter.safetensors", local: local("adapter.safetensors") },
              { path: "config.json", local: local("config.json") },
            ], { commitDescription: "run r1, recipe tiny-demo" }),
            { progress: (done, total, file) => progress.push([done, total, file]) },
          )
        );
        const result = value as UploadResult;
        const repo = hub.repos.get("me/tiny-sft")!;
        assert.equal(repo.private, true);
        const files = repo.branches.get("main")!;
        assert.deepEqual(files.get("model.gguf")!.bytes, gguf);
        assert.equal(files.get("model.gguf")!.lfs, true);
        assert.deepEqual(files.get("lora/adapter.safetensors")!.bytes, adapter);
        assert.equal(files.get("lora/adapter.safetensors")!.lfs, true);
        assert.equal(new TextDecoder().decode(files.get("config.json")!.bytes), config);
        assert.equal(files.get("config.json")!.lfs, false);
        const last = repo.commits.at(-1)!;
        assert.equal(last.title, "Upload from lathe");
        assert.equal(last.description, "run r1, recipe tiny-demo");
        const total = gguf.length + adapter.length + config.length;
        assert.deepEqual(result, {
          repo: "me/tiny-sft",
          commit: last.oid,
          url: `${hub.url}/me/tiny-sft/commit/${last.oid}`,
          created: true,
          files: 3,
          bytes: total,
        });
        // The multipart parts went up as three PUTs; the requests that need it carried the token.
        assert.equal(hub.requests.filter((r) => r.path.includes("/part/")).length, 3);
        assert.deepEqual(hub.requests.filter((r) => r.path.startsWith("/api/")).map((r) => r.auth), [
          "Bearer hf_valid",
          "Bearer hf_valid",
          "Bearer hf_valid",
          "Bearer hf_valid",
        ]);
        assert.deepEqual(hub.requests.map((r) => r.route).filter((r) => r !== "lfs-upload"), [
          "info",
          "create",
          "preupload",
          "lfs-batch",
          "commit",
        ]);
        // Progress: bytes only grow, reach the total, and name the files.
        assert.ok(progress.every(([done, t], i) => t === total && (i === 0 || done > progress[i - 1][0])));
        assert.deepEqual(progress.at(-1)!.slice(0, 2), [total, total]);
        assert.deepEqual(
          new Set(progress.map((p) => p[2])),
          new Set(["model.gguf", "lora/adapter.safetensors", "config.json"]),
        );
        assert.equal(printed, "");
        assert.ok(
          !JSON.stringify({ result, progress }).includes("hf_valid"),
          "no token in the result or progress",
        );
      });
    },
  );
});

Deno.test("uploadToHub() commits to an existing repo without creating it or changing its visibility", async () => {
  await withFiles({ "README.md": "# tiny-sft\n", "model.gguf": bytes(MiB + 1, 3) }, async (_, local) => {
    await withHub({ repos: { "my-org/tiny-sft": { files: { "README.md": "old" } } } }, async (hub) => {
      const before = hub.repos.get("my-org/tiny-sft")!.commits.length;
      const result = await uploadToHub(
        settings(hub.url),
        request("my-org/tiny-sft", [
          { path: "README.md", local: local("README.md") },
          { path: "model.gguf", local: local("model.gguf") },
        ], { commitMessage: "Second export" }),
      );
      const repo = hub.repos.get("my-org/tiny-sft")!;
      assert.equal(result.created, false);
      assert.equal(repo.private, false, "an existing repo keeps its visibility");
      assert.equal(repo.commits.length, before + 1);
      assert.equal(repo.commits.at(-1)!.title, "Second export");
      assert.equal(result.commit, repo.commits.at(-1)!.oid);
      assert.equal(
        new TextDecoder().decode(repo.branches.get("main")!.get("README.md")!.bytes),
        "# tiny-sft\n",
      );
      assert.ok(!hub.requests.some((r) => r.route === "create"));
      // The same LFS object again: the Hub already holds it, so nothing is PUT.
      const puts = hub.requests.filter((r) => r.route === "lfs-upload").length;
      await uploadToHub(
        settings(hub.url),
        request("my-org/tiny-sft", [{ path: "copy.gguf", local: local("model.gguf") }]),
      );
      assert.equal(hub.requests.filter((r) => r.route === "lfs-upload").length, puts);
      assert.equal(repo.branches.get("main")!.get("copy.gguf")!.lfs, true);
    });
  });
});

Deno.test("uploadToHub() reports an invalid token (401) without showing it", async () => {
  await withFiles({ "a.txt": "a" }, async (_, local) => {
    await withHub({}, async (hub) => {
      const error = await uploadFails(
        settings(hub.url, TOKEN),
        request("me/x", [{ path: "a.txt", local: local("a.txt") }]),
      );
      assert.ok(error instanceof HubUploadError);
      assert.equal(error.failure.status, 401);
      assert.match(
        error.message,
        /^Cannot create model "me\/x" on http:\/\/127\.0\.0\.1:\d+: the Hub rejected the token \(HTTP 401: Invalid credentials/,
      );
      assert.match(error.hint!, /HF_TOKEN is invalid or expired/);
      assert.ok(!hub.repos.has("me/x"));
    });
  });
});

Deno.test("uploadToHub() scrubs the token from an answer that repeats it, and drops that answer", async () => {
  await withFiles({ "a.txt": "a" }, async (_, local) => {
    // A proxy that answers 400 with the request's Authorization header in its message.
    const echo: typeof fetch = (_input, init) => {
      const auth = new Headers(init?.headers).get("authorization");
      return Promise.resolve(Response.json({ error: `bad header: ${auth}` }, { status: 400 }));
    };
    const error = await uploadFails(
      settings("http://127.0.0.1:1", TOKEN),
      request("me/x", [{ path: "a.txt", local: local("a.txt") }]),
      { fetch: echo },
    );
    assert.match(error.message, /: the Hub answered HTTP 400: bad header: Bearer hf_\*\*\*$/);
    assert.equal(error.cause, undefined);
  });
});

Deno.test("uploadToHub() reports a namespace the token may not write to, and a read-only token (403)", async () => {
  await withFiles({ "a.txt": "a" }, async (_, local) => {
    await withHub({ token: TOKEN }, async (hub) => {
      const error = await uploadFails(
        settings(hub.url, TOKEN),
        request("someone-else/x", [{ path: "a.txt", local: local("a.txt") }]),
      );
      assert.match(
        error.message,
        /^Cannot create model "someone-else\/x" on .*: the token may not write there \(HTTP 403: You don't have the rights to create a model under the namespace "someone-else"\)$/,
      );
      assert.match(error.hint!, /write role.*"someone-else"/);
    });
    await withHub({ token: TOKEN, readOnly: true, repos: { "me/x": {} } }, async (hub) => {
      const error = await uploadFails(
        settings(hub.url, TOKEN),
        request("me/x", [{ path: "a.txt", local: local("a.txt") }]),
      );
      assert.match(
        error.message,
        /^Cannot upload 1 file to model "me\/x" \(branch "main"\) on .*: the token may not write there \(HTTP 403: /,
      );
      assert.match(error.hint!, /write role/);
      assert.equal(hub.repos.get("me/x")!.commits.length, 1, "nothing was committed");
    });
  });
});

Deno.test("uploadToHub() reports a missing branch (404) and an unknown namespace (404 on the check, 403 on create)", async () => {
  await withFiles({ "a.txt": "a" }, async (_, local) => {
    await withHub({ token: TOKEN, repos: { "me/x": {} } }, async (hub) => {
      const error = await uploadFails(
        settings(hub.url, TOKEN),
        request("me/x", [{ path: "a.txt", local: local("a.txt") }], { revision: "dev" }),
      );
      assert.match(
        error.message,
        /^Cannot upload 1 file to model "me\/x" \(branch "dev"\) on .*: not found \(HTTP 404: Invalid rev id: dev\)$/,
      );
      assert.match(error.hint!, /branch "dev" exists in "me\/x"/);
    });
    // A namespace that does not exist: the repo check answers 404 (so the repo is created), and
    // the Hub refuses the creation with 403, as for any namespace the token may not write to.
    await withHub({ token: TOKEN }, async (hub) => {
      const error = await uploadFails(
        settings(hub.url, TOKEN),
        request("ghost-org/x", [{ path: "a.txt", local: local("a.txt") }]),
      );
      assert.deepEqual(hub.requests.map((r) => r.route), ["info", "create"]);
      assert.match(error.message, /^Cannot create model "ghost-org\/x" .*HTTP 403/);
      assert.match(error.hint!, /"ghost-org"/);
    });
  });
});

Deno.test("uploadToHub() reports an unreachable Hub, a dropped connection and a server error", async () => {
  await withFiles({ "a.txt": "a", "big.bin": bytes(MiB, 5) }, async (_, local) => {
    const closed = startFakeHub({ token: TOKEN, namespaces: ["me"] });
    const endpoint = closed.url;
    await closed.close();
    const refused = await uploadFails(
      settings(endpoint, TOKEN),
      request("me/x", [{ path: "a.txt", local: local("a.txt") }]),
    );
    assert.ok(refused instanceof HubUploadError && refused.failure.unreachable);
    assert.match(
      refused.message,
      /^Cannot check whether model "me\/x" exists on http:\/\/127\.0\.0\.1:\d+: no answer from the Hub \(/,
    );
    assert.match(refused.message, /Connection refused/);
    assert.match(refused.hint!, /check the network, or HF_ENDPOINT/);

    await withHub(
      { token: TOKEN, lfsThreshold: 1000, fail: { route: "lfs-upload", close: true } },
      async (hub) => {
        const dropped = await uploadFails(
          settings(hub.url, TOKEN),
          request("me/x", [{ path: "big.bin", local: local("big.bin") }]),
        );
        assert.match(
          dropped.message,
          // The reason is the runtime's: "connection closed …", or a bare "fetch failed" when the socket
          // closes before the request body is sent.
          /^Cannot upload 1 file to model "me\/x" \(branch "main"\) on .*: no answer from the Hub \((.*connection closed|fetch failed)/,
        );
      },
    );
    await withHub(
      { token: TOKEN, lfsThreshold: 1000, fail: { route: "lfs-upload", status: 500 } },
      async (hub) => {
        const failed = await uploadFails(
          settings(hub.url, TOKEN),
          request("me/x", [{ path: "big.bin", local: local("big.bin") }, {
            path: "a.txt",
            local: local("a.txt"),
          }]),
        );
        assert.match(
          failed.message,
          /^Cannot upload 2 files to model "me\/x" .*: the Hub answered HTTP 500: /,
        );
        assert.match(failed.hint!, /try again later/);
      },
    );
  });
});

Deno.test("uploadToHub() refuses before any request without a token, offline, or with bad files", async () => {
  await withFiles({ "a.txt": "a" }, async (home, local) => {
    await withHub({ token: TOKEN }, async (hub) => {
      const env = (vars: Record<string, string>): Env => (name) =>
        ({ HF_HOME: home, HF_ENDPOINT: hub.url, ...vars })[name];
      const files = [{ path: "a.txt", local: local("a.txt") }];

      const noToken = await uploadFails(hubSettings(env({})), request("me/x", files));
      assert.equal(noToken.message, 'Cannot upload to model "me/x": no Hugging Face token is set');
      assert.match(noToken.hint!, /set HF_TOKEN/);

      const offline = await uploadFails(
        hubSettings(env({ HF_TOKEN: TOKEN, HF_HUB_OFFLINE: "1" })),
        request("me/x", files),
      );
      assert.equal(
        offline.message,
        'Cannot upload to model "me/x": the Hub is offline (HF_HUB_OFFLINE is set)',
      );
      assert.match(offline.hint!, /unset HF_HUB_OFFLINE/);

      const online = hubSettings(env({ HF_TOKEN: TOKEN }));
      await assert.rejects(
        uploadToHub(online, request("tiny-sft", files)),
        /a repo name must be "owner\/name"/,
      );
      await assert.rejects(
        uploadToHub(online, request("me/x", [{ path: "a.txt", local: local("missing.gguf") }])),
        /Cannot upload ".*missing.gguf" to model "me\/x": no such file/,
      );
      await assert.rejects(
        uploadToHub(online, request("me/x", [{ path: "../a.txt", local: local("a.txt") }])),
        /repo path "..\/a.txt" is not a relative "\/"-separated path/,
      );
      await assert.rejects(uploadToHub(online, request("me/x", [])), /no files were given/);
      assert.deepEqual(hub.requests, []);
    });
  });
});
