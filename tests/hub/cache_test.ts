import assert from "node:assert/strict";
import { join } from "node:path";
import { sha256File, sha256Hex } from "../../foundation/hash.ts";
import { sourceHash } from "../../hub/cache.ts";

Deno.test("sourceHash() takes the sha256 of a Hugging Face cache blob from its name and hashes other files", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-hash-" });
  try {
    const content = new TextEncoder().encode("weights");
    const sha = sha256Hex(content);
    await Deno.mkdir(join(dir, "blobs"));
    await Deno.mkdir(join(dir, "snapshots", "rev"), { recursive: true });
    await Deno.writeFile(join(dir, "blobs", sha), content);
    await Deno.symlink(join("..", "..", "blobs", sha), join(dir, "snapshots", "rev", "model.safetensors"));
    assert.deepEqual(await sourceHash(join(dir, "snapshots", "rev", "model.safetensors")), {
      sha256: sha,
      bytes: 7,
    });

    // A blob named like a hash is trusted by name: the cache is content-addressed.
    const named = "a".repeat(64);
    await Deno.writeFile(join(dir, "blobs", named), content);
    assert.equal((await sourceHash(join(dir, "blobs", named))).sha256, named);

    // Not in blobs/ (or not a 64-hex name, e.g. a git-sha1 blob): hashed.
    const plain = join(dir, "config.json");
    await Deno.writeFile(plain, content);
    assert.deepEqual(await sourceHash(plain), await sha256File(plain));
    const sha1 = "b".repeat(40);
    await Deno.writeFile(join(dir, "blobs", sha1), content);
    assert.equal((await sourceHash(join(dir, "blobs", sha1))).sha256, sha);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
