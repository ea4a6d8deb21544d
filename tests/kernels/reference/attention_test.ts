import assert from "node:assert/strict";
import {
  attention_allowed,
  attention_backward,
  attention_forward,
  type AttentionDims,
  doc_ids_from_positions,
} from "../../../kernels/reference/attention.ts";
import { assertClose, checkGradient, dot, random, randomArray } from "./_check.ts";

const TIGHT = { atol: 1e-14, rtol: 1e-12 };

// Mean of v[j, kvh, :] over the keys j in `keys` (uniform attention when every score is equal).
function meanV(v: Float64Array, keys: number[], kvh: number, Hkv: number, hd: number): number[] {
  const m = new Array(hd).fill(0);
  for (const j of keys) for (let d = 0; d < hd; d++) m[d] += v[(j * Hkv + kvh) * hd + d] / keys.length;
  return m;
}

Deno.test("attention_forward of a single token returns its v and lse = scale·q·k", () => {
  const rand = random(6);
  const hd = 4;
  const q = randomArray(rand, hd);
  const k = randomArray(rand, hd);
  const v = randomArray(rand, hd);
  const { out, lse } = attention_forward(q, k, v, { B: 1, S: 1, H: 1, Hkv: 1, hd });
  assertClose(out, v, TIGHT);
  assertClose(lse, [dot(q, k) / Math.sqrt(hd)], TIGHT);
});

Deno.test("attention_allowed follows transformers' causal sliding window (kv > q − W, kv <= q)", () => {
  // transformers masking_utils, sliding_window = 3, 5 tokens
  const expected = [
    "■⬚⬚⬚⬚",
    "■■⬚⬚⬚",
    "■■■⬚⬚",
    "⬚■■■⬚",
    "⬚⬚■■■",
  ];
  const got = [0, 1, 2, 3, 4].map((i) =>
    [0, 1, 2, 3, 4].map((j) => attention_allowed(i, j, 3, 0, 0) ? "■" : "⬚").join("")
  );
  assert.deepEqual(got, expected);
  assert.equal(attention_allowed(4, 0, null, 0, 0), true);
  assert.equal(attention_allowed(4, 3, null, 1, 0), false);
});

Deno.test("attention_forward averages v over exactly the allowed keys (window, documents, rows, GQA)", () => {
  // q = 0 makes every allowed score equal, so out = mean of v over the allowed keys and lse = ln(count)
  const rand = random(7);
  const B = 2, S = 6, H = 4, Hkv = 2, hd = 3, W = 3;
  const T = B * S;
  // row 1 reuses the id of row 0's second document: rows must stay apart anyway
  const docIds = Int32Array.of(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1);
  const dims: AttentionDims = { B, S, H, Hkv, hd, window: W, docIds };
  const q = new Float64Array(T * H * hd);
  const k = randomArray(rand, T * Hkv * hd);
  const v = randomArray(rand, T * Hkv * hd);
  const { out, lse } = attention_forward(q, k, v, dims);
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < S; i++) {
      const t = b * S + i;
      // allowed: same row, i − W < j <= i, same document
      const keys: number[] = [];
      for (let j = Math.max(0, i - W + 1); j <= i; j++) {
        if (docIds[b * S + j] === docIds[t]) keys.push(b * S + j);
      }
      for (let h = 0; h < H; h++) {
        const kvh = Math.floor(h / (H / Hkv)); // heads 0,1 -> kv 0; heads 2,3 -> kv 1
        const o = (t * H + h) * hd;
        assertClose(out.subarray(o, o + hd), meanV(v, keys, kvh, Hkv, hd), TIGHT, `out[${t},${h}]`);
        assertClose([lse[t * H + h]], [Math.log(keys.length)], TIGHT, `lse[${t},${h}]`);
      }
    }
  }
});

Deno.test("doc_ids_from_positions starts a document at each row and wherever the position is 0", () => {
  const ids = doc_ids_from_positions([0, 1, 2, 0, 1, 5, 6, 7, 0, 1], 2, 5);
  assert.deepEqual([...ids], [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]);
});

Deno.test("attention_backward matches finite differences (GQA, window, two documents, two rows)", () => {
  const rand = random(8);
  const B = 2, S = 5, H = 4, Hkv = 2, hd = 3;
  const T = B * S;
  const dims: AttentionDims = {
    B,
    S,
    H,
    Hkv,
    hd,
    window: 3,
    docIds: Int32Array.of(0, 0, 1, 1, 1, 2, 2, 2, 2, 2),
  };
  const q = randomArray(rand, T * H * hd, 2);
  const k = randomArray(rand, T * Hkv * hd, 2);
  const v = randomArray(rand, T * Hkv * hd);
  const dout = randomArray(rand, T * H * hd);
  const { out, lse } = attention_forward(q, k, v, dims);
  const { dq, dk, dv } = attention_backward(dout, q, k, v, out, lse, dims);
  const loss = () => dot(attention_forward(q, k, v, dims).out, dout);
  checkGradient("dq", q, dq, loss);
  checkGradient("dk", k, dk, loss);
  checkGradient("dv", v, dv, loss);
});

Deno.test("attention_backward matches central finite differences without window or documents (MHA)", () => {
  const rand = random(9);
  const dims: AttentionDims = { B: 1, S: 4, H: 2, Hkv: 2, hd: 5 };
  const q = randomArray(rand, 4 * 2 * 5);
  const k = randomArray(rand, 4 * 2 * 5);
  const v = randomArray(rand, 4 * 2 * 5);
  const dout = randomArray(rand, 4 * 2 * 5);
  const { out, lse } = attention_forward(q, k, v, dims);
  const { dq, dk, dv } = attention_backward(dout, q, k, v, out, lse, dims);
  const loss = () => dot(attention_forward(q, k, v, dims).out, dout);
  checkGradient("dq", q, dq, loss);
  checkGradient("dk", k, dk, loss);
  checkGradient("dv", v, dv, loss);
});

Deno.test("attention_forward rejects H not a multiple of Hkv and a window below 1", () => {
  const x = new Float64Array(6);
  assert.throws(() => attention_forward(x, x, x, { B: 1, S: 1, H: 3, Hkv: 2, hd: 1 }), /multiple of Hkv/);
  assert.throws(() => attention_forward(x, x, x, { B: 1, S: 1, H: 1, Hkv: 1, hd: 6, window: 0 }), /window/);
});
