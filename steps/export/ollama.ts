/**
 * An Ollama `Modelfile` for an exported GGUF: `FROM`, a Go `TEMPLATE` that renders conversations as
 * the model's Jinja chat template does, its `PARAMETER stop` tokens, and `ADAPTER` for a LoRA GGUF
 * (FORMATS.md "Ollama Modelfile").
 *
 * Ollama does not run Jinja, so the template is chosen by recognising the chat template's family
 * from its markers: ChatML (`<|im_start|>`: Qwen2, the demo), Llama 3 (`<|start_header_id|>`) and
 * Mistral / Llama 2 (`[INST]`). A template of another family is refused with what to do.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";

/** A chat family Ollama gets a template for. */
export type ChatFamily = "chatml" | "llama3" | "mistral";

/** Go templates, each rendering `.Messages` (with an optional system turn) and the generation prompt. */
const TEMPLATES: Record<ChatFamily, { template: string; stop: string[] }> = {
  chatml: {
    template: `{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
`,
    stop: ["<|im_start|>", "<|im_end|>"],
  },
  llama3: {
    template: `<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

`,
    stop: ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
  },
  mistral: {
    template: `{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}`,
    stop: ["[INST]", "[/INST]", "</s>"],
  },
};

/** The family of a Jinja chat template, or null when it is none Ollama gets a template for here. */
export function chatFamily(chatTemplate: string | null): ChatFamily | null {
  if (!chatTemplate) return null;
  if (chatTemplate.includes("<|im_start|>")) return "chatml";
  if (chatTemplate.includes("<|start_header_id|>")) return "llama3";
  if (chatTemplate.includes("[INST]")) return "mistral";
  return null;
}

/** What a Modelfile is made of. */
export interface ModelfileSpec {
  /** The GGUF path, relative to the Modelfile (`./name.gguf`). */
  from: string;
  /** A LoRA GGUF to apply, relative to the Modelfile, or null. */
  adapter: string | null;
  chatTemplate: string | null;
  /** Sampling defaults from generation_config.json, when set. */
  temperature?: number;
  topP?: number;
  topK?: number;
  repeatPenalty?: number;
  /** Context length to run with. */
  numCtx?: number;
  where: string;
}

/** The Modelfile text. */
export function modelfile(spec: ModelfileSpec): string {
  const family = chatFamily(spec.chatTemplate);
  if (family === null) {
    throw new LatheError(
      `Cannot write an Ollama Modelfile for "${spec.where}": its chat template is not ChatML, Llama 3 or Mistral`,
      {
        hint: "drop `ollama` from export.targets, or use a base whose tokenizer has one of those templates",
      },
    );
  }
  const t = TEMPLATES[family];
  const lines = [`FROM ${spec.from}`];
  if (spec.adapter) lines.push(`ADAPTER ${spec.adapter}`);
  lines.push(`TEMPLATE """${t.template}"""`);
  for (const s of t.stop) lines.push(`PARAMETER stop "${s}"`);
  if (spec.temperature !== undefined) lines.push(`PARAMETER temperature ${spec.temperature}`);
  if (spec.topP !== undefined) lines.push(`PARAMETER top_p ${spec.topP}`);
  if (spec.topK !== undefined) lines.push(`PARAMETER top_k ${spec.topK}`);
  if (spec.repeatPenalty !== undefined) lines.push(`PARAMETER repeat_penalty ${spec.repeatPenalty}`);
  if (spec.numCtx !== undefined) lines.push(`PARAMETER num_ctx ${spec.numCtx}`);
  return lines.join("\n") + "\n";
}

/** The stop strings of a family (for tests and the printed commands). */
export function stopStrings(family: ChatFamily): readonly string[] {
  return TEMPLATES[family].stop;
}
