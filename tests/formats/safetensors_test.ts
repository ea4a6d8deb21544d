import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type Dtype,
  DTYPES,
  f16BitsToFloat32,
  float32ToBf16Bits,
  float32ToF16Bits,
  fromFloat32,
  INDEX_FILE,
  MAX_HEADER_BYTES,
  ModelWeights,
  planSafetensors,
  SafetensorsFile,
  serializeSafetensors,
  toFloat32,
  writeModelWeights,
  writeSafetensors,
} from "../../formats/safetensors.ts";
import { LatheError } from "../../foundation/errors.ts";
import { Pcg32 } from "../../foundation/random.ts";

const enc = new TextEncoder();

/** A file from a header string (unpadded) and data bytes; `n` overrides the length field. */
function rawFile(header: string, data: Uint8Array = new Uint8Array(), n?: number): Uint8Array {
  const json = enc.encode(header);
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(n ?? json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

function f32Bytes(values: number[]): Uint8Array<ArrayBuffer> {
  return new Uint8Array(new Float32Array(values).buffer);
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-st-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function rejects(bytes: Uint8Array, pattern: RegExp): Promise<LatheError> {
  let caught: unknown;
  await withTempDir(async (dir) => {
    const path = join(dir, "bad.safetensors");
    await Deno.writeFile(path, bytes);
    try {
      (await SafetensorsFile.open(path)).close();
    } catch (error) {
      caught = error;
    }
    if (caught instanceof Error) {
      assert.ok(caught.message.includes(path), `message names the file: ${caught.message}`);
    }
  });
  assert.ok(caught instanceof LatheError, `expected a LatheError, got ${caught}`);
  assert.match(caught.message, pattern);
  return caught;
}

Deno.test("serializeSafetensors() reproduces the reference crate's bytes, spaces padding the header to 8", async () => {
  // The crate's test_serialization_forced_alignement vector: "attn0" F32 [1,1,2,3] = 0..5.
  const out = await serializeSafetensors([
    { name: "attn0", dtype: "F32", shape: [1, 1, 2, 3], data: f32Bytes([0, 1, 2, 3, 4, 5]) },
  ]);
  const json = `{"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}`;
  assert.equal(json.length, 65);
  const expected = new Uint8Array(8 + 72 + 24);
  expected.set([72, 0, 0, 0, 0, 0, 0, 0]);
  expected.set(enc.encode(json), 8);
  expected.fill(0x20, 8 + 65, 8 + 72);
  expected.set(f32Bytes([0, 1, 2, 3, 4, 5]), 80);
  assert.deepEqual(out, expected);

  // test_empty: no tensors, with and without metadata.
  assert.deepEqual(
    await serializeSafetensors([]),
    new Uint8Array([8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]),
  );
  const meta = await serializeSafetensors([], { framework: "pt" });
  assert.deepEqual(meta.subarray(0, 8), new Uint8Array([40, 0, 0, 0, 0, 0, 0, 0]));
  assert.equal(new TextDecoder().decode(meta.subarray(8)), `{"__metadata__":{"framework":"pt"}}     `);
});

// safetensors 0.8.0 (the reference Rust writer behind safetensors.numpy.save_file), given
// b.weight = arange(15, f32).reshape(3, 5) / 4, a.weight = [[1, -2], [0.5, 3]] f16, ids = arange(7, i64),
// mask = [T, F, T], z = [0.1, 0.2, 0.3, 0.4] f64, u8 = arange(5, u8), i16 = arange(6, i16).reshape(2, 3),
// "10" = zeros((0, 2), i32), s = 1.5 f32 (a scalar), metadata {"format": "pt"}.
const REFERENCE_FILE_BASE64 = [
  "QAIAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwdCJ9LCJpZHMiOnsiZHR5cGUiOiJJNjQiLCJzaGFwZSI6Wzdd",
  "LCJkYXRhX29mZnNldHMiOlswLDU2XX0sInoiOnsiZHR5cGUiOiJGNjQiLCJzaGFwZSI6WzRdLCJkYXRhX29mZnNldHMiOls1",
  "Niw4OF19LCJiLndlaWdodCI6eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbMyw1XSwiZGF0YV9vZmZzZXRzIjpbODgsMTQ4XX0s",
  "InMiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6W10sImRhdGFfb2Zmc2V0cyI6WzE0OCwxNTJdfSwiMTAiOnsiZHR5cGUiOiJJ",
  "MzIiLCJzaGFwZSI6WzAsMl0sImRhdGFfb2Zmc2V0cyI6WzE1MiwxNTJdfSwiYS53ZWlnaHQiOnsiZHR5cGUiOiJGMTYiLCJz",
  "aGFwZSI6WzIsMl0sImRhdGFfb2Zmc2V0cyI6WzE1MiwxNjBdfSwiaTE2Ijp7ImR0eXBlIjoiSTE2Iiwic2hhcGUiOlsyLDNd",
  "LCJkYXRhX29mZnNldHMiOlsxNjAsMTcyXX0sInU4Ijp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzVdLCJkYXRhX29mZnNldHMi",
  "OlsxNzIsMTc3XX0sIm1hc2siOnsiZHR5cGUiOiJCT09MIiwic2hhcGUiOlszXSwiZGF0YV9vZmZzZXRzIjpbMTc3LDE4MF19",
  "fSAgICAgICAAAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADAAAAAAAAAAQAAAAAAAAABQAAAAAAAAAGAAAAAAAAAJqZmZmZmbk/",
  "mpmZmZmZyT8zMzMzMzPTP5qZmZmZmdk/AAAAAAAAgD4AAAA/AABAPwAAgD8AAKA/AADAPwAA4D8AAABAAAAQQAAAIEAAADBA",
  "AABAQAAAUEAAAGBAAADAPwA8AMAAOABCAAABAAIAAwAEAAUAAAECAwQBAAE=",
].join("");

Deno.test("serializeSafetensors() is byte-identical to the reference writer for mixed dtypes", async () => {
  const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const ours = await serializeSafetensors([
    { name: "b.weight", dtype: "F32", shape: [3, 5], data: bytes(new Float32Array(15).map((_, i) => i / 4)) },
    { name: "a.weight", dtype: "F16", shape: [2, 2], data: bytes(new Float16Array([1, -2, 0.5, 3])) },
    {
      name: "ids",
      dtype: "I64",
      shape: [7],
      data: bytes(BigInt64Array.from({ length: 7 }, (_, i) => BigInt(i))),
    },
    { name: "mask", dtype: "BOOL", shape: [3], data: new Uint8Array([1, 0, 1]) },
    { name: "z", dtype: "F64", shape: [4], data: bytes(new Float64Array([0.1, 0.2, 0.3, 0.4])) },
    { name: "u8", dtype: "U8", shape: [5], data: new Uint8Array([0, 1, 2, 3, 4]) },
    { name: "i16", dtype: "I16", shape: [2, 3], data: bytes(new Int16Array([0, 1, 2, 3, 4, 5])) },
    { name: "10", dtype: "I32", shape: [0, 2], data: new Uint8Array() },
    { name: "s", dtype: "F32", shape: [], data: bytes(new Float32Array([1.5])) },
  ], { format: "pt" });
  const reference = Uint8Array.from(atob(REFERENCE_FILE_BASE64), (c) => c.charCodeAt(0));
  assert.equal(ours.length, reference.length);
  assert.deepEqual(ours, reference);
});

Deno.test("planSafetensors() orders by descending dtype alignment then name, with contiguous offsets", () => {
  const plan = planSafetensors([
    { name: "b", dtype: "U8", shape: [3] },
    { name: "a", dtype: "BF16", shape: [2] },
    { name: "z", dtype: "F32", shape: [1] },
    { name: "y", dtype: "F64", shape: [] },
    { name: "c", dtype: "F32", shape: [2, 0] },
    { name: "x", dtype: "BOOL", shape: [1] },
    { name: "10", dtype: "I64", shape: [1] },
  ], { z: "1", a: "2", "5": "integer-like keys keep sorted order" });
  assert.deepEqual(
    plan.tensors.map((t) => [t.name, t.dataOffsets]),
    [["10", [0, 8]], ["y", [8, 16]], ["c", [16, 16]], ["z", [16, 20]], ["a", [20, 24]], ["b", [24, 27]], [
      "x",
      [27, 28],
    ]],
  );
  assert.equal(plan.dataLength, 28);
  const n = Number(new DataView(plan.prefix.buffer).getBigUint64(0, true));
  assert.equal(n % 8, 0);
  assert.equal(plan.prefix.length, 8 + n);
  const text = new TextDecoder().decode(plan.prefix.subarray(8));
  const json = text.trimEnd();
  assert.equal(text.slice(json.length), " ".repeat(n - json.length));
  assert.ok(n - json.length < 8);
  assert.ok(
    json.startsWith(`{"__metadata__":{"5":"integer-like keys keep sorted order","a":"2","z":"1"},"10":`),
  );
  assert.ok(json.includes(`"y":{"dtype":"F64","shape":[],"data_offsets":[8,16]}`));
});

Deno.test("writeSafetensors() and SafetensorsFile round-trip every dtype, scalars and empty tensors", async () => {
  const rng = new Pcg32(7);
  const tensors = (Object.keys(DTYPES) as Dtype[]).map((dtype, i) => {
    const shape = i % 3 === 0 ? [3, 5] : [7];
    const bytes = new Uint8Array(shape.reduce((a, b) => a * b, 1) * DTYPES[dtype].size);
    for (let j = 0; j < bytes.length; j++) bytes[j] = rng.nextU32() & 0xff;
    return { name: `t.${dtype.toLowerCase()}`, dtype, shape, data: bytes as Uint8Array };
  });
  tensors.push({ name: "scalar", dtype: "F32", shape: [], data: f32Bytes([2.5]) });
  tensors.push({ name: "empty", dtype: "F16", shape: [0, 4], data: new Uint8Array() });
  await withTempDir(async (dir) => {
    const path = join(dir, "all.safetensors");
    let lazyCalls = 0;
    const sources = tensors.map((t) => ({ ...t, data: () => (lazyCalls++, t.data) }));
    const size = await writeSafetensors(path, sources, { format: "pt" });
    assert.equal(lazyCalls, tensors.length);
    assert.equal((await Deno.stat(path)).size, size);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["all.safetensors"]);
    assert.deepEqual(await Deno.readFile(path), await serializeSafetensors(tensors, { format: "pt" }));
    using st = await SafetensorsFile.open(path);
    assert.deepEqual(st.metadata, { format: "pt" });
    assert.deepEqual(st.names().sort(), tensors.map((t) => t.name).sort());
    for (const t of tensors) {
      const info = st.info(t.name);
      assert.equal(info.dtype, t.dtype);
      assert.deepEqual(info.shape, t.shape);
      assert.deepEqual(await st.readBytes(t.name), t.data);
    }
    assert.deepEqual(await st.readFloat32("scalar"), new Float32Array([2.5]));
    assert.equal(st.info("scalar").numel, 1);
    assert.equal((await st.readFloat32("empty")).length, 0);
    // Row chunks of a [3, 5] tensor: rows 1..3 are bytes [5·size, 15·size).
    const t0 = tensors[0];
    const rowBytes = 5 * DTYPES[t0.dtype].size;
    assert.deepEqual(await st.readRows(t0.name, 1, 3), t0.data.subarray(rowBytes, 3 * rowBytes));
    assert.deepEqual(await st.readRows(t0.name, 3, 3), new Uint8Array());
    assert.throws(
      () => st.readRows(t0.name, 2, 4),
      /Cannot read rows \[2, 4\) of tensor "t.bool": it has 3 rows/,
    );
    // Concurrent reads share one handle and still land in the right buffers.
    const all = await Promise.all(tensors.map((t) => st.readBytes(t.name)));
    all.forEach((bytes, i) => assert.deepEqual(bytes, tensors[i].data));
  });
});

Deno.test("SafetensorsFile names the file and the missing tensor", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "one.safetensors");
    await writeSafetensors(path, [{ name: "w", dtype: "F32", shape: [1], data: f32Bytes([1]) }]);
    using st = await SafetensorsFile.open(path);
    assert.throws(
      () => st.info("v"),
      (e: Error) => e instanceof LatheError && e.message.includes(`"v"`) && e.message.includes(path),
    );
    await assert.rejects(SafetensorsFile.open(join(dir, "nope.safetensors")), /does not exist/);
    await assert.rejects(SafetensorsFile.open(dir), /not a regular file/);
  });
});

Deno.test("SafetensorsFile rejects a header length over 100 MB or past the end of the file", async () => {
  const tooBig = rawFile("{}", new Uint8Array(), MAX_HEADER_BYTES + 1);
  await rejects(tooBig, /header length 100000001 exceeds the limit of 100000000 bytes/);
  await rejects(
    rawFile("{}", new Uint8Array(), 64),
    /header length 64 runs past the end of the file \(10 bytes\)/,
  );
  await rejects(new Uint8Array([1, 0, 0]), /3 bytes long, shorter than the 8-byte header length/);
  // u64 lengths beyond 2^53 are rejected before any arithmetic on them.
  const huge = new Uint8Array(16).fill(0xff);
  await rejects(huge, /exceeds the limit/);
});

Deno.test("SafetensorsFile rejects offsets outside the data section, overlaps, gaps and trailing bytes", async () => {
  const e = await rejects(
    rawFile(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, new Uint8Array(4)),
    /tensor "w" has data_offsets \[0, 8\] outside the data section \(4 bytes\)/,
  );
  assert.ok(e.hint);
  await rejects(
    rawFile(
      `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`,
      new Uint8Array(12),
    ),
    /tensor "b" \(data_offsets \[4, 12\]\) overlaps tensor "a" \(data_offsets \[0, 8\]\)/,
  );
  await rejects(
    rawFile(
      `{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}`,
      new Uint8Array(6),
    ),
    /bytes \[2, 4\) of the data section belong to no tensor \(before tensor "b"\)/,
  );
  await rejects(
    rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, new Uint8Array(5)),
    /the data section is 5 bytes but its tensors end at byte 2/,
  );
  await rejects(
    rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,0]}}`, new Uint8Array(2)),
    /tensor "a" has data_offsets \[2, 0\] with end before begin/,
  );
});

Deno.test("SafetensorsFile rejects a byte length that disagrees with shape × dtype size", async () => {
  await rejects(
    rawFile(`{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}`, new Uint8Array(8)),
    /tensor "w" has data_offsets \[0, 8\] spanning 8 bytes, but shape \[2,3\] of BF16 needs 12 bytes/,
  );
});

Deno.test("SafetensorsFile rejects unknown dtypes, bad shapes and non-string metadata", async () => {
  await rejects(
    rawFile(`{"w":{"dtype":"F12","shape":[1],"data_offsets":[0,1]}}`, new Uint8Array(1)),
    /tensor "w" has unknown dtype "F12" \(known: BOOL, U8/,
  );
  await rejects(
    rawFile(`{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}`, new Uint8Array(1)),
    /tensor "w" has shape \[-1\]; expected a list of non-negative integers/,
  );
  await rejects(
    rawFile(`{"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}`, new Uint8Array(1)),
    /tensor "w" has shape \[1.5\]/,
  );
  await rejects(
    rawFile(`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}}`, new Uint8Array(1)),
    /tensor "w" has data_offsets \[0\]; expected \[begin, end\] integers/,
  );
  await rejects(rawFile(`{"__metadata__":{"format":1}}`), /"__metadata__.format" is 1, not a string/);
  await rejects(rawFile(`{"__metadata__":["pt"]}`), /"__metadata__" is not a JSON object of strings/);
  await rejects(rawFile(`{"w":[1]}`), /tensor "w" is not a JSON object/);
});

Deno.test("SafetensorsFile rejects headers that are not a UTF-8 JSON object starting with {", async () => {
  await rejects(rawFile(`{"w":`), /the header is not valid JSON/);
  await rejects(rawFile(` {}`), /the header does not start with "\{"/);
  await rejects(rawFile(`[]`), /does not start/);
  const bad = rawFile(`{"\u00e9":1}`);
  bad[10] = 0xff;
  await rejects(bad, /not valid UTF-8/);
});

Deno.test("SafetensorsFile rejects a truncated file, and a file that shrinks after it was opened", async () => {
  const full = await serializeSafetensors([
    { name: "w", dtype: "F32", shape: [4], data: f32Bytes([1, 2, 3, 4]) },
  ]);
  await rejects(
    full.subarray(0, full.length - 3),
    /tensor "w" has data_offsets \[0, 16\] outside the data section \(13 bytes\)/,
  );
  await rejects(full.subarray(0, 20), /runs past the end of the file \(20 bytes\)/);
  await withTempDir(async (dir) => {
    const path = join(dir, "w.safetensors");
    await Deno.writeFile(path, full);
    using st = await SafetensorsFile.open(path);
    await Deno.truncate(path, full.length - 8);
    await assert.rejects(st.readBytes("w"), /expected 16 bytes at offset \d+ but the file ends after 8/);
  });
});

Deno.test("writeSafetensors() refuses a wrong byte length and leaves no file behind", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "x.safetensors");
    await assert.rejects(
      writeSafetensors(path, [{ name: "w", dtype: "F32", shape: [2], data: new Uint8Array(4) }]),
      /tensor "w" has 4 bytes, but shape \[2\] of F32 needs 8/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)], []);
    assert.throws(
      () =>
        planSafetensors([{ name: "w", dtype: "F32", shape: [1] }, { name: "w", dtype: "F32", shape: [1] }]),
      /tensor "w" appears twice/,
    );
  });
});

Deno.test("f16 and bf16 conversions round to nearest even and keep inf, NaN and subnormals", () => {
  // Every f16 bit pattern decodes to the value Float16Array gives.
  const h = new Uint16Array(65536).map((_, i) => i);
  const oracle = new Float32Array(new Float16Array(h.buffer));
  const ours = toFloat32("F16", new Uint8Array(h.buffer), "test");
  for (let i = 0; i < 65536; i++) {
    if (Number.isNaN(oracle[i])) assert.ok(Number.isNaN(ours[i]), `bits ${i}`);
    else assert.equal(ours[i], oracle[i], `bits ${i}`);
    assert.ok(Object.is(f16BitsToFloat32(i), oracle[i]) || Number.isNaN(oracle[i]));
  }
  // f32 -> f16 agrees with Float16Array's rounding on edge cases and random values.
  const rng = new Pcg32(3);
  const values = [
    0,
    -0,
    1,
    1 / 3,
    0.1,
    65504,
    65519.99,
    65520,
    1e6,
    -1e6,
    2 ** -24,
    2 ** -25,
    1.5 * 2 ** -25,
    2 ** -26,
    6.1e-5,
    Infinity,
    -Infinity,
  ];
  for (let i = 0; i < 20000; i++) {
    const bits = rng.nextU32();
    const f = new Float32Array(new Uint32Array([bits]).buffer)[0];
    if (!Number.isNaN(f)) values.push(f);
  }
  // Exact ties between neighbouring f16 values (normal and subnormal) go to the even one.
  for (let i = 0; i < 2000; i++) {
    const h = rng.nextU32() & 0x7bfe;
    values.push((f16BitsToFloat32(h) + f16BitsToFloat32(h + 1)) / 2);
    values.push((f16BitsToFloat32(h + 1) + f16BitsToFloat32(h + 2)) / 2);
  }
  const asF16 = new Uint16Array(new Float16Array(values).buffer);
  values.forEach((v, i) => assert.equal(float32ToF16Bits(v), asF16[i], `f16(${v})`));
  assert.equal(float32ToF16Bits(NaN) & 0x7c00, 0x7c00);
  assert.notEqual(float32ToF16Bits(NaN) & 0x3ff, 0);
  assert.deepEqual(fromFloat32(new Float32Array(values), "F16"), new Uint8Array(asF16.buffer));

  // bf16: the upper half of f32, rounded to nearest even.
  assert.equal(float32ToBf16Bits(1 / 3), 0x3eab);
  assert.equal(float32ToBf16Bits(0.1), 0x3dcd);
  assert.equal(float32ToBf16Bits(1 + 2 ** -8), 0x3f80); // tie -> even
  assert.equal(float32ToBf16Bits(1 + 3 * 2 ** -8), 0x3f82); // tie -> even (up)
  assert.equal(float32ToBf16Bits(3.4028234663852886e38), 0x7f80); // rounds to inf
  assert.equal(float32ToBf16Bits(NaN) & 0x7fc0, 0x7fc0);
  for (let i = 0; i < 20000; i++) {
    const bits = rng.nextU32();
    const f = new Float32Array(new Uint32Array([bits]).buffer)[0];
    if (!Number.isFinite(f)) continue;
    const b = float32ToBf16Bits(f);
    const back = toFloat32("BF16", new Uint8Array(new Uint16Array([b]).buffer), "t")[0];
    const down = toFloat32("BF16", new Uint8Array(new Uint16Array([bits >>> 16]).buffer), "t")[0];
    const up = toFloat32("BF16", new Uint8Array(new Uint16Array([(bits >>> 16) + 1]).buffer), "t")[0];
    // The result is one of the two neighbours and no farther from f than the other.
    assert.ok(back === down || back === up || !Number.isFinite(back), `bf16(${f})`);
    const other = back === down ? up : down;
    if (Number.isFinite(other)) assert.ok(Math.abs(back - f) <= Math.abs(other - f), `bf16(${f}) nearest`);
  }
  const bf = fromFloat32(new Float32Array([1 / 3, -2.5]), "BF16");
  assert.deepEqual(new Uint16Array(bf.buffer), new Uint16Array([0x3eab, 0xc020]));
});

Deno.test("toFloat32() reads F64, F8 and integer dtypes by value", () => {
  const f64 = new Float64Array([1 / 3, -1e300, 2.5]);
  assert.deepEqual(
    toFloat32("F64", new Uint8Array(f64.buffer), "t"),
    new Float32Array([Math.fround(1 / 3), -Infinity, 2.5]),
  );
  const e4m3 = toFloat32("F8_E4M3", new Uint8Array([0x38, 0x7e, 0x01, 0xb8, 0x7f, 0x00]), "t");
  assert.deepEqual([...e4m3.subarray(0, 4)], [1, 448, 2 ** -9, -1]);
  assert.ok(Number.isNaN(e4m3[4]));
  assert.equal(e4m3[5], 0);
  assert.deepEqual([...toFloat32("F8_E5M2", new Uint8Array([0x3c, 0x7c, 0xc0]), "t")], [1, Infinity, -2]);
  assert.deepEqual([...toFloat32("I8", new Uint8Array([0xff, 5]), "t")], [-1, 5]);
  assert.deepEqual([...toFloat32("I64", new Uint8Array(new BigInt64Array([-3n, 1n << 40n]).buffer), "t")], [
    -3,
    2 ** 40,
  ]);
  assert.deepEqual([...toFloat32("BOOL", new Uint8Array([0, 1]), "t")], [0, 1]);
  // Unaligned source bytes still convert.
  const shifted = new Uint8Array(9);
  shifted.set(f32Bytes([1.25, -2]), 1);
  assert.deepEqual([...toFloat32("F32", shifted.subarray(1), "t")], [1.25, -2]);
  assert.throws(() => toFloat32("C64", new Uint8Array(8), 'tensor "c"'), /tensor "c" to f32: dtype C64/);
});

Deno.test("writeModelWeights() shards like transformers and ModelWeights reads any tensor by name", async () => {
  const mk = (name: string, n: number, v: number) => ({
    name,
    dtype: "F32" as const,
    shape: [n],
    data: f32Bytes(Array.from({ length: n }, (_, i) => v + i)),
  });
  const tensors = [
    mk("a.weight", 4, 0),
    mk("b.weight", 4, 10),
    mk("c.weight", 10, 20),
    mk("d.weight", 1, 30),
  ];
  await withTempDir(async (dir) => {
    const files = await writeModelWeights(dir, tensors, { maxShardBytes: 32 });
    // a+b fill shard 1 (32 bytes); c (40 bytes) is alone; d starts shard 3.
    assert.deepEqual(files, [
      "model-00001-of-00003.safetensors",
      "model-00002-of-00003.safetensors",
      "model-00003-of-00003.safetensors",
      INDEX_FILE,
    ]);
    const indexText = await Deno.readTextFile(join(dir, INDEX_FILE));
    assert.deepEqual(JSON.parse(indexText), {
      metadata: { total_size: 76 },
      weight_map: {
        "a.weight": "model-00001-of-00003.safetensors",
        "b.weight": "model-00001-of-00003.safetensors",
        "c.weight": "model-00002-of-00003.safetensors",
        "d.weight": "model-00003-of-00003.safetensors",
      },
    });
    assert.ok(indexText.startsWith(`{\n  "metadata": {\n    "total_size": 76\n  },\n  "weight_map": {\n`));
    using weights = await ModelWeights.open(dir);
    assert.deepEqual(weights.names(), ["a.weight", "b.weight", "c.weight", "d.weight"]);
    assert.equal(weights.info("c.weight").file, "model-00002-of-00003.safetensors");
    assert.deepEqual(
      await weights.readFloat32("c.weight"),
      new Float32Array(Array.from({ length: 10 }, (_, i) => 20 + i)),
    );
    assert.deepEqual(await weights.readBytes("d.weight"), f32Bytes([30]));
    assert.deepEqual(await weights.readRows("c.weight", 2, 4), f32Bytes([22, 23]));
    assert.throws(() => weights.info("e.weight"), /Cannot read tensor "e.weight" from model/);
    using shard = await SafetensorsFile.open(join(dir, files[0]));
    assert.deepEqual(shard.metadata, { format: "pt" });
    // A single model.safetensors takes precedence over the index, as in transformers.
    await writeSafetensors(join(dir, "model.safetensors"), [mk("only.weight", 1, 0)]);
    using single = await ModelWeights.open(dir);
    assert.deepEqual(single.names(), ["only.weight"]);
  });
  await withTempDir(async (dir) => {
    assert.deepEqual(await writeModelWeights(dir, tensors), ["model.safetensors"]);
    using weights = await ModelWeights.open(dir);
    assert.equal(weights.names().length, 4);
    using single = await ModelWeights.open(join(dir, "model.safetensors"));
    assert.deepEqual(await single.readFloat32("a.weight"), new Float32Array([0, 1, 2, 3]));
  });
});

Deno.test("ModelWeights names a missing shard, a tensor absent from its shard, and escaping paths", async () => {
  const t = (name: string) => ({ name, dtype: "F32" as const, shape: [2], data: f32Bytes([1, 2]) });
  await withTempDir(async (dir) => {
    await writeModelWeights(dir, [t("a"), t("b"), t("c")], { maxShardBytes: 8 });
    await Deno.remove(join(dir, "model-00002-of-00003.safetensors"));
    await assert.rejects(
      ModelWeights.open(dir),
      (e: Error) =>
        e instanceof LatheError &&
        /shard "model-00002-of-00003.safetensors" \(listed in model.safetensors.index.json for 1 tensors, e.g. "b"\) is missing/
          .test(e.message) &&
        /download/.test(e.hint ?? ""),
    );
  });
  await withTempDir(async (dir) => {
    await writeModelWeights(dir, [t("a"), t("b")], { maxShardBytes: 8 });
    const index = JSON.parse(await Deno.readTextFile(join(dir, INDEX_FILE)));
    index.weight_map.b = "model-00001-of-00002.safetensors";
    await Deno.writeTextFile(join(dir, INDEX_FILE), JSON.stringify(index));
    await assert.rejects(
      ModelWeights.open(dir),
      /puts tensor "b" in "model-00001-of-00002.safetensors", but that shard/,
    );
    index.weight_map.b = "../elsewhere.safetensors";
    await Deno.writeTextFile(join(dir, INDEX_FILE), JSON.stringify(index));
    await assert.rejects(ModelWeights.open(dir), /"weight_map.b" points outside the model directory/);
    await Deno.writeTextFile(join(dir, INDEX_FILE), `{"metadata": {}}`);
    await assert.rejects(ModelWeights.open(dir), /"weight_map" is missing/);
  });
  await withTempDir(async (dir) => {
    await assert.rejects(
      ModelWeights.open(dir),
      /neither "model.safetensors" nor "model.safetensors.index.json"/,
    );
    await Deno.writeFile(join(dir, "pytorch_model.bin"), new Uint8Array(4));
    await assert.rejects(
      ModelWeights.open(dir),
      (e: Error) => /safetensors only/.test((e as LatheError).hint ?? ""),
    );
  });
});
