/**
 * Shared setup of the train-sft step tests: a temp directory with synthetic chats, a nano model
 * and a run whose upstream steps (prepare (fake), tokenize, and optionally quantize) are done.
 * @module
 */
import { join } from "node:path";
import type { TinyArch } from "../../../kernels/models/tiny.ts";
import { writeTinyModel } from "../../../kernels/models/tiny.ts";
import { step as quantizeStep } from "../../../steps/quantize.ts";
import { runStep } from "../../../steps/runner.ts";
import { step as tokenizeStep } from "../../../steps/tokenize.ts";
import type { RunOutcome } from "../../../steps/runner.ts";
import { step as trainSftStep } from "../../../steps/train_sft.ts";
import { trainSftHooks } from "../../../steps/train_sft.ts";
import { fakePrepare, syntheticChats, writeJsonl } from "../tokenize/_fixtures.ts";
import { DEMO_TOKENIZER, ROOT } from "./_fixtures.ts";

/** Where a test's runs and model live. */
export interface SftSetup {
  dir: string;
  runs: string;
  /** The nano model's directory. */
  model: string;
  /** The quantize step's config, when the runs have one (a QLoRA setup), else null. */
  quantize: Record<string, unknown> | null;
}

/** prepare (fake), tokenize and, for a QLoRA setup, quantize into run `runId`. */
export async function sftUpstream(s: SftSetup, runId: string): Promise<void> {
  const common = { runsRoot: s.runs, runId, recipe: null, seed: 1, projectRoot: ROOT, quiet: true };
  await runStep(fakePrepare, {
    ...common,
    config: { train: join(s.dir, "train.jsonl"), eval: join(s.dir, "eval.jsonl"), kind: "sft" },
  });
  await runStep(tokenizeStep, {
    ...common,
    config: { tokenizer: "data/demo/tokenizer", max_seq_len: 96, workers: 1 },
  });
  if (s.quantize) await runStep(quantizeStep, { ...common, config: { model: s.model, ...s.quantize } });
}

/**
 * Runs `fn` on a fresh setup with run "a" upstream done (a nano `arch` model, 12 train and 3 eval
 * chats); afterwards clears train-sft's fault hook and LATHE_RESUME and removes everything.
 */
export async function withSftSetup(
  options: { arch: TinyArch; quantize?: Record<string, unknown> },
  fn: (s: SftSetup) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-train-sft-" });
  try {
    const s = {
      dir,
      runs: join(dir, "runs"),
      model: join(dir, `tiny-${options.arch}`),
      quantize: options.quantize ?? null,
    };
    await writeJsonl(join(dir, "train.jsonl"), syntheticChats(12));
    await writeJsonl(join(dir, "eval.jsonl"), syntheticChats(3));
    await writeTinyModel(s.model, {
      arch: options.arch,
      size: "nano",
      seed: 2,
      tokenizerDir: DEMO_TOKENIZER,
    });
    await sftUpstream(s, "a");
    await fn(s);
  } finally {
    delete trainSftHooks.wrapModel;
    Deno.env.delete("LATHE_RESUME");
    await Deno.remove(dir, { recursive: true });
  }
}

/** Runs train-sft on `s`'s model with `config` into run `runId` (seed 11), on the default backend. */
export function trainSft(
  s: { runs: string; model: string },
  config: Record<string, unknown>,
  runId = "a",
  force = false,
): Promise<RunOutcome> {
  return runStep(trainSftStep, {
    runsRoot: s.runs,
    runId,
    recipe: null,
    config: { model: s.model, ...config },
    seed: 11,
    projectRoot: ROOT,
    quiet: true,
    force,
  });
}
