/**
 * Golden ggml blocks from llama.cpp itself: runs the inputs below through the prebuilt
 * `libggml-base.so` that node-llama-cpp 3.21.1 ships (llama.cpp release v0.4.0, ggml 0.23.0)
 * by Deno FFI — `ggml_quantize_chunk(type, src, dst, 0, rows, row_length, NULL)`, the call
 * `llama-quantize` makes without an imatrix — and `dequantize_row_*` / `ggml_fp16_to_fp32_row` /
 * `ggml_bf16_to_fp32_row` on the result; and the per-tensor types `llama-quantize` would choose
 * for a few model shapes, from libllama's `llama_quant_compute_types` on its mock model
 * (`llama_quant_model_from_metadata`, src/llama-ext.h: the same llama_tensor_get_type as
 * llama-quantize, with its 70B detection for llama only). tests/formats/gguf_quants_test.ts
 * compares formats/gguf_quants.ts against the output; the test itself needs no llama.cpp.
 *
 * ```
 * (cd scripts/llama_cpp && npm ci)   # node-llama-cpp with its prebuilt CPU binaries
 * deno run -A scripts/golden/gguf_quants.ts tests/fixtures/golden/gguf_quants.json
 * deno run -A scripts/golden/gguf_quants.ts --compare 2000   # wider check, writes nothing
 * deno run -A scripts/golden/gguf_quants.ts --compare 2000 --no-halves   # without the 2³² sweep
 * ```
 *
 * `--compare N` quantizes N fresh random super-blocks per case and type with both and reports
 * every difference, and checks f16 / bf16 conversion over all 2³² f32 bit patterns.
 * @module
 */
import { Pcg32 } from "../../foundation/random.ts";
import {
  GGML_TYPE,
  type GgmlTypeName,
  type GgufFileType,
  LLAMA_FTYPE,
  llamaQuantizeOrder,
  type MixModel,
} from "../../formats/gguf_quants.ts";

/** One golden input tensor: rows of `rowLength` f32 values. */
export interface GoldenCase {
  name: string;
  rowLength: number;
  values: Float32Array;
}

/** The types the golden covers, in file order. */
export const GOLDEN_TYPES: GgmlTypeName[] = [
  "F16",
  "BF16",
  "Q8_0",
  "Q4_0",
  "Q4_1",
  "Q5_0",
  "Q5_1",
  "Q4_K",
  "Q5_K",
  "Q6_K",
];

/** The next f32 above x (toward +∞). */
function nextUp(x: number): number {
  const b = new Float32Array([x]);
  const u = new Int32Array(b.buffer);
  if (x === 0) return 1.401298464324817e-45;
  u[0] += x > 0 ? 1 : -1;
  return b[0];
}

/**
 * The inputs, seeded (Pcg32 streams 0…): `normal` (4 rows of 512 N(0, 1) scaled by 1, 0.02, 30,
 * 1e-3: a trained weight's range and beyond), `outliers` (every 37th value ×12), and `edge`
 * (rows of 256: all zero; a constant; all positive; |x| < 1e-15; scale 1e-6, where d is an f16
 * subnormal; an integer ramp −128…127 (exact ties for nearest_int); large values (6e4); one
 * non-zero per 32; one zero sub-block among normal ones; a negative extreme; halves k/2).
 */
export function goldenCases(): GoldenCase[] {
  const normal = new Float32Array(4 * 512);
  const rowScale = [1, 0.02, 30, 1e-3];
  for (let r = 0; r < 4; r++) {
    const row = normal.subarray(512 * r, 512 * (r + 1));
    new Pcg32(2025, r).fillNormal(row, 0, rowScale[r]);
  }
  const outliers = new Float32Array(2 * 512);
  new Pcg32(2025, 10).fillNormal(outliers, 0, 0.05);
  for (let i = 0; i < outliers.length; i += 37) outliers[i] = Math.fround(outliers[i] * 12);

  const rows: Float32Array[] = [];
  const row = (fill: (i: number) => number) =>
    rows.push(Float32Array.from({ length: 256 }, (_, i) => fill(i)));
  const noise = (seed: number, std: number) =>
    new Pcg32(2025, 100 + seed).fillNormal(new Float32Array(256), 0, std);
  row(() => 0);
  row(() => 0.5);
  const pos = noise(1, 1);
  row((i) => 1 + Math.abs(pos[i]));
  const tiny = noise(2, 1e-17);
  row((i) => tiny[i]);
  const small = noise(3, 1e-6);
  row((i) => small[i]);
  row((i) => i - 128);
  const large = noise(4, 2e4);
  row((i) => large[i]);
  const sparse = noise(5, 1);
  row((i) => (i % 32 === 7 ? sparse[i] : 0));
  const holes = noise(6, 1);
  row((i) => (i >= 64 && i < 96 ? 0 : holes[i]));
  const neg = noise(7, 0.1);
  row((i) => (i % 64 === 5 ? -3 : neg[i]));
  row((i) => ((i % 17) - 8) / 2);
  row((i) => nextUp(((i % 33) - 16) / 16)); // one ulp above multiples of 1/16
  const edge = new Float32Array(rows.length * 256);
  rows.forEach((r, k) => edge.set(r, 256 * k));

  return [
    { name: "normal", rowLength: 512, values: normal },
    { name: "outliers", rowLength: 512, values: outliers },
    { name: "edge", rowLength: 256, values: edge },
  ];
}

/** f32 bit patterns for the f16 / bf16 conversions: ties, subnormals, overflow, ±Inf, NaNs. */
export function goldenHalfBits(): Uint32Array {
  const bits = [
    0x00000000,
    0x80000000,
    0x3f800000,
    0xbf800000, // ±0, ±1
    0x7f800000,
    0xff800000,
    0x7fc00000,
    0xffc00000,
    0x7f800001,
    0xff812345,
    0x7fbfffff, // ±Inf, NaNs
    0x477fe000,
    0x477fefff,
    0x477ff000,
    0x477ff001,
    0x47800000, // 65504, below/at/above the Inf tie
    0x38800000,
    0x387fe000,
    0x387ff000,
    0x33800000,
    0x33000000,
    0x33000001,
    0x32ffffff, // f16 min normal/subnormal
    0x3f801000,
    0x3f803000,
    0x3f801001,
    0x3f802fff, // f16 ties to even at 1
    0x3f808000,
    0x3f818000,
    0x3f808001,
    0x3f817fff, // bf16 ties to even at 1
    0x7f7fffff,
    0xff7fffff,
    0x7f7f8000,
    0x7f7f7fff, // bf16 overflow to Inf by rounding
    0x00000001,
    0x807fffff,
    0x00008000,
    0x00018000, // f32 subnormals (bf16 keeps them)
  ];
  const next = new Pcg32(2025, 20);
  for (let i = 0; i < 64; i++) bits.push(next.nextU32());
  return Uint32Array.from(bits);
}

/** One model for the tensor-type golden: its tensors in llama-quantize's order, the file types. */
export interface GoldenMix {
  name: string;
  model: MixModel & { architecture: string; nEmbd: number; nFf: number };
  tensors: [string, number[]][];
  ftypes: GgufFileType[];
}

/**
 * Models for `llama_quant_compute_types` (llama.cpp's llama-quant.cpp, through its mock model):
 * a Llama 3 8B shape (untied and tied), a 70B shape, rows of 64 and of 48 (the fallbacks), an
 * 8-expert MoE and a Qwen2 with biases.
 */
export function goldenMixes(): GoldenMix[] {
  const ALL: GgufFileType[] = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"];
  const mixOf = (
    name: string,
    arch: string,
    L: number,
    D: number,
    F: number,
    nHead: number,
    nHeadKv: number,
    opts: { tied?: boolean; nExpert?: number; bias?: boolean },
    ftypes: GgufFileType[],
  ): GoldenMix => {
    const V = 1024;
    const kv = (D / nHead) * nHeadKv;
    const E = opts.nExpert ?? 0;
    const t: [string, number[]][] = [["token_embd.weight", [D, V]], ["output_norm.weight", [D]]];
    if (!opts.tied) t.push(["output.weight", [D, V]]);
    if (arch === "llama") t.push(["rope_freqs.weight", [(D / nHead) / 2]]);
    for (let i = 0; i < L; i++) {
      const b = `blk.${i}.`;
      t.push([b + "attn_norm.weight", [D]], [b + "ffn_norm.weight", [D]]);
      t.push([b + "attn_q.weight", [D, D]], [b + "attn_k.weight", [D, kv]], [b + "attn_v.weight", [D, kv]]);
      t.push([b + "attn_output.weight", [D, D]]);
      if (opts.bias) t.push([b + "attn_q.bias", [D]], [b + "attn_k.bias", [kv]], [b + "attn_v.bias", [kv]]);
      if (E > 1) {
        t.push([b + "ffn_gate_inp.weight", [D, E]]);
        t.push([b + "ffn_gate_exps.weight", [D, F, E]], [b + "ffn_up_exps.weight", [D, F, E]]);
        t.push([b + "ffn_down_exps.weight", [F, D, E]]);
      } else {
        t.push([b + "ffn_gate.weight", [D, F]], [b + "ffn_up.weight", [D, F]], [b + "ffn_down.weight", [
          F,
          D,
        ]]);
      }
    }
    const shapes = new Map(t);
    return {
      name,
      model: {
        architecture: arch,
        nEmbd: D,
        nFf: F,
        nLayers: L,
        nHead,
        nHeadKv,
        nExpert: E,
        tiedEmbeddings: opts.tied ?? false,
      },
      tensors: llamaQuantizeOrder(shapes.keys()).map((n) => [n, shapes.get(n)!]),
      ftypes,
    };
  };
  return [
    mixOf("llama-8b", "llama", 32, 4096, 14336, 32, 8, {}, ALL),
    mixOf("llama-8b-tied", "llama", 32, 4096, 14336, 32, 8, { tied: true }, [
      "Q4_K_M",
      "Q4_0",
      "Q8_0",
      "Q6_K",
    ]),
    mixOf("llama-70b", "llama", 80, 8192, 28672, 64, 8, {}, ["Q4_K_M", "Q5_K_M"]),
    mixOf("rows-64", "llama", 8, 64, 128, 4, 4, {}, ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "Q8_0"]),
    mixOf("rows-48-tied", "llama", 3, 48, 96, 4, 2, { tied: true }, ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]),
    mixOf("moe-8", "llama", 4, 1024, 512, 8, 8, { nExpert: 8 }, ["Q4_K_M", "Q5_K_M", "Q8_0"]),
    mixOf("qwen2-bias", "qwen2", 28, 1536, 8960, 12, 2, { tied: true, bias: true }, ["Q4_K_M", "Q5_K_M"]),
  ];
}

const LIB = new URL(
  "../llama_cpp/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so",
  import.meta.url,
);

type Lib = ReturnType<typeof openGgml>;

function openGgml(path: string) {
  const row = { parameters: ["buffer", "buffer", "i64"], result: "void" } as const;
  return Deno.dlopen(path, {
    ggml_quantize_chunk: {
      parameters: ["i32", "buffer", "buffer", "i64", "i64", "i64", "pointer"],
      result: "usize",
    },
    ggml_row_size: { parameters: ["i32", "i64"], result: "usize" },
    ggml_fp16_to_fp32_row: row,
    ggml_bf16_to_fp32_row: row,
    dequantize_row_q8_0: row,
    dequantize_row_q4_0: row,
    dequantize_row_q4_1: row,
    dequantize_row_q5_0: row,
    dequantize_row_q5_1: row,
    dequantize_row_q4_K: row,
    dequantize_row_q5_K: row,
    dequantize_row_q6_K: row,
  }).symbols;
}

const LLAMA_LIB = new URL(
  "../llama_cpp/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libllama.v0.4.0.so",
  import.meta.url,
);

/** libllama's quantization-type entry points (C++ names from src/llama-ext.h, mangled). */
function openLlama(path: string, ggmlPath: string) {
  const ggml = Deno.dlopen(ggmlPath, {
    ggml_init: { parameters: [{ struct: ["usize", "pointer", "bool"] }], result: "pointer" },
    ggml_new_tensor: { parameters: ["pointer", "i32", "i32", "buffer"], result: "pointer" },
    ggml_set_name: { parameters: ["pointer", "buffer"], result: "pointer" },
  }).symbols;
  const llama = Deno.dlopen(path, {
    llama_model_quantize_default_params: {
      parameters: [],
      // struct llama_model_quantize_params (include/llama.h), x86-64 layout
      result: {
        struct: [
          "i32",
          "i32",
          "i32",
          "i32",
          "u8",
          "u8",
          "u8",
          "u8",
          "u8",
          "u8",
          "pointer",
          "pointer",
          "pointer",
          "pointer",
          "usize",
        ],
      },
    },
    _Z31llama_quant_model_from_metadataPK22llama_quant_model_desc: {
      parameters: ["buffer"],
      result: "pointer",
    },
    _Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params: {
      parameters: ["pointer", "buffer"],
      result: "pointer",
    },
    _Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem: {
      parameters: ["pointer", "i32", "buffer", "buffer", "usize"],
      result: "void",
    },
  }).symbols;
  return { ggml, llama };
}

/** llama.cpp's type for each tensor of `mix` under `ftype` (llama_quant_compute_types). */
function llamaTypes(lib: ReturnType<typeof openLlama>, mix: GoldenMix, ftype: GgufFileType): GgmlTypeName[] {
  const { ggml, llama } = lib;
  const enc = new TextEncoder();
  const init = new Uint8Array(24);
  new DataView(init.buffer).setBigUint64(0, 16n << 20n, true); // mem_size; mem_buffer NULL
  init[16] = 1; // no_alloc
  const ctx = ggml.ggml_init(init);
  const arch = enc.encode(mix.model.architecture + "\0");
  const desc = new DataView(new ArrayBuffer(40)); // struct llama_quant_model_desc
  desc.setBigUint64(0, BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(arch))), true);
  const m = mix.model;
  const hd = m.nEmbd / m.nHead;
  [m.nEmbd, m.nFf, m.nLayers, m.nHead, m.nHeadKv, m.nExpert ?? 0, hd, hd].forEach((v, i) =>
    desc.setUint32(8 + 4 * i, v, true)
  );
  const model = llama._Z31llama_quant_model_from_metadataPK22llama_quant_model_desc(
    new Uint8Array(desc.buffer),
  );
  const qs = llama._Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params(
    model,
    llama.llama_model_quantize_default_params(),
  );
  const tensors = new BigUint64Array(mix.tensors.length);
  mix.tensors.forEach(([name, shape], i) => {
    const t = ggml.ggml_new_tensor(ctx, GGML_TYPE.F32, shape.length, new BigInt64Array(shape.map(BigInt)));
    ggml.ggml_set_name(t, enc.encode(name + "\0"));
    tensors[i] = BigInt(Deno.UnsafePointer.value(t));
  });
  const out = new Int32Array(mix.tensors.length);
  llama._Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem(
    qs,
    LLAMA_FTYPE[ftype],
    new Uint8Array(tensors.buffer),
    new Uint8Array(out.buffer),
    BigInt(mix.tensors.length),
  );
  // The mock model, state and ggml context are left to the process exit.
  const byId = new Map(Object.entries(GGML_TYPE).map(([k, v]) => [v as number, k as GgmlTypeName]));
  return Array.from(out, (id) => {
    const name = byId.get(id);
    if (name === undefined) throw new Error(`llama.cpp chose ggml type ${id}, which lathe does not know`);
    return name;
  });
}

/** llama.cpp's bytes for `values` as `type`. */
function ggmlQuantize(lib: Lib, type: GgmlTypeName, values: Float32Array, rowLength: number): Uint8Array {
  const rows = values.length / rowLength;
  const out = new Uint8Array(Number(lib.ggml_row_size(GGML_TYPE[type], BigInt(rowLength))) * rows);
  const n = Number(
    lib.ggml_quantize_chunk(GGML_TYPE[type], values, out, 0n, BigInt(rows), BigInt(rowLength), null),
  );
  if (n !== out.length) throw new Error(`ggml_quantize_chunk(${type}) wrote ${n} bytes, not ${out.length}`);
  return out;
}

/** llama.cpp's f32 values of `count` values of `type`. */
function ggmlDequantize(lib: Lib, type: GgmlTypeName, bytes: Uint8Array, count: number): Float32Array {
  const y = new Float32Array(count);
  const fn = {
    F16: lib.ggml_fp16_to_fp32_row,
    BF16: lib.ggml_bf16_to_fp32_row,
    Q8_0: lib.dequantize_row_q8_0,
    Q4_0: lib.dequantize_row_q4_0,
    Q4_1: lib.dequantize_row_q4_1,
    Q5_0: lib.dequantize_row_q5_0,
    Q5_1: lib.dequantize_row_q5_1,
    Q4_K: lib.dequantize_row_q4_K,
    Q5_K: lib.dequantize_row_q5_K,
    Q6_K: lib.dequantize_row_q6_K,
  }[type as Exclude<GgmlTypeName, "F32">];
  fn(bytes, y, BigInt(count));
  return y;
}

async function sha256(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function base64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function asBytes(a: Float32Array | Uint32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** The golden file: per case, its input's sha256 and, per type, ggml's bytes and dequant sha256. */
async function writeGolden(lib: Lib, llamaLib: ReturnType<typeof openLlama>, outPath: string): Promise<void> {
  const cases: Record<string, unknown> = {};
  for (const c of goldenCases()) {
    const types: Record<string, unknown> = {};
    for (const type of GOLDEN_TYPES) {
      const q = ggmlQuantize(lib, type, c.values, c.rowLength);
      const y = ggmlDequantize(lib, type, q, c.values.length);
      types[type] = { bytes: base64(q), dequantized_sha256: await sha256(asBytes(y)) };
    }
    cases[c.name] = {
      row_length: c.rowLength,
      count: c.values.length,
      input_sha256: await sha256(asBytes(c.values)),
      types,
    };
  }
  const half = goldenHalfBits();
  const halfValues = new Float32Array(half.buffer);
  const halves: Record<string, string> = {};
  for (const type of ["F16", "BF16"] as const) halves[type] = base64(ggmlQuantize(lib, type, halfValues, 1));
  const golden = {
    generator: "scripts/golden/gguf_quants.ts",
    llama_cpp: "node-llama-cpp 3.21.1 prebuilt libggml-base.so (llama.cpp release v0.4.0, ggml 0.23.0)",
    cases,
    half_bits: { input_sha256: await sha256(asBytes(half)), ...halves },
    tensor_types: Object.fromEntries(
      goldenMixes().map((mix) => [
        mix.name,
        Object.fromEntries(mix.ftypes.map((ftype) => [ftype, llamaTypes(llamaLib, mix, ftype).join(" ")])),
      ]),
    ),
  };
  await Deno.writeTextFile(outPath, JSON.stringify(golden, null, 1) + "\n");
  console.log(`wrote ${outPath}`);
}

/** Wider check: `blocks` fresh super-blocks per distribution and type; f16/bf16 exhaustively. */
async function compare(lib: Lib, blocks: number, halves: boolean): Promise<void> {
  const { quantize, dequantize } = await import("../../formats/gguf_quants.ts");
  const n = blocks * 256;
  const dists: [string, (rng: Pcg32, out: Float32Array) => void][] = [
    ["normal", (r, o) => r.fillNormal(o, 0, 1)],
    ["weights", (r, o) => r.fillNormal(o, 0, 0.02)],
    ["uniform+", (r, o) => r.fillUniform(o, 0, 1)],
    ["heavy", (r, o) => {
      r.fillNormal(o, 0, 1);
      for (let i = 0; i < o.length; i++) o[i] = o[i] ** 3;
    }],
    ["f16-grid", (r, o) => {
      r.fillNormal(o, 0, 0.05);
      for (let i = 0; i < o.length; i++) o[i] = Math.f16round(o[i]);
    }],
    ["bf16-grid", (r, o) => {
      r.fillNormal(o, 0, 0.05);
      const u = new Uint32Array(o.buffer, o.byteOffset, o.length);
      for (let i = 0; i < o.length; i++) u[i] = u[i] & 0xffff0000;
    }],
    ["small-ints", (r, o) => {
      for (let i = 0; i < o.length; i++) o[i] = Math.floor(r.uniform() * 33) - 16;
    }],
    ["scales", (r, o) => { // each 32 values at its own scale, 1e-8 … 1e8
      r.fillNormal(o, 0, 1);
      for (let b = 0; b < o.length; b += 32) {
        const s = 10 ** (16 * r.uniform() - 8);
        for (let i = b; i < b + 32; i++) o[i] *= s;
      }
    }],
    ["subnormal", (r, o) => r.fillNormal(o, 0, 1e-39)],
    ["huge", (r, o) => r.fillNormal(o, 0, 1e30)],
    ["sparse", (r, o) => {
      r.fillNormal(o, 0, 1);
      for (let i = 0; i < o.length; i++) if (r.uniform() < 0.9) o[i] = 0;
    }],
  ];
  let bad = 0;
  for (const [di, [name, fill]] of dists.entries()) {
    const x = new Float32Array(n);
    fill(new Pcg32(99, di), x);
    for (const type of GOLDEN_TYPES) {
      const t0 = performance.now();
      const ours = quantize(type, x, 256);
      const t1 = performance.now();
      const theirs = ggmlQuantize(lib, type, x, 256);
      const t2 = performance.now();
      let diff = 0;
      for (let i = 0; i < ours.length; i++) if (ours[i] !== theirs[i]) diff++;
      const yo = asBytes(dequantize(type, theirs, n));
      const yt = asBytes(ggmlDequantize(lib, type, theirs, n));
      let ddiff = 0;
      for (let i = 0; i < yo.length; i++) if (yo[i] !== yt[i]) ddiff++;
      bad += diff + ddiff;
      console.log(
        `${name.padEnd(10)} ${
          type.padEnd(5)
        } bytes differing ${diff}/${ours.length}, dequant bytes differing ` +
          `${ddiff}; ours ${((t1 - t0) * 1e6 / n).toFixed(1)} ns/value, ggml ${
            ((t2 - t1) * 1e6 / n).toFixed(1)
          }`,
      );
    }
  }
  // f16 / bf16 over every f32 bit pattern, 2²⁴ at a time.
  const chunk = 1 << 24;
  const bits = new Uint32Array(chunk);
  const values = new Float32Array(bits.buffer);
  for (const type of halves ? ["F16", "BF16"] as const : []) {
    let diff = 0;
    for (let hi = 0; hi < 256; hi++) {
      for (let i = 0; i < chunk; i++) bits[i] = (hi * chunk + i) >>> 0;
      const ours = quantize(type, values, 1);
      const theirs = ggmlQuantize(lib, type, values, 1);
      for (let i = 0; i < ours.length; i++) if (ours[i] !== theirs[i]) diff++;
    }
    bad += diff;
    console.log(`${type}: all 2^32 f32 values, bytes differing ${diff}`);
  }
  console.log(bad === 0 ? "all equal" : `${bad} differences`);
  if (bad !== 0) Deno.exit(1);
}

if (import.meta.main) {
  const lib = openGgml(Deno.env.get("GGML_BASE_LIB") ?? LIB.pathname);
  const [first, second] = Deno.args;
  if (first === "--compare") await compare(lib, Number(second ?? 1000), !Deno.args.includes("--no-halves"));
  else if (first !== undefined) {
    const llamaLib = openLlama(
      Deno.env.get("LLAMA_LIB") ?? LLAMA_LIB.pathname,
      Deno.env.get("GGML_BASE_LIB") ?? LIB.pathname,
    );
    await writeGolden(lib, llamaLib, first);
  } else {
    console.error("usage: deno run -A scripts/golden/gguf_quants.ts <out.json> | --compare [blocks]");
    Deno.exit(2);
  }
}
