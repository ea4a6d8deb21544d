// The decode attention (kernels/ops/attention_decode.ts) against the f64 reference
// (kernels/reference/attention.ts `attention_decode`) on random q and caches: GQA (H 8, Hkv 2),
// sequences of different lengths (1, a tile boundary, longer than a tile), with and without a
// sliding window, hd 64 and 128, f32 (|gpu − ref| ≤ 1e-5 + 1e-4·|ref|) and f16 q and cache (inputs
// rounded to f16 for the reference; ≤ 2e-3 + 1e-2·|ref|). Also: the cache write places each
// sequence's rows at its slots.
import assert from "node:assert/strict";
import { attentionDecode, KvCache } from "../../kernels/ops/attention_decode.ts";
import { attention_decode } from "../../kernels/reference/attention.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, randn, roundF16 } from "./_harness.ts";

for (const hd of [64, 128]) {
  for (const window of [null, 5]) {
    gpuTest(
      `attention decode matches the reference: hd ${hd}, window ${window ?? "none"}, f32 and f16`,
      async (gpu) => {
        const [B, H, Hkv, L] = [4, 8, 2, 40];
        const lens = Uint32Array.from([1, 8, 17, 40]);
        for (const dtype of gpu.f16 ? ["f32", "f16"] as const : ["f32"] as const) {
          const round = (x: Float32Array) => dtype === "f16" ? roundF16(x) : x;
          const q = round(randn(B * H * hd, 1, 1));
          const K = round(randn(B * L * Hkv * hd, 2, 1));
          const V = round(randn(B * L * Hkv * hd, 3, 1));
          using qt = Tensor.from(gpu, q, [B, H, hd], dtype, { label: "q" });
          using kt = Tensor.from(gpu, K, [B, L, Hkv, hd], dtype, { label: "K" });
          using vt = Tensor.from(gpu, V, [B, L, Hkv, hd], dtype, { label: "V" });
          using lt = Tensor.from(gpu, lens, [B], "u32", { label: "lens" });
          using out = attentionDecode(qt, kt, vt, lt, { window });
          const ref = attention_decode(q, K, V, lens, { B, H, Hkv, hd, L, window });
          const tol = dtype === "f32" ? { atol: 1e-5, rtol: 1e-4 } : { atol: 2e-3, rtol: 1e-2 };
          assertClose(await out.readF32(), ref, { ...tol, name: `${dtype} out` });
        }
      },
    );
  }
}

gpuTest("the KV cache write puts each sequence's rows at its slots", async (gpu) => {
  const [B, L, Hkv, hd, S] = [2, 6, 1, 4, 3];
  using cache = new KvCache(gpu, 1, B, L, Hkv, hd, "f32");
  const k = Float32Array.from({ length: B * S * Hkv * hd }, (_, i) => i + 1);
  using kt = Tensor.from(gpu, k, [B * S, Hkv, hd], "f32", { label: "k" });
  using vt = Tensor.from(gpu, k.map((x) => -x), [B * S, Hkv, hd], "f32", { label: "v" });
  cache.write(0, kt, vt, S, [{ at: 0, count: 2 }, { at: 3, count: 3 }]);
  const got = await cache.k[0].readF32();
  const row = (b: number, slot: number) =>
    Array.from(got.subarray((b * L + slot) * hd, (b * L + slot + 1) * hd));
  assert.deepEqual(row(0, 0), [1, 2, 3, 4]);
  assert.deepEqual(row(0, 1), [5, 6, 7, 8]);
  assert.deepEqual(row(1, 3), [13, 14, 15, 16]);
  assert.deepEqual(row(1, 5), [21, 22, 23, 24]);
  assert.deepEqual(Array.from((await cache.v[0].readF32()).subarray((L + 4) * hd, (L + 5) * hd)), [
    -17,
    -18,
    -19,
    -20,
  ]);
  assert.throws(
    () => cache.write(0, kt, vt, S, [{ at: 5, count: 2 }, { at: 0, count: 0 }]),
    /6-slot KV cache/,
  );
});
