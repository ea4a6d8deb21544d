import assert from "node:assert/strict";
import { join } from "node:path";
import {
  ADAPTER_CONFIG_FILE,
  ADAPTER_WEIGHTS_FILE,
  adapterConfigJson,
  initLoraAdapters,
  type LoraConfig,
  loraKey,
  type LoraPair,
  loraScaling,
  readPeftAdapter,
  resolveTargetModules,
  writePeftAdapter,
} from "../../formats/peft.ts";
import { fromFloat32, SafetensorsFile, writeSafetensors } from "../../formats/safetensors.ts";
import { parseModelConfig } from "../../formats/model_config.ts";
import { LatheError } from "../../foundation/errors.ts";

// D=16, H=4, Hkv=2, hd=4, F=24, L=2: q [16,16], k/v [8,16], o [16,16], gate/up [24,16], down [16,24].
const MODEL = parseModelConfig({
  architectures: ["LlamaForCausalLM"],
  vocab_size: 32,
  hidden_size: 16,
  intermediate_size: 24,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
});

const LORA: LoraConfig = {
  baseModelNameOrPath: "org/tiny-llama",
  r: 4,
  loraAlpha: 8,
  loraDropout: 0.05,
  targetModules: ["v_proj", "q_proj", "down_proj"],
  useRslora: false,
};

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-peft-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function counting(pairs: LoraPair[]): LoraPair[] {
  // Distinct, recognisable values: A holds 1000·layer + index, B holds −(1000·layer + index).
  return pairs.map((p) => ({
    ...p,
    a: p.a.map((_, i) => 1000 * p.layer + i),
    b: p.b.map((_, i) => -(1000 * p.layer + i)),
  }));
}

Deno.test("writePeftAdapter() writes exactly peft's config fields and keys, shapes, F32 and format metadata", async () => {
  await withTempDir(async (dir) => {
    const pairs = counting(initLoraAdapters(MODEL, LORA, 1));
    await writePeftAdapter(dir, MODEL, LORA, pairs);
    const text = await Deno.readTextFile(join(dir, ADAPTER_CONFIG_FILE));
    const config = JSON.parse(text);
    assert.deepEqual(config, {
      alpha_pattern: {},
      base_model_name_or_path: "org/tiny-llama",
      bias: "none",
      fan_in_fan_out: false,
      inference_mode: true,
      init_lora_weights: true,
      lora_alpha: 8,
      lora_dropout: 0.05,
      modules_to_save: null,
      peft_type: "LORA",
      r: 4,
      rank_pattern: {},
      revision: null,
      target_modules: ["down_proj", "q_proj", "v_proj"],
      task_type: "CAUSAL_LM",
      use_dora: false,
      use_rslora: false,
    });
    assert.deepEqual(Object.keys(config), Object.keys(config).toSorted());
    assert.ok(text.startsWith(`{\n  "alpha_pattern": {},\n  "base_model_name_or_path": "org/tiny-llama",\n`));

    using st = await SafetensorsFile.open(join(dir, ADAPTER_WEIGHTS_FILE));
    assert.deepEqual(st.metadata, { format: "pt" });
    const shapes = Object.fromEntries(st.header.tensors.map((t) => [t.name, [t.dtype, ...t.shape]]));
    assert.deepEqual(shapes, {
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ["F32", 4, 16],
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ["F32", 16, 4],
      "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": ["F32", 4, 16],
      "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": ["F32", 8, 4],
      "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": ["F32", 4, 24],
      "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": ["F32", 16, 4],
      "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": ["F32", 4, 16],
      "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": ["F32", 16, 4],
      "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": ["F32", 4, 16],
      "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": ["F32", 8, 4],
      "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": ["F32", 4, 24],
      "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": ["F32", 16, 4],
    });
    // Row-major A[r, in]: element (1, 2) of layer 1's down_proj A is 1000 + 1·24 + 2.
    const a = await st.readFloat32(loraKey(1, "down_proj", "A"));
    assert.equal(a[1 * 24 + 2], 1026);
    assert.equal(a.length, 96);
  });
});

Deno.test("adapterConfigJson() expands all-linear to the seven projections and keeps use_rslora", () => {
  const json = adapterConfigJson({ ...LORA, targetModules: "all-linear", useRslora: true, revision: "main" });
  assert.deepEqual(json.target_modules, [
    "down_proj",
    "gate_proj",
    "k_proj",
    "o_proj",
    "q_proj",
    "up_proj",
    "v_proj",
  ]);
  assert.equal(json.use_rslora, true);
  assert.equal(json.revision, "main");
  assert.deepEqual(resolveTargetModules(["q_proj", "q_proj", "k_proj"]), ["k_proj", "q_proj"]);
  assert.throws(() => resolveTargetModules(["lm_head"]), /"lm_head" is not a projection/);
  assert.throws(() => resolveTargetModules(".*proj"), /only a list of names or "all-linear"/);
  assert.throws(() => resolveTargetModules([]), /the list is empty/);
  assert.throws(() => adapterConfigJson({ ...LORA, r: 0 }), /r is 0; expected a positive integer/);
  assert.throws(() => adapterConfigJson({ ...LORA, loraDropout: 1 }), /lora_dropout is 1/);
});

Deno.test("loraScaling() is alpha/r, or alpha/sqrt(r) with rsLoRA", () => {
  assert.equal(loraScaling(16, 8, false), 2);
  assert.equal(loraScaling(16, 16, true), 4);
  assert.equal(loraScaling(8, 2, true), 8 / Math.SQRT2);
});

Deno.test("initLoraAdapters() draws A from U(-1/sqrt(in), 1/sqrt(in)) with B zero, reproducibly per seed", () => {
  const config = { ...LORA, r: 64, targetModules: "all-linear" as const };
  const pairs = initLoraAdapters(MODEL, config, 42);
  assert.equal(pairs.length, 2 * 7);
  for (const p of pairs) {
    const inFeatures = p.module === "down_proj" ? 24 : 16;
    const bound = 1 / Math.sqrt(inFeatures);
    assert.equal(p.a.length, 64 * inFeatures);
    let sum = 0;
    let sq = 0;
    for (const v of p.a) {
      assert.ok(v >= -bound && v <= bound, `${v} within ±${bound}`);
      sum += v;
      sq += v * v;
    }
    // U(-b, b): mean 0, variance b²/3; n ≥ 1024 draws keep both within a few standard errors.
    const n = p.a.length;
    assert.ok(Math.abs(sum / n) < 4 * bound / Math.sqrt(3 * n), `mean ${sum / n}`);
    assert.ok(Math.abs(sq / n - bound * bound / 3) < 0.1 * bound * bound, `variance ${sq / n}`);
    assert.ok(p.b.every((v) => v === 0));
  }
  const again = initLoraAdapters(MODEL, config, 42);
  assert.deepEqual(again.map((p) => p.a), pairs.map((p) => p.a));
  const other = initLoraAdapters(MODEL, config, 43);
  assert.notDeepEqual(other[0].a, pairs[0].a);
  // A pair's init does not depend on which other modules are targeted.
  const onlyV = initLoraAdapters(MODEL, { ...config, targetModules: ["v_proj"] }, 42);
  const vInAll = pairs.find((p) => p.layer === 1 && p.module === "v_proj")!;
  assert.deepEqual(onlyV.find((p) => p.layer === 1)!.a, vInAll.a);
});

Deno.test("readPeftAdapter() round-trips what writePeftAdapter() wrote, by (layer, module)", async () => {
  await withTempDir(async (dir) => {
    const config = { ...LORA, targetModules: "all-linear" as const, useRslora: true };
    const pairs = counting(initLoraAdapters(MODEL, config, 5));
    await writePeftAdapter(dir, MODEL, config, pairs);
    const adapter = await readPeftAdapter(dir, MODEL);
    assert.equal(adapter.pairs.size, 14);
    assert.equal(adapter.scaling, 8 / 2);
    assert.equal(adapter.config.r, 4);
    assert.equal(adapter.config.useRslora, true);
    assert.equal(adapter.config.baseModelNameOrPath, "org/tiny-llama");
    for (const p of pairs) {
      const got = adapter.get(p.layer, p.module);
      assert.deepEqual(got.a, p.a);
      assert.deepEqual(got.b, p.b);
    }
    const partial = await (async () => {
      const d2 = join(dir, "v");
      await writePeftAdapter(
        d2,
        MODEL,
        { ...LORA, targetModules: ["v_proj"] },
        initLoraAdapters(MODEL, { ...LORA, targetModules: ["v_proj"] }, 1),
      );
      return readPeftAdapter(d2, MODEL);
    })();
    assert.throws(() => partial.get(0, "q_proj"), /does not adapt layer 0 q_proj/);
  });
});

Deno.test("readPeftAdapter() matches target_modules as peft does: full paths (newer peft) and regexes", async () => {
  await withTempDir(async (dir) => {
    const all = { ...LORA, targetModules: "all-linear" as const };
    const pairs = counting(initLoraAdapters(MODEL, all, 9));
    await writePeftAdapter(dir, MODEL, all, pairs);
    // peft 0.21 saves all-linear as the full module paths it adapted; keep layer 1's q and down only.
    const keep = pairs.filter((p) => p.layer === 1 && (p.module === "q_proj" || p.module === "down_proj"));
    const json = {
      ...adapterConfigJson(all),
      target_modules: ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"],
    };
    await Deno.writeTextFile(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(json));
    const tensors = keep.flatMap((p) => {
      const [o, i] = p.module === "q_proj" ? [16, 16] : [16, 24];
      return [
        {
          name: loraKey(1, p.module, "A"),
          dtype: "F32" as const,
          shape: [4, i],
          data: fromFloat32(p.a, "F32"),
        },
        {
          name: loraKey(1, p.module, "B"),
          dtype: "F32" as const,
          shape: [o, 4],
          data: fromFloat32(p.b, "F32"),
        },
      ];
    });
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: "pt" });
    const adapter = await readPeftAdapter(dir, MODEL);
    assert.deepEqual([...adapter.pairs.keys()], ["1.q_proj", "1.down_proj"]);
    assert.deepEqual(adapter.targets, ["down_proj", "q_proj"]);
    assert.deepEqual(adapter.get(1, "down_proj").a, keep.find((p) => p.module === "down_proj")!.a);
    assert.throws(() => adapter.get(0, "q_proj"), /does not adapt layer 0 q_proj/);
    // A regex selects by full match on the module path.
    await Deno.writeTextFile(
      join(dir, ADAPTER_CONFIG_FILE),
      JSON.stringify({ ...json, target_modules: "model\\.layers\\.1\\..*(q|down)_proj" }),
    );
    assert.equal((await readPeftAdapter(dir, MODEL)).pairs.size, 2);
    // A selected module without weights is an error.
    await Deno.writeTextFile(
      join(dir, ADAPTER_CONFIG_FILE),
      JSON.stringify({ ...json, target_modules: ["q_proj", "down_proj"] }),
    );
    await assert.rejects(
      readPeftAdapter(dir, MODEL),
      /"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" is missing/,
    );
  });
});

// adapter_config.json exactly as peft 0.21.0 saved it for LoraConfig(r=8, lora_alpha=16,
// target_modules="all-linear", use_rslora=True) on a 2-layer model (base path replaced).
const PEFT_021_CONFIG = {
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "org/tiny-llama",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.0",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "model.layers.1.mlp.gate_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.mlp.up_proj",
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": true,
  "velora_config": null,
};

Deno.test("readPeftAdapter() reads the adapter_config.json that peft 0.21 writes", async () => {
  await withTempDir(async (dir) => {
    const config = { ...LORA, r: 8, loraAlpha: 16, targetModules: "all-linear" as const, useRslora: true };
    const pairs = counting(initLoraAdapters(MODEL, config, 4));
    await writePeftAdapter(dir, MODEL, config, pairs);
    await Deno.writeTextFile(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(PEFT_021_CONFIG, null, 2));
    const adapter = await readPeftAdapter(dir, MODEL);
    assert.equal(adapter.pairs.size, 14);
    assert.equal(adapter.scaling, 16 / Math.sqrt(8));
    assert.deepEqual(
      adapter.get(0, "gate_proj").b,
      pairs.find((p) => p.layer === 0 && p.module === "gate_proj")!.b,
    );
  });
});

Deno.test("readPeftAdapter() accepts F16/BF16 weights by converting them to f32", async () => {
  await withTempDir(async (dir) => {
    const config = { ...LORA, targetModules: ["q_proj"] };
    const pairs = counting(initLoraAdapters(MODEL, config, 2));
    await writePeftAdapter(dir, MODEL, config, pairs);
    const tensors = pairs.flatMap((p) => [
      {
        name: loraKey(p.layer, "q_proj", "A"),
        dtype: "BF16" as const,
        shape: [4, 16],
        data: fromFloat32(p.a, "BF16"),
      },
      {
        name: loraKey(p.layer, "q_proj", "B"),
        dtype: "F16" as const,
        shape: [16, 4],
        data: fromFloat32(p.b, "F16"),
      },
    ]);
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: "pt" });
    const adapter = await readPeftAdapter(dir, MODEL);
    // Small integers are exact in bf16 (≤ 256) and f16 (≤ 2048).
    assert.equal(adapter.get(0, "q_proj").a[63], 63);
    assert.equal(adapter.get(1, "q_proj").b[5], -1005);
  });
});

Deno.test("readPeftAdapter() rejects wrong shapes, unknown names, stray layers, missing halves and dtypes", async () => {
  const config = { ...LORA, targetModules: ["q_proj"] };
  const pairs = initLoraAdapters(MODEL, config, 3);
  const good = pairs.flatMap((p) => [
    {
      name: loraKey(p.layer, "q_proj", "A"),
      dtype: "F32" as const,
      shape: [4, 16],
      data: fromFloat32(p.a, "F32"),
    },
    {
      name: loraKey(p.layer, "q_proj", "B"),
      dtype: "F32" as const,
      shape: [16, 4],
      data: fromFloat32(p.b, "F32"),
    },
  ]);
  type T = (typeof good)[number];
  const cases: [string, (ts: T[]) => T[], RegExp][] = [
    [
      "wrong rank",
      (ts) => ts.map((t, i) => (i === 0 ? { ...t, shape: [5, 16], data: new Uint8Array(5 * 16 * 4) } : t)),
      /tensor "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" has shape \[5, 16\], expected \[4, 16\] \(r=4\)/,
    ],
    [
      "adapter-name infix",
      (
        ts,
      ) => [...ts, {
        ...ts[0],
        name: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
      }],
      /"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" is not a LoRA weight/,
    ],
    [
      "module in the wrong block",
      (ts) => [...ts, { ...ts[0], name: "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight" }],
      /names no projection of this model family/,
    ],
    [
      "layer beyond the model",
      (ts) => [...ts, { ...ts[0], name: loraKey(7, "q_proj", "A") }],
      /is for layer 7, but the model has 2 layers/,
    ],
    [
      "module outside target_modules",
      (ts) => [...ts, { ...ts[0], name: loraKey(0, "k_proj", "A"), shape: [4, 16] }],
      /adapts layer 0 "k_proj", which target_modules \["q_proj"\] does not select/,
    ],
    [
      "missing B",
      (ts) => ts.filter((t) => t.name !== loraKey(1, "q_proj", "B")),
      /tensor "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" is missing/,
    ],
    [
      "integer dtype",
      (ts) => ts.map((t, i) => (i === 1 ? { ...t, dtype: "I32" as const } : t)) as T[],
      /has dtype I32; expected F32/,
    ],
  ];
  for (const [label, edit, pattern] of cases) {
    await withTempDir(async (dir) => {
      await writePeftAdapter(dir, MODEL, config, pairs);
      await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), edit(good), { format: "pt" });
      await assert.rejects(readPeftAdapter(dir, MODEL), (e: unknown) => {
        assert.ok(e instanceof LatheError, label);
        assert.match(e.message, pattern, label);
        return true;
      });
    });
  }
});

Deno.test("readPeftAdapter() rejects config fields lathe does not model, with the field named", async () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ peft_type: "IA3" }, /peft_type is "IA3"; only "LORA" is supported/],
    [{ use_dora: true }, /use_dora is true; DoRA is not supported/],
    [{ bias: "all" }, /bias is "all"; bias training is not supported/],
    [{ rank_pattern: { q_proj: 8 } }, /rank_pattern is \{"q_proj":8\}/],
    [{ modules_to_save: ["score"] }, /modules_to_save is \["score"\]; modules_to_save beyond embed_tokens/],
    [{ modules_to_save: ["lm_head"] }, /tensor "base_model\.model\.lm_head\.weight" is missing/],
    [
      { trainable_token_indices: { lm_head: [1] } },
      /trainable_token_indices beyond a list of embed_tokens rows/,
    ],
    [{ layers_to_transform: [0] }, /layers_to_transform is \[0\]/],
    [{ target_modules: "(" }, /target_modules of .*: Invalid regular expression/],
    [{ target_modules: ["lm_head"] }, /\["lm_head"\]: it matches no projection of the model/],
    [{ r: -1 }, /r is -1; expected a positive integer/],
    [{ task_type: "SEQ_CLS" }, /task_type is "SEQ_CLS"/],
  ];
  for (const [patch, pattern] of cases) {
    await withTempDir(async (dir) => {
      await writePeftAdapter(dir, MODEL, LORA, initLoraAdapters(MODEL, LORA, 0));
      const json = { ...adapterConfigJson(LORA), ...patch };
      await Deno.writeTextFile(join(dir, ADAPTER_CONFIG_FILE), JSON.stringify(json));
      await assert.rejects(readPeftAdapter(dir, MODEL), pattern, JSON.stringify(patch));
    });
  }
  await withTempDir(async (dir) => {
    await assert.rejects(readPeftAdapter(dir, MODEL), /adapter_config.json": the file does not exist/);
  });
});

Deno.test("writePeftAdapter() refuses missing, duplicate, untargeted and mis-sized pairs", async () => {
  await withTempDir(async (dir) => {
    const pairs = initLoraAdapters(MODEL, LORA, 0);
    await assert.rejects(
      writePeftAdapter(dir, MODEL, LORA, pairs.slice(1)),
      /layer 0 down_proj has no weights/,
    );
    await assert.rejects(writePeftAdapter(dir, MODEL, LORA, [...pairs, pairs[0]]), /is given twice/);
    await assert.rejects(
      writePeftAdapter(dir, MODEL, { ...LORA, targetModules: ["q_proj"] }, pairs),
      /layer 0 down_proj is not in target_modules \[q_proj\]/,
    );
    await assert.rejects(
      writePeftAdapter(
        dir,
        MODEL,
        LORA,
        pairs.map((p, i) => (i === 0 ? { ...p, a: new Float32Array(3) } : p)),
      ),
      /layer 0 down_proj has 3 A and 64 B values; expected A \[4, 24\] and B \[16, 4\]/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)], []);
  });
});
