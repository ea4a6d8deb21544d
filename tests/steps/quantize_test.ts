import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { dequantize4bit, quantize4bit, quantStateJson } from "../../formats/bnb4bit.ts";
import { quantizedWeightNames } from "../../formats/bnb4bit_checkpoint.ts";
import { ModelWeights, SafetensorsFile, writeSafetensors } from "../../formats/safetensors.ts";
import { loadHostModel } from "../../kernels/models/load.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { type RunOutcome, runStep } from "../../steps/runner.ts";
import { isSkipped, MODEL_DIR, step } from "../../steps/quantize.ts";
import { DEMO_TOKENIZER, ROOT } from "./train/_fixtures.ts";

async function withModel(
  dtype: "f32" | "bf16",
  body: (s: { dir: string; model: string; runs: string }) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-quantize-" });
  try {
    const model = join(dir, "base");
    await writeTinyModel(model, {
      arch: "llama",
      size: "nano",
      seed: 4,
      dtype,
      tokenizerDir: DEMO_TOKENIZER,
    });
    await body({ dir, model, runs: join(dir, "runs") });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function quantize(runs: string, config: Record<string, unknown>, runId = "q"): Promise<RunOutcome> {
  return runStep(step, {
    runsRoot: runs,
    runId,
    recipe: null,
    config,
    seed: 1,
    projectRoot: ROOT,
    quiet: true,
  });
}

const PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

Deno.test("quantize writes a 4-bit model directory in bitsandbytes' layout, codes as quantize4bit, the rest unchanged", async () => {
  for (const dtype of ["f32", "bf16"] as const) {
    await withModel(dtype, async ({ model, runs }) => {
      const outcome = await quantize(runs, { model });
      const out = join(runs, "q", "quantize", MODEL_DIR);
      const config = JSON.parse(await Deno.readTextFile(join(out, "config.json")));
      assert.deepEqual(config.quantization_config, {
        _load_in_4bit: true,
        _load_in_8bit: false,
        bnb_4bit_compute_dtype: "bfloat16",
        bnb_4bit_quant_storage: "uint8",
        bnb_4bit_quant_type: "nf4",
        bnb_4bit_use_double_quant: true,
        llm_int8_enable_fp32_cpu_offload: false,
        llm_int8_has_fp16_weight: false,
        llm_int8_skip_modules: ["lm_head"],
        llm_int8_threshold: 6.0,
        load_in_4bit: true,
        load_in_8bit: false,
        quant_method: "bitsandbytes",
      });
      for (const file of ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
        assert.equal(
          await Deno.readTextFile(join(out, file)),
          await Deno.readTextFile(join(model, file)),
          file,
        );
      }
      using base = await ModelWeights.open(model);
      using q = await SafetensorsFile.open(join(out, "model.safetensors"));
      assert.deepEqual(q.metadata, { format: "pt" });
      const torchDtype = dtype === "bf16" ? "bfloat16" : "float32";
      let quantized = 0;
      for (const name of base.names()) {
        const info = base.info(name);
        const proj = PROJECTIONS.find((p) => name.endsWith(`.${p}.weight`));
        if (!proj) {
          // Embeddings, norms (and the tied lm_head) stay as they were, byte for byte.
          assert.equal(q.info(name).dtype, info.dtype, name);
          assert.deepEqual(await q.readBytes(name), await base.readBytes(name), name);
          continue;
        }
        quantized++;
        const n = info.numel;
        const want = quantize4bit(await base.readFloat32(name), [...info.shape]);
        const entry = (suffix: string) => q.info(`${name}${suffix}`);
        assert.deepEqual([entry("").dtype, [...entry("").shape]], ["U8", [Math.ceil(n / 2), 1]], name);
        assert.deepEqual([entry(".absmax").dtype, [...entry(".absmax").shape]], ["U8", [Math.ceil(n / 64)]]);
        assert.deepEqual([entry(".quant_map").dtype, [...entry(".quant_map").shape]], ["F32", [16]]);
        assert.deepEqual([entry(".nested_absmax").dtype, [...entry(".nested_absmax").shape]], [
          "F32",
          [Math.ceil(Math.ceil(n / 64) / 256)],
        ]);
        assert.deepEqual([entry(".nested_quant_map").dtype, [...entry(".nested_quant_map").shape]], ["F32", [
          256,
        ]]);
        assert.deepEqual(await q.readBytes(name), want.codes, `${name} codes`);
        assert.deepEqual(await q.readBytes(`${name}.absmax`), want.absmax, `${name} absmax codes`);
        assert.deepEqual(await q.readFloat32(`${name}.nested_absmax`), want.nested!.absmax);
        assert.deepEqual(await q.readFloat32(`${name}.nested_quant_map`), want.nested!.quantMap);
        const state = new TextDecoder().decode(await q.readBytes(`${name}.quant_state.bitsandbytes__nf4`));
        assert.equal(state, quantStateJson(want, torchDtype));
        assert.deepEqual(JSON.parse(state).shape, info.shape);
      }
      assert.equal(quantized, 2 * 7);
      const m = outcome.manifest.metrics;
      assert.equal(m.already_quantized, false);
      assert.equal(m.tensors_quantized, 14);
      assert.equal(
        (m.params_quantized as number) + (m.params_kept as number),
        [...base.names()].reduce((a, n) => a + base.info(n).numel, 0),
      );
      // Per weight: 4 bits, + 8/64 for the absmax codes, + the maps and nested absmax (large for tiny tensors).
      assert.ok(
        (m.bits_per_weight as number) > 4.125 && (m.bits_per_weight as number) < 8,
        `${m.bits_per_weight}`,
      );
      assert.ok(
        (m.rel_rms_error as number) > 0.05 && (m.rel_rms_error as number) < 0.11,
        `${m.rel_rms_error}`,
      );
      assert.ok((m.bytes_out as number) < (m.bytes_in as number));
      const report = JSON.parse(await Deno.readTextFile(join(runs, "q", "quantize", "quantize_report.json")));
      assert.equal(report.tensors.length, 14);
      assert.equal(report.tensors[0].name, base.names().find((n) => n.endsWith("_proj.weight")));
    });
  }
});

Deno.test("quantize shards past max_shard_size with an index, and honours skip_modules, fp4 and no double quantization", async () => {
  await withModel("f32", async ({ model, runs }) => {
    const outcome = await quantize(runs, {
      model,
      quant_type: "fp4",
      double_quant: false,
      skip_modules: ["lm_head", "down_proj"],
      max_shard_size: 40_000,
    });
    const out = join(runs, "q", "quantize", MODEL_DIR);
    const index = JSON.parse(await Deno.readTextFile(join(out, "model.safetensors.index.json")));
    const shards = new Set(Object.values(index.weight_map) as string[]);
    assert.ok(shards.size > 1, `${shards.size} shards`);
    assert.ok(
      Object.keys(outcome.manifest.outputs).some((k) =>
        k.endsWith("model-00001-of-0000" + shards.size + ".safetensors")
      ),
    );
    using q = await ModelWeights.open(out);
    assert.equal(q.info("model.layers.0.mlp.down_proj.weight").dtype, "F32");
    assert.ok(!q.has("model.layers.0.mlp.down_proj.weight.absmax"));
    assert.equal(q.info("model.layers.0.mlp.up_proj.weight.absmax").dtype, "F32");
    assert.ok(q.has("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"));
    assert.ok(!q.has("model.layers.0.mlp.up_proj.weight.nested_absmax"));
    const config = JSON.parse(await Deno.readTextFile(join(out, "config.json")));
    assert.deepEqual(config.quantization_config.llm_int8_skip_modules, ["lm_head", "down_proj"]);
    assert.equal(config.quantization_config.bnb_4bit_quant_type, "fp4");
    assert.equal(outcome.manifest.metrics.tensors_quantized, 12);
  });
});

Deno.test("quantize passes a model that is already 4-bit through unchanged, saying so", async () => {
  await withModel("f32", async ({ runs, model }) => {
    await quantize(runs, { model });
    const first = join(runs, "q", "quantize", MODEL_DIR);
    const again = await quantize(runs, { model: first }, "q2");
    assert.equal(again.manifest.metrics.already_quantized, true);
    const second = join(runs, "q2", "quantize", MODEL_DIR);
    for (const file of ["config.json", "model.safetensors", "tokenizer.json"]) {
      assert.deepEqual(await Deno.readFile(join(second, file)), await Deno.readFile(join(first, file)), file);
    }
  });
});

Deno.test("quantize explains an unsupported architecture, a non-float projection and a non-finite weight", async () => {
  await withModel("f32", async ({ dir, model, runs }) => {
    const config = JSON.parse(await Deno.readTextFile(join(model, "config.json")));
    await Deno.writeTextFile(
      join(model, "config.json"),
      JSON.stringify({ ...config, architectures: ["GPT2LMHeadModel"] }),
    );
    await assert.rejects(
      quantize(runs, { model }, "a"),
      (e: unknown) => e instanceof LatheError && /GPT2LMHeadModel/.test(e.message),
    );
    await Deno.writeTextFile(join(model, "config.json"), JSON.stringify(config));
    // Rewrite the weights with one projection in I8, then with a NaN in another.
    using base = await ModelWeights.open(model);
    const tensors = [];
    for (const name of base.names()) {
      const info = base.info(name);
      tensors.push({ name, dtype: info.dtype, shape: info.shape, data: await base.readBytes(name) });
    }
    const broken = join(dir, "broken");
    await Deno.mkdir(broken);
    for (const file of ["config.json", "tokenizer.json", "tokenizer_config.json"]) {
      await Deno.copyFile(join(model, file), join(broken, file));
    }
    const q = "model.layers.1.self_attn.q_proj.weight";
    const i8 = tensors.map((t) =>
      t.name === q ? { ...t, dtype: "I8" as const, data: new Uint8Array(t.data.length / 4) } : t
    );
    await writeSafetensors(join(broken, "model.safetensors"), i8, { format: "pt" });
    await assert.rejects(
      quantize(runs, { model: broken }, "b"),
      (e: unknown) =>
        e instanceof LatheError && e.message.includes(`"${q}"`) && e.message.includes("dtype is I8"),
    );
    const nan = tensors.map((t) => {
      if (t.name !== q) return t;
      const data = t.data.slice();
      new Float32Array(data.buffer)[70] = NaN;
      return { ...t, data };
    });
    await writeSafetensors(join(broken, "model.safetensors"), nan, { format: "pt" });
    await assert.rejects(
      quantize(runs, { model: broken }, "c"),
      (e: unknown) =>
        e instanceof LatheError && e.message.includes(`"${q}"`) &&
        /element 70 \(row 1\) is NaN/.test(e.message),
    );
  });
});

Deno.test("quantize's output reads back through loadHostModel: each projection dequantize4bit(quantize4bit(original)), the rest as stored", async () => {
  const cases: [string, "f32" | "bf16", Record<string, unknown>][] = [
    ["nf4 with double quantization", "bf16", {}],
    // Sharded; FP4 without double quantization; "mlp" kept in 16 bit (transformers 4.x's reading).
    ["fp4, sharded, mlp skipped", "f32", {
      quant_type: "fp4",
      double_quant: false,
      skip_modules: ["lm_head", "mlp"],
      max_shard_size: 40_000,
    }],
  ];
  for (const [what, dtype, options] of cases) {
    await withModel(dtype, async ({ model, runs }) => {
      await quantize(runs, { model, ...options });
      const out = join(runs, "q", "quantize", MODEL_DIR);
      const host = await loadHostModel(out);
      using base = await ModelWeights.open(model);
      using q = await ModelWeights.open(out);
      const quantized = quantizedWeightNames(q.names());
      assert.equal(quantized.size, options.skip_modules ? 8 : 14, what);
      assert.deepEqual([...host.weights.keys()].sort(), base.names().sort(), what);
      for (const name of base.names()) {
        const original = await base.readFloat32(name);
        const want = quantized.has(name)
          ? dequantize4bit(quantize4bit(original, [...base.info(name).shape], {
            quantType: (options.quant_type ?? "nf4") as "nf4" | "fp4",
            doubleQuant: options.double_quant !== false,
          }))
          : original;
        assert.deepEqual(host.weights.get(name), want, `${what}: ${name}`);
      }
    });
  }
});

Deno.test("quantize refuses a checkpoint quantized another way (8-bit, GPTQ) and checks a 4-bit one it passes through", async () => {
  await withModel("f32", async ({ model, runs }) => {
    const raw = JSON.parse(await Deno.readTextFile(join(model, "config.json")));
    for (
      const [qc, message] of [
        [{ quant_method: "bitsandbytes", load_in_8bit: true }, /8-bit checkpoints .* are not supported/],
        [{ quant_method: "gptq", bits: 4 }, /quant_method "gptq" is not supported/],
      ] as const
    ) {
      await Deno.writeTextFile(
        join(model, "config.json"),
        JSON.stringify({ ...raw, quantization_config: qc }),
      );
      await assert.rejects(
        quantize(runs, { model }, `r${qc.quant_method}`),
        (e: unknown) => e instanceof LatheError && message.test(e.message),
      );
    }
    // 4-bit in config.json, but float weights: not a 4-bit checkpoint.
    await Deno.writeTextFile(
      join(model, "config.json"),
      JSON.stringify({ ...raw, quantization_config: { quant_method: "bitsandbytes", load_in_4bit: true } }),
    );
    await assert.rejects(
      quantize(runs, { model }, "r4"),
      (e: unknown) =>
        e instanceof LatheError &&
        /"model\.layers\.0\.self_attn\.q_proj\.weight" is stored as F32, but llm_int8_skip_modules null/
          .test(e.message),
    );
  });
});

Deno.test("isSkipped() matches a module as transformers reads llm_int8_skip_modules: own name, path prefix, suffix", () => {
  assert.ok(isSkipped("lm_head", ["lm_head"]));
  assert.ok(isSkipped("model.layers.0.mlp.down_proj", ["down_proj"]));
  assert.ok(isSkipped("model.layers.0.mlp.down_proj", ["mlp.down_proj"]));
  assert.ok(isSkipped("model.layers.0.mlp", ["layers"]));
  assert.ok(!isSkipped("model.layers.0.mlp.down_proj", ["up_proj", "lm_head"]));
  // A dotted path prefix, as unsloth's checkpoints list single layers.
  assert.ok(isSkipped("model.layers.1.mlp.down_proj", ["model.layers.1.mlp"]));
  assert.ok(!isSkipped("model.layers.11.mlp.down_proj", ["model.layers.1.mlp"]));
});
