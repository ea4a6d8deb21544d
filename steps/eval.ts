/**
 * The `eval` step: the base model and every adapter trained upstream (train-sft, train-dpo),
 * side by side, on the eval split:
 * - loss and perplexity of the eval split's token shards (`data`, a tokenize of SFT rows),
 *   token-weighted exactly as train-sft's `eval_loss` (the same loop, the same batches);
 * - greedy (or sampled) answers to the eval prompts (the prepare step behind `data`: each row's
 *   conversation up to its last assistant turn, that turn the reference), in `generations.jsonl`;
 * - exact match (and normalised), ROUGE-L F1, corpus BLEU (sacreBLEU's defaults) and, for JSON
 *   references, valid JSON and field accuracy (steps/eval/metrics.ts);
 * - with preference data (`preference`, a tokenize of pairs): the share of eval pairs whose chosen
 *   answer is more likely under each model, and for train-dpo's adapter its implicit reward
 *   accuracy against the reference it was trained with (trl's `eval_rewards/accuracies`).
 * Outputs: `report.md`, a self-contained `report.html`, `generations.jsonl`, `metrics.json`; the
 * manifest's metrics are `<model>/<metric>` (the tracker indexes them).
 *
 * Models: "base" is the model train-sft and train-dpo trained on (the quantize step's 4-bit model
 * when one is upstream); each adapter is named by the step that wrote it. train-dpo's adapter
 * continues train-sft's, so each model is the base with one adapter.
 * @module
 */
import { dirname, join } from "node:path";
import * as z from "zod";
import { writeFileAtomic, writeJsonAtomic } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import { MANIFEST_FILE, readManifest } from "../foundation/manifest.ts";
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type Upstream } from "./define.ts";
import { openSession, type Session } from "./generate/session.ts";
import type { SamplingOptions } from "../kernels/models/sampling.ts";
import { corpusBleu, exactMatch, jsonMetrics, rougeL } from "./eval/metrics.ts";
import { DEFAULT_JUDGE_PROMPT, judge } from "./eval/judge.ts";
import { type McItem, mcItem, scoreMultipleChoice } from "./eval/multiple_choice.ts";
import { Source } from "./prepare/config.ts";
import { readRows } from "./prepare/readers.ts";
import { resolveSources } from "./prepare/sources.ts";
import { type ModelResult, reportHtml, reportMarkdown, sampleRow } from "./eval/report.ts";
import type { Message } from "./tokenize/chat.ts";
import { loadSplit, type Split } from "./train/batches.ts";
import { pairCount, scoreSplit } from "./train/dpo.ts";
import { evaluateSplit } from "./train/loop.ts";
import { baseDir, trainingSources } from "./train/setup.ts";

/** The step's config. */
export const EvalConfig = z.strictObject({
  /** The base model (as train-sft's `model`): a directory, an HF cache snapshot or a Hub repo id. */
  model: z.string().min(1),
  revision: z.string().min(1).default("main"),
  /** Eval prompts to answer (the first N of the eval split; default 32); 0: no generations. */
  max_samples: z.number().int().min(0).default(32),
  /** New tokens per answer at most (default 128). */
  max_new_tokens: z.number().int().positive().default(128),
  /** Prompts per generation batch, and rows (pairs) per loss batch (default 8). */
  batch_size: z.number().int().positive().default(8),
  /** Sampling (default greedy), by transformers' names. */
  do_sample: z.boolean().default(false),
  temperature: z.number().min(0).default(1),
  top_k: z.number().int().min(0).default(50),
  top_p: z.number().gt(0).max(1).default(1),
  min_p: z.number().min(0).lt(1).default(0),
  repetition_penalty: z.number().positive().default(1),
  /** Sample generations shown side by side in the reports (default 5). */
  report_samples: z.number().int().min(0).default(5),
  /**
   * Multiple-choice benchmarks scored as lm-evaluation-harness scores them (acc, acc_norm):
   * JSONL files of {"question", "choices", "answer"} (steps/eval/multiple_choice.ts).
   */
  benchmarks: z.array(z.strictObject({
    /** Its name in the report and the metrics ("<model>/<name>/acc"). */
    name: z.string().regex(/^[A-Za-z0-9_.-]+$/, "letters, digits, '_', '.' and '-'"),
    /** Where its rows are, as a prepare source: a file, directory or glob, or `{ hub, split, ... }`. */
    source: Source,
    /** Questions scored at most (default: all). */
    max_samples: z.number().int().positive().nullable().default(null),
  })).default([]),
  /**
   * An LLM judge through an OpenAI-compatible chat-completions endpoint, scoring each generation
   * from 1 to 10 (steps/eval/judge.ts); null: none (default). The key comes from the environment
   * variable `key_env` and is never written anywhere.
   */
  judge: z.strictObject({
    url: z.string().url(),
    model: z.string().min(1),
    prompt: z.string().min(1).default(DEFAULT_JUDGE_PROMPT),
    key_env: z.string().regex(/^[A-Z_][A-Z0-9_]*$/).nullable().default("OPENAI_API_KEY"),
  }).nullable().default(null),
});
/** The parsed config. */
export type EvalConfig = z.output<typeof EvalConfig>;

/** One eval prompt and its reference, from the prepared rows. */
interface Prompt {
  messages: Message[];
  reference: string;
  source: string;
}

/** The prepared eval rows behind a tokenize step: its prepare input's eval.jsonl. */
async function evalPrompts(data: Upstream, max: number): Promise<Prompt[]> {
  const prepare = data.manifest.inputs.data;
  if (!prepare || max === 0) return [];
  const dir = join(data.dir, "..", prepare.step);
  const manifest = await readManifest(join(dir, MANIFEST_FILE));
  const evalOut = manifest.outputs.eval;
  if (!evalOut) return [];
  const out: Prompt[] = [];
  const lines = (await Deno.readTextFile(join(dir, evalOut.path))).split("\n");
  for (const [i, line] of lines.entries()) {
    if (out.length >= max) break;
    if (line.trim() === "") continue;
    const row = JSON.parse(line) as { messages?: Message[]; source?: string };
    const messages = row.messages ?? [];
    const last = messages.findLastIndex((m) => m.role === "assistant");
    if (last <= 0) continue;
    out.push({
      messages: messages.slice(0, last),
      reference: messages[last].content,
      source: row.source ?? `${prepare.step}/eval.jsonl:${i + 1}`,
    });
  }
  return out;
}

/** The eval split of a tokenize step, or null when it has none. */
async function evalSplit(data: Upstream): Promise<Split | null> {
  return "eval" in data.manifest.outputs ? await loadSplit(data.path("eval")) : null;
}

interface Candidate {
  label: string;
  /** A model directory of its own (a full fine-tune's), else the base. */
  model?: string;
  adapters: string[];
  description: string;
  /** For train-dpo's adapter: the adapters of its reference (train-sft's, or none: the base). */
  reference?: string[];
  /** The model its reference runs on ("" the base), when not its own (a full train-dpo's). */
  referenceModel?: string;
  beta?: number;
}

async function run(ctx: StepContext, config: EvalConfig, inputs: Record<string, Upstream>) {
  const dir = baseDir("eval", ctx, config, inputs);
  const data = inputs.data;
  const split = await evalSplit(data);
  if (split && split.index.kind === "preference") {
    throw new LatheError(`Cannot eval on step "${data.manifest.step}": its rows are preference pairs`, {
      hint: "give eval the tokenize step of the SFT data as `data` (inputs: { data: tokenize }) and the " +
        "preference data as `preference`",
    });
  }
  const prefInput = inputs.preference;
  const prefSplit = prefInput && prefInput.manifest.step !== data.manifest.step
    ? await evalSplit(prefInput)
    : null;
  const preference = prefSplit && prefSplit.index.kind === "preference" ? prefSplit : null;
  const prompts = await evalPrompts(data, config.max_samples);
  if (
    (split === null || split.rows.length === 0) && prompts.length === 0 && config.benchmarks.length === 0 &&
    !preference
  ) {
    throw new LatheError(
      `Cannot eval: step "${data.manifest.step}" has no eval split, so there is nothing to evaluate on`,
      {
        hint:
          "give its prepare step an eval split (prepare.eval_fraction or eval_max), or add benchmarks to eval",
      },
    );
  }
  const benchmarks: { name: string; items: McItem[] }[] = [];
  for (const b of config.benchmarks) {
    benchmarks.push({ name: b.name, items: await benchmarkItems(b, ctx.projectRoot) });
  }

  const candidates: Candidate[] = [{ label: "base", adapters: [], description: `${config.model}` }];
  const sft = inputs.sft;
  const dpo = inputs.dpo;
  if (sft && "model" in sft.manifest.outputs) {
    // A full fine-tune: its own model directory.
    candidates.push({
      label: sft.manifest.step,
      model: dirname(sft.path("model")),
      adapters: [],
      description: `the model ${sft.manifest.step} fine-tuned in full`,
    });
  } else if (sft) {
    candidates.push({
      label: sft.manifest.step,
      adapters: [join(sft.dir, "adapter")],
      description: `base + the LoRA adapter of ${sft.manifest.step}`,
    });
  }
  if (dpo && "model" in dpo.manifest.outputs) {
    // A full train-dpo: its own model; the reference is the model it started from, with no adapter.
    const from = sft && "model" in sft.manifest.outputs ? dirname(sft.path("model")) : "";
    candidates.push({
      label: dpo.manifest.step,
      model: dirname(dpo.path("model")),
      adapters: [],
      description: `the model ${dpo.manifest.step} fine-tuned in full`,
      reference: [],
      referenceModel: from,
      beta: (dpo.manifest.config as { beta?: number }).beta,
    });
  } else if (dpo) {
    const dpoConfig = dpo.manifest.config as { beta?: number };
    const ref = dpo.manifest.inputs.sft;
    // After a full train-sft, train-dpo's adapter runs on that model, which is also its reference.
    const sftModel = ref && sft && "model" in sft.manifest.outputs ? dirname(sft.path("model")) : undefined;
    candidates.push({
      label: dpo.manifest.step,
      model: sftModel,
      adapters: [join(dpo.dir, "adapter")],
      description: sftModel
        ? `the model of ${sft!.manifest.step} + the LoRA adapter of ${dpo.manifest.step}`
        : `base + the LoRA adapter of ${dpo.manifest.step}`,
      reference: ref && !sftModel ? [join(dpo.dir, "..", ref.step, "adapter")] : [],
      beta: dpoConfig.beta,
    });
  }
  const sampling = {
    doSample: config.do_sample,
    temperature: config.temperature,
    topK: config.top_k,
    topP: config.top_p,
    minP: config.min_p,
    repetitionPenalty: config.repetition_penalty,
  };
  const results: ModelResult[] = [];
  const outputs = new Map<string, Output[]>();
  // Preference log-probs by adapters (for the reward accuracy of train-dpo's reference).
  const prefLogps = new Map<string, Float64Array>();
  const evalBs = sftBatch(sft) ?? config.batch_size;
  const { getGpu } = await import("../kernels/device.ts");
  ctx.setGpu((await getGpu()).info);
  const total = candidates.length * (1 + prompts.length);
  const progress = ctx.progress(total, "items");
  for (const c of candidates) {
    using session = await openSession({
      model: c.model ?? dir,
      adapters: c.adapters,
      projectRoot: ctx.projectRoot,
      seed: ctx.seed,
    });
    const metrics: Record<string, number | null> = {};
    if (split && split.rows.length > 0) {
      const r = await evaluateSplit(session.model, split, evalBs);
      metrics.eval_loss = r?.eval_loss ?? null;
      metrics.perplexity = r ? Math.exp(r.eval_loss) : null;
      metrics.eval_mean_token_accuracy = r?.eval_mean_token_accuracy ?? null;
    }
    progress.tick(1, c.label);
    if (prompts.length > 0) {
      const answers = await answerAll(session, prompts, config, sampling, () => progress.tick(1, c.label));
      outputs.set(c.label, answers);
      const texts = answers.map((a) => a.text);
      const refs = prompts.map((p) => p.reference);
      const em = exactMatch(texts, refs);
      metrics.exact_match = em.exact;
      metrics.exact_match_normalized = em.normalized;
      metrics.rouge_l = texts.reduce((s, t, i) => s + rougeL(t, refs[i]), 0) / texts.length;
      metrics.bleu = corpusBleu(texts, [refs]).score;
      const json = jsonMetrics(texts, refs);
      if (json) {
        metrics.json_valid = json.valid;
        metrics.json_field_accuracy = json.fields;
      }
    }
    for (const b of benchmarks) {
      const encode = (text: string) =>
        session.tokenizer.tokenizer.encode(text, { add_special_tokens: false }).ids;
      const score = await scoreMultipleChoice(session.model, encode, b.items, config.batch_size);
      metrics[`${b.name}/acc`] = score.acc;
      metrics[`${b.name}/acc_norm`] = score.acc_norm;
    }
    if (config.judge && prompts.length > 0) {
      const settings = {
        url: config.judge.url,
        model: config.judge.model,
        prompt: config.judge.prompt,
        keyEnv: config.judge.key_env,
      };
      let sum = 0;
      let scored = 0;
      const scores: (number | null)[] = [];
      for (const [i, p] of prompts.entries()) {
        const output = outputs.get(c.label)![i];
        const score = await judge(settings, {
          prompt: p.messages.at(-1)?.content ?? "",
          reference: p.reference,
          output: output.text,
        });
        scores.push(score);
        output.judge = score;
        if (score !== null) {
          sum += score;
          scored++;
        }
      }
      metrics.judge_score = scored > 0 ? sum / scored : null;
      metrics.judge_unscored = scores.length - scored;
    }
    if (preference) {
      const logps = await scoreSplit(session.model, preference, evalBs);
      prefLogps.set(`${c.model ?? ""}|${c.adapters.join("|")}`, logps);
      let more = 0;
      for (let i = 0; i < pairCount(preference); i++) if (logps[2 * i] > logps[2 * i + 1]) more++;
      metrics.preference_accuracy = more / pairCount(preference);
    }
    results.push({ label: c.label, description: c.description, metrics });
  }
  // train-dpo's implicit rewards against the reference it was trained with.
  for (const c of candidates) {
    if (!preference || c.reference === undefined) continue;
    // The reference runs on the candidate's own model (the base, or a full train-sft's model), or on
    // the model a full train-dpo started from.
    const pol = prefLogps.get(`${c.model ?? ""}|${c.adapters.join("|")}`)!;
    const ref = prefLogps.get(`${c.referenceModel ?? c.model ?? ""}|${c.reference.join("|")}`);
    if (!ref) continue;
    let right = 0;
    for (let i = 0; i < pairCount(preference); i++) {
      if (pol[2 * i] - ref[2 * i] > pol[2 * i + 1] - ref[2 * i + 1]) right++;
    }
    results.find((r) => r.label === c.label)!.metrics.reward_accuracy = right / pairCount(preference);
  }
  progress.done();

  const rows = prompts.map((p, i) => ({
    source: p.source,
    prompt: p.messages.at(-1)?.content ?? "",
    reference: p.reference,
    outputs: Object.fromEntries(candidates.map((c) => [c.label, outputs.get(c.label)![i]])),
  }));
  await writeFileAtomic(
    await ctx.out("generations.jsonl"),
    rows.map((r) => JSON.stringify(r)).join("\n") + (rows.length ? "\n" : ""),
  );
  const samples = rows.slice(0, config.report_samples).map(sampleRow);
  const title = `eval of ${config.model}`;
  await writeFileAtomic(await ctx.out("report.md"), reportMarkdown(title, results, samples));
  await writeFileAtomic(await ctx.out("report.html"), reportHtml(title, results, samples));
  await writeJsonAtomic(await ctx.out("metrics.json"), { models: results });
  const flat: Record<string, number | null> = {};
  for (const r of results) for (const [k, v] of Object.entries(r.metrics)) flat[`${r.label}/${k}`] = v;
  return {
    outputs: {
      report: "report.md",
      report_html: "report.html",
      generations: "generations.jsonl",
      metrics_json: "metrics.json",
    },
    metrics: { ...flat, samples: prompts.length, preference_pairs: preference ? pairCount(preference) : 0 },
  };
}

/** A benchmark's questions (its first `max_samples`), read as prepare reads its sources. */
async function benchmarkItems(
  b: { name: string; source: z.output<typeof Source>; max_samples: number | null },
  projectRoot: string,
): Promise<McItem[]> {
  const [resolved] = await resolveSources({ sources: [b.source] }, projectRoot);
  const items: McItem[] = [];
  for (const file of resolved.files) {
    for await (const row of readRows(file.path, file.format, { label: file.label })) {
      if (b.max_samples !== null && items.length >= b.max_samples) return items;
      if (row.error) throw new LatheError(`Cannot read benchmark ${row.where}: ${row.error.message}`);
      items.push(mcItem(row.value, row.where));
    }
  }
  if (items.length === 0) {
    throw new LatheError(`Cannot run benchmark "${b.name}": its source holds no question`);
  }
  return items;
}

/** train-sft's eval batch size: the same batches give its eval_loss to the bit. */
function sftBatch(sft: Upstream | undefined): number | null {
  if (!sft) return null;
  const c = sft.manifest.config as {
    per_device_eval_batch_size?: number | null;
    per_device_train_batch_size?: number;
  };
  return c.per_device_eval_batch_size ?? c.per_device_train_batch_size ?? null;
}

/** One model's answer to one eval prompt, as generations.jsonl holds it. */
interface Output {
  text: string;
  tokens: number;
  seconds: number;
  finish: string;
  /** The judge's score, when a judge is configured (null: its reply held none). */
  judge?: number | null;
}

async function answerAll(
  session: Session,
  prompts: Prompt[],
  config: EvalConfig,
  sampling: Partial<SamplingOptions>,
  tick: () => void,
) {
  const out: Output[] = [];
  for (let i = 0; i < prompts.length; i += config.batch_size) {
    const group = prompts.slice(i, i + config.batch_size);
    const answers = await session.answer(group.map((p) => p.messages), {
      ...sampling,
      maxNewTokens: config.max_new_tokens,
      batchSize: config.batch_size,
      seed: i,
    });
    for (const a of answers) {
      out.push({ text: a.text, tokens: a.tokens, seconds: a.seconds, finish: a.finishReason });
      tick();
    }
  }
  return out;
}

/** The eval step. */
export const step = defineStep({
  name: "eval",
  version: "1",
  description:
    "Evaluates the base and each trained adapter side by side: loss, generations, text metrics, preferences",
  config: EvalConfig,
  inputs: { data: "tokenize" },
  optionalInputs: { base: "quantize", sft: "train-sft", dpo: "train-dpo", preference: "tokenize" },
  sources: async (config, projectRoot, inputs) => {
    const out = await trainingSources(config, projectRoot, inputs);
    for (const b of config.benchmarks) {
      const [resolved] = await resolveSources({ sources: [b.source] }, projectRoot);
      resolved.files.forEach((f, i) => (out[`benchmark/${b.name}/${i}`] = f.path));
    }
    return out;
  },
  run,
});

if (import.meta.main) await runFromCli(step);
