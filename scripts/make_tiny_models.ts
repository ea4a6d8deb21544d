/**
 * Writes tiny random-init Hugging Face checkpoints (see kernels/models/tiny.ts) for tests
 * and the demo, one directory per (arch, size): `<out>/<arch>-<size>/`, plus with
 * `--sharded` a `<out>/llama-nano-sharded/` whose weights are split into shards with
 * `model.safetensors.index.json`.
 *
 * ```
 * deno run -A scripts/make_tiny_models.ts [--out data/models] [--arch llama,mistral,qwen2]
 *   [--size nano,micro] [--dtype f32|bf16] [--seed 0] [--tokenizer data/demo/tokenizer] [--sharded]
 * ```
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { LatheError, runMain } from "../foundation/errors.ts";
import {
  TINY_ARCHS,
  TINY_SIZES,
  type TinyArch,
  type TinyDtype,
  type TinySize,
  writeTinyModel,
} from "../kernels/models/tiny.ts";

/** Shard limit of the sharded variant: small enough to split nano (0.2 MB in bf16) into two or more shards. */
export const SHARDED_MAX_BYTES = 200_000;

function listOption<T extends string>(value: string, allowed: readonly T[], flag: string): T[] {
  const items = value.split(",").map((s) => s.trim()).filter((s) => s !== "");
  for (const item of items) {
    if (!(allowed as readonly string[]).includes(item)) {
      throw new LatheError(
        `Cannot make tiny models: --${flag} "${item}" is not one of ${allowed.join(", ")}`,
      );
    }
  }
  return items as T[];
}

if (import.meta.main) {
  await runMain(async () => {
    const { values } = parseArgs({
      args: Deno.args,
      options: {
        out: { type: "string", default: "data/models" },
        arch: { type: "string", default: TINY_ARCHS.join(",") },
        size: { type: "string", default: Object.keys(TINY_SIZES).join(",") },
        dtype: { type: "string", default: "f32" },
        seed: { type: "string", default: "0" },
        tokenizer: { type: "string", default: "data/demo/tokenizer" },
        sharded: { type: "boolean", default: false },
      },
    });
    const archs = listOption<TinyArch>(values.arch, TINY_ARCHS, "arch");
    const sizes = listOption<TinySize>(values.size, Object.keys(TINY_SIZES) as TinySize[], "size");
    const [dtype] = listOption<TinyDtype>(values.dtype, ["f32", "bf16"], "dtype");
    const seed = Number(values.seed);
    if (!Number.isSafeInteger(seed) || seed < 0) {
      throw new LatheError(`Cannot make tiny models: --seed "${values.seed}" is not a non-negative integer`);
    }
    const jobs: { name: string; arch: TinyArch; size: TinySize; maxShardBytes?: number }[] = [];
    for (const arch of archs) for (const size of sizes) jobs.push({ name: `${arch}-${size}`, arch, size });
    if (values.sharded) {
      jobs.push({
        name: "llama-nano-sharded",
        arch: "llama",
        size: "nano",
        maxShardBytes: SHARDED_MAX_BYTES,
      });
    }
    for (const job of jobs) {
      const dir = join(values.out, job.name);
      const { files } = await writeTinyModel(dir, { ...job, seed, dtype, tokenizerDir: values.tokenizer });
      console.log(`wrote ${dir} (${dtype}, seed ${seed}): ${files.join(", ")}`);
    }
  });
}
