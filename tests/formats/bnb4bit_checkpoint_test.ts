// formats/bnb4bit_checkpoint.ts against scripts/golden/nf4_checkpoints.py: pre-quantized checkpoint
// directories in transformers' bitsandbytes layout (NF4 and FP4, with and without double
// quantization, one keeping modules in 16 bit) written by an independent numpy reference. Every
// 4-bit weight read back dequantizes to the golden's f32 values bit for bit, and its parts are the
// codes of scripts/golden/nf4.py's golden. Damaged checkpoints and unsupported quantizations are
// refused with a message naming the tensor and what is wrong.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LatheError } from "../../foundation/errors.ts";
import { sha256Hex } from "../../foundation/hash.ts";
import { dequantize4bit, type Quantized4bit } from "../../formats/bnb4bit.ts";
import {
  bnb4bitSettings,
  checkQuantizedWeights,
  isQuantCompanion,
  isSkippedModule,
  quantizedWeightNames,
  readQuantized4bit,
  readQuantized4bitStats,
} from "../../formats/bnb4bit_checkpoint.ts";
import {
  expectedTensors,
  loadModelConfig,
  type ModelConfig,
  parseModelConfig,
} from "../../formats/model_config.ts";
import {
  ModelWeights,
  SafetensorsFile,
  type TensorSource,
  writeSafetensors,
} from "../../formats/safetensors.ts";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GOLDEN = join(REPO, "tests/fixtures/golden/nf4");
const CHECKPOINTS = join(GOLDEN, "checkpoints");
const meta = JSON.parse(await Deno.readTextFile(join(CHECKPOINTS, "golden.json")));
const inputs = JSON.parse(await Deno.readTextFile(join(GOLDEN, "golden.json")));

interface GoldenCheckpoint {
  source: "bf16" | "f16";
  quant_type: "nf4" | "fp4";
  double_quant: boolean;
  llm_int8_skip_modules: string[] | null;
  quantized: string[];
  f32_sha256: Record<string, string>;
}
const golden = meta.checkpoints as Record<string, GoldenCheckpoint>;

const f32Sha = (a: Float32Array) => sha256Hex(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
const Q = "model.layers.0.self_attn.q_proj.weight";

/** Every tensor of a safetensors file as f32, or its bytes for U8. */
async function readAll(path: string): Promise<Map<string, Float32Array | Uint8Array>> {
  using file = await SafetensorsFile.open(path);
  const out = new Map<string, Float32Array | Uint8Array>();
  for (const name of file.names()) {
    out.set(name, file.info(name).dtype === "U8" ? await file.readBytes(name) : await file.readFloat32(name));
  }
  return out;
}

/** The header entries of a checkpoint, as checkQuantizedWeights takes them. */
async function entries(dir: string): Promise<{ name: string; shape: readonly number[]; dtype: string }[]> {
  using file = await ModelWeights.open(dir);
  return file.names().map((n) => file.info(n));
}

/** Every tensor of checkpoint `name` with its bytes, to rewrite. */
async function sources(dir: string): Promise<Map<string, TensorSource>> {
  using file = await ModelWeights.open(dir);
  const out = new Map<string, TensorSource>();
  for (const n of file.names()) {
    const info = file.info(n);
    out.set(n, { name: n, dtype: info.dtype, shape: [...info.shape], data: await file.readBytes(n) });
  }
  return out;
}

/** A LatheError whose message matches every pattern. */
function lathe(...patterns: RegExp[]): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof LatheError, `expected a LatheError, got ${e}`);
    for (const p of patterns) assert.match(e.message, p);
    assert.ok(e.hint, "the error has a hint");
    return true;
  };
}

Deno.test("the golden checkpoints come from the tiny Llama that the NF4 golden quantizes", () => {
  assert.equal(meta.sha256["bf16/model.safetensors"], inputs.sha256["bf16/model.safetensors"]);
  assert.equal(meta.sha256["f32/model.safetensors"], inputs.sha256["f32/model.safetensors"]);
  assert.deepEqual(Object.keys(golden).sort(), ["fp4", "fp4-dq-skip", "nf4", "nf4-dq"]);
});

Deno.test("readQuantized4bit() reads each golden checkpoint's weights to the golden's dequantized values, bit for bit", async () => {
  let checked = 0;
  for (const [ckpt, g] of Object.entries(golden)) {
    const dir = join(CHECKPOINTS, ckpt);
    const config = await loadModelConfig(dir);
    using file = await ModelWeights.open(dir);
    checkQuantizedWeights(config, file.names().map((n) => file.info(n)), dir);
    const settings = bnb4bitSettings(config, dir)!;
    assert.deepEqual(
      [settings.quantType, settings.doubleQuant, settings.skipModules],
      [g.quant_type, g.double_quant, g.llm_int8_skip_modules],
    );
    const quantized = quantizedWeightNames(file.names());
    assert.deepEqual([...quantized].sort(), g.quantized, ckpt);
    // nf4.py's golden codes of the same weights (the checkpoint's source dtype).
    const parts = await readAll(join(GOLDEN, `${g.source}.safetensors`));
    const expected = expectedTensors(config);
    for (const name of quantized) {
      const q = await readQuantized4bit(file, name, expected.get(name)!, dir);
      const where = `${ckpt} ${name}`;
      assert.equal(q.quantType, g.quant_type, where);
      assert.equal(q.blocksize, 64);
      assert.equal(q.dtype, g.source === "bf16" ? "bfloat16" : "float16");
      assert.deepEqual(q.shape, expected.get(name));
      assert.equal(f32Sha(dequantize4bit(q)), g.f32_sha256[name], `${where}: dequantized`);
      const key = `${name}.${g.quant_type}.${g.double_quant ? "dq" : "plain"}`;
      assert.deepEqual(q.codes, parts.get(`${key}.codes`), `${where}: codes`);
      assert.deepEqual(q.absmax, parts.get(`${key}.absmax`), `${where}: absmax`);
      assert.equal(q.nested !== undefined, g.double_quant);
      if (q.nested) {
        assert.deepEqual(q.nested.absmax, parts.get(`${key}.nested_absmax`), `${where}: nested absmax`);
        assert.equal(q.nested.offset, (parts.get(`${key}.offset`) as Float32Array)[0], `${where}: offset`);
        assert.equal(q.nested.blocksize, 256);
      }
      // The statistics alone are the same, without the codes.
      const { codes: _, ...stats } = q;
      assert.deepEqual(await readQuantized4bitStats(file, name, expected.get(name)!, dir), stats);
      checked++;
    }
  }
  assert.equal(checked, 14 * 3 + 8);
});

Deno.test("the skip-modules checkpoint keeps layer 1's attention and every down_proj as bf16 floats", async () => {
  const dir = join(CHECKPOINTS, "fp4-dq-skip");
  using file = await ModelWeights.open(dir);
  const quantized = quantizedWeightNames(file.names());
  for (const name of file.names().filter((n) => n.endsWith("_proj.weight"))) {
    const kept = name.startsWith("model.layers.1.self_attn.") || name.includes(".down_proj.");
    assert.equal(quantized.has(name), !kept, name);
    if (kept) {
      assert.equal(file.info(name).dtype, "BF16", name);
      assert.ok(!file.names().some((n) => n.startsWith(`${name}.`)), `${name} has no companions`);
    }
  }
});

Deno.test("quantizedWeightNames() and isQuantCompanion() name the 4-bit weights and their side tensors", () => {
  const names = [
    `${Q}`,
    `${Q}.absmax`,
    `${Q}.quant_map`,
    `${Q}.nested_absmax`,
    `${Q}.nested_quant_map`,
    `${Q}.quant_state.bitsandbytes__nf4`,
    "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.mlp.down_proj.weight.SCB",
  ];
  assert.deepEqual([...quantizedWeightNames(names)], [Q, "model.layers.0.mlp.up_proj.weight"]);
  assert.deepEqual(names.filter(isQuantCompanion), names.slice(1, 7));
});

Deno.test("isSkippedModule() reads llm_int8_skip_modules as transformers 4.x and 5.x do", () => {
  const m = "model.layers.1.mlp.down_proj";
  // 4.x: the module's own name, `<entry>.` inside its path, or the whole path.
  assert.ok(isSkippedModule(m, ["down_proj"]));
  assert.ok(isSkippedModule(m, ["mlp"]));
  assert.ok(isSkippedModule(m, ["model.layers.1.mlp"]));
  assert.ok(isSkippedModule(m, [m]));
  // 5.x: a regex match at the start, or a suffix.
  assert.ok(isSkippedModule(m, ["model\\.layers\\.1\\..*"]));
  assert.ok(isSkippedModule(m, ["mlp.down_proj"]));
  assert.ok(!isSkippedModule(m, ["lm_head", "up_proj", "self_attn", "model.layers.0.mlp"]));
  assert.ok(!isSkippedModule("model.layers.11.mlp.up_proj", ["model.layers.1.mlp"]));
  assert.ok(isSkippedModule("lm_head", ["lm_head"]));
  assert.ok(
    !isSkippedModule("model.layers.0.mlp.up_proj", ["model.layers.[0"]),
    "an invalid regex is literal",
  );
});

// ---------------------------------------------------------------------------------------
// Damaged checkpoints and unsupported configs.

async function nf4Config(edit: (raw: Record<string, unknown>) => void = () => {}): Promise<ModelConfig> {
  const raw = JSON.parse(await Deno.readTextFile(join(CHECKPOINTS, "nf4-dq", "config.json")));
  edit(raw);
  return parseModelConfig(raw, "nf4-dq/config.json");
}

Deno.test("checkQuantizedWeights() lists a missing companion, a truncated or mistyped tensor, and orphans", async () => {
  const config = await nf4Config();
  const all = await entries(join(CHECKPOINTS, "nf4-dq"));
  const check = (tensors: typeof all) => () => checkQuantizedWeights(config, tensors, "ckpt");
  check(all)();
  const up = "model.layers.1.mlp.up_proj.weight";
  const broken = all
    .filter((t) => t.name !== `${Q}.absmax` && t.name !== `${up}.quant_state.bitsandbytes__nf4`)
    .map((t) => {
      if (t.name === "model.layers.0.mlp.gate_proj.weight") return { ...t, shape: [4095, 1] };
      if (t.name === "model.layers.0.mlp.down_proj.weight.absmax") return { ...t, dtype: "F32" };
      return t;
    });
  assert.throws(
    check(broken),
    lathe(
      /Cannot load weights "ckpt"/,
      /"model\.layers\.0\.self_attn\.q_proj\.weight\.absmax" is missing/,
      /"model\.layers\.0\.mlp\.gate_proj\.weight" is U8 \[4095, 1\], expected the packed codes of \[128, 64\]: U8 \[4096, 1\]/,
      /"model\.layers\.0\.mlp\.down_proj\.weight\.absmax" is F32 \[128\], expected U8 \[length\]/,
      /"model\.layers\.1\.mlp\.up_proj\.weight" has 4-bit companions \(\.absmax, \.nested_absmax, \.nested_quant_map, \.quant_map\) but no \.quant_state/,
    ),
  );
  // A flat [⌈n/2⌉] codes tensor is read as well; an absmax no blocksize explains is not.
  check(all.map((t) => (t.name === Q ? { ...t, shape: [2048] } : t)))();
  assert.throws(
    check(all.map((t) => (t.name === `${Q}.absmax` ? { ...t, shape: [63] } : t))),
    lathe(/"model\.layers\.0\.self_attn\.q_proj\.weight\.absmax" has 63 blocks; no blocksize/),
  );
  // 4-bit weights under a config without quantization_config.
  const plain = await nf4Config((raw) => delete raw.quantization_config);
  assert.throws(
    () => checkQuantizedWeights(plain, all, "ckpt"),
    lathe(/14 weights are stored in bitsandbytes 4-bit .* but config\.json has no quantization_config/),
  );
});

Deno.test("checkQuantizedWeights() holds the 4-bit set to llm_int8_skip_modules where transformers' readings agree", async () => {
  const all = await entries(join(CHECKPOINTS, "nf4-dq"));
  const withSkip = (skip: unknown) =>
    nf4Config((raw) => (raw.quantization_config as Record<string, unknown>).llm_int8_skip_modules = skip);
  // Both readings keep layer 0's MLP in 16 bit, but the file holds it in 4 bit.
  const config = await withSkip(["lm_head", "model.layers.0.mlp"]);
  assert.throws(
    () => checkQuantizedWeights(config, all, "ckpt"),
    lathe(
      /4-bit vs llm_int8_skip_modules \(3\)/,
      /"model\.layers\.0\.mlp\.gate_proj\.weight" is stored in 4 bit, but llm_int8_skip_modules \["lm_head","model\.layers\.0\.mlp"\] keeps module "model\.layers\.0\.mlp\.gate_proj" in 16 bit \(entry "model\.layers\.0\.mlp"\)/,
    ),
  );
  // "mlp" alone: 4.x keeps the MLPs in 16 bit, 5.x quantizes them; a 4-bit file loads in 5.x.
  checkQuantizedWeights(await withSkip(["lm_head", "mlp"]), all, "ckpt");
  // The skip checkpoint's floats need its list: with ["lm_head"] alone, transformers expects them in 4 bit.
  const skipDir = join(CHECKPOINTS, "fp4-dq-skip");
  const raw = JSON.parse(await Deno.readTextFile(join(skipDir, "config.json")));
  raw.quantization_config.llm_int8_skip_modules = ["lm_head"];
  const skipped = await entries(skipDir);
  assert.throws(
    () => checkQuantizedWeights(parseModelConfig(raw), skipped, skipDir),
    lathe(
      /4-bit vs llm_int8_skip_modules \(6\)/,
      /"model\.layers\.0\.mlp\.down_proj\.weight" is stored as BF16, but llm_int8_skip_modules \["lm_head"\] does not name module "model\.layers\.0\.mlp\.down_proj", so transformers expects it in 4 bit/,
    ),
  );
});

Deno.test("a quantization other than bitsandbytes 4-bit is refused as unsupported, with a hint", async () => {
  const all = await entries(join(CHECKPOINTS, "nf4-dq"));
  const cases: [Record<string, unknown>, RegExp][] = [
    [
      { quant_method: "bitsandbytes", load_in_8bit: true, load_in_4bit: false },
      /bitsandbytes 8-bit checkpoints \(load_in_8bit, LLM\.int8\(\)\) are not supported/,
    ],
    [{ quant_method: "gptq", bits: 4 }, /quantization_config\.quant_method "gptq" is not supported/],
    [{ quant_method: "awq", bits: 4 }, /quant_method "awq" is not supported/],
    [
      { quant_method: "bitsandbytes", load_in_4bit: true, bnb_4bit_quant_storage: "bfloat16" },
      /bnb_4bit_quant_storage "bfloat16" is not supported/,
    ],
  ];
  for (const [qc, message] of cases) {
    const config = await nf4Config((raw) => raw.quantization_config = qc);
    assert.throws(
      () => checkQuantizedWeights(config, all, "models/x"),
      lathe(/^Cannot load model "models\/x": /, message),
    );
    assert.throws(() => bnb4bitSettings(config, "models/x"), (e: unknown) => {
      assert.match((e as LatheError).hint!, /bitsandbytes 4-bit/);
      return true;
    });
  }
});

Deno.test("readQuantized4bit() names the tensor, the file and what is wrong in a damaged checkpoint", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-bnb4-" });
  try {
    const base = await sources(join(CHECKPOINTS, "nf4-dq"));
    const state = `${Q}.quant_state.bitsandbytes__nf4`;
    const goodState = JSON.parse(new TextDecoder().decode(base.get(state)!.data as Uint8Array));
    const withState = (json: string): [string, TensorSource] => {
      const data = new TextEncoder().encode(json);
      return [state, { name: state, dtype: "U8", shape: [data.length], data }];
    };
    /** Writes the checkpoint with `edit` applied and reads Q back. */
    const read = async (
      edit: (m: Map<string, TensorSource>) => void,
      shape = [64, 64],
    ): Promise<Quantized4bit> => {
      const m = new Map(base);
      edit(m);
      const path = join(dir, "damaged.safetensors");
      await writeSafetensors(path, [...m.values()]);
      using file = await ModelWeights.open(path);
      return await readQuantized4bit(file, Q, shape, "models/broken");
    };
    const where =
      /^Cannot read 4-bit weight "model\.layers\.0\.self_attn\.q_proj\.weight" of "models\/broken" \(file "damaged\.safetensors"\): /;
    // Unchanged, it reads.
    assert.equal((await read(() => {})).codes.length, 2048);
    const cases: [string, (m: Map<string, TensorSource>) => void, RegExp][] = [
      [
        "missing companion",
        (m) => m.delete(`${Q}.absmax`),
        /"model\.layers\.0\.self_attn\.q_proj\.weight\.absmax" is missing/,
      ],
      [
        "missing quant_state",
        (m) => m.delete(state),
        /quant_state\.bitsandbytes__nf4" \(or __fp4\) is missing/,
      ],
      [
        "truncated codes",
        (m) => m.set(Q, { name: Q, dtype: "U8", shape: [2047, 1], data: new Uint8Array(2047) }),
        /the packed codes are U8 \[2047, 1\], expected U8 \[2048, 1\] for \[64, 64\]/,
      ],
      [
        "quant_state not JSON",
        (m) => m.set(...withState(`{"quant_type": "nf4", `)),
        /its quant_state is not valid UTF-8 JSON/,
      ],
      [
        "quant_state shape",
        (m) => m.set(...withState(JSON.stringify({ ...goodState, shape: [32, 128] }))),
        /its quant_state gives shape \[32, 128\], but config\.json expects \[64, 64\]/,
      ],
      [
        "quant_state blocksize",
        (m) => m.set(...withState(JSON.stringify({ ...goodState, blocksize: 48 }))),
        /its quant_state has "blocksize": 48; expected one of 32, 64, 128/,
      ],
      [
        "quant_state type",
        (m) => m.set(...withState(JSON.stringify({ ...goodState, quant_type: "fp4" }))),
        /its quant_state has "quant_type": "fp4"; expected "nf4"/,
      ],
      [
        "quant_state dtype",
        (m) => m.set(...withState(JSON.stringify({ ...goodState, dtype: "int8" }))),
        /"dtype": "int8"; expected float32, float16, bfloat16/,
      ],
      [
        "nested keys without nested tensors",
        (m) => {
          m.delete(`${Q}.nested_absmax`);
          m.delete(`${Q}.nested_quant_map`);
        },
        /its quant_state is double-quantized, but .*nested_absmax" or "\.nested_quant_map" is missing/,
      ],
      [
        "partial nested keys",
        (m) => m.set(...withState(JSON.stringify({ ...goodState, nested_offset: undefined }))),
        /has nested_blocksize, nested_dtype but not all of/,
      ],
      [
        "absmax dtype",
        (m) =>
          m.set(`${Q}.absmax`, { name: `${Q}.absmax`, dtype: "F32", shape: [64], data: new Uint8Array(256) }),
        /"model\.layers\.0\.self_attn\.q_proj\.weight\.absmax" \(file "damaged\.safetensors"\) is F32 \[64\], expected U8 \[64\]/,
      ],
      [
        "quant_map length",
        (m) =>
          m.set(`${Q}.quant_map`, {
            name: `${Q}.quant_map`,
            dtype: "F32",
            shape: [15],
            data: new Uint8Array(60),
          }),
        /\.quant_map" \(file "damaged\.safetensors"\) is F32 \[15\], expected F32 \[16\]/,
      ],
      [
        "non-finite map",
        (m) =>
          m.set(`${Q}.quant_map`, {
            name: `${Q}.quant_map`,
            dtype: "F32",
            shape: [16],
            data: new Uint8Array(new Float32Array(16).fill(NaN).buffer),
          }),
        /"model\.layers\.0\.self_attn\.q_proj\.weight\.quant_map" element 0 is NaN/,
      ],
    ];
    for (const [what, edit, message] of cases) {
      await assert.rejects(read(edit), lathe(where, message), what);
    }
    // The config expects another shape.
    await assert.rejects(
      read(() => {}, [64, 32]),
      lathe(where, /gives shape \[64, 64\], but config\.json expects \[64, 32\]/),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
