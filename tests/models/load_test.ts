// kernels/models/load.ts on bitsandbytes 4-bit checkpoints: the golden directories of
// scripts/golden/nf4_checkpoints.py (NF4 and FP4, with and without double quantization, one
// keeping modules in 16 bit) load with every weight equal to the golden's f32 values bit for bit;
// unsupported quantizations and damaged files are refused with what is wrong.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { LatheError } from "../../foundation/errors.ts";
import { sha256Hex } from "../../foundation/hash.ts";
import { Progress } from "../../foundation/progress.ts";
import { quantizedWeightNames } from "../../formats/bnb4bit_checkpoint.ts";
import { expectedTensors } from "../../formats/model_config.ts";
import { ModelWeights, type TensorSource, writeSafetensors } from "../../formats/safetensors.ts";
import { loadHostModel } from "../../kernels/models/load.ts";

const CHECKPOINTS = fileURLToPath(new URL("../fixtures/golden/nf4/checkpoints", import.meta.url));
const golden = JSON.parse(await Deno.readTextFile(join(CHECKPOINTS, "golden.json"))).checkpoints as Record<
  string,
  { quantized: string[]; f32_sha256: Record<string, string> }
>;

const f32Sha = (a: Float32Array) => sha256Hex(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));

/** A quiet progress that counts its ticks. */
class Counting extends Progress {
  ticked = 0;
  finished = false;
  constructor(readonly total: number) {
    super("load", total, "B", true);
  }
  override tick(n = 1): void {
    this.ticked += n;
  }
  override done(): void {
    this.finished = true;
  }
}

Deno.test("loadHostModel() loads each golden 4-bit checkpoint with every weight the golden's f32 values, bit for bit", async () => {
  for (const [name, g] of Object.entries(golden)) {
    const dir = join(CHECKPOINTS, name);
    let progress: Counting | null = null;
    const host = await loadHostModel(dir, { progress: (total) => (progress = new Counting(total)) });
    assert.deepEqual([...host.weights.keys()].sort(), [...expectedTensors(host.config).keys()].sort());
    assert.deepEqual([...host.weights.keys()].sort(), Object.keys(g.f32_sha256).sort(), name);
    for (const [tensor, values] of host.weights) {
      assert.equal(f32Sha(values), g.f32_sha256[tensor], `${name}: ${tensor}`);
    }
    // Progress counts every byte read: the codes, their companions and the float tensors.
    using file = await ModelWeights.open(dir);
    const bytes = file.names().reduce((a, n) => a + file.info(n).byteLength, 0);
    const p = progress as Counting | null;
    assert.deepEqual([p?.total, p?.ticked, p?.finished], [bytes, bytes, true], name);
  }
});

Deno.test("loadHostModel() keeps the skipped modules of a skip-modules checkpoint as their stored floats", async () => {
  const dir = join(CHECKPOINTS, "fp4-dq-skip");
  const host = await loadHostModel(dir);
  using file = await ModelWeights.open(dir);
  const quantized = quantizedWeightNames(file.names());
  const kept = [...host.weights.keys()].filter((n) => n.endsWith("_proj.weight") && !quantized.has(n));
  assert.deepEqual(kept.sort(), [
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
  ]);
  for (const name of kept) {
    assert.equal(file.info(name).dtype, "BF16");
    assert.deepEqual(host.weights.get(name), await file.readFloat32(name), name);
  }
});

Deno.test("loadHostModel() refuses an 8-bit checkpoint and a damaged 4-bit one, saying what is wrong", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lathe-load-" });
  try {
    const src = join(CHECKPOINTS, "nf4-dq");
    const raw = JSON.parse(await Deno.readTextFile(join(src, "config.json")));
    await Deno.copyFile(join(src, "model.safetensors"), join(dir, "model.safetensors"));
    await Deno.writeTextFile(
      join(dir, "config.json"),
      JSON.stringify({ ...raw, quantization_config: { quant_method: "bitsandbytes", load_in_8bit: true } }),
    );
    await assert.rejects(
      loadHostModel(dir),
      (e: unknown) => e instanceof LatheError && /8-bit checkpoints .* are not supported/.test(e.message),
    );
    await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(raw));
    // A quant_state that is not JSON: the header check passes, reading the weight does not.
    const name = "model.layers.1.mlp.up_proj.weight";
    const tensors: TensorSource[] = [];
    {
      using file = await ModelWeights.open(src);
      for (const n of file.names()) {
        const info = file.info(n);
        tensors.push({ name: n, dtype: info.dtype, shape: [...info.shape], data: await file.readBytes(n) });
      }
    }
    const damaged = tensors.map((t) =>
      t.name === `${name}.quant_state.bitsandbytes__nf4`
        ? { ...t, data: (t.data as Uint8Array).slice().fill(0x7b) }
        : t
    ); // "{{{…"
    await writeSafetensors(join(dir, "model.safetensors"), damaged);
    await assert.rejects(
      loadHostModel(dir),
      (e: unknown) =>
        e instanceof LatheError && e.message.includes(`Cannot read 4-bit weight "${name}"`) &&
        /quant_state is not valid UTF-8 JSON/.test(e.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
