/**
 * The `export` step: what a training run produced, in the forms people deploy.
 *
 * `targets:` any of
 * - `peft`: the adapter (train-dpo's, else train-sft's) in `peft/` with a model card;
 * - `merged`: the merge step's model in `merged/` (hard links, no copy) with a model card;
 * - `gguf`: `gguf/<name>-<TYPE>.gguf` for each of `gguf.types` from the merged model
 *   (formats/gguf_model.ts: llama.cpp's names, metadata, Q/K permutation, tokenizer, quant mixes),
 *   with a model card; without a merge step upstream and without an adapter, the model itself;
 * - `gguf-lora`: `gguf/<name>-lora.gguf`, the adapter as a llama.cpp LoRA (formats/gguf_lora.ts);
 * - `ollama`: `gguf/Modelfile` beside the first GGUF (or the base GGUF + `ADAPTER` when only the
 *   LoRA is exported), and the commands to use it;
 * - `hub`: uploads what `hub.upload` names (default: every directory this step wrote) to
 *   `hub.repo` with `HF_TOKEN`, creating it (`hub.private`) when missing; the commit message names
 *   the lathe run and git commit. The token is never written anywhere.
 * Every file is written under a temp name and renamed, so a failed export leaves no manifest and
 * no file claiming to be complete.
 * @module
 */
import { basename, dirname, join, relative } from "node:path";
import * as z from "zod";
import { exists } from "../foundation/atomic.ts";
import { LatheError } from "../foundation/errors.ts";
import { type Manifest, MANIFEST_FILE, readManifest } from "../foundation/manifest.ts";
import { writeFileAtomic } from "../foundation/atomic.ts";
import { gguf as g } from "../formats/gguf.ts";
import { writeLoraGguf } from "../formats/gguf_lora.ts";
import { GGUF_FILE_TYPES, writeModelGguf } from "../formats/gguf_model.ts";
import type { GgufFileType } from "../formats/gguf_quants.ts";
import { loadModelConfig, type ModelConfig } from "../formats/model_config.ts";
import { ropeFreqFactors } from "../kernels/rope_frequencies.ts";
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE } from "../formats/peft.ts";
import { readGenerationConfig } from "../formats/generation_config.ts";
import { hubSettings } from "../hub/settings.ts";
import { uploadToHub } from "../hub/upload.ts";
import { runFromCli } from "./cli.ts";
import { defineStep, type StepContext, type Upstream } from "./define.ts";
import { licenseOf, modelCard, type TrainingRecord } from "./export/model_card.ts";
import { modelfile } from "./export/ollama.ts";
import { MERGED_DIR } from "./merge.ts";
import { modelDir, modelSources } from "./model_source.ts";
import { loadTokenizer } from "./tokenize/tokenizer.ts";

/** What export can write. */
export const EXPORT_TARGETS = ["peft", "merged", "gguf", "gguf-lora", "ollama", "hub"] as const;
/** Directories a hub upload can take. */
const UPLOADS = ["peft", "merged", "gguf"] as const;

/** The step's config. */
export const ExportConfig = z.strictObject({
  /** What to write (see the module doc). */
  targets: z.array(z.enum(EXPORT_TARGETS)).min(1),
  /** The base model (for cards and the LoRA GGUF's architecture); null: the training step's `model`. */
  model: z.string().min(1).nullable().default(null),
  revision: z.string().min(1).default("main"),
  /** Stem of the GGUF file names and `general.name`; null: `<base name>-lathe`. */
  name: z.string().regex(/^[A-Za-z0-9._-]+$/, "letters, digits, '.', '_' and '-' only").nullable().default(
    null,
  ),
  gguf: z.strictObject({
    /** GGUF file types, one file each. */
    types: z.array(z.enum(GGUF_FILE_TYPES as [GgufFileType, ...GgufFileType[]])).min(1).default(["Q4_K_M"]),
    /** Storage type of the LoRA GGUF's A and B. */
    lora_type: z.enum(["F32", "F16"]).default("F32"),
  }).default({ types: ["Q4_K_M"], lora_type: "F32" }),
  hub: z.strictObject({
    /** "owner/name". */
    repo: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]*\/[A-Za-z0-9][A-Za-z0-9._-]*$/, "owner/name"),
    /** Visibility when the repo is created (default private). */
    private: z.boolean().default(true),
    /** What to upload (default: every directory this step wrote). */
    upload: z.array(z.enum(UPLOADS)).min(1).nullable().default(null),
    revision: z.string().min(1).default("main"),
  }).nullable().default(null),
});
/** The parsed config. */
export type ExportConfig = z.output<typeof ExportConfig>;

/** The manifest of an upstream step's own input `name`, or null. */
async function upstreamOf(u: Upstream, name: string): Promise<{ manifest: Manifest; dir: string } | null> {
  const entry = u.manifest.inputs[name];
  if (!entry) return null;
  const dir = join(u.dir, "..", entry.step);
  return { manifest: await readManifest(join(dir, MANIFEST_FILE)), dir };
}

/** Dataset names the training read: prepare's sources (Hub ids or file names). */
async function datasetsOf(training: Upstream[]): Promise<string[]> {
  const out = new Set<string>();
  for (const t of training) {
    const tok = await upstreamOf(t, "data");
    if (!tok) continue;
    const prepEntry = tok.manifest.inputs.data;
    if (!prepEntry) continue;
    const prep = await readManifest(join(tok.dir, "..", prepEntry.step, MANIFEST_FILE));
    const sources = (prep.config.sources ?? []) as unknown[];
    for (const s of sources) {
      const name = typeof s === "string" ? s : (s as { path?: string; hub?: string })?.hub ??
        (s as { path?: string })?.path;
      if (typeof name === "string") {
        out.add(/^[\w.-]+\/[\w.-]+$/.test(name) && !name.includes(".") ? name : basename(name));
      }
    }
  }
  return [...out];
}

/** Llama 3 RoPE scaling's `rope_freqs` factors of `config`, or null. */
function ropeFactors(config: ModelConfig): Float32Array | null {
  if (config.ropeScaling?.type !== "llama3") return null;
  return ropeFreqFactors({
    headDim: config.headDim,
    theta: config.ropeTheta,
    scaling: config.ropeScaling,
    maxPositionEmbeddings: config.maxPositionEmbeddings,
  });
}

/** Hard-links (else copies) `from` to `to`. */
async function linkOrCopy(from: string, to: string): Promise<void> {
  try {
    await Deno.link(from, to);
  } catch {
    await Deno.copyFile(from, to);
  }
}

async function run(ctx: StepContext, config: ExportConfig, inputs: Record<string, Upstream>) {
  const targets = new Set(config.targets);
  const training = [inputs.sft, inputs.dpo].filter((u): u is Upstream => u !== undefined);
  const last = inputs.dpo ?? inputs.sft ?? null;
  // A full fine-tune wrote a model directory, not an adapter.
  const fullModel = last && "model" in last.manifest.outputs ? dirname(last.path("model")) : null;
  const adapterStep = fullModel ? null : last;
  const merge = inputs.merge ?? null;
  const baseRef = config.model ?? (last?.manifest.config.model as string | undefined) ??
    (merge?.manifest.config.model as string | undefined);
  if (!baseRef) {
    throw new LatheError("Cannot export: no base model", {
      hint: "set export.model, or put export after a training step",
    });
  }
  const baseDir = await modelDir(baseRef, config.revision, ctx.projectRoot);
  const need = (what: string, ok: unknown, hint: string) => {
    if (!ok) throw new LatheError(`Cannot export ${what}`, { hint });
  };
  need(
    "peft: there is no adapter upstream",
    !targets.has("peft") || adapterStep,
    "put export after train-sft or train-dpo",
  );
  need(
    "gguf-lora: there is no adapter upstream",
    !targets.has("gguf-lora") || adapterStep,
    "put export after train-sft or train-dpo",
  );
  need(
    "merged: there is no merge step upstream",
    !targets.has("merged") || merge || fullModel,
    "add a merge step before export",
  );
  need(
    "gguf: the model has an adapter but there is no merge step to fold it in",
    !targets.has("gguf") || merge || !adapterStep,
    "add a merge step before export (or export gguf-lora for the adapter alone)",
  );
  need(
    "ollama: it needs a GGUF",
    !targets.has("ollama") || targets.has("gguf") || targets.has("gguf-lora"),
    "add gguf (or gguf-lora) to export.targets",
  );
  need(
    "hub: export.hub.repo is not set",
    !targets.has("hub") || config.hub,
    "set export.hub: { repo: owner/name }",
  );
  const modelConfig = await loadModelConfig(baseDir);
  const name = config.name ?? `${basename(baseRef).replace(/[^A-Za-z0-9._-]/g, "-")}-lathe`;
  const gitCommit = (adapterStep ?? merge)?.manifest.git.commit ?? null;
  let readme: string | null = null;
  try {
    readme = await Deno.readTextFile(join(baseDir, "README.md"));
  } catch { /* the base has no card */ }
  const records: TrainingRecord[] = training.map((t) => ({
    step: t.manifest.step,
    config: t.manifest.config,
    metrics: t.manifest.metrics,
  }));
  const facts = {
    baseModel: baseRef,
    repo: config.hub?.repo ?? null,
    datasets: await datasetsOf(training),
    license: licenseOf(readme),
    training: records,
    runId: ctx.runId,
    gitCommit,
    full: fullModel !== null,
  };
  const outputs: Record<string, string> = {};
  const metrics: Record<string, number | string | boolean | null> = {};
  const extra: [string, ReturnType<typeof g.str>][] = [
    ["general.base_model.count", g.u32(1)],
    ["general.base_model.0.name", g.str(baseRef)],
    ["general.source.url", g.str(`lathe run ${ctx.runId}`)],
  ];

  if (targets.has("peft")) {
    const src = dirname(adapterStep!.path("adapter"));
    for (const f of [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]) {
      await linkOrCopy(join(src, f), await ctx.out(`peft/${f}`));
      outputs[`peft/${f}`] = `peft/${f}`;
    }
    await writeFileAtomic(await ctx.out("peft/README.md"), modelCard({ ...facts, kind: "peft" }));
    outputs["peft/README.md"] = "peft/README.md";
  }
  let mergedDir: string | null = fullModel;
  if (merge) mergedDir = dirname(merge.path(`${MERGED_DIR}/config.json`));
  if (targets.has("merged")) {
    // The merge step's model, or a full fine-tune's (both under `model/` in their step directory).
    const from = merge ?? last!;
    for (const [key, entry] of Object.entries(from.manifest.outputs)) {
      if (!key.startsWith(`${MERGED_DIR}/`)) continue;
      const rel = `merged/${key.slice(MERGED_DIR.length + 1)}`;
      await linkOrCopy(join(from.dir, entry.path), await ctx.out(rel));
      outputs[rel] = rel;
    }
    await writeFileAtomic(await ctx.out("merged/README.md"), modelCard({ ...facts, kind: "merged" }));
    outputs["merged/README.md"] = "merged/README.md";
  }
  const ggufFiles: { file: string; type: string }[] = [];
  const warnings: string[] = [];
  if (targets.has("gguf")) {
    const source = mergedDir ?? baseDir;
    const tok = await loadTokenizer(source);
    const progress = ctx.progress(config.gguf.types.length, "files");
    for (const type of config.gguf.types) {
      const file = `${name}-${type}.gguf`;
      let tensorProgress: ReturnType<StepContext["progress"]> | null = null;
      const result = await writeModelGguf(source, await ctx.out(`gguf/${file}`), {
        fileType: type,
        name,
        addBos: tok.textPrefix.length > 0 && tok.textPrefix[0] === tok.bosId,
        addEos: tok.textSuffix.length > 0 && tok.textSuffix.at(-1) === tok.eosId,
        chatTemplate: tok.chatTemplate,
        ropeFactors: ropeFactors(await loadModelConfig(source)),
        extra,
        onTensor: (_done, total, t) => {
          tensorProgress ??= ctx.progress(total, "tensors");
          tensorProgress.tick(1, `${file}: ${t}`);
        },
      });
      (tensorProgress as ReturnType<StepContext["progress"]> | null)?.done(
        `${file}: ${(result.bytes / 2 ** 20).toFixed(1)} MiB`,
      );
      for (const w of result.warnings) if (!warnings.includes(w)) warnings.push(w);
      ggufFiles.push({ file, type });
      outputs[`gguf/${file}`] = `gguf/${file}`;
      metrics[`gguf_${type}_bytes`] = result.bytes;
      progress.tick(1, file);
    }
    progress.done(`${ggufFiles.length} GGUF files`);
  }
  let loraFile: string | null = null;
  if (targets.has("gguf-lora")) {
    loraFile = `${name}-lora-${config.gguf.lora_type}.gguf`;
    const result = await writeLoraGguf(
      dirname(adapterStep!.path("adapter")),
      modelConfig,
      await ctx.out(`gguf/${loraFile}`),
      {
        name: `${name}-lora`,
        type: config.gguf.lora_type,
        extra,
      },
    );
    outputs[`gguf/${loraFile}`] = `gguf/${loraFile}`;
    metrics.gguf_lora_bytes = result.bytes;
  }
  const commands: string[] = [];
  const abs = join(ctx.runDir, "export", "gguf");
  const dir = relative(ctx.projectRoot, abs).startsWith("..") ? abs : relative(ctx.projectRoot, abs);
  if (targets.has("ollama")) {
    const gen = await readGenerationConfig(mergedDir ?? baseDir);
    const tok = await loadTokenizer(mergedDir ?? baseDir);
    let from = ggufFiles[0]?.file;
    let adapter: string | null = null;
    if (!from) {
      // Only the LoRA: Ollama applies it on the base, converted here at F16.
      from = `${name}-base-F16.gguf`;
      const result = await writeModelGguf(baseDir, await ctx.out(`gguf/${from}`), {
        fileType: "F16",
        name: `${name}-base`,
        addBos: tok.textPrefix[0] === tok.bosId && tok.textPrefix.length > 0,
        addEos: tok.textSuffix.length > 0 && tok.textSuffix.at(-1) === tok.eosId,
        chatTemplate: tok.chatTemplate,
        ropeFactors: ropeFactors(modelConfig),
        extra,
      });
      outputs[`gguf/${from}`] = `gguf/${from}`;
      metrics.gguf_base_bytes = result.bytes;
      adapter = `./${loraFile}`;
    }
    const text = modelfile({
      from: `./${from}`,
      adapter,
      chatTemplate: tok.chatTemplate,
      temperature: gen?.doSample ? gen.temperature ?? undefined : undefined,
      topP: gen?.doSample ? gen.topP ?? undefined : undefined,
      where: mergedDir ?? baseDir,
    });
    await writeFileAtomic(await ctx.out("gguf/Modelfile"), text);
    outputs["gguf/Modelfile"] = "gguf/Modelfile";
    commands.push(
      `ollama create ${name.toLowerCase()} -f ${dir}/Modelfile`,
      `ollama run ${name.toLowerCase()}`,
    );
  }
  if (ggufFiles.length) {
    await writeFileAtomic(await ctx.out("gguf/README.md"), modelCard({ ...facts, kind: "gguf", ggufFiles }));
    outputs["gguf/README.md"] = "gguf/README.md";
    const first = `${dir}/${ggufFiles[0].file}`;
    commands.unshift(`llama-cli -m ${first} -cnv`, `llama-server -m ${first} --port 8080`);
  }
  if (loraFile && ggufFiles.length === 0 && !targets.has("ollama")) {
    commands.push(`llama-cli -m <base>.gguf --lora ${dir}/${loraFile} -cnv`);
  }
  if (targets.has("hub")) {
    const hub = config.hub!;
    const wanted = hub.upload ??
      UPLOADS.filter((u) => Object.keys(outputs).some((o) => o.startsWith(`${u}/`)));
    const files: { path: string; local: string }[] = [];
    for (const what of wanted) {
      const produced = Object.keys(outputs).filter((o) => o.startsWith(`${what}/`));
      if (produced.length === 0) {
        throw new LatheError(`Cannot upload "${what}": export did not write it`, {
          hint: `add ${what} to export.targets, or remove it from export.hub.upload`,
        });
      }
      // One kind: its files at the repo root; several: each in its own folder.
      for (const o of produced) {
        files.push({ path: wanted.length === 1 ? o.slice(what.length + 1) : o, local: join(ctx.stepDir, o) });
      }
    }
    const progress = ctx.progress(files.length, "files");
    let sent = 0;
    const result = await uploadToHub(hubSettings(), {
      repo: hub.repo,
      private: hub.private,
      revision: hub.revision,
      files,
      commitMessage: `lathe run ${ctx.runId}` + (gitCommit ? ` (git ${gitCommit.slice(0, 12)})` : ""),
      commitDescription: `Uploaded by lathe's export step: ${wanted.join(", ")}.`,
    }, {
      progress: (done, _total, file) => {
        progress.tick(done - sent, file);
        sent = done;
      },
    });
    progress.done(`${result.repo}@${result.commit.slice(0, 12)}`);
    metrics.hub_repo = result.repo;
    metrics.hub_commit = result.commit;
    metrics.hub_url = result.url;
    metrics.hub_created = result.created;
    await writeFileAtomic(
      await ctx.out("hub.json"),
      JSON.stringify(
        {
          repo: result.repo,
          commit: result.commit,
          url: result.url,
          files: files.map((f) => f.path),
        },
        null,
        2,
      ) +
        "\n",
    );
    outputs.hub = "hub.json";
  }
  for (const w of warnings) console.warn(`export: warning: ${w}`);
  if (commands.length) {
    await writeFileAtomic(await ctx.out("commands.txt"), commands.join("\n") + "\n");
    outputs.commands = "commands.txt";
    console.log(`export: run it with\n${commands.map((c) => `  ${c}`).join("\n")}`);
  }
  metrics.targets = config.targets.join(",");
  metrics.warnings = warnings.length ? warnings.join("; ") : null;
  return { outputs, metrics };
}

/** The export step. */
export const step = defineStep({
  name: "export",
  version: "1",
  description:
    "Writes the adapter, the merged model and GGUF files (llama.cpp, Ollama) with model cards; uploads to the Hub",
  config: ExportConfig,
  inputs: {},
  optionalInputs: { merge: "merge", sft: "train-sft", dpo: "train-dpo" },
  sources: async (config: ExportConfig, projectRoot: string) => {
    if (config.model === null) return {};
    const dir = await modelDir(config.model, config.revision, projectRoot);
    const out = await modelSources(dir);
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
      if (await exists(join(dir, f))) out[`model/${f}`] = join(dir, f);
    }
    return out;
  },
  run,
});

if (import.meta.main) await runFromCli(step);
