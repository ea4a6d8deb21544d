/**
 * Model cards (`README.md`) for what `export` writes, as the Hub reads them: YAML front matter
 * (`base_model`, `library_name`, `tags`, `datasets`, `license`, `pipeline_tag`) then Markdown: what
 * the model is, how it was trained (each training step's config and final metrics, from the
 * manifests), the lathe run and commit, and how to load it (peft / transformers / llama.cpp).
 * @module
 */
import { stringify } from "yaml";

/** One training step that made the weights, from its manifest. */
export interface TrainingRecord {
  /** Step instance name (`train-sft`, `train-dpo`). */
  step: string;
  config: Record<string, unknown>;
  metrics: Record<string, number | string | boolean | null>;
}

/** What a card says. */
export interface CardFacts {
  kind: "peft" | "merged" | "gguf";
  /** The base model (Hub id or path). */
  baseModel: string;
  /** The Hub repo this card will live in, when uploading (for the load snippets). */
  repo: string | null;
  /** Dataset Hub ids or file names the training read. */
  datasets: string[];
  /** The base's license, when its README says. */
  license: string | null;
  training: TrainingRecord[];
  runId: string;
  gitCommit: string | null;
  /** GGUF files (name, type) for `gguf` cards. */
  ggufFiles?: { file: string; type: string }[];
  /** Every weight was trained (no adapter): the `merged` card says so. */
  full?: boolean;
  /** Eval metrics to show (model label → metric → value), optional. */
  eval?: Record<string, Record<string, number | null>>;
}

/** Training keys worth showing, in order (others are in the run's manifests). */
const SHOWN = [
  "lora",
  "finetuning",
  "learning_rate",
  "lr_scheduler_type",
  "warmup_steps",
  "per_device_train_batch_size",
  "gradient_accumulation_steps",
  "max_steps",
  "num_train_epochs",
  "beta",
  "loss_type",
  "optim",
  "weight_decay",
  "max_grad_norm",
];

function fmt(v: unknown): string {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  if (v === null || v === undefined) return "—";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

/** The base's license from its README.md front matter, or null. */
export function licenseOf(readme: string | null): string | null {
  if (!readme?.startsWith("---")) return null;
  const end = readme.indexOf("\n---", 3);
  if (end === -1) return null;
  const m = /^license:\s*["']?([^"'\n]+)["']?\s*$/m.exec(readme.slice(3, end));
  return m ? m[1].trim() : null;
}

/** The README.md text of a card. */
export function modelCard(f: CardFacts): string {
  const tags = ["lathe", ...(f.kind === "gguf" ? ["gguf", "llama.cpp"] : [])];
  for (const t of f.training) {
    if (t.step.startsWith("train-sft")) tags.push("sft");
    if (t.step.startsWith("train-dpo")) tags.push("dpo");
    const lora = t.config.lora as Record<string, unknown> | undefined;
    if (lora && t.config.finetuning !== "full" && !tags.includes("lora")) tags.push("lora");
  }
  const front: Record<string, unknown> = { base_model: f.baseModel };
  if (f.kind === "peft") front.library_name = "peft";
  else if (f.kind === "merged") front.library_name = "transformers";
  front.pipeline_tag = "text-generation";
  front.tags = [...new Set(tags)];
  if (f.datasets.length) front.datasets = f.datasets;
  if (f.license) front.license = f.license;
  const title = f.repo ?? `${f.baseModel.split("/").pop()} (${f.kind})`;
  const lines: string[] = ["---", stringify(front).trimEnd(), "---", "", `# ${title}`, ""];
  const what = {
    peft: `A LoRA adapter for [${f.baseModel}](https://huggingface.co/${f.baseModel}) in PEFT's format.`,
    merged:
      `[${f.baseModel}](https://huggingface.co/${f.baseModel}) with its LoRA adapter merged into the weights ` +
      "(W + s·B·A, rounded once): a plain transformers model.",
    gguf:
      `[${f.baseModel}](https://huggingface.co/${f.baseModel}) fine-tuned, merged and converted to GGUF for ` +
      "llama.cpp and Ollama.",
  }[f.kind];
  lines.push(
    what,
    "",
    `Trained with [lathe](https://github.com/) — run \`${f.runId}\`` +
      (f.gitCommit ? `, commit \`${f.gitCommit.slice(0, 12)}\`` : "") + ".",
    "",
  );
  if (f.datasets.length) lines.push(`Data: ${f.datasets.map((d) => `\`${d}\``).join(", ")}.`, "");
  for (const t of f.training) {
    lines.push(`## ${t.step}`, "", "| setting | value |", "| --- | --- |");
    for (const key of SHOWN) if (key in t.config) lines.push(`| ${key} | ${fmt(t.config[key])} |`);
    const metrics = Object.entries(t.metrics).filter(([, v]) => typeof v === "number");
    if (metrics.length) {
      lines.push("", "| final metric | value |", "| --- | --- |");
      for (const [k, v] of metrics) lines.push(`| ${k} | ${fmt(v)} |`);
    }
    lines.push("");
  }
  if (f.eval && Object.keys(f.eval).length) {
    const names = [...new Set(Object.values(f.eval).flatMap((m) => Object.keys(m)))];
    lines.push(
      "## Evaluation",
      "",
      `| model | ${names.join(" | ")} |`,
      `| --- |${" --- |".repeat(names.length)}`,
    );
    for (const [model, m] of Object.entries(f.eval)) {
      lines.push(`| ${model} | ${names.map((n) => fmt(m[n])).join(" | ")} |`);
    }
    lines.push("");
  }
  const id = f.repo ?? "<this directory>";
  lines.push("## Use", "");
  if (f.kind === "peft") {
    lines.push(
      "```python",
      "from peft import AutoPeftModelForCausalLM",
      "from transformers import AutoTokenizer",
      "",
      `model = AutoPeftModelForCausalLM.from_pretrained("${id}")`,
      `tokenizer = AutoTokenizer.from_pretrained("${f.baseModel}")`,
      "```",
      "",
      "With lathe: `deno task generate --model " + f.baseModel + " --adapter " + id + ' "…"`.',
    );
  } else if (f.kind === "merged") {
    lines.push(
      "```python",
      "from transformers import AutoModelForCausalLM, AutoTokenizer",
      "",
      `model = AutoModelForCausalLM.from_pretrained("${id}", torch_dtype="auto")`,
      `tokenizer = AutoTokenizer.from_pretrained("${id}")`,
      "```",
    );
  } else {
    const first = f.ggufFiles?.[0]?.file ?? "model.gguf";
    lines.push("| file | type |", "| --- | --- |");
    for (const g of f.ggufFiles ?? []) lines.push(`| ${g.file} | ${g.type} |`);
    lines.push(
      "",
      "```sh",
      `llama-cli -m ${first} -cnv`,
      `llama-server -m ${first}`,
      "ollama create my-model -f Modelfile && ollama run my-model",
      "```",
    );
  }
  lines.push("");
  return lines.join("\n");
}
