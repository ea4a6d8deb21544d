// The quantization pool (formats/gguf_quant_pool.ts) gives the bytes of a single-thread `quantize`:
// rows split over workers, each range quantized alone, concatenated in order.
import assert from "node:assert/strict";
import { QuantizePool } from "../../formats/gguf_quant_pool.ts";
import { quantize } from "../../formats/gguf_quants.ts";
import { randn } from "../kernels/_harness.ts";

Deno.test("QuantizePool: the bytes of quantize(), for K-quants and 32-blocks, odd row counts", async () => {
  using pool = new QuantizePool(3);
  const values = randn(1031 * 256, 17, 0.02); // 1031 rows: ranges of unequal length
  for (const type of ["Q4_K", "Q6_K", "Q8_0"] as const) {
    assert.deepEqual(await pool.quantize(type, values, 256), quantize(type, values, 256), type);
  }
  await assert.rejects(
    () => pool.quantize("Q4_K", randn(1024 * 300, 1, 1), 300),
    /not a multiple of its block size/,
  );
});
