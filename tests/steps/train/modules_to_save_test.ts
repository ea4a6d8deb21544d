// LoRA with peft's modules_to_save and trainable_token_indices in train-sft (webgpu, nano models):
// - the adapter holds peft's keys and shapes (`base_model.model.model.embed_tokens.weight` [V,D],
//   `base_model.model.lm_head.weight`, `…embed_tokens.token_adapter.trainable_tokens_delta` [k,D]) and
//   adapter_config.json names them;
// - merge writes them into the model (whole modules; only the listed rows), and a session applies them;
// - a run killed after a checkpoint resumes to the same adapter bytes;
// - bad input: a tied lm_head in modules_to_save, both keys on embed_tokens, a row beyond the vocabulary.
import assert from "node:assert/strict";
import { join } from "node:path";
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE } from "../../../formats/peft.ts";
import { SafetensorsFile } from "../../../formats/safetensors.ts";
import { ModelWeights } from "../../../formats/safetensors.ts";
import { LatheError } from "../../../foundation/errors.ts";
import { runStep } from "../../../steps/runner.ts";
import { MERGED_DIR, step as mergeStep } from "../../../steps/merge.ts";
import { openSession } from "../../../steps/generate/session.ts";
import { trainSftHooks } from "../../../steps/train_sft.ts";
import { gpuTest } from "../../kernels/_harness.ts";
import { FaultyModel, ROOT } from "./_fixtures.ts";
import { sftUpstream, trainSft, withSftSetup } from "./_sft_runs.ts";

const SMALL = {
  max_steps: 4,
  per_device_train_batch_size: 2,
  gradient_accumulation_steps: 1,
  learning_rate: 5e-3,
  save_steps: 2,
};

const train = trainSft;

function merge(s: { runs: string; model: string }, runId: string) {
  return runStep(mergeStep, {
    runsRoot: s.runs,
    runId,
    recipe: null,
    config: { model: s.model, dtype: "float32", check_rows: 0 },
    seed: 1,
    projectRoot: ROOT,
    quiet: true,
  });
}

gpuTest(
  "modules_to_save: the adapter holds embed_tokens and lm_head under peft's keys; merge writes them",
  async () => {
    await withSftSetup({ arch: "qwen2" }, async (s) => {
      const lora = {
        r: 4,
        alpha: 8,
        target_modules: ["q_proj", "v_proj"],
        modules_to_save: ["embed_tokens", "lm_head"],
      };
      await train(s, { ...SMALL, lora });
      const dir = join(s.runs, "a", "train-sft", "adapter");
      const config = JSON.parse(await Deno.readTextFile(join(dir, ADAPTER_CONFIG_FILE)));
      assert.deepEqual(config.modules_to_save, ["embed_tokens", "lm_head"]);
      using st = await SafetensorsFile.open(join(dir, ADAPTER_WEIGHTS_FILE));
      assert.deepEqual(st.info("base_model.model.model.embed_tokens.weight").shape, [512, 64]);
      assert.deepEqual(st.info("base_model.model.lm_head.weight").shape, [512, 64]);
      await merge(s, "a");
      using merged = await ModelWeights.open(join(s.runs, "a", "merge", MERGED_DIR));
      using base = await ModelWeights.open(s.model);
      for (
        const [key, name] of [
          ["base_model.model.model.embed_tokens.weight", "model.embed_tokens.weight"],
          ["base_model.model.lm_head.weight", "lm_head.weight"],
        ]
      ) {
        const saved = await st.readFloat32(key);
        assert.deepEqual(await merged.readFloat32(name), saved, `${name} is the adapter's`);
        assert.notDeepEqual(saved, await base.readFloat32(name), `${name} trained`);
      }
    });
  },
);

gpuTest(
  "trainable_token_indices: only those rows train; the delta merges into them; sessions apply it",
  async () => {
    await withSftSetup({ arch: "llama" }, async (s) => {
      const rows = [3, 40, 260];
      const lora = { r: 4, alpha: 8, target_modules: ["q_proj"], trainable_token_indices: rows };
      await train(s, { ...SMALL, lora });
      const dir = join(s.runs, "a", "train-sft", "adapter");
      const config = JSON.parse(await Deno.readTextFile(join(dir, ADAPTER_CONFIG_FILE)));
      assert.deepEqual(config.trainable_token_indices, { embed_tokens: rows });
      using st = await SafetensorsFile.open(join(dir, ADAPTER_WEIGHTS_FILE));
      const key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
      assert.deepEqual(st.info(key).shape, [3, 64]);
      const delta = await st.readFloat32(key);
      await merge(s, "a");
      using merged = await ModelWeights.open(join(s.runs, "a", "merge", MERGED_DIR));
      using base = await ModelWeights.open(s.model);
      const E = await merged.readFloat32("model.embed_tokens.weight");
      const E0 = await base.readFloat32("model.embed_tokens.weight");
      for (let r = 0; r < 512; r++) {
        const i = rows.indexOf(r);
        const row = E.subarray(r * 64, r * 64 + 64);
        if (i === -1) assert.deepEqual(row, E0.subarray(r * 64, r * 64 + 64), `row ${r} is the base's`);
        else assert.deepEqual(row, delta.subarray(i * 64, i * 64 + 64), `row ${r} is the adapter's`);
      }
      assert.notDeepEqual(delta.subarray(0, 64), E0.subarray(3 * 64, 4 * 64), "row 3 trained");
      // The merged model and base + adapter (its rows applied in the session) score alike.
      const ids = [3, 40, 7, 260, 3];
      const last = async (model: string, adapters: string[]) => {
        using session = await openSession({ model, adapters, projectRoot: ROOT, seed: 1, dtype: "f32" });
        return (await session.model.scoreTokens({
          rows: 1,
          seqLen: ids.length,
          tokens: Uint32Array.from(ids),
          targets: Int32Array.from([...ids.slice(1), -100]),
          positions: Uint32Array.from(ids.map((_, i) => i)),
          docs: new Uint32Array(ids.length),
        })).logp;
      };
      const a = await last(join(s.runs, "a", "merge", MERGED_DIR), []);
      const b = await last(s.model, [dir]);
      for (let i = 0; i < a.length; i++) {
        assert.ok(Math.abs(a[i] - b[i]) < 1e-4, `token ${i}: ${a[i]} vs ${b[i]}`);
      }
    });
  },
);

gpuTest("a killed run with trainable tokens resumes to the bytes of an uninterrupted one", async () => {
  await withSftSetup({ arch: "qwen2" }, async (s) => {
    const lora = {
      r: 4,
      alpha: 8,
      target_modules: ["v_proj"],
      trainable_token_indices: [5, 9],
      modules_to_save: ["lm_head"],
    };
    const config = { ...SMALL, max_steps: 5, lora };
    trainSftHooks.wrapModel = (model) => new FaultyModel(model, { throwAtStep: 4 });
    await assert.rejects(() => train(s, config), /injected kill at step 4/);
    delete trainSftHooks.wrapModel;
    Deno.env.set("LATHE_RESUME", "1");
    const resumed = await train(s, config);
    Deno.env.delete("LATHE_RESUME");
    assert.equal(resumed.manifest.metrics.resumed_from_step, 2);
    await sftUpstream(s, "b");
    const whole = await train(s, config, "b", true);
    assert.equal(
      resumed.manifest.outputs.adapter_weights.sha256,
      whole.manifest.outputs.adapter_weights.sha256,
    );
  });
});

Deno.test("modules_to_save and trainable_token_indices refuse what cannot be trained as asked", async () => {
  await withSftSetup({ arch: "llama" }, async (s) => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ modules_to_save: ["lm_head"] }, /this model ties it to embed_tokens/],
      [{ modules_to_save: ["embed_tokens"], trainable_token_indices: [1] }, /not both|with embed_tokens/],
      [{ trainable_token_indices: [600] }, /Cannot train token 600/],
    ];
    for (const [extra, pattern] of cases) {
      await assert.rejects(
        () => train(s, { ...SMALL, lora: { target_modules: ["q_proj"], ...extra } }),
        (e: Error) => {
          assert.ok(e instanceof LatheError, String(e));
          assert.match(e.message, pattern);
          return true;
        },
      );
    }
  });
});
