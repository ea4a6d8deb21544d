/**
 * The command line of the `generate` and `chat` programs: what to load (a model directory or Hub
 * id, or a run id whose trained adapter is used; `--adapter` directories) and the sampling
 * options by transformers' names.
 *
 * ```
 * <model | run-id> [--adapter DIR ...] [--tokenizer DIR] [--dtype f16|f32]
 *   [--max-new-tokens N] [--do-sample] [--temperature T] [--top-k K] [--top-p P] [--min-p M]
 *   [--repetition-penalty R] [--seed N] [--system TEXT] [--runs DIR]
 * ```
 * @module
 */
import { join } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { exists } from "../../foundation/atomic.ts";
import { LatheError } from "../../foundation/errors.ts";
import { runsRoot } from "../../foundation/paths.ts";
import { checkSampling, DEFAULT_SAMPLING } from "../../kernels/models/sampling.ts";
import { type GenerateOptions, runModel, type SessionSetup } from "./session.ts";

/** The options both programs take. */
export const SESSION_OPTIONS = {
  adapter: { type: "string", multiple: true },
  tokenizer: { type: "string" },
  dtype: { type: "string" },
  "max-new-tokens": { type: "string" },
  "do-sample": { type: "boolean" },
  temperature: { type: "string" },
  "top-k": { type: "string" },
  "top-p": { type: "string" },
  "min-p": { type: "string" },
  "repetition-penalty": { type: "string" },
  seed: { type: "string" },
  system: { type: "string" },
  runs: { type: "string" },
  help: { type: "boolean" },
} as const satisfies ParseArgsConfig["options"];

/** What a command line asks for. */
export interface SessionArgs {
  setup: SessionSetup;
  options: GenerateOptions;
  system: string | null;
  /** The remaining values (the program's own options), and the positional arguments after the model. */
  values: Record<string, unknown>;
  positionals: string[];
}

/** Parses `args` with the session options and the program's `extra` ones. */
export async function parseSessionArgs(
  program: string,
  usage: string,
  args: string[],
  extra: ParseArgsConfig["options"] = {},
  projectRoot: string,
): Promise<SessionArgs> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: { ...SESSION_OPTIONS, ...extra },
      allowPositionals: true,
      strict: true,
    });
  } catch (error) {
    throw new LatheError(`Cannot run ${program}: ${(error as Error).message}`, { hint: usage });
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(usage);
    Deno.exit(0);
  }
  const ref = positionals[0];
  if (!ref) {
    throw new LatheError(`Cannot run ${program}: name a model directory, a Hub id or a run id`, {
      hint: usage,
    });
  }
  const number = (flag: string, integer = false): number | undefined => {
    const raw = values[flag as keyof typeof values];
    if (raw === undefined) return undefined;
    const n = Number(raw);
    if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) {
      throw new LatheError(
        `Cannot run ${program}: --${flag} "${raw}" is not ${integer ? "an integer" : "a number"}`,
        {
          hint: usage,
        },
      );
    }
    return n;
  };
  const options: GenerateOptions = {
    maxNewTokens: number("max-new-tokens", true),
    doSample: values["do-sample"] as boolean | undefined,
    temperature: number("temperature"),
    topK: number("top-k", true),
    topP: number("top-p"),
    minP: number("min-p"),
    repetitionPenalty: number("repetition-penalty"),
    seed: number("seed", true),
  };
  // A sampling option implies sampling, as in transformers' examples.
  if (
    options.doSample === undefined &&
    [options.temperature, options.topK, options.topP, options.minP].some((v) => v !== undefined)
  ) {
    options.doSample = true;
  }
  try {
    checkSampling({
      ...DEFAULT_SAMPLING,
      ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
    });
  } catch (error) {
    throw new LatheError(`Cannot run ${program}: ${(error as Error).message}`, { hint: usage });
  }
  const dtype = values.dtype as string | undefined;
  if (dtype !== undefined && dtype !== "f16" && dtype !== "f32") {
    throw new LatheError(`Cannot run ${program}: --dtype "${dtype}" is not f16 or f32`, { hint: usage });
  }
  // A run id: the adapter its last training step wrote, on the base it trained on.
  const runs = runsRoot(values.runs as string | undefined, projectRoot);
  let model = ref;
  let adapters = (values.adapter as string[] | undefined) ?? [];
  let baseName: string | undefined;
  if (!ref.includes("/") && (await exists(join(runs, ref)))) {
    const found = await runModel(join(runs, ref));
    model = found.model;
    adapters = [...found.adapters, ...adapters];
    baseName = found.baseName;
  }
  return {
    setup: {
      model,
      adapters,
      baseName,
      tokenizer: values.tokenizer as string | undefined,
      dtype: dtype as "f16" | "f32" | undefined,
      projectRoot,
    },
    options,
    system: (values.system as string | undefined) ?? null,
    values,
    positionals: positionals.slice(1),
  };
}
