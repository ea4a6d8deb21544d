/**
 * Loading a Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json`,
 * optionally `chat_template.jinja`) into what the `tokenize` step needs: the
 * `@huggingface/tokenizers` instance, the special tokens as transformers names them, the chat
 * template, and the rule for which special tokens a plain-text row gets.
 * @module
 */
import { join, resolve } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import { LatheError } from "../../foundation/errors.ts";
import { isHubRepoId, resolveModel } from "../../hub/model.ts";

/** File names inside a tokenizer directory. */
export const TOKENIZER_JSON = "tokenizer.json";
export const TOKENIZER_CONFIG = "tokenizer_config.json";
export const CHAT_TEMPLATE_FILE = "chat_template.jinja";

/** The raw files of a tokenizer directory, as parsed JSON and text. */
export interface TokenizerFiles {
  /** Parsed `tokenizer.json`. */
  tokenizerJson: Record<string, unknown>;
  /** Parsed `tokenizer_config.json`. */
  config: Record<string, unknown>;
  /** Contents of `chat_template.jinja` when the directory has one (newer transformers save it there). */
  chatTemplateFile: string | null;
}

/** One entry of `tokenizer.json` `added_tokens`. */
export interface AddedTokenSpec {
  id: number;
  content: string;
  special: boolean;
  normalized: boolean;
  lstrip: boolean;
  rstrip: boolean;
  single_word: boolean;
}

/** An entry of `tokenizer.json` `added_tokens` with the library's defaults for missing fields. */
export function addedTokenOf(t: Partial<AddedTokenSpec>): AddedTokenSpec {
  return {
    id: Number(t.id),
    content: String(t.content),
    special: t.special ?? false,
    normalized: t.normalized ?? !(t.special ?? false),
    lstrip: t.lstrip ?? false,
    rstrip: t.rstrip ?? false,
    single_word: t.single_word ?? false,
  };
}

/** A loaded tokenizer with the facts the step needs. */
export interface LoadedTokenizer {
  /** The library tokenizer (reference implementation for every id lathe writes). */
  tokenizer: Tokenizer;
  files: TokenizerFiles;
  /** Largest token id + 1, over the model vocabulary and the added tokens. */
  vocabSize: number;
  /** Added tokens from `tokenizer.json`, in file order. */
  addedTokens: AddedTokenSpec[];
  /** Special token strings as transformers' `special_tokens_map` names them (`bos_token`, ...). */
  specialTokens: Record<string, string | string[]>;
  bosId: number | null;
  eosId: number | null;
  /** Padding id: `pad_token`, else `eos_token`, else 0. */
  padId: number;
  /** The model's chat template, or null when it has none. */
  chatTemplate: string | null;
  /** Special ids a plain-text row starts and ends with before EOS is appended (see {@link textSpecials}). */
  textPrefix: number[];
  textSuffix: number[];
}

/**
 * What chat rendering and document building need of a tokenizer: plain data, so the workers get
 * it in their first message instead of loading the tokenizer again.
 */
export type TokenizerFacts = Pick<
  LoadedTokenizer,
  "addedTokens" | "specialTokens" | "chatTemplate" | "bosId" | "eosId" | "padId" | "textPrefix" | "textSuffix"
>;

/** The {@link TokenizerFacts} of a loaded tokenizer. */
export function tokenizerFacts(loaded: LoadedTokenizer): TokenizerFacts {
  const { addedTokens, specialTokens, chatTemplate, bosId, eosId, padId, textPrefix, textSuffix } = loaded;
  return { addedTokens, specialTokens, chatTemplate, bosId, eosId, padId, textPrefix, textSuffix };
}

/**
 * Resolves a `tokenizer` config value to a directory: a directory relative to the project root (or
 * absolute) when one exists, else a Hub repo id ("Qwen/Qwen2.5-0.5B-Instruct") through the Hugging Face
 * cache or the Hub (hub/: HF_HOME, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE), the same
 * snapshot a training step of that model reads.
 */
export async function tokenizerDir(ref: string, projectRoot: string, revision = "main"): Promise<string> {
  const local = resolve(projectRoot, ref);
  const stat = await Deno.stat(local).catch(() => null);
  if (stat?.isDirectory || !isHubRepoId(ref)) return local;
  return (await resolveModel(ref, { revision })).dir;
}

/** The files of a tokenizer directory that determine its output, by source name. */
export async function tokenizerSources(dir: string, configKey = "tokenize.tokenizer"): Promise<
  Record<string, string>
> {
  const out: Record<string, string> = {};
  for (const [name, file] of [["tokenizer_json", TOKENIZER_JSON], ["tokenizer_config", TOKENIZER_CONFIG]]) {
    const path = join(dir, file);
    try {
      const info = await Deno.stat(path);
      if (!info.isFile) throw new Error("not a file");
    } catch {
      throw new LatheError(`Cannot load tokenizer "${dir}" (${configKey}): "${file}" is missing`, {
        hint: "point the tokenizer at a Hugging Face model directory holding tokenizer.json " +
          "and tokenizer_config.json (relative paths are relative to the project root)",
      });
    }
    out[name] = path;
  }
  const template = join(dir, CHAT_TEMPLATE_FILE);
  try {
    if ((await Deno.stat(template)).isFile) out.chat_template = template;
  } catch { /* optional */ }
  return out;
}

/** Reads the files of a tokenizer directory. */
export async function readTokenizerFiles(dir: string): Promise<TokenizerFiles> {
  const readJson = async (file: string): Promise<Record<string, unknown>> => {
    const path = join(dir, file);
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch {
      throw new LatheError(`Cannot load tokenizer "${dir}": "${file}" cannot be read`, {
        hint: "point the tokenizer at a Hugging Face model directory",
      });
    }
    try {
      return JSON.parse(text);
    } catch (error) {
      throw new LatheError(`Cannot load tokenizer "${path}": not valid JSON (${(error as Error).message})`);
    }
  };
  const tokenizerJson = await readJson(TOKENIZER_JSON);
  const config = await readJson(TOKENIZER_CONFIG);
  let chatTemplateFile: string | null = null;
  try {
    chatTemplateFile = await Deno.readTextFile(join(dir, CHAT_TEMPLATE_FILE));
  } catch { /* optional */ }
  return { tokenizerJson, config, chatTemplateFile };
}

/**
 * Writes `files` into `dir` as a Hugging Face tokenizer directory (JSON indented by 2, as
 * `save_pretrained` writes it; `chat_template.jinja` when `files` has one). Returns the paths
 * by source name, as {@link tokenizerSources} names them.
 */
export async function writeTokenizerFiles(
  dir: string,
  files: TokenizerFiles,
): Promise<Record<string, string>> {
  await Deno.mkdir(dir, { recursive: true });
  const out: Record<string, string> = {
    tokenizer_json: join(dir, TOKENIZER_JSON),
    tokenizer_config: join(dir, TOKENIZER_CONFIG),
  };
  await Deno.writeTextFile(out.tokenizer_json, JSON.stringify(files.tokenizerJson, null, 2) + "\n");
  await Deno.writeTextFile(out.tokenizer_config, JSON.stringify(files.config, null, 2) + "\n");
  if (files.chatTemplateFile !== null) {
    out.chat_template = join(dir, CHAT_TEMPLATE_FILE);
    await Deno.writeTextFile(out.chat_template, files.chatTemplateFile);
  }
  return out;
}

/** A special token value in `tokenizer_config.json`: a string or an AddedToken object. */
export function tokenString(value: unknown): string | null {
  if (typeof value === "string") return value;
  if (value && typeof value === "object" && typeof (value as { content?: unknown }).content === "string") {
    return (value as { content: string }).content;
  }
  return null;
}

/**
 * The chat template of a tokenizer: `chat_template` of `tokenizer_config.json` (a string, or
 * a list of named templates of which "default" is used), else `chat_template.jinja`.
 */
export function chatTemplateOf(files: TokenizerFiles): string | null {
  const t = files.config.chat_template;
  if (typeof t === "string") return t;
  if (Array.isArray(t)) {
    const named = t.find((e) => e && typeof e === "object" && e.name === "default") ?? t[0];
    if (named && typeof named.template === "string") return named.template;
  }
  return files.chatTemplateFile;
}

/** Tokenizer classes whose fast tokenizer transformers rebuilds from `add_bos_token` / `add_eos_token`. */
const BOS_EOS_FLAG_CLASSES = new Set([
  "LlamaTokenizer",
  "LlamaTokenizerFast",
  "CodeLlamaTokenizer",
  "CodeLlamaTokenizerFast",
  "GemmaTokenizer",
  "GemmaTokenizerFast",
]);

/**
 * Special ids transformers adds around a single text with `add_special_tokens=True`:
 * for Llama / CodeLlama / Gemma tokenizer classes the `add_bos_token` (default true) and
 * `add_eos_token` (default false) flags decide; for every other class the `tokenizer.json`
 * post-processor does (a `TemplateProcessing` template's special tokens before and after `$A`).
 */
export function textSpecials(
  files: TokenizerFiles,
  bosId: number | null,
  eosId: number | null,
): { prefix: number[]; suffix: number[] } {
  const cls = String(files.config.tokenizer_class ?? "");
  if (BOS_EOS_FLAG_CLASSES.has(cls)) {
    const addBos = files.config.add_bos_token ?? true;
    const addEos = files.config.add_eos_token ?? false;
    return {
      prefix: addBos && bosId !== null ? [bosId] : [],
      suffix: addEos && eosId !== null ? [eosId] : [],
    };
  }
  const prefix: number[] = [];
  const suffix: number[] = [];
  const collect = (pp: Record<string, unknown> | null): void => {
    if (!pp) return;
    if (pp.type === "Sequence" && Array.isArray(pp.processors)) {
      for (const p of pp.processors) collect(p as Record<string, unknown>);
      return;
    }
    if (pp.type !== "TemplateProcessing" || !Array.isArray(pp.single)) return;
    const specials = (pp.special_tokens ?? {}) as Record<string, { ids: number[] }>;
    let seenSequence = false;
    for (const item of pp.single as Record<string, { id: string }>[]) {
      if ("Sequence" in item) seenSequence = true;
      else if ("SpecialToken" in item) {
        const ids = specials[item.SpecialToken.id]?.ids ?? [];
        (seenSequence ? suffix : prefix).push(...ids);
      }
    }
  };
  collect(files.tokenizerJson.post_processor as Record<string, unknown> | null);
  return { prefix, suffix };
}

/** Builds a {@link LoadedTokenizer} from the files of a tokenizer directory. */
export function buildTokenizer(files: TokenizerFiles, where: string): LoadedTokenizer {
  let tokenizer: Tokenizer;
  try {
    tokenizer = new Tokenizer(files.tokenizerJson, files.config);
  } catch (error) {
    throw new LatheError(`Cannot load tokenizer "${where}": ${(error as Error).message}`, {
      hint: "the tokenizer.json must be in the Hugging Face tokenizers format",
    });
  }
  const addedTokens = ((files.tokenizerJson.added_tokens ?? []) as Partial<AddedTokenSpec>[]).map(
    addedTokenOf,
  );
  let maxId = -1;
  for (const id of tokenizer.get_vocab(true).values()) if (id > maxId) maxId = id;
  for (const t of addedTokens) if (t.id > maxId) maxId = t.id;

  const specialTokens: Record<string, string | string[]> = {};
  for (
    const key of ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
  ) {
    const s = tokenString(files.config[key]);
    if (s !== null) specialTokens[key] = s;
  }
  const extra = files.config.additional_special_tokens;
  if (Array.isArray(extra)) {
    specialTokens.additional_special_tokens = extra.map(tokenString).filter((s): s is string => s !== null);
  }
  const idOf = (key: string): number | null => {
    const s = specialTokens[key];
    if (typeof s !== "string") return null;
    const id = tokenizer.token_to_id(s);
    if (id === undefined) {
      throw new LatheError(
        `Cannot load tokenizer "${where}": ${key} "${s}" of tokenizer_config.json is not in the vocabulary`,
      );
    }
    return id;
  };
  const bosId = idOf("bos_token");
  const eosId = idOf("eos_token");
  const padId = idOf("pad_token") ?? eosId ?? 0;
  const { prefix, suffix } = textSpecials(files, bosId, eosId);
  return {
    tokenizer,
    files,
    vocabSize: maxId + 1,
    addedTokens,
    specialTokens,
    bosId,
    eosId,
    padId,
    chatTemplate: chatTemplateOf(files),
    textPrefix: prefix,
    textSuffix: suffix,
  };
}

/** Reads and builds the tokenizer in `dir`. */
export async function loadTokenizer(dir: string): Promise<LoadedTokenizer> {
  return buildTokenizer(await readTokenizerFiles(dir), dir);
}
