/**
 * The hand-made weights of the bitsandbytes 4-bit golden (scripts/golden/nf4.py): values on and
 * one f32 ulp either side of every NF4 and FP4 decision threshold, an all-zero block, ±0 and
 * subnormals, a ragged odd length, many blocks of one absmax (the nested absmax is then 0), and
 * more than 256 blocks (two nested blocks).
 *
 * ```
 * deno run -A scripts/golden/nf4_edge.ts tests/fixtures/golden/nf4/edge.safetensors
 * ```
 * @module
 */
import { Pcg32 } from "../../foundation/random.ts";
import { FP4_TABLE, FP4_THRESHOLDS, NF4_TABLE, NF4_THRESHOLDS } from "../../formats/bnb4bit.ts";
import { type TensorSource, writeSafetensors } from "../../formats/safetensors.ts";

/** The next f32 above (dir 1) or below (dir −1) an f32 value. */
function nextF32(x: number, dir: 1 | -1): number {
  const buf = new Float32Array([x]);
  const bits = new Int32Array(buf.buffer);
  if (x === 0) return dir * 1.401298464324817e-45;
  bits[0] += (x > 0) === (dir > 0) ? 1 : -1;
  return buf[0];
}

/** name -> [shape, values]. */
export function edgeTensors(): Map<string, [number[], Float32Array]> {
  const out = new Map<string, [number[], Float32Array]>();
  // Block 0: absmax 1 (so x = w), every midpoint of both tables, one ulp either side.
  const mids: number[] = [];
  for (const table of [NF4_TABLE, FP4_TABLE]) {
    const sorted = [...table].sort((a, b) => a - b);
    for (let i = 0; i + 1 < sorted.length; i++) mids.push(Math.fround((sorted[i] + sorted[i + 1]) / 2));
  }
  const points = [...NF4_THRESHOLDS, ...FP4_THRESHOLDS, ...FP4_THRESHOLDS.map((t) => -t), ...mids].map(
    Math.fround,
  );
  const onThresholds: number[] = [];
  for (const p of points) onThresholds.push(p, nextF32(p, 1), nextF32(p, -1));
  const all = [1, ...new Set(onThresholds)];
  const rows = Math.ceil(all.length / 64);
  const thresholds = new Float32Array(rows * 64);
  // Each block of 64 starts with 1 so its absmax is 1 and x = w exactly.
  for (let b = 0, k = 1; b < rows; b++) {
    thresholds[b * 64] = 1;
    for (let j = 1; j < 64 && k < all.length; j++, k++) thresholds[b * 64 + j] = all[k];
  }
  out.set("edge.thresholds.weight", [[rows, 64], thresholds]);
  // An all-zero block, a block of ±0 and subnormals, then ordinary values.
  const zeros = new Float32Array(3 * 64);
  for (let j = 0; j < 64; j++) {
    zeros[64 + j] = j % 2 === 0 ? -0 : (j % 4 === 1 ? 1 : -1) * 1.401298464324817e-45 * j;
  }
  new Pcg32(7, 0).fillNormal(zeros.subarray(128), 0, 1);
  out.set("edge.zeros.weight", [[3, 64], zeros]);
  // Ragged: 3 × 45 = 135 values (blocks across row ends, an odd count), magnitudes 1e-3 … 1e3.
  const ragged = new Float32Array(135);
  new Pcg32(7, 1).fillNormal(ragged, 0, 1);
  for (let k = 0; k < ragged.length; k++) ragged[k] = Math.fround(ragged[k] * 10 ** ((k % 7) - 3));
  out.set("edge.ragged.weight", [[3, 45], ragged]);
  // Four blocks of one absmax: the centred absmax is 0, so is its nested absmax.
  const flat = new Float32Array(4 * 64);
  for (let k = 0; k < flat.length; k++) flat[k] = k % 64 === 5 ? -0.5 : Math.fround(0.25 * Math.sin(k));
  out.set("edge.flat.weight", [[4, 64], flat]);
  // 300 blocks: two nested blocks, the second short; some blocks share an absmax.
  const many = new Float32Array(300 * 64);
  new Pcg32(7, 2).fillNormal(many, 0, 0.02);
  for (let b = 0; b < 300; b += 7) many[b * 64] = 0.125;
  out.set("edge.many.weight", [[300, 64], many]);
  return out;
}

if (import.meta.main) {
  const tensors: TensorSource[] = [...edgeTensors()].map(([name, [shape, values]]) => ({
    name,
    dtype: "F32",
    shape,
    data: new Uint8Array(values.buffer),
  }));
  await writeSafetensors(Deno.args[0] ?? "tests/fixtures/golden/nf4/edge.safetensors", tensors);
}
