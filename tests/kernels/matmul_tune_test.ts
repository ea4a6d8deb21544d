// The matmul tuning table (file, adapter keying, lookup by shape class) and the tuner itself,
// on the current adapter with tiny shapes and one repetition. M, N, K as in
// C[M,N] = op(A)[M,K]·op(B)[K,N].
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Gpu } from "../../kernels/device.ts";
import {
  chooseConfig,
  configName,
  matmul,
  matmulChoice,
  type MatmulConfig,
  type MatmulShape,
} from "../../kernels/ops/matmul.ts";
import { latheCacheDir } from "../../foundation/paths.ts";
import {
  activeTuningTable,
  adapterIdentity,
  emptyTuningTable,
  readTuningTable,
  resetMatmulTuning,
  setMatmulTuning,
  shapeClass,
  tuningDisabled,
  type TuningTable,
  tuningTablePath,
  writeTuningTable,
} from "../../kernels/ops/matmul_table.ts";
import { tuneMatmul } from "../../kernels/ops/matmul_tune.ts";
import { matmul_forward } from "../../kernels/reference/matmul.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { assertClose, gpuTest, randn } from "./_harness.ts";

/** A config of this adapter's family that the heuristic never picks (so its use is visible). */
function unusualConfig(gpu: Gpu): MatmulConfig {
  return gpu.software
    ? { kind: "direct", tile: { TM: 4, TN: 8, WG: 4 } }
    : { kind: "tiled", tile: { BM: 32, BN: 64, BK: 8, TM: 4, TN: 8 } };
}

/** The kernel label's tile parameter of a config (`tile=4x8/4`, `tile=32x64x8/4x8`). */
function tileParam(config: MatmulConfig): string {
  if (config.kind === "direct") return `tile=${config.tile.TM}x${config.tile.TN}/${config.tile.WG}`;
  const t = config.tile;
  return `tile=${t.BM}x${t.BN}x${t.BK}/${t.TM}x${t.TN}`;
}

function tableWith(gpu: Gpu, entries: Record<string, MatmulConfig>): TuningTable {
  const table = emptyTuningTable(adapterIdentity(gpu));
  for (const [key, config] of Object.entries(entries)) {
    table.entries[key] = {
      config,
      shapes: [[64, 64, 64]],
      ms: 1,
      gflops: 0.5,
      heuristicGflops: 0.4,
      timer: "wall",
      tuned: "2026-01-01T00:00:00.000Z",
    };
  }
  return table;
}

/** Runs `fn` with environment variables set (undefined: removed), restoring them after. */
async function withEnv<T>(vars: Record<string, string | undefined>, fn: () => Promise<T> | T): Promise<T> {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, Deno.env.get(k)]));
  const apply = (v: Record<string, string | undefined>) => {
    for (const [k, value] of Object.entries(v)) {
      value === undefined ? Deno.env.delete(k) : Deno.env.set(k, value);
    }
  };
  apply(vars);
  try {
    return await fn();
  } finally {
    apply(saved);
  }
}

/** Collects console.warn lines while `fn` runs. */
async function captureWarnings(fn: () => Promise<void> | void): Promise<string[]> {
  const lines: string[] = [];
  const original = console.warn;
  console.warn = (...args: unknown[]) => lines.push(args.join(" "));
  try {
    await fn();
  } finally {
    console.warn = original;
  }
  return lines;
}

const SHAPE: MatmulShape = { layout: "NT", a: "f32", b: "f32", M: 48, N: 40, K: 36 };

Deno.test("the cache directory is LATHE_CACHE_DIR, else XDG_CACHE_HOME/lathe, else ~/.cache/lathe", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  assert.equal(latheCacheDir(env({ LATHE_CACHE_DIR: "/c", XDG_CACHE_HOME: "/x" })), "/c");
  assert.equal(latheCacheDir(env({ XDG_CACHE_HOME: "/x" })), "/x/lathe");
  assert.match(latheCacheDir(env({})), /\.cache\/lathe$/);
  assert.ok(tuningDisabled(env({ LATHE_MATMUL_TUNING: "off" })));
  assert.ok(!tuningDisabled(env({ LATHE_MATMUL_TUNING: "on" })));
  assert.ok(!tuningDisabled(env({})));
});

Deno.test("shape classes round M, N, K to the nearest power of two and keep layout and dtypes", () => {
  assert.equal(
    shapeClass({ layout: "NT", a: "f16", b: "f16", M: 2048, N: 14336, K: 4096 }),
    "NT/f16/m2048/n16384/k4096",
  );
  assert.equal(
    shapeClass({ layout: "NN", a: "f32", b: "f32", M: 2000, N: 11008, K: 1 }),
    "NN/f32/m2048/n8192/k1",
  );
  assert.equal(shapeClass({ layout: "TN", a: "f32", b: "f16", M: 3, N: 5, K: 6 }), "TN/f32-f16/m4/n4/k8");
});

gpuTest("a tuning table round-trips through its file, keyed by adapter and driver", async (gpu) => {
  const dir = await Deno.makeTempDir();
  try {
    const adapter = adapterIdentity(gpu);
    assert.equal(adapter.description, gpu.info.description);
    assert.equal(adapter.backend, gpu.info.backend);
    const path = tuningTablePath(adapter, dir);
    assert.ok(path.startsWith(join(dir, "matmul")), path);
    const table = tableWith(gpu, { [shapeClass(SHAPE)]: unusualConfig(gpu) });
    await writeTuningTable(path, table);
    assert.deepEqual(readTuningTable(path, adapter), { table });
    // Another driver (or any other identity field) is another file, and this file is not its table.
    const other = { ...adapter, driver: "nvidia 999.1" };
    assert.notEqual(tuningTablePath(other, dir), path);
    const read = readTuningTable(path, other);
    assert.equal(read.table, null);
    assert.match(read.warning!, /another adapter or driver/);
    // No file: no table and no warning.
    assert.deepEqual(readTuningTable(join(dir, "absent.json"), adapter), { table: null });
    // The write left no temp file behind.
    const names = [...Deno.readDirSync(join(dir, "matmul"))].map((e) => e.name);
    assert.deepEqual(names, [path.split("/").pop()]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTest("a corrupt tuning table gives one warning and the heuristic, and matmul still runs", async (gpu) => {
  const dir = await Deno.makeTempDir();
  try {
    const path = tuningTablePath(adapterIdentity(gpu), dir);
    await Deno.mkdir(join(dir, "matmul"), { recursive: true });
    for (
      const [text, why] of [["{ not json", /not JSON/], [
        '{"format": "lathe-matmul-tuning"}',
        /version/,
      ]] as const
    ) {
      await Deno.writeTextFile(path, text);
      const warnings = await captureWarnings(() =>
        withEnv({ LATHE_CACHE_DIR: dir, LATHE_MATMUL_TUNING: undefined }, async () => {
          resetMatmulTuning(gpu);
          assert.equal(matmulChoice(gpu, SHAPE).source, "heuristic");
          assert.equal(matmulChoice(gpu, SHAPE).source, "heuristic"); // loaded once: one warning
          const a = randn(SHAPE.M * SHAPE.K, 1);
          const b = randn(SHAPE.N * SHAPE.K, 2);
          using A = Tensor.from(gpu, a, [SHAPE.M, SHAPE.K]);
          using B = Tensor.from(gpu, b, [SHAPE.N, SHAPE.K]);
          using C = matmul(A, B, { layout: "NT" });
          const want = matmul_forward(a, b, { layout: "NT", M: SHAPE.M, N: SHAPE.N, K: SHAPE.K });
          assertClose(await C.readF32(), want, { atol: 1e-4, rtol: 1e-5 });
        })
      );
      assert.equal(warnings.length, 1, warnings.join("\n"));
      assert.ok(warnings[0].includes(path), warnings[0]);
      assert.match(warnings[0], why);
      assert.match(warnings[0], /using the built-in tile heuristic/);
    }
  } finally {
    resetMatmulTuning(gpu);
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTest("matmul uses the tuned entry of a product's class, read from the adapter's file", async (gpu) => {
  const dir = await Deno.makeTempDir();
  const config = unusualConfig(gpu);
  try {
    const key = shapeClass(SHAPE);
    await writeTuningTable(tuningTablePath(adapterIdentity(gpu), dir), tableWith(gpu, { [key]: config }));
    await withEnv({ LATHE_CACHE_DIR: dir, LATHE_MATMUL_TUNING: undefined }, async () => {
      resetMatmulTuning(gpu);
      assert.deepEqual(matmulChoice(gpu, SHAPE), { config, source: "tuned", entry: key });
      assert.notEqual(configName(chooseConfig(gpu, SHAPE.M, SHAPE.N)), configName(config));
      const a = randn(SHAPE.M * SHAPE.K, 3);
      const b = randn(SHAPE.N * SHAPE.K, 4);
      using A = Tensor.from(gpu, a, [SHAPE.M, SHAPE.K]);
      using B = Tensor.from(gpu, b, [SHAPE.N, SHAPE.K]);
      using C = matmul(A, B, { layout: "NT" });
      assert.ok(gpu.lastKernel!.includes(tileParam(config)), gpu.lastKernel!);
      const want = matmul_forward(a, b, { layout: "NT", M: SHAPE.M, N: SHAPE.N, K: SHAPE.K });
      assertClose(await C.readF32(), want, { atol: 1e-4, rtol: 1e-5 });
      // LATHE_MATMUL_TUNING=off: the file is not consulted.
      await withEnv({ LATHE_MATMUL_TUNING: "off" }, () => {
        resetMatmulTuning(gpu);
        assert.equal(matmulChoice(gpu, SHAPE).source, "heuristic");
        assert.equal(activeTuningTable(gpu), null);
      });
    });
  } finally {
    resetMatmulTuning(gpu);
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTest(
  "a tuned entry covers classes one power of two away, of the same layout, dtypes and family",
  (gpu) => {
    const config = unusualConfig(gpu);
    const key = shapeClass(SHAPE); // NT/f32/m64/n32/k32
    try {
      setMatmulTuning(gpu, tableWith(gpu, { [key]: config }));
      assert.equal(matmulChoice(gpu, { ...SHAPE, M: 100 }).entry, key); // m128: one step away
      assert.equal(matmulChoice(gpu, { ...SHAPE, M: 100, K: 70 }).entry, key);
      assert.equal(matmulChoice(gpu, { ...SHAPE, M: 300 }).source, "heuristic"); // m256: two steps
      assert.equal(matmulChoice(gpu, { ...SHAPE, layout: "NN" }).source, "heuristic");
      assert.equal(matmulChoice(gpu, { ...SHAPE, a: "f16", b: "f16" }).source, "heuristic");
      // The nearer of two entries wins.
      const near: MatmulConfig = gpu.software
        ? { kind: "direct", tile: { TM: 8, TN: 16, WG: 8 } }
        : { kind: "tiled", tile: { BM: 64, BN: 32, BK: 16, TM: 8, TN: 4 } };
      setMatmulTuning(gpu, tableWith(gpu, { [key]: config, "NT/f32/m128/n32/k32": near }));
      assert.equal(configName(matmulChoice(gpu, { ...SHAPE, M: 120 }).config), configName(near));
      // An entry of the other kernel family is ignored (its sums could differ in the last bit).
      const other: MatmulConfig = gpu.software
        ? { kind: "tiled", tile: { BM: 32, BN: 32, BK: 8, TM: 4, TN: 4 } }
        : { kind: "direct", tile: { TM: 4, TN: 8, WG: 4 } };
      setMatmulTuning(gpu, tableWith(gpu, { [key]: other }));
      assert.equal(matmulChoice(gpu, SHAPE).source, "heuristic");
      // So is a tile beyond this adapter's limits.
      const huge: MatmulConfig = gpu.software
        ? { kind: "direct", tile: { TM: 4, TN: 8, WG: 4096 } }
        : { kind: "tiled", tile: { BM: 128, BN: 128, BK: 256, TM: 8, TN: 8 } };
      setMatmulTuning(gpu, tableWith(gpu, { [key]: huge }));
      assert.equal(matmulChoice(gpu, SHAPE).source, "heuristic");
    } finally {
      resetMatmulTuning(gpu);
    }
  },
);

gpuTest("tuneMatmul() times the candidates, writes a valid table and matmul then uses it", async (gpu) => {
  const dir = await Deno.makeTempDir();
  const candidates: MatmulConfig[] = gpu.software
    ? [{ kind: "direct", tile: { TM: 4, TN: 8, WG: 4 } }, { kind: "direct", tile: { TM: 8, TN: 8, WG: 8 } }]
    : [
      { kind: "tiled", tile: { BM: 32, BN: 32, BK: 16, TM: 4, TN: 4 } },
      { kind: "tiled", tile: { BM: 32, BN: 64, BK: 8, TM: 4, TN: 8 } },
    ];
  try {
    const shapes = [
      { layout: "NT" as const, dtype: "f32" as const, M: 16, N: 24, K: 20 },
      { layout: "TN" as const, dtype: "f32" as const, M: 9, N: 16, K: 12 },
    ];
    const timers = gpu.timestamps ? ["timestamp", "wall"] as const : ["wall"] as const;
    for (const [i, timer] of timers.entries()) {
      const result = await tuneMatmul(gpu, [shapes[i]], {
        candidates,
        warmup: 0,
        reps: 1,
        timer,
        minRunMs: 0,
        cacheDir: dir,
        progress: false,
      });
      assert.equal(result.path, tuningTablePath(adapterIdentity(gpu), dir));
      assert.equal(result.timer, timer);
      // Every candidate timed once (the heuristic's config too, when it is not one of them).
      const heuristic = configName(chooseConfig(gpu, shapes[i].M, shapes[i].N));
      const expected = new Set([...candidates.map(configName), heuristic]);
      assert.deepEqual(new Set(result.measurements.map((m) => configName(m.config))), expected);
      for (const m of result.measurements) {
        assert.ok(m.ms !== null && m.ms > 0 && m.gflops! > 0, JSON.stringify(m));
      }
      const key = shapeClass({ ...shapes[i], a: "f32", b: "f32" });
      const entry = result.entries[key];
      const fastest = result.measurements.reduce((x, y) => (y.ms! < x.ms! ? y : x));
      assert.equal(configName(entry.config), configName(fastest.config));
      assert.deepEqual(entry.shapes, [[shapes[i].M, shapes[i].N, shapes[i].K]]);
      // The file holds this run's class and the earlier run's (merged), and reads back valid.
      const read = readTuningTable(result.path!, adapterIdentity(gpu));
      assert.equal(read.warning, undefined);
      assert.deepEqual(
        Object.keys(read.table!.entries).sort(),
        shapes.slice(0, i + 1).map((s) => shapeClass({ ...s, a: "f32", b: "f32" })).sort(),
      );
      // This process now uses the table.
      const choice = matmulChoice(gpu, { ...shapes[i], a: "f32", b: "f32" });
      assert.equal(choice.source, "tuned");
      assert.equal(configName(choice.config), configName(entry.config));
    }
  } finally {
    resetMatmulTuning(gpu);
    await Deno.remove(dir, { recursive: true });
  }
});
