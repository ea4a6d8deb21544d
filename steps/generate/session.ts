/**
 * An inference session: a base model (a directory, a Hugging Face cache snapshot or a Hub repo
 * id; 16-bit or 4-bit) on the GPU with zero or more PEFT adapters applied unmerged (several are
 * stacked, kernels/models/stack_adapters.ts), its tokenizer and chat template, and the stop ids
 * and sampling defaults of its `generation_config.json`. The `generate` and `chat` programs and
 * the `eval` step run on it.
 *
 * Prompts are chat messages rendered by the model's chat template with
 * `add_generation_prompt=True` (the tokenize step's renderer), tokenized without adding special
 * tokens, as transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`.
 * The stop ids are the generation config's `eos_token_id`s, the tokenizer's EOS and the template's
 * end-of-turn tokens that are special tokens (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`).
 * @module
 */
import { isAbsolute, join, resolve } from "node:path";
import { readGenerationConfig } from "../../formats/generation_config.ts";
import { loadModelConfig, type ModelConfig } from "../../formats/model_config.ts";
import { type AdapterExtras, resolveTargetModules } from "../../formats/peft.ts";
import { ModelWeights } from "../../formats/safetensors.ts";
import { exists } from "../../foundation/atomic.ts";
import { LatheError } from "../../foundation/errors.ts";
import { MANIFEST_FILE, readManifest } from "../../foundation/manifest.ts";
import { resolveModel } from "../../hub/model.ts";
import { getGpu } from "../../kernels/device.ts";
import { generate, type Generation } from "../../kernels/models/generate.ts";
import { createGpuModel, type GpuModel } from "../../kernels/models/graph.ts";
import { DEFAULT_SAMPLING, type SamplingOptions } from "../../kernels/models/sampling.ts";
import { type Adapter, stackAdapters } from "../../kernels/models/stack_adapters.ts";
import { ChatRenderer, type Message } from "../tokenize/chat.ts";
import { type LoadedTokenizer, loadTokenizer } from "../tokenize/tokenizer.ts";
import { readAdapterWeights } from "../train/checkpoint.ts";
import { baseForAdapters } from "../train/resize.ts";

/** What a session loads. */
export interface SessionSetup {
  /** The base model: a directory (relative to `projectRoot`), a cache snapshot or a Hub repo id. */
  model: string;
  revision?: string;
  /** PEFT adapter directories, applied in order (stacked). */
  adapters?: readonly string[];
  /**
   * The name the adapters give their base when `model` is a copy of it (a quantize step's 4-bit
   * model: adapters name the original, as peft writes them).
   */
  baseName?: string;
  /** The tokenizer directory (default: the model's). */
  tokenizer?: string;
  projectRoot: string;
  /** "f16" or "f32" (default: f16 where the adapter has shader-f16). */
  dtype?: "f16" | "f32";
  /** Seed of the (unused, all-zero B) adapters of a session without any. */
  seed?: number;
}

/** Options of one generation call (transformers' names, camelCased). */
export interface GenerateOptions extends Partial<SamplingOptions> {
  maxNewTokens?: number;
  seed?: number;
  batchSize?: number;
}

/** One generated answer. */
export interface Answer {
  text: string;
  tokens: number;
  finishReason: "stop" | "length";
  seconds: number;
}

/** A loaded session; see the module documentation. */
export class Session implements Disposable {
  readonly model: GpuModel;
  readonly config: ModelConfig;
  readonly tokenizer: LoadedTokenizer;
  readonly renderer: ChatRenderer;
  readonly stop: ReadonlySet<number>;
  /** The model's sampling defaults (its generation_config.json over transformers'). */
  readonly defaults: SamplingOptions;
  readonly defaultMaxNewTokens: number;
  /** The model directory and the adapters, for reports. */
  readonly modelDir: string;
  readonly adapters: readonly string[];

  constructor(init: {
    model: GpuModel;
    tokenizer: LoadedTokenizer;
    stop: Set<number>;
    defaults: SamplingOptions;
    defaultMaxNewTokens: number;
    modelDir: string;
    adapters: string[];
  }) {
    this.model = init.model;
    this.config = init.model.config;
    this.tokenizer = init.tokenizer;
    this.renderer = new ChatRenderer(init.tokenizer);
    this.stop = init.stop;
    this.defaults = init.defaults;
    this.defaultMaxNewTokens = init.defaultMaxNewTokens;
    this.modelDir = init.modelDir;
    this.adapters = init.adapters;
  }

  /** The prompt ids of a conversation, ready for the assistant's turn. */
  encodeChat(messages: readonly Message[]): number[] {
    const text = this.renderer.render(messages, true);
    return this.tokenizer.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** Text of generated ids, special tokens (the stop id) left out. */
  decode(ids: readonly number[]): string {
    return this.tokenizer.tokenizer.decode([...ids], { skip_special_tokens: true });
  }

  /**
   * Answers every conversation; `onText(i, piece)` streams each answer's text as it grows.
   */
  async answer(
    conversations: readonly (readonly Message[])[],
    options: GenerateOptions = {},
    onText?: (index: number, piece: string) => void,
  ): Promise<Answer[]> {
    const prompts = conversations.map((m) => this.encodeChat(m));
    const context = this.config.maxPositionEmbeddings;
    prompts.forEach((p, i) => {
      if (p.length >= context) {
        throw new LatheError(
          `Cannot answer prompt ${i + 1}: it is ${p.length} tokens long, the model's context is ${context}`,
          { hint: "shorten the prompt (or the conversation so far)" },
        );
      }
    });
    const sampling: SamplingOptions = {
      doSample: options.doSample ?? this.defaults.doSample,
      temperature: options.temperature ?? this.defaults.temperature,
      topK: options.topK ?? this.defaults.topK,
      topP: options.topP ?? this.defaults.topP,
      minP: options.minP ?? this.defaults.minP,
      repetitionPenalty: options.repetitionPenalty ?? this.defaults.repetitionPenalty,
    };
    const made: number[][] = conversations.map(() => []);
    const shown = conversations.map(() => "");
    const stream = onText
      ? (i: number, t: number) => {
        made[i].push(t);
        const text = this.decode(made[i]);
        // A piece is shown once it decodes to whole characters.
        if (text.startsWith(shown[i]) && !text.endsWith("\ufffd")) {
          onText(i, text.slice(shown[i].length));
          shown[i] = text;
        }
      }
      : undefined;
    let generations: Generation[];
    try {
      generations = await generate(this.model, {
        prompts,
        maxNewTokens: options.maxNewTokens ?? this.defaultMaxNewTokens,
        sampling,
        stop: this.stop,
        seed: options.seed ?? 0,
        batchSize: options.batchSize,
      }, stream);
    } catch (error) {
      if (error instanceof RangeError) throw new LatheError(`Cannot generate: ${error.message}`);
      throw error;
    }
    return generations.map((g) => ({
      text: this.decode(g.tokens),
      tokens: g.tokens.length,
      finishReason: g.finishReason,
      seconds: g.seconds,
    }));
  }

  [Symbol.dispose](): void {
    this.model[Symbol.dispose]();
  }
}

/** The stop ids: generation_config's eos ids, the tokenizer's EOS, and special end-of-turn tokens. */
function stopIds(tokenizer: LoadedTokenizer, eos: readonly number[]): Set<number> {
  const out = new Set(eos);
  if (tokenizer.eosId !== null) out.add(tokenizer.eosId);
  for (const t of tokenizer.addedTokens) {
    if (t.special && ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>"].includes(t.content)) {
      out.add(t.id);
    }
  }
  return out;
}

/** Whether two model references name the same model (the same Hub id, or the same directory). */
function sameModel(a: string, b: string, projectRoot: string): boolean {
  return a === b || localOr(a, projectRoot) === localOr(b, projectRoot);
}

/** Where a model reference names a directory of the project, that directory; else the reference. */
function localOr(ref: string, projectRoot: string): string {
  return isAbsolute(ref) ? ref : resolve(projectRoot, ref);
}

/** Loads a session; see {@link SessionSetup}. */
export async function openSession(setup: SessionSetup): Promise<Session> {
  const local = localOr(setup.model, setup.projectRoot);
  const ref = (await exists(join(local, "config.json"))) ? local : setup.model;
  const { dir: resolved } = await resolveModel(ref, { revision: setup.revision ?? "main" });
  // An adapter that added tokens runs on the base grown the same way (mean rows, its tokenizer).
  const grown = await baseForAdapters(
    resolved,
    (setup.adapters ?? []).map((a) => localOr(a, setup.projectRoot)),
  );
  try {
    return await openOn(setup, grown.dir, resolved);
  } finally {
    await grown.cleanup();
  }
}

async function openOn(setup: SessionSetup, dir: string, resolved: string): Promise<Session> {
  const config = await loadModelConfig(dir);
  const adapters: Adapter[] = [];
  const extras: { extras: AdapterExtras; rows: readonly number[] }[] = [];
  const adapterDirs = (setup.adapters ?? []).map((a) => localOr(a, setup.projectRoot));
  for (const a of adapterDirs) {
    let loaded;
    try {
      loaded = await readAdapterWeights(a, config);
    } catch (error) {
      if (!(error instanceof LatheError)) throw error;
      throw new LatheError(`Cannot apply adapter "${a}" to "${setup.model}": ${error.message}`, {
        hint: "an adapter runs on the base it was trained on (its adapter_config.json names it)",
      });
    }
    const p = loaded.config;
    extras.push({ extras: loaded.extras, rows: p.trainableTokenIndices ?? [] });
    const named = p.baseModelNameOrPath;
    const expected = [setup.model, dir, resolved, ...(setup.baseName ? [setup.baseName] : [])];
    if (named && !expected.some((m) => sameModel(named, m, setup.projectRoot))) {
      // Shapes fit (checked above), so it runs; the name is worth a line (a quantized copy of the
      // named base, or a local copy of a Hub model, are the usual innocent cases).
      console.error(`[session] adapter "${a}" names "${named}" as its base; applying it to "${setup.model}"`);
    }
    adapters.push({
      spec: {
        r: p.r,
        alpha: p.loraAlpha,
        dropout: 0,
        targets: resolveTargetModules(p.targetModules),
        useRslora: p.useRslora,
      },
      weights: loaded.weights,
    });
  }
  const stacked = adapters.length > 0
    ? stackAdapters(config, adapters)
    : { spec: { r: 1, alpha: 1, dropout: 0, targets: ["q_proj" as const], useRslora: false }, weights: null };
  const gpu = await getGpu();
  const model = await createGpuModel(config, dir, stacked.spec, setup.seed ?? 0, {
    dtype: setup.dtype ?? (gpu.f16 ? "f16" : "f32"),
  });
  try {
    // Without an adapter the session's own is zero (B = 0): the base alone.
    if (stacked.weights) await model.setLora(stacked.weights);
    // What the adapters trained beside their pairs (modules_to_save, trainable token rows), in order.
    if (extras.some((e) => e.extras.embed_tokens || e.extras.lm_head || e.extras.tokens)) {
      await model.overwriteWeights(await weightsWithExtras(dir, config, extras));
    }
    const tokenizer = await loadTokenizer(
      setup.tokenizer ? localOr(setup.tokenizer, setup.projectRoot) : dir,
    );
    const gen = await readGenerationConfig(dir);
    const defaults: SamplingOptions = {
      doSample: gen?.doSample ?? DEFAULT_SAMPLING.doSample,
      temperature: gen?.temperature ?? DEFAULT_SAMPLING.temperature,
      topK: gen?.topK ?? DEFAULT_SAMPLING.topK,
      topP: gen?.topP ?? DEFAULT_SAMPLING.topP,
      minP: gen?.minP ?? DEFAULT_SAMPLING.minP,
      repetitionPenalty: gen?.repetitionPenalty ?? DEFAULT_SAMPLING.repetitionPenalty,
    };
    return new Session({
      model,
      tokenizer,
      stop: stopIds(tokenizer, gen?.eosTokenIds ?? []),
      defaults,
      defaultMaxNewTokens: gen?.maxNewTokens ?? 256,
      modelDir: resolved,
      adapters: adapterDirs,
    });
  } catch (error) {
    model[Symbol.dispose]();
    throw error;
  }
}

/**
 * The model and adapter a run trained: its last training step (train-dpo, else train-sft; the
 * latest instance) gives the adapter, and the base it trained on (the quantize step's 4-bit
 * model when it read one, else its `model`).
 */
export async function runModel(
  runDir: string,
): Promise<{ model: string; adapters: string[]; step: string; baseName: string }> {
  if (!(await exists(runDir))) {
    throw new LatheError(`Cannot find run "${runDir}"`, { hint: "`deno task runs ls` lists the runs" });
  }
  const steps: string[] = [];
  for await (const e of Deno.readDir(runDir)) {
    if (e.isDirectory && (await exists(join(runDir, e.name, MANIFEST_FILE)))) steps.push(e.name);
  }
  const pick = ["train-dpo", "train-sft"].map((s) =>
    steps.filter((n) => n === s || n.startsWith(`${s}@`)).sort()
  )
    .find((found) => found.length > 0)?.at(-1);
  if (!pick) {
    throw new LatheError(
      `Cannot find a trained adapter in run "${runDir}": it has no train-dpo or train-sft step`,
      {
        hint: "name a model directory, or a run that trained one",
      },
    );
  }
  const manifest = await readManifest(join(runDir, pick, MANIFEST_FILE));
  const base = manifest.inputs.base;
  const model = base
    ? join(runDir, base.step, "model")
    : String((manifest.config as { model?: unknown }).model);
  const baseName = String((manifest.config as { model?: unknown }).model);
  return { model, adapters: [join(runDir, pick, "adapter")], step: pick, baseName };
}

/**
 * The embedding table and lm_head of the base in `dir` with each adapter's modules_to_save and
 * trainable token rows applied in order (only the tensors they touch).
 */
async function weightsWithExtras(
  dir: string,
  config: ModelConfig,
  extras: { extras: AdapterExtras; rows: readonly number[] }[],
): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  using file = await ModelWeights.open(dir);
  const D = config.hiddenSize;
  const load = async (name: string) => {
    if (!out.has(name)) out.set(name, await file.readFloat32(name));
    return out.get(name)!;
  };
  for (const { extras: e, rows } of extras) {
    if (e.embed_tokens) (await load("model.embed_tokens.weight")).set(e.embed_tokens);
    if (e.tokens) {
      const E = await load("model.embed_tokens.weight");
      rows.forEach((r, i) => E.set(e.tokens!.subarray(i * D, i * D + D), r * D));
    }
    if (e.lm_head) (await load("lm_head.weight")).set(e.lm_head);
  }
  return out;
}
