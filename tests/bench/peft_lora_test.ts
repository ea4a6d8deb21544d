// The PyTorch reference of the QLoRA benchmark (bench/peft_lora.py), where python3 has torch: its
// timing, FLOP model and report run on a tiny plain-PyTorch stand-in on the CPU (--self-test),
// its FLOPs match lathe's model (bench/train_flops.ts) for the same shape, and without
// transformers and peft it says it skipped, with exit code 3. The interpreter is $PYTHON, else the
// first of python3 and /usr/bin/python3 that has torch.
import assert from "node:assert/strict";
import { join } from "node:path";
import { syntheticBatch } from "../../bench/train.ts";
import { shapeConfigJson } from "../../bench/train_checkpoint.ts";
import { trainingFlops } from "../../bench/train_flops.ts";
import { parseModelConfig, PROJECTIONS } from "../../formats/model_config.ts";

const SCRIPT = new URL("../../bench/peft_lora.py", import.meta.url).pathname;

function python(args: string[], exe = PYTHON): { code: number; stdout: string; stderr: string } {
  const out = new Deno.Command(exe, { args, stdout: "piped", stderr: "piped" }).outputSync();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

/** Which of torch, transformers and peft `exe` imports, or null when it does not run. */
function modules(exe: string): Set<string> | null {
  try {
    const { stdout } = python([
      "-c",
      "import importlib.util as u; print(' '.join(m for m in ['torch', 'transformers', 'peft'] if u.find_spec(m)))",
    ], exe);
    return new Set(stdout.trim().split(" ").filter((m) => m !== ""));
  } catch {
    return null;
  }
}

const CANDIDATES = [Deno.env.get("PYTHON"), "python3", "/usr/bin/python3"].filter((p) => p !== undefined);
const PYTHON = CANDIDATES.find((p) => modules(p)?.has("torch")) ?? CANDIDATES[0];
const have = modules(PYTHON);
const SHAPE = ["--hidden", "64", "--intermediate", "160", "--heads", "4", "--kv-heads", "2", "--vocab", "96"];

Deno.test({
  name: "peft_lora.py --self-test times steps and reports tokens/s and lathe's FLOPs for the same shape",
  ignore: !have?.has("torch"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "lathe-peft-lora-test-" });
    try {
      const json = join(dir, "p.json");
      const args = [...SHAPE, "--layers", "3", "--rows", "2", "--seq", "24", "--rank", "4"];
      const run = python([SCRIPT, "--self-test", "--device", "cpu", ...args, "--steps", "2", "--json", json]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, /tokens\/s/);
      const r = JSON.parse(await Deno.readTextFile(json));
      assert.equal(r.benchmark, "peft_lora");
      assert.equal(r.tokensPerStep, 48);
      assert.equal(r.stepSeconds.all.length, 2);
      assert.ok(r.tokensPerSecond > 0 && Number.isFinite(r.tflops.total), JSON.stringify(r));
      assert.ok(Number.isFinite(r.loss.last));

      const config = parseModelConfig(
        shapeConfigJson("mistral-7b", {
          hidden_size: 64,
          intermediate_size: 160,
          num_attention_heads: 4,
          num_key_value_heads: 2,
          vocab_size: 96,
          num_hidden_layers: 3,
        }),
        "test",
      );
      const flops = trainingFlops(
        config,
        { r: 4, targets: [...PROJECTIONS] },
        syntheticBatch(96, 2, 24, 1, 0),
        true,
      );
      assert.equal(r.flopsPerStep.total, flops.total);
      assert.equal(r.flopsPerStep.model, flops.model);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "peft_lora.py without transformers and peft says it skipped, exit code 3",
  ignore: !have?.has("torch") || (have.has("transformers") && have.has("peft")),
  fn: () => {
    const run = python([SCRIPT, "--device", "cpu", ...SHAPE, "--layers", "1", "--seq", "8"]);
    assert.equal(run.code, 3, run.stderr);
    assert.match(run.stderr, /skipped: (transformers|peft) is not installed/);
  },
});
