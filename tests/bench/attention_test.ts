// The attention benchmark (bench/attention.ts): its command line, its packed document ids, and a
// minimal run on the current adapter (no timing assertions): every pass is timed against the
// previous kernels and the matmul reference, and the JSON report says so.
import assert from "node:assert/strict";
import { join } from "node:path";
import { benchDocs, parseAttentionArgs, parseTiles, run } from "../../bench/attention.ts";
import { LatheError } from "../../foundation/errors.ts";
import { gpuTest } from "../kernels/_harness.ts";

Deno.test("parseAttentionArgs() takes one shape from --S/--H/--Hkv/--hd/--B and refuses bad values", () => {
  const gpu = { f16: true, software: true };
  const { config, json } = parseAttentionArgs(
    ["--S", "128", "--H", "4", "--Hkv", "2", "--hd", "32", "--B", "2", "--dtypes", "f32", "--json", "x.json"],
    gpu,
  );
  assert.deepEqual(config.shapes, [{ B: 2, S: 128, H: 4, Hkv: 2, hd: 32 }]);
  assert.deepEqual(config.dtypes, ["f32"]);
  assert.equal(json, "x.json");
  assert.throws(() => parseAttentionArgs(["--S", "zero"], gpu), LatheError);
  assert.throws(() => parseAttentionArgs(["--bogus"], gpu), LatheError);
});

Deno.test("parseTiles() reads kernel=BrxBc/TPR/RPT lists", () => {
  const tiles = parseTiles("forward=64x32/8/4");
  assert.deepEqual(Object.keys(tiles), ["forward"]);
  assert.throws(() => parseTiles("forward=64"), LatheError);
});

Deno.test("benchDocs() cuts each row into n contiguous documents with ids that never repeat across rows", () => {
  const docs = benchDocs(3, 50, 4, 7);
  for (let b = 0; b < 3; b++) {
    const row = [...docs.subarray(b * 50, (b + 1) * 50)];
    assert.equal(new Set(row).size, 4);
    for (let i = 1; i < row.length; i++) assert.ok(row[i] === row[i - 1] || row[i] === row[i - 1] + 1);
    if (b > 0) assert.ok(row[0] > docs[b * 50 - 1]);
  }
});

gpuTest(
  "a minimal attention benchmark times forward, backward, the previous kernels and matmul",
  async () => {
    const dir = await Deno.makeTempDir();
    try {
      const path = join(dir, "a.json");
      const args = ["--S", "32", "--H", "2", "--Hkv", "1", "--hd", "16", "--dtypes", "f32"];
      const report = await run([...args, "--seconds", "0.01", "--rounds", "1", "--json", path]);
      const kinds = report.results.map((r) => `${r.pass}:${r.kernel.split(" ")[0]}`);
      for (
        const k of [
          "forward:lathe",
          "forward:previous",
          "backward:lathe",
          "backward:previous",
          "matmul:matmul",
        ]
      ) {
        assert.ok(kinds.includes(k), `${k} missing from ${kinds}`);
      }
      for (const r of report.results) assert.ok(r.ms > 0 && r.gflops > 0, JSON.stringify(r));
      const written = JSON.parse(await Deno.readTextFile(path));
      assert.equal(written.benchmark, "attention");
      assert.equal(written.results.length, report.results.length);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
