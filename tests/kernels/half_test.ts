import assert from "node:assert/strict";
import {
  bf16ArrayToF32,
  f16ArrayToF32,
  f16ToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
  f32BitsToF16Bits,
  f32ToF16,
} from "../../kernels/half.ts";
import { rng } from "./_harness.ts";

/** f16 bits of a number as the platform's Float16Array stores them (the oracle). */
function oracleF16(x: number): number {
  return new Uint16Array(new Float16Array([x]).buffer)[0];
}

Deno.test("f16ToF32() decodes every f16 bit pattern exactly", () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const platform = new Float16Array(all.buffer);
  const ours = f16ArrayToF32(all);
  for (let h = 0; h < 65536; h++) {
    const want = platform[h];
    if (Number.isNaN(want)) assert.ok(Number.isNaN(ours[h]) && Number.isNaN(f16ToF32(h)), `bits ${h}`);
    else {
      assert.equal(ours[h], want, `bits 0x${h.toString(16)}`);
      assert.equal(f16ToF32(h), want);
    }
  }
});

Deno.test("f32ToF16() rounds to nearest even at every midpoint between f16 values", () => {
  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);
  for (let h = 0; h < 0x7c00; h++) {
    const lo = f16ToF32(h);
    const hi = h === 0x7bff ? 65536 : f16ToF32(h + 1); // 65536: the overflow threshold's neighbour
    for (const sign of [1, -1]) {
      const mid = sign * (lo + hi) / 2; // exact in f32
      f32[0] = mid;
      const bits = u32[0];
      for (const probe of [bits - 1, bits, bits + 1]) {
        u32[0] = probe;
        const want = oracleF16(f32[0]);
        assert.equal(f32BitsToF16Bits(probe), want, `f32 ${f32[0]} (bits 0x${probe.toString(16)})`);
      }
    }
  }
});

Deno.test("f32ToF16() handles overflow, subnormals, zeros, infinities and NaN", () => {
  assert.equal(f32ToF16(1), 0x3c00);
  assert.equal(f32ToF16(65504), 0x7bff);
  assert.equal(f32ToF16(65519.99), 0x7bff);
  assert.equal(f32ToF16(65520), 0x7c00); // the tie rounds to even: Inf
  assert.equal(f32ToF16(-1e9), 0xfc00);
  assert.equal(f32ToF16(2 ** -24), 0x0001);
  assert.equal(f32ToF16(2 ** -25), 0x0000); // tie to even: 0
  assert.equal(f32ToF16(3 * 2 ** -26), 0x0001);
  assert.equal(f32ToF16(-0), 0x8000);
  assert.equal(f32ToF16(Infinity), 0x7c00);
  assert.equal(f32ToF16(NaN) & 0x7c00, 0x7c00);
  assert.notEqual(f32ToF16(NaN) & 0x3ff, 0);
});

Deno.test("f32ArrayToF16() agrees with Float16Array on random bit patterns", () => {
  const next = rng(7);
  const bits = Uint32Array.from({ length: 200_000 }, () => Math.floor(next() * 2 ** 32));
  const src = new Float32Array(bits.buffer);
  const ours = f32ArrayToF16(src);
  const want = new Uint16Array(new Float16Array(src).buffer);
  for (let i = 0; i < src.length; i++) {
    if (Number.isNaN(src[i])) assert.equal(ours[i] & 0x7c00, 0x7c00);
    else assert.equal(ours[i], want[i], `f32 ${src[i]} (bits 0x${bits[i].toString(16)})`);
  }
});

Deno.test("bf16 conversions are exact up and round to nearest even down", () => {
  assert.deepEqual([...bf16ArrayToF32(new Uint16Array([0x3f80, 0xc000, 0x7f80, 0x0001]))], [
    1,
    -2,
    Infinity,
    2 ** -133,
  ]);
  const x = new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -1.5, NaN]);
  const bf = f32ArrayToBf16(x);
  assert.equal(bf[0], 0x3f80); // tie: stays at the even 1.0
  assert.equal(bf[1], 0x3f82); // tie: rounds up to the even 1 + 2^-6
  assert.equal(bf[2], 0x3f81); // above the tie
  assert.equal(bf[3], 0xbfc0);
  assert.ok(Number.isNaN(bf16ArrayToF32(bf.subarray(4))[0]));
});
