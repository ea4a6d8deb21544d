// formats/bnb4bit.ts against scripts/golden/nf4.py (an independent numpy reference of bitsandbytes'
// CUDA quantization): every packed code, absmax (or absmax code), nested absmax, offset and map is
// compared bit for bit, for the tiny Llama's projections in f32, f16 and bf16 and for hand-made
// edge values, NF4 and FP4, with and without double quantization.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { sha256File } from "../../foundation/hash.ts";
import {
  blockAbsmax,
  blockAbsmaxOfBytes,
  dequantize4bit,
  dynamicMap,
  encode4bit,
  FP4_TABLE,
  NF4_TABLE,
  pythonFloatRepr,
  quantize4bit,
  quantizeDynamic,
  quantizeFP4,
  quantizeNF4,
  quantizeStats,
  quantStateJson,
  type QuantType,
} from "../../formats/bnb4bit.ts";
import { PROJECTIONS } from "../../formats/model_config.ts";
import {
  fromFloat32,
  SafetensorsFile,
  type TensorSource,
  toFloat32,
  writeSafetensors,
} from "../../formats/safetensors.ts";
import { f16ArrayToF32, f32ArrayToF16 } from "../../kernels/half.ts";
import { writeTinyModel } from "../../kernels/models/tiny.ts";
import { edgeTensors } from "../../scripts/golden/nf4_edge.ts";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GOLDEN = join(REPO, "tests/fixtures/golden/nf4");
const meta = JSON.parse(await Deno.readTextFile(join(GOLDEN, "golden.json")));

/** Every tensor of a safetensors file as f32 (or its raw bytes for U8). */
async function readAll(
  path: string,
): Promise<Map<string, { shape: number[]; data: Float32Array | Uint8Array }>> {
  using file = await SafetensorsFile.open(path);
  const out = new Map<string, { shape: number[]; data: Float32Array | Uint8Array }>();
  for (const name of file.names()) {
    const info = file.info(name);
    const data = info.dtype === "U8" ? (await file.readBytes(name)).slice() : await file.readFloat32(name);
    out.set(info.name, { shape: [...info.shape], data });
  }
  return out;
}

function bits(a: Float32Array | Uint8Array): Uint32Array | Uint8Array {
  return a instanceof Float32Array ? new Uint32Array(a.buffer, a.byteOffset, a.length) : a;
}

/** Index of the first differing element, or -1. */
function firstDiff(a: Float32Array | Uint8Array, b: Float32Array | Uint8Array): number {
  const x = bits(a), y = bits(b);
  if (x.length !== y.length) return Math.min(x.length, y.length);
  return x.findIndex((v, i) => v !== y[i]);
}

/** The golden inputs, regenerated: the tiny Llama's projections (f32, f16, bf16) and the edge values. */
async function goldenInputs(
  dir: string,
): Promise<Record<string, Map<string, { shape: number[]; data: Float32Array }>>> {
  const tokenizerDir = join(REPO, "data/demo/tokenizer");
  const model = meta.model;
  const inputs: Record<string, Map<string, { shape: number[]; data: Float32Array }>> = {};
  const edge = new Map([...edgeTensors()].map(([name, [shape, data]]) => [name, { shape, data }]));
  const edgeFile = join(dir, "edge.safetensors");
  const sources: TensorSource[] = [...edge].map(([name, t]) => ({
    name,
    dtype: "F32",
    shape: t.shape,
    data: new Uint8Array(t.data.buffer),
  }));
  await writeSafetensors(edgeFile, sources);
  assert.equal(
    (await sha256File(edgeFile)).sha256,
    meta.sha256["edge.safetensors"],
    "edge values as the golden",
  );
  for (const dtype of ["f32", "bf16"] as const) {
    const modelDir = join(dir, dtype);
    await writeTinyModel(modelDir, {
      arch: model.arch,
      size: model.size,
      seed: model.seed,
      dtype,
      tokenizerDir,
    });
    const weights = join(modelDir, "model.safetensors");
    assert.equal(
      (await sha256File(weights)).sha256,
      meta.sha256[`${dtype}/model.safetensors`],
      `${dtype} tiny model`,
    );
    const all = await readAll(weights);
    const projections = new Map(
      [...all].filter(([name]) => (PROJECTIONS as readonly string[]).includes(name.split(".").at(-2)!)) as [
        string,
        { shape: number[]; data: Float32Array },
      ][],
    );
    inputs[dtype] = new Map([...projections, ...edge]);
  }
  // f16: the f32 weights rounded to nearest even, as numpy's astype(float16).
  inputs.f16 = new Map(
    [...inputs.f32].map((
      [name, t],
    ) => [name, { shape: t.shape, data: f16ArrayToF32(f32ArrayToF16(t.data)) }]),
  );
  return inputs;
}

Deno.test("the NF4, FP4 and dynamic maps are bitsandbytes' (torch's create_dynamic_map), bit for bit", async () => {
  const maps = await readAll(join(GOLDEN, "maps.safetensors"));
  assert.equal(firstDiff(NF4_TABLE, maps.get("nf4")!.data), -1);
  assert.equal(firstDiff(FP4_TABLE, maps.get("fp4")!.data), -1);
  assert.equal(firstDiff(dynamicMap(), maps.get("dynamic")!.data), -1);
});

Deno.test("quantize4bit() gives the golden codes, absmax, nested absmax and offset in f32, f16 and bf16", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-nf4-" });
  try {
    const inputs = await goldenInputs(dir);
    let checked = 0;
    for (const dtype of ["f32", "f16", "bf16"]) {
      const golden = await readAll(join(GOLDEN, `${dtype}.safetensors`));
      assert.ok(inputs[dtype].size >= 14 + 5, `${dtype}: ${inputs[dtype].size} weights`);
      for (const [name, w] of inputs[dtype]) {
        for (const quantType of ["nf4", "fp4"] as QuantType[]) {
          for (const dq of [true, false]) {
            const q = quantize4bit(w.data, w.shape, { quantType, doubleQuant: dq });
            const key = `${name}.${quantType}.${dq ? "dq" : "plain"}`;
            const want = (part: string) => golden.get(`${key}.${part}`)!.data;
            const where = `${dtype} ${key}`;
            assert.equal(firstDiff(q.codes, want("codes")), -1, `${where}: codes`);
            assert.equal(firstDiff(q.absmax, want("absmax")), -1, `${where}: absmax`);
            if (dq) {
              assert.equal(firstDiff(q.nested!.absmax, want("nested_absmax")), -1, `${where}: nested absmax`);
              assert.equal(
                firstDiff(Float32Array.of(q.nested!.offset), want("offset")),
                -1,
                `${where}: offset`,
              );
            } else assert.equal(q.nested, undefined);
            checked++;
          }
        }
      }
    }
    assert.equal(checked, 3 * 19 * 4);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("NF4 codes: a value on a midpoint takes the lower code, padding is code 7, an all-zero block codes 0", () => {
  const t = Math.fround(0.03979014977812767);
  assert.equal(quantizeNF4(t), 7);
  assert.equal(quantizeNF4(Math.fround(t + 1e-8)), 8);
  assert.equal(quantizeNF4(0), 7);
  assert.equal(quantizeNF4(NaN), 0);
  // 3 values: one byte of codes for the first two, the third in a high nibble over padding's 7.
  const q = quantize4bit(Float32Array.of(1, -1, 0.5), [1, 3], { doubleQuant: false });
  assert.deepEqual([...q.codes], [0xf0, (quantizeNF4(0.5) << 4) | 7]);
  const zeros = quantize4bit(new Float32Array(64), [1, 64], { doubleQuant: false });
  assert.ok(zeros.codes.every((c) => c === 0));
  assert.ok(dequantize4bit(zeros).every((v) => v === 0));
  // The dynamic map's own entries code to themselves.
  const map = dynamicMap();
  for (let i = 0; i < 256; i++) {
    if (i === 0 || map[i] !== map[i - 1]) assert.equal(map[quantizeDynamic(map, map[i])], map[i]);
  }
});

Deno.test("dequantize4bit() restores normal weights to a relative RMS error of about 10 % (NF4) and 20 % (FP4)", () => {
  // A normal weight: NF4's quantiles suit it; the relative RMS error of blockwise NF4 is ≈ 0.09.
  const w = edgeTensors().get("edge.many.weight")![1];
  for (const [quantType, bound] of [["nf4", 0.11], ["fp4", 0.2]] as const) {
    for (const doubleQuant of [false, true]) {
      const q = quantize4bit(w, [300, 64], { quantType, doubleQuant });
      const back = dequantize4bit(q);
      let err = 0, ref = 0;
      for (let k = 0; k < w.length; k++) {
        err += (back[k] - w[k]) ** 2;
        ref += w[k] ** 2;
      }
      const rel = Math.sqrt(err / ref);
      assert.ok(rel < bound && rel > 0.02, `${quantType} dq=${doubleQuant}: relative RMS error ${rel}`);
    }
  }
  // Double quantization moves each absmax by at most half the widest gap of the 8-bit map, times
  // its nested absmax (the map covers [−1, 1]).
  const plain = quantize4bit(w, [300, 64], { doubleQuant: false });
  const q = quantize4bit(w, [300, 64]);
  const dq = blockAbsmax(q);
  const map = dynamicMap();
  let gap = 0;
  for (let i = 1; i < 256; i++) gap = Math.max(gap, map[i] - map[i - 1]);
  for (let b = 0; b < dq.length; b++) {
    const a = (plain.absmax as Float32Array)[b];
    const bound = 0.5 * gap * q.nested!.absmax[b >> 8] * (1 + 1e-6);
    assert.ok(Math.abs(dq[b] - a) <= bound, `block ${b}: ${dq[b]} vs ${a} (bound ${bound})`);
  }
});

Deno.test("quantStateJson() writes bitsandbytes' packed quant_state JSON, keys in its order, floats as Python", () => {
  const q = quantize4bit(edgeTensors().get("edge.ragged.weight")![1], [3, 45]);
  assert.equal(
    quantStateJson(q, "bfloat16"),
    `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 45], "nested_blocksize": 256, ` +
      `"nested_dtype": "float32", "nested_offset": ${pythonFloatRepr(q.nested!.offset)}}`,
  );
  assert.equal(
    quantStateJson(quantize4bit(new Float32Array(64).fill(1), [64, 1], { doubleQuant: false }), "float16"),
    `{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [64, 1]}`,
  );
  // Python's repr: integers keep ".0", exponents below 1e-4 and from 1e16 with a sign and two digits.
  assert.deepEqual(
    [0.5, 3, 0.0001, 0.00001, 1.5e-7, 1e16, 123456.789, -0.03125].map(pythonFloatRepr),
    ["0.5", "3.0", "0.0001", "1e-05", "1.5e-07", "1e+16", "123456.789", "-0.03125"],
  );
});

Deno.test("encode4bit's code table gives the comparison tree's code for every f32 bucket", () => {
  // Values scaled by absmax 1 are coded as they are: one value per bucket of the upper 16 bits,
  // with random low bits, plus both ends of every bucket, through encode4bit against the tree.
  for (const quantType of ["nf4", "fp4"] as const) {
    const tree = quantType === "nf4" ? quantizeNF4 : quantizeFP4;
    const x = new Float32Array(3 * 65536);
    const bits = new Uint32Array(x.buffer);
    let seed = 12345;
    for (let i = 0; i < 65536; i++) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      bits[3 * i] = i << 16;
      bits[3 * i + 1] = (i << 16) | (seed & 0xffff);
      bits[3 * i + 2] = (i << 16) | 0xffff;
    }
    // Each value alone in a block whose absmax is 1 (so x · 1/absmax is x itself).
    const values = new Float32Array(x.length * 64);
    for (let i = 0; i < x.length; i++) values[64 * i] = x[i];
    const stats = {
      quantType,
      blocksize: 64,
      shape: [x.length, 64],
      quantMap: NF4_TABLE,
      absmax: new Float32Array(x.length),
      blockAbsmax: new Float32Array(x.length).fill(1),
    };
    const codes = encode4bit(values, stats);
    for (let i = 0; i < x.length; i++) {
      const got = codes[32 * i] >> 4;
      if (got !== tree(x[i])) {
        assert.fail(`${quantType} 0x${bits[i].toString(16)} (${x[i]}): ${got} != ${tree(x[i])}`);
      }
    }
  }
});

Deno.test("blockAbsmaxOfBytes reads each block's absmax off the stored bits, exactly, in F32, F16 and BF16", () => {
  const n = 64 * 37 + 5; // a ragged last block
  const values = new Float32Array(n);
  let seed = 7;
  for (let i = 0; i < n; i++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    values[i] = ((seed / 2 ** 32) - 0.5) * 2 ** ((seed % 40) - 30); // wide exponents, subnormals in f16
  }
  for (let i = 64; i < 128; i++) values[i] = (i % 7) / 8;
  values[64] = -0;
  values[65] = -3.5; // a block's largest magnitude may be a negative value
  for (let i = 128; i < 192; i++) values[i] = i % 2 === 0 ? 0 : -0; // an all-zero block
  for (const dtype of ["F32", "F16", "BF16"] as const) {
    const bytes = fromFloat32(values, dtype);
    const exact = toFloat32(dtype, bytes, "test"); // the values the dtype holds
    const want = quantizeStats(exact, [n], { blocksize: 64 }).blockAbsmax;
    const got = blockAbsmaxOfBytes(dtype, bytes, 64)!;
    assert.deepEqual(got, want, dtype);
    assert.equal(got[1], 3.5);
    assert.ok(Object.is(got[2], 0), "an all-zero block has absmax +0");
    for (const bad of [NaN, Infinity, -Infinity]) {
      const broken = exact.slice();
      broken[n - 1] = bad;
      assert.equal(blockAbsmaxOfBytes(dtype, fromFloat32(broken, dtype), 64), null, `${dtype} ${bad}`);
    }
  }
});
