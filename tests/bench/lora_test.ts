// The LoRA fusion benchmark (bench/lora.ts): its command line and a minimal run on the current
// adapter (no timing assertions): both passes are timed fused and unfused, with one dispatch fewer
// fused, and the two paths agree to f32 rounding.
import assert from "node:assert/strict";
import { join } from "node:path";
import { parseLoraArgs, run } from "../../bench/lora.ts";
import { LatheError } from "../../foundation/errors.ts";
import { gpuTest } from "../kernels/_harness.ts";

Deno.test("parseLoraArgs() reads T:K:N:r shapes, dtypes and dropouts, and refuses bad values", () => {
  const gpu = { f16: false, software: true };
  const { config } = parseLoraArgs(["--shapes", "64:32:48:4", "--dtypes", "f32", "--dropout", "0,0.1"], gpu);
  assert.deepEqual(config.shapes, [{ T: 64, K: 32, N: 48, r: 4 }]);
  assert.deepEqual(config.dropouts, [0, 0.1]);
  assert.throws(() => parseLoraArgs(["--shapes", "64:32:48"], gpu), LatheError);
  assert.throws(() => parseLoraArgs(["--dtypes", "f16"], gpu), LatheError);
  assert.throws(() => parseLoraArgs(["--dropout", "1"], gpu), LatheError);
});

gpuTest("a minimal LoRA benchmark times both passes fused and unfused, one dispatch apart", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = join(dir, "l.json");
    const report = await run([
      "--shapes",
      "32:16:24:4",
      "--dtypes",
      "f32",
      "--seconds",
      "0.01",
      "--rounds",
      "1",
      "--json",
      path,
    ]);
    assert.deepEqual(report.results.map((r) => r.pass).sort(), ["backward", "forward"]);
    for (const r of report.results) {
      assert.equal(r.dispatches.fused, r.dispatches.unfused - 1, JSON.stringify(r));
      assert.ok(r.fusedMs > 0 && r.unfusedMs > 0);
      assert.ok(r.relDiff < 1e-5, `fused and unfused differ by ${r.relDiff}`);
    }
    assert.equal(JSON.parse(await Deno.readTextFile(path)).benchmark, "lora");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
