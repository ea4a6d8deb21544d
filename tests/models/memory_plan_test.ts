// The memory planner (kernels/models/memory_plan.ts) against the pool's measured peak
// (`memoryStats(gpu).peakBytes` after `resetPeakMemory`, less what was alive before the model
// loaded) of one micro-batch forward + backward and one AdamW step of a GpuModel, and the plan of
// Mistral-7B in QLoRA, which no test machine can run, checked part by part against its formulas.
// B = rows, S = tokens per row, T = B·S, D = hidden, F = ffn, V = vocab, L = layers, r = LoRA rank.
//
// Cases measured (lavapipe, a software adapter: no split-K): the nano checkpoints (D 64, L 2, V 512)
// of the three architectures; a micro Qwen2 (D 128, L 4); a random Mistral-shaped model with D 256,
// L 4, H 8, Hkv 2, F 688, V 2048 at T = 256 to 512, f16 and f32, checkpointing on and off, LoRA dropout
// on and off; and nano models on a device whose bindings are capped at 1 KiB, so every activation is
// split into row chunks and no pool bucket applies past the cap.
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  loadModelConfig,
  type ModelConfig,
  parseModelConfig,
  PROJECTIONS,
} from "../../formats/model_config.ts";
import { writeModelWeights } from "../../formats/safetensors.ts";
import { type Gpu, requestGpu } from "../../kernels/device.ts";
import { GpuModel } from "../../kernels/models/graph.ts";
import { loadGpuWeights } from "../../kernels/models/gpu_weights.ts";
import {
  fitAdvice,
  formatBytes,
  formatMemoryPlan,
  memoryLimits,
  type MemoryPlan,
  planTrainingMemory,
  quantizationFromConfig,
  type QuantizationSettings,
  quantizedWeightBytes,
  type TrainingMemorySettings,
} from "../../kernels/models/memory_plan.ts";
import { tinyConfigJson, tinyModelTensors, writeTinyModel } from "../../kernels/models/tiny.ts";
import { memoryStats, resetPeakMemory } from "../../kernels/tensor.ts";
import { gpuTest } from "../kernels/_harness.ts";
import { packedBatch, quantizedCheckpoint, tinyCheckpoint, trainedTokens } from "./_model_fixture.ts";

/** |plan − measured| ≤ this share of the measured peak. */
const TOLERANCE = 0.1;
const SEED = 7;
const GiB = 2 ** 30;
const MiB = 2 ** 20;
const ALL = [...PROJECTIONS];
const TOKENIZER = fileURLToPath(new URL("../../data/demo/tokenizer", import.meta.url));

/** Runs one training step of a GpuModel on `gpu`; returns the measured peak and the plan. */
async function measure(
  gpu: Gpu,
  config: ModelConfig,
  dir: string,
  s: TrainingMemorySettings,
): Promise<{ measured: number; resident: number; plan: MemoryPlan }> {
  const plan = planTrainingMemory(config, s, memoryLimits(gpu));
  const before = memoryStats(gpu).liveBytes;
  const weights = await loadGpuWeights(gpu, config, dir, { dtype: s.dtype });
  const lora = {
    r: s.lora.r,
    alpha: 16,
    dropout: s.lora.dropout ?? 0,
    targets: [...s.lora.targets],
    useRslora: false,
  };
  using model = new GpuModel(gpu, config, weights, lora, SEED, s.gradientCheckpointing, s.offloadLayerInputs);
  const resident = memoryStats(gpu).liveBytes - before;
  const batch = packedBatch(config.vocabSize, s.batchRows, s.seqLen, 5);
  resetPeakMemory(gpu);
  await model.forwardBackward(batch, trainedTokens(batch), 1234);
  await model.optimizerStep({
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weightDecay: 0,
    maxGradNorm: 1,
  });
  return { measured: memoryStats(gpu).peakBytes - before, resident, plan };
}

/** Asserts the plan's peak (and resident bytes) within TOLERANCE of the measured ones; prints both. */
function assertClose(what: string, r: { measured: number; resident: number; plan: MemoryPlan }): void {
  const { measured, resident, plan } = r;
  const error = (plan.total - measured) / measured;
  console.log(
    `${what}: plan ${plan.total} B (${formatBytes(plan.total)}), measured ${measured} B, ` +
      `${(100 * error).toFixed(2)} %; peak at the ${plan.peakAt}`,
  );
  assert.ok(
    Math.abs(error) <= TOLERANCE,
    `${what}: planned ${plan.total} bytes, measured ${measured} (${(100 * error).toFixed(1)} %)\n` +
      formatMemoryPlan(plan),
  );
  assert.ok(
    Math.abs(plan.resident - resident) <= TOLERANCE * resident,
    `${what}: resident ${plan.resident} vs ${resident}`,
  );
  assert.equal(
    plan.parts.reduce((n, p) => n + p.bytes, 0),
    plan.total,
    `${what}: the parts add up to the total`,
  );
}

function settings(
  batchRows: number,
  seqLen: number,
  dtype: "f16" | "f32",
  gradientCheckpointing: boolean,
  lora: TrainingMemorySettings["lora"],
): TrainingMemorySettings {
  return { batchRows, seqLen, dtype, gradientCheckpointing, lora };
}

gpuTest(
  "planTrainingMemory() is within 10 % of the measured peak: nano and micro checkpoints",
  async (gpu) => {
    const f16 = gpu.f16 ? "f16" : "f32";
    const cases = [
      ["llama", settings(2, 16, "f32", false, { r: 4, targets: ALL, dropout: 0 }), "f32, activations kept"],
      [
        "mistral",
        settings(2, 16, f16, true, { r: 4, targets: ALL, dropout: 0.1 }),
        `${f16}, checkpointing, dropout`,
      ],
      [
        "qwen2",
        settings(2, 24, "f32", true, { r: 8, targets: ["q_proj", "v_proj"], dropout: 0 }),
        "f32, q/v only",
      ],
    ] as const;
    for (const [arch, s, what] of cases) {
      const ckpt = await tinyCheckpoint(arch);
      try {
        assertClose(`nano ${arch} (${what})`, await measure(gpu, ckpt.config, ckpt.dir, s));
      } finally {
        await ckpt.cleanup();
      }
    }
    const dir = await Deno.makeTempDir({ prefix: "lathe-plan-micro-" });
    try {
      const { config } = await writeTinyModel(dir, { arch: "qwen2", size: "micro", tokenizerDir: TOKENIZER });
      const s = settings(1, 64, f16, false, { r: 8, targets: ALL, dropout: 0.05 });
      assertClose(`micro qwen2 (${f16}, activations kept, dropout)`, await measure(gpu, config, dir, s));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

/** A random Mistral-shaped checkpoint: D 256, L 4, H 8 (hd 32), Hkv 2, F 688, V 2048. */
async function d256Model(dir: string): Promise<ModelConfig> {
  const tokenizer = { vocabSize: 2048, bosTokenId: 1, eosTokenId: 2, padTokenId: null };
  const json = {
    ...tinyConfigJson("mistral", "micro", tokenizer),
    hidden_size: 256,
    intermediate_size: 688,
    num_attention_heads: 8,
    num_key_value_heads: 2,
    head_dim: 32,
    num_hidden_layers: 4,
    sliding_window: 96,
  };
  const config = parseModelConfig(json, "d256");
  await writeModelWeights(dir, tinyModelTensors(config, 1, "f32"));
  await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(json));
  return await loadModelConfig(dir);
}

gpuTest(
  "planTrainingMemory() is within 10 % of the measured peak: a D 256, 4-layer model at T = 256..512",
  async (gpu) => {
    const f16 = gpu.f16 ? "f16" : "f32";
    const dir = await Deno.makeTempDir({ prefix: "lathe-plan-d256-" });
    try {
      const config = await d256Model(dir);
      const cases = [
        [
          settings(1, 256, f16, true, { r: 16, targets: ["q_proj", "v_proj"], dropout: 0.05 }),
          `1·256 ${f16} checkpointing`,
        ],
        [settings(2, 128, "f32", false, { r: 8, targets: ALL, dropout: 0 }), "2·128 f32 kept"],
        [settings(1, 384, f16, false, { r: 8, targets: ALL, dropout: 0.05 }), `1·384 ${f16} kept, dropout`],
        [
          {
            ...settings(1, 256, f16, true, { r: 16, targets: ["q_proj", "v_proj"], dropout: 0.05 }),
            offloadLayerInputs: true,
          },
          `1·256 ${f16} checkpointing, layer inputs in host memory`,
        ],
      ] as const;
      for (const [s, what] of cases) assertClose(`D 256 (${what})`, await measure(gpu, config, dir, s));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

gpuTest(
  "planTrainingMemory() follows the row chunks and buckets of a device with 1 KiB bindings",
  async () => {
    const capped = await requestGpu({ maxBindingBytes: 1024, f16: false });
    try {
      for (const [arch, checkpointing, dropout] of [["llama", true, 0], ["mistral", false, 0.1]] as const) {
        const ckpt = await tinyCheckpoint(arch);
        try {
          const s = settings(2, 40, "f32", checkpointing, { r: 4, targets: ALL, dropout });
          const r = await measure(capped, ckpt.config, ckpt.dir, s);
          assertClose(`nano ${arch} split into 1 KiB chunks`, r);
        } finally {
          await ckpt.cleanup();
        }
      }
    } finally {
      capped.device.destroy();
    }
  },
);

// ---------------------------------------------------------------------------------------------
// Plans alone.

/** Mistral-7B v0.3's config.json values that size it. */
const MISTRAL_7B = parseModelConfig({
  architectures: ["MistralForCausalLM"],
  model_type: "mistral",
  hidden_size: 4096,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  intermediate_size: 14336,
  vocab_size: 32768,
  rope_theta: 1e6,
  max_position_embeddings: 32768,
  sliding_window: null,
  tie_word_embeddings: false,
}, "Mistral-7B");
const NF4: QuantizationSettings = {
  quantType: "nf4",
  doubleQuant: true,
  blocksize: 64,
  skipModules: ["lm_head"],
};
/** A discrete GPU: 2 GiB bindings, split-K on. */
const GPU_LIMITS = { maxBindingBytes: 2 ** 31 - 1, software: false };
const QLORA: TrainingMemorySettings = {
  batchRows: 1,
  seqLen: 2048,
  gradientCheckpointing: true,
  dtype: "f16",
  lora: { r: 16, targets: ["q_proj", "v_proj"], dropout: 0.05 },
  quantization: NF4,
};

function part(plan: MemoryPlan, name: string): number {
  const p = plan.parts.find((x) => x.name === name);
  assert.ok(p, `the plan has a "${name}" line`);
  return p.bytes;
}

Deno.test("planTrainingMemory() breaks Mistral-7B QLoRA (NF4, r 16 on q/v, 1·2048, checkpointing, f16) down by its formulas", () => {
  const plan = planTrainingMemory(MISTRAL_7B, QLORA, GPU_LIMITS);
  console.log(formatMemoryPlan(plan));
  const { hiddenSize: D, intermediateSize: F, vocabSize: V, numLayers: L } = MISTRAL_7B;
  const T = 2048;

  // 4-bit projections: codes n/2, absmax 1 byte per 64, f32 tables of 16 + 256 + ⌈nb/256⌉.
  let nf4 = 0;
  for (let l = 0; l < L; l++) {
    for (const shape of [[4096, D], [1024, D], [1024, D], [D, 4096], [F, D], [F, D], [D, F]] as const) {
      const n = shape[0] * shape[1];
      nf4 += n / 2 + Math.ceil(n / 64 / 4) * 4 + 4 * Math.ceil(n / 64 / 256) + 4 * 256 + 4 * 16;
    }
  }
  assert.equal(part(plan, "base projections"), nf4);
  assert.ok(nf4 > 3.2 * GiB && nf4 < 3.6 * GiB, `NF4 projections ${formatBytes(nf4)} ≈ 3.35 GiB`);
  assert.equal(part(plan, "embeddings and lm_head"), 2 * V * D * 2, "f16 embeddings and lm_head: 512 MiB");
  // Adapters: q [4096, D] and v [1024, D], r 16, f32: A[r,in] + B[out,r]; gradients alike, moments twice.
  const adapters = L * 4 * 16 * ((D + 4096) + (D + 1024));
  assert.equal(part(plan, "LoRA A, B"), adapters);
  assert.equal(part(plan, "LoRA gradients dA, dB"), adapters);
  assert.equal(part(plan, "AdamW m, v"), 2 * adapters);
  // The peak: the MLP backward of the last layer, h_0..h_{L-1} kept (4·T·D each).
  assert.match(plan.peakAt, /backward of layer 31: MLP/);
  assert.equal(part(plan, "layer inputs h"), L * 4 * T * D);
  // dh [T,D] and dm, g, u, dg, du [T,F] f32, with 1 GiB of layer inputs: the largest transients.
  // At the gate/up backward: dh and dx2 [T,D], dg (written over dm) and du [T,F], all f32; m was
  // never kept (down_proj has no adapter), g and u were freed once SwiGLU's backward read them.
  assert.equal(part(plan, "layer backward intermediates"), 2 * 4 * T * D + 2 * 4 * T * F);
  const deq = plan.workspaces.find((w) => w.name === "dequantized projection")!;
  assert.equal(deq.bytes, F * D * 2, "one dequantized gate/up/down [F,D] f16 at a time");
  assert.ok(plan.total > 5 * GiB && plan.total < 7 * GiB, `total ${formatBytes(plan.total)}`);
  assert.equal(plan.parts.reduce((n, p) => n + p.bytes, 0), plan.total);
  console.log(`Mistral-7B QLoRA step: ${plan.total} bytes = ${formatBytes(plan.total)}`);

  // The same step on the f16 base: projections n·2 (13 GiB), no dequantized copy.
  const f16 = planTrainingMemory(MISTRAL_7B, { ...QLORA, quantization: null }, GPU_LIMITS);
  assert.equal(part(f16, "base projections"), 2 * L * (2 * 4096 * D + 2 * 1024 * D + 3 * F * D));
  assert.equal(f16.workspaces.find((w) => w.name === "dequantized projection")!.bytes, 0);
  // The copy is alive only inside a projection's matmuls: the transients differ by at most one copy.
  const transients = (p: MemoryPlan) => p.total - p.resident;
  assert.ok(
    Math.abs(transients(f16) - transients(plan)) <= deq.bytes,
    `${formatBytes(transients(f16))} vs ${formatBytes(transients(plan))}`,
  );
});

Deno.test("planTrainingMemory() reads quantization_config and quantizes only the projections it does not skip", () => {
  const raw = {
    quant_method: "bitsandbytes",
    load_in_4bit: true,
    bnb_4bit_quant_type: "nf4",
    bnb_4bit_use_double_quant: false,
    llm_int8_skip_modules: ["lm_head", "down_proj"],
  };
  const config = { ...MISTRAL_7B, quantizationConfig: raw };
  assert.deepEqual(quantizationFromConfig(config), {
    quantType: "nf4",
    doubleQuant: false,
    blocksize: 64,
    skipModules: ["lm_head", "down_proj"],
  });
  assert.equal(quantizationFromConfig(MISTRAL_7B), null);
  const other = (q: Record<string, unknown>) => ({ ...MISTRAL_7B, quantizationConfig: q });
  assert.throws(
    () => quantizationFromConfig(other({ quant_method: "bitsandbytes", load_in_8bit: true })),
    /8-bit/,
  );
  assert.throws(
    () => quantizationFromConfig(other({ quant_method: "gptq", bits: 4 })),
    /"gptq" is not supported/,
  );
  assert.throws(
    () =>
      planTrainingMemory(other({ quant_method: "awq" }), { ...QLORA, quantization: undefined }, GPU_LIMITS),
    /"awq" is not supported/,
  );
  const plan = planTrainingMemory(config, { ...QLORA, quantization: undefined }, GPU_LIMITS);
  const { hiddenSize: D, intermediateSize: F, numLayers: L } = MISTRAL_7B;
  // Without double quantization the absmax is f32 (4 bytes per 64), and no nested absmax.
  let expected = 0;
  for (const shape of [[4096, D], [1024, D], [1024, D], [D, 4096], [F, D], [F, D]] as const) {
    const b = quantizedWeightBytes(shape, plan.settings.quantization!);
    assert.equal(b.absmax, 4 * Math.ceil((shape[0] * shape[1]) / 64));
    assert.equal(b.tables, 4 * (16 + 256), "quant map and an unused nested map, no nested absmax");
    expected += b.codes + b.absmax + b.tables;
  }
  expected = L * (expected + 2 * D * F); // down_proj skipped: f16
  assert.equal(part(plan, "base projections"), expected);
});

Deno.test("planTrainingMemory() grows with the batch, falls with checkpointing, splits K only on GPUs", () => {
  const base: TrainingMemorySettings = { ...QLORA, quantization: null };
  const at = (change: Partial<TrainingMemorySettings>, limits = GPU_LIMITS) =>
    planTrainingMemory(MISTRAL_7B, { ...base, ...change }, limits);
  const one = at({});
  assert.ok(at({ batchRows: 2 }).total > one.total);
  assert.ok(at({ seqLen: 4096 }).total > one.total);
  // Without checkpointing every layer keeps what one recomputed layer holds.
  const kept = at({ gradientCheckpointing: false });
  // (At the peak the last layer has freed its m, g and u, as the recomputed one has.)
  assert.ok(part(kept, "layer activations") > (MISTRAL_7B.numLayers - 1) * part(one, "layer activations"));
  assert.ok(part(kept, "layer activations") < MISTRAL_7B.numLayers * 2 * part(one, "layer activations"));
  assert.ok(at({ dtype: "f32" }).resident > 1.9 * one.resident);
  // A short micro-batch: x·Aᵀ and dA have long K and few output tiles, so a GPU splits K.
  const short = { seqLen: 16 };
  const splitK = (p: MemoryPlan) => p.workspaces.find((w) => w.name === "matmul split-K partials")!.bytes;
  assert.ok(splitK(at(short)) > 0);
  assert.equal(splitK(at(short, { ...GPU_LIMITS, software: true })), 0);
  // 128 MiB bindings split the embeddings and the logits: the same bytes, in chunks.
  const chunked = at({}, { maxBindingBytes: 128 * MiB, software: false });
  assert.equal(part(chunked, "embeddings and lm_head"), part(one, "embeddings and lm_head"));
  assert.throws(() => at({ seqLen: 0 }), /seqLen "0" must be a positive integer/);
  assert.throws(() => at({ lora: { r: 8, targets: [] } }), /LoRA targets are empty/);
});

Deno.test("fitAdvice() gives each change's planned peak, and nothing when the step fits", () => {
  const plan = planTrainingMemory(MISTRAL_7B, {
    batchRows: 4,
    seqLen: 4096,
    gradientCheckpointing: false,
    dtype: "f16",
    lora: { r: 16, targets: ["q_proj", "v_proj"] },
    quantization: null,
  }, GPU_LIMITS);
  const available = 24 * GiB;
  const advice = fitAdvice(plan, available);
  console.log(advice.join("\n"));
  assert.match(advice[0], /more than the 24\.00 GiB available/);
  const ckpt = planTrainingMemory(MISTRAL_7B, { ...plan.settings, gradientCheckpointing: true }, GPU_LIMITS);
  assert.ok(
    advice.includes(
      `gradient_checkpointing: true -> ${formatBytes(ckpt.total)} (still ${
        formatBytes(ckpt.total - available)
      } over)`,
    ),
  );
  assert.ok(advice.some((l) => /^a 4-bit base .* -> /.test(l)));
  assert.ok(advice.some((l) => /^per_device_train_batch_size: 1 -> /.test(l)));
  assert.ok(advice.some((l) => /^seq_len: \d+ -> .* \(fits\)$/.test(l)));
  assert.match(advice.at(-1)!, /\(fits\)$/);
  assert.deepEqual(fitAdvice(plan, plan.total), []);
});

gpuTest(
  "planTrainingMemory() is within 10 % of the measured peak of a 4-bit base (NF4 and FP4)",
  async (gpu) => {
    const f16 = gpu.f16 ? "f16" : "f32";
    const cases = [
      [
        "mistral",
        {},
        settings(2, 16, f16, true, { r: 4, targets: ALL, dropout: 0.1 }),
        `NF4 double quant, ${f16}`,
      ],
      [
        "qwen2",
        { quant_type: "fp4", double_quant: false, skip_modules: ["lm_head", "down_proj"] },
        settings(2, 16, "f32", false, { r: 4, targets: ["q_proj", "v_proj"], dropout: 0 }),
        "FP4, down_proj kept in 16 bit, f32",
      ],
    ] as const;
    for (const [arch, quantize, s, what] of cases) {
      await quantizedCheckpoint(arch, quantize, async (dir) => {
        const config = await loadModelConfig(dir);
        const r = await measure(gpu, config, dir, s);
        assert.ok(r.plan.settings.quantization !== null, "the plan reads quantization_config");
        assert.ok(r.plan.workspaces.find((w) => w.name === "dequantized projection")!.bytes > 0);
        assertClose(`nano ${arch} 4-bit (${what})`, r);
      });
    }
  },
);
