import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { sha256File } from "../../foundation/hash.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { loadModelConfig } from "../../formats/model_config.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const DEMO = join(ROOT, "data/demo/model");

Deno.test("data/demo/model is the nano llama that make_tiny_models.ts writes (seed 0, f32, demo tokenizer)", async () => {
  const out = await Deno.makeTempDir({ prefix: "lathe-demo-model-" });
  try {
    await writeTinyModel(out, {
      arch: "llama",
      size: "nano",
      dtype: "f32",
      seed: 0,
      tokenizerDir: join(ROOT, "data/demo/tokenizer"),
    });
    const names = [...Deno.readDirSync(DEMO)].map((e) => e.name).sort();
    assert.deepEqual([...Deno.readDirSync(out)].map((e) => e.name).sort(), names);
    for (const name of names) {
      assert.equal(
        (await sha256File(join(out, name))).sha256,
        (await sha256File(join(DEMO, name))).sha256,
        `data/demo/model/${name} is stale: run \`deno run -A scripts/make_tiny_models.ts --out /tmp/m --arch llama --size nano\` and copy /tmp/m/llama-nano`,
      );
    }
    const config = await loadModelConfig(DEMO);
    assert.equal(config.vocabSize, 512);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
