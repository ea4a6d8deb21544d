import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LatheError } from "../../../foundation/errors.ts";
import { tokenizerDir } from "../../../steps/tokenize/tokenizer.ts";

const ROOT = fileURLToPath(new URL("../../..", import.meta.url));
const COMMIT = "0123456789abcdef0123456789abcdef01234567";

/** Runs `body` with HF_HOME at a temp cache holding org/tiny (the demo model) and HF_HUB_OFFLINE=1. */
async function withCache(body: (home: string) => Promise<void>): Promise<void> {
  const home = await Deno.makeTempDir({ prefix: "lathe-hf-" });
  const saved = { home: Deno.env.get("HF_HOME"), offline: Deno.env.get("HF_HUB_OFFLINE") };
  try {
    const repo = join(home, "hub", "models--org--tiny");
    const snapshot = join(repo, "snapshots", COMMIT);
    await Deno.mkdir(join(repo, "refs"), { recursive: true });
    await Deno.mkdir(snapshot, { recursive: true });
    await Deno.writeTextFile(join(repo, "refs", "main"), COMMIT);
    for (const entry of Deno.readDirSync(join(ROOT, "data/demo/model"))) {
      await Deno.copyFile(join(ROOT, "data/demo/model", entry.name), join(snapshot, entry.name));
    }
    Deno.env.set("HF_HOME", home);
    Deno.env.set("HF_HUB_OFFLINE", "1");
    await body(snapshot);
  } finally {
    for (const [name, value] of [["HF_HOME", saved.home], ["HF_HUB_OFFLINE", saved.offline]] as const) {
      if (value === undefined) Deno.env.delete(name);
      else Deno.env.set(name, value);
    }
    await Deno.remove(home, { recursive: true });
  }
}

Deno.test("tokenizerDir() takes a local directory first, relative to the project root", async () => {
  assert.equal(await tokenizerDir("data/demo/tokenizer", ROOT), join(ROOT, "data/demo/tokenizer"));
});

Deno.test("tokenizerDir() resolves a Hub repo id through the Hugging Face cache", async () => {
  await withCache(async (snapshot) => {
    assert.equal(await tokenizerDir("org/tiny", ROOT), snapshot);
    assert.equal(await tokenizerDir("org/tiny", ROOT, COMMIT), snapshot);
  });
});

Deno.test("tokenizerDir() offline names a repo the cache lacks", async () => {
  await withCache(async () => {
    await assert.rejects(tokenizerDir("org/absent", ROOT), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.match(error.message, /Cannot resolve model "org\/absent".*HF_HUB_OFFLINE is set/s);
      return true;
    });
  });
});
