// The generation benchmark's report: a row per size and batch, every figure finite and positive.
import assert from "node:assert/strict";
import { run } from "../../bench/generate.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { LatheError } from "../../foundation/errors.ts";

gpuTest(
  "bench generate reports prefill and decode tokens/s beside the training forward and the weights' copy",
  async () => {
    const report = await run(["--sizes", "nano", "--prompt", "16", "--new", "3", "--batches", "1,2"]);
    assert.equal(report.benchmark, "generate");
    assert.deepEqual(report.results.map((r) => [r.model, r.batch]), [["llama-nano", 1], ["llama-nano", 2]]);
    for (const r of report.results) {
      for (
        const k of [
          "prefillTokensPerS",
          "decodeTokensPerS",
          "decodeStepMs",
          "forwardTokensPerS",
          "weightCopyMs",
          "stepOverCopy",
        ] as const
      ) {
        assert.ok(Number.isFinite(r[k]) && r[k] > 0, `${k} ${r[k]}`);
      }
      assert.ok(r.weightBytes > 0);
    }
  },
);

Deno.test("bench generate names a bad option", async () => {
  await assert.rejects(
    () => run(["--batches", "0"]),
    (e: Error) => e instanceof LatheError && /--batches "0"/.test(e.message),
  );
  await assert.rejects(
    () => run(["--sizes", "huge"]),
    (e: Error) => e instanceof LatheError && /--sizes names "huge"/.test(e.message),
  );
});
