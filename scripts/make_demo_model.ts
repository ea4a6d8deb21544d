/**
 * Writes `data/demo/model/`, the demo's base: a random-init tiny Llama ({@link DEMO_INIT}, the
 * demo tokenizer) pretrained by `recipes/demo-base.yaml` (full fine-tuning on
 * `data/demo/corpus.jsonl`, the demo task's language and JSON records, but never a sentence's JSON
 * answer), so that it knows the words and JSON, not the task. Beside the weights, `pretraining.json` records how it was made: the
 * recipe's and the corpus's sha256, the init, the run's metrics and each file's sha256.
 *
 * Training is deterministic (same seed, same adapter: same bytes), so regenerating gives the
 * committed bytes again on the same kind of adapter (GPUs may round `exp` differently).
 *
 * ```
 * deno run -A scripts/make_demo_model.ts           # regenerate data/demo/model (about 25 min on 2 cores)
 * deno run -A scripts/make_demo_model.ts --check   # regenerate into a temp dir; exit 1 unless the bytes equal
 * deno run -A scripts/make_demo_model.ts --out DIR --set train-sft.max_steps=5   # a shorter run elsewhere
 * ```
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { writeFileAtomic } from "../foundation/atomic.ts";
import { LatheError, runMain } from "../foundation/errors.ts";
import { canonicalJson, sha256File, sha256Hex } from "../foundation/hash.ts";
import { parse as parseYaml } from "yaml";
import { type TinySize, writeTinyModel } from "../kernels/models/tiny.ts";
import { recipeCommand } from "../steps/pipeline.ts";
import { loadStep } from "../steps/registry.ts";

/** The random init the pretraining starts from (kernels/models/tiny.ts). */
export const DEMO_INIT = { arch: "llama", size: "micro" as TinySize, seed: 0, dtype: "f32" } as const;

/** What `pretraining.json` holds. */
export interface PretrainingRecord {
  recipe: string;
  /** sha256 of the recipe's canonical JSON: its comments may change, its settings not. */
  recipe_sha256: string;
  corpus: string;
  corpus_sha256: string;
  init: typeof DEMO_INIT;
  /** `--set` overrides the run had beyond the init's path (none for the committed model). */
  overrides: string[];
  metrics: Record<string, unknown>;
  /** sha256 of each file of the model directory. */
  files: Record<string, string>;
}

/** Options of {@link pretrainDemoBase}. */
export interface DemoBaseOptions {
  projectRoot: string;
  /** The model directory to write (replaced whole). */
  out: string;
  /** Where the random init is written (the recipe's `train-sft.model`). */
  initDir: string;
  /** The runs root the recipe runs in. */
  runsRoot: string;
  /** `key=value` overrides of the recipe, as `--set` takes them. */
  overrides?: string[];
  quiet?: boolean;
  print?: (line: string) => void;
}

/** sha256 of `recipes/demo-base.yaml`'s canonical JSON (comments and layout aside). */
export async function recipeHash(root: string): Promise<string> {
  return sha256Hex(canonicalJson(parseYaml(await Deno.readTextFile(join(root, "recipes/demo-base.yaml")))));
}

/**
 * Writes the random init, runs `recipes/demo-base.yaml` on it and installs its `train-sft/model/`
 * into `out` with `pretraining.json` (written beside, then renamed over `out`).
 */
export async function pretrainDemoBase(o: DemoBaseOptions): Promise<PretrainingRecord> {
  const root = o.projectRoot;
  await writeTinyModel(o.initDir, { ...DEMO_INIT, tokenizerDir: join(root, "data/demo/tokenizer") });
  const overrides = o.overrides ?? [];
  const args = ["demo-base", "--runs", o.runsRoot, "--set", `train-sft.model=${o.initDir}`];
  for (const s of overrides) args.push("--set", s);
  if (o.quiet) args.push("--quiet");
  const result = await recipeCommand(args, { projectRoot: root, loadStep, print: o.print });
  if (!result) throw new LatheError("Cannot make the demo model: the demo-base recipe did not run");
  const train = result.steps.find((s) => s.step === "train-sft")?.outcome.manifest;
  if (!train) throw new LatheError(`Cannot make the demo model: ${result.runDir} has no train-sft result`);
  const from = join(result.runDir, "train-sft", "model");
  const staging = `${o.out}.tmp-${Deno.pid}`;
  await Deno.remove(staging, { recursive: true }).catch(() => {});
  await Deno.mkdir(staging, { recursive: true });
  const files: Record<string, string> = {};
  const names = [...Deno.readDirSync(from)].filter((e) => e.isFile).map((e) => e.name).sort();
  for (const name of names) {
    await Deno.copyFile(join(from, name), join(staging, name));
    files[name] = (await sha256File(join(staging, name))).sha256;
  }
  const m = train.metrics as Record<string, unknown>;
  const record: PretrainingRecord = {
    recipe: "recipes/demo-base.yaml",
    recipe_sha256: await recipeHash(root),
    corpus: "data/demo/corpus.jsonl",
    corpus_sha256: (await sha256File(join(root, "data/demo/corpus.jsonl"))).sha256,
    init: DEMO_INIT,
    overrides,
    metrics: Object.fromEntries(
      ["steps", "epochs", "trained_tokens", "train_loss", "eval_loss_before", "eval_loss", "backend"]
        .map((k) => [k, m[k] ?? null]),
    ),
    files,
  };
  await writeFileAtomic(join(staging, "pretraining.json"), JSON.stringify(record, null, 2) + "\n");
  // The old model moves aside first, so a kill between the renames leaves it whole at `.old-<pid>`.
  const old = `${o.out}.old-${Deno.pid}`;
  const had = await Deno.rename(o.out, old).then(() => true, () => false);
  await Deno.rename(staging, o.out);
  if (had) await Deno.remove(old, { recursive: true });
  return record;
}

/**
 * What differs between the committed record and a fresh one, one line each: the recipe, the corpus,
 * and each file of the model by name (missing on either side, or other bytes). Empty: the same.
 */
export function recordDifferences(want: PretrainingRecord, got: PretrainingRecord): string[] {
  const out: string[] = [];
  if (want.recipe_sha256 !== got.recipe_sha256) {
    out.push(`${want.recipe} has other settings than when it ran`);
  }
  if (want.corpus_sha256 !== got.corpus_sha256) out.push(`${want.corpus} has other bytes than when it ran`);
  const names = [...new Set([...Object.keys(want.files), ...Object.keys(got.files)])].sort();
  for (const name of names) {
    if (!(name in got.files)) out.push(`model/${name} is not in the fresh model`);
    else if (!(name in want.files)) out.push(`model/${name} is new in the fresh model`);
    else if (want.files[name] !== got.files[name]) out.push(`model/${name} has other bytes`);
  }
  return out;
}

if (import.meta.main) {
  await runMain(async () => {
    const { values } = parseArgs({
      args: Deno.args,
      options: {
        out: { type: "string" },
        check: { type: "boolean", default: false },
        set: { type: "string", multiple: true, default: [] },
      },
    });
    const root = join(import.meta.dirname!, "..");
    const committed = join(root, "data/demo/model");
    if (values.check && values.set.length > 0) {
      throw new LatheError(
        "Cannot check data/demo/model with --set: it was made by the recipe as written; drop the --set flags",
      );
    }
    const tmp = await Deno.makeTempDir({ prefix: "lathe-demo-base-" });
    try {
      const out = values.check ? join(tmp, "model") : values.out ?? committed;
      const record = await pretrainDemoBase({
        projectRoot: root,
        out,
        initDir: values.check ? join(tmp, "init") : join(root, "data/demo/init"),
        runsRoot: join(tmp, "runs"),
        overrides: values.set,
      });
      console.log(
        `wrote ${out}: eval loss ${record.metrics.eval_loss_before} -> ${record.metrics.eval_loss}`,
      );
      if (values.check) {
        const want = JSON.parse(
          await Deno.readTextFile(join(committed, "pretraining.json")),
        ) as PretrainingRecord;
        const differ = recordDifferences(want, record);
        if (differ.length > 0) {
          throw new LatheError(
            `data/demo/model is not what a fresh pretraining makes:\n  ${differ.join("\n  ")}\n` +
              "Regenerate it: deno run -A scripts/make_demo_model.ts",
          );
        }
        console.log("data/demo/model equals a fresh pretraining, byte for byte");
      }
    } finally {
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  });
}
