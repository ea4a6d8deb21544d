/**
 * `tokenize.add_special_tokens`: new special tokens added to a tokenizer's files as transformers'
 * `tokenizer.add_special_tokens({"additional_special_tokens": [...]},
 * replace_additional_special_tokens=False)` followed by `save_pretrained` writes them.
 *
 * Per string, in the order given (transformers, then the fast tokenizer's
 * `AddedVocabulary::add_tokens`):
 * - already listed in `additional_special_tokens` of tokenizer_config.json: nothing changes;
 * - otherwise it is appended to that list, and the added token
 *   `{content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true}`
 *   - changes nothing when `tokenizer.json` has exactly that added token already;
 *   - replaces the added token of that content, keeping its id, or becomes an added token with
 *     the model vocabulary's id of the string (transformers marks an existing string special);
 *   - else gets a new id: V (the model vocabulary's entry count) while no added token has an id
 *     >= V, else the largest added id + 1. For a vocabulary with ids 0..V-1 that is the
 *     tokenizer's largest id + 1: new tokens take ids `vocab_size`, `vocab_size + 1`, ...
 *
 * `tokenizer.json` lists its added tokens sorted by id (as the library serializes them), and
 * `tokenizer_config.json` holds each changed token in `added_tokens_decoder` under its id.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import { addedTokenOf, type AddedTokenSpec, type TokenizerFiles, tokenString } from "./tokenizer.ts";

/** The config key, as errors name it. */
export const ADD_SPECIAL_TOKENS_KEY = "tokenize.add_special_tokens";

/** A token string and its id. */
export interface TokenId {
  content: string;
  id: number;
}

/** What {@link addSpecialTokens} made of a tokenizer. */
export interface SpecialTokensAdded {
  /** The tokenizer files with the tokens added (the given files are not modified). */
  files: TokenizerFiles;
  /** Strings that got a new id, in the order given: the embedding rows training adds. */
  newTokens: TokenId[];
  /** Strings the tokenizer had already, with their ids (no new embedding row). */
  presentTokens: TokenId[];
  /** Largest id + 1 over the model vocabulary and the added tokens, before and after. */
  baseVocabSize: number;
  vocabSize: number;
}

/** The first entry of a list of tokens to add that cannot be added (empty, or listed twice), or null. */
export function specialTokenListProblem(
  tokens: readonly string[],
): { index: number; message: string } | null {
  const seen = new Map<string, number>();
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    if (t === "") return { index: i, message: "an empty string cannot be a token" };
    const first = seen.get(t);
    if (first !== undefined) {
      return { index: i, message: `${JSON.stringify(t)} is listed twice (entries ${first} and ${i})` };
    }
    seen.set(t, i);
  }
  return null;
}

/** The added token transformers makes of a string given to `add_special_tokens`. */
function specialToken(content: string, id: number): AddedTokenSpec {
  return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };
}

/** Whether two added tokens are equal as the library compares them (every field but the id). */
function sameToken(a: AddedTokenSpec, b: AddedTokenSpec): boolean {
  return a.content === b.content && a.single_word === b.single_word && a.lstrip === b.lstrip &&
    a.rstrip === b.rstrip && a.normalized === b.normalized && a.special === b.special;
}

/** An entry of tokenizer_config.json `added_tokens_decoder`, keys sorted as transformers writes them. */
function decoderEntry(t: AddedTokenSpec): Record<string, unknown> {
  return {
    content: t.content,
    lstrip: t.lstrip,
    normalized: t.normalized,
    rstrip: t.rstrip,
    single_word: t.single_word,
    special: t.special,
  };
}

/** The model vocabulary of tokenizer.json: id by string, entry count, largest id, ids in use. */
interface ModelVocab {
  idOf(s: string): number | undefined;
  /** Entries (the library's `get_vocab_size()` of the model). */
  size: number;
  maxId: number;
  has(id: number): boolean;
}

function modelVocab(model: Record<string, unknown>): ModelVocab {
  const vocab = model.vocab;
  if (Array.isArray(vocab)) {
    // Unigram: [piece, score] pairs, id = index.
    let byPiece: Map<string, number> | null = null;
    return {
      idOf(s) {
        byPiece ??= new Map(vocab.map((e, i) => [String(Array.isArray(e) ? e[0] : e), i]));
        return byPiece.get(s);
      },
      size: vocab.length,
      maxId: vocab.length - 1,
      has: (id) => id >= 0 && id < vocab.length,
    };
  }
  const map = (vocab && typeof vocab === "object" ? vocab : {}) as Record<string, number>;
  const ids = new Set(Object.values(map).map(Number));
  let maxId = -1;
  for (const id of ids) if (id > maxId) maxId = id;
  return {
    idOf: (s) => Object.hasOwn(map, s) ? Number(map[s]) : undefined,
    size: Object.keys(map).length,
    maxId,
    has: (id) => ids.has(id),
  };
}

/**
 * Adds `tokens` to the tokenizer `files` as special tokens (see the module doc). Throws a
 * `LatheError` naming `configKey` for an empty or repeated string, and for a new id that a
 * model vocabulary with gaps already uses (the library would corrupt that tokenizer).
 *
 * @example
 * ```ts
 * import { addSpecialTokens } from "./special_tokens.ts";
 * import { readTokenizerFiles } from "./tokenizer.ts";
 * const files = await readTokenizerFiles("data/demo/tokenizer");
 * const { newTokens, vocabSize } = addSpecialTokens(files, ["<tool_call>", "<|think|>"]);
 * // newTokens = [{content: "<tool_call>", id: 512}, {content: "<|think|>", id: 513}]; vocabSize = 514
 * ```
 */
export function addSpecialTokens(
  files: TokenizerFiles,
  tokens: readonly string[],
  configKey = ADD_SPECIAL_TOKENS_KEY,
): SpecialTokensAdded {
  const problem = specialTokenListProblem(tokens);
  if (problem) {
    throw new LatheError(`Cannot add special tokens: ${configKey}[${problem.index}]: ${problem.message}`, {
      hint: `list each new token once, as a non-empty string (${configKey}: ["<tool_call>", "</tool_call>"])`,
    });
  }
  const { tokenizerJson: tj, config } = files;
  const vocab = modelVocab((tj.model ?? {}) as Record<string, unknown>);
  const raw = (Array.isArray(tj.added_tokens) ? tj.added_tokens : []) as Record<string, unknown>[];
  const added = raw.map((t) => addedTokenOf(t as Partial<AddedTokenSpec>));
  /** Id of each added token's content (a later entry of the same content wins, as the library loads them). */
  const addedId = new Map<string, number>();
  let maxAdded = -1;
  for (const t of added) {
    addedId.set(t.content, t.id);
    if (t.id > maxAdded) maxAdded = t.id;
  }
  const baseVocabSize = Math.max(vocab.maxId, maxAdded) + 1;
  const usedIds = new Set(added.map((t) => t.id));

  const listed = Array.isArray(config.additional_special_tokens) ? config.additional_special_tokens : [];
  const listedStrings = new Set(listed.map(tokenString).filter((s): s is string => s !== null));
  const appended: string[] = [];
  /** Added tokens that are new or changed, by id. */
  const changed = new Map<number, AddedTokenSpec>();
  const newTokens: TokenId[] = [];
  const presentTokens: TokenId[] = [];

  for (const s of tokens) {
    const known = addedId.get(s) ?? vocab.idOf(s);
    // transformers skips a string listed as special already. (One listed without an id, which
    // transformers would leave unencodable as one token, is added below.)
    if (listedStrings.has(s) && known !== undefined) {
      presentTokens.push({ content: s, id: known });
      continue;
    }
    if (!listedStrings.has(s)) appended.push(s);
    if (known !== undefined) {
      presentTokens.push({ content: s, id: known });
      const token = specialToken(s, known);
      if (added.some((t) => sameToken(t, token))) continue;
      changed.set(known, token);
      addedId.set(s, known);
      maxAdded = Math.max(maxAdded, known);
      continue;
    }
    const id = maxAdded < 0
      ? vocab.size
      : maxAdded >= vocab.size || vocab.size === 0
      ? maxAdded + 1
      : vocab.size;
    if (vocab.has(id) || usedIds.has(id)) {
      throw new LatheError(
        `Cannot add special token ${JSON.stringify(s)} (${configKey}): its id would be ${id}, which the ` +
          `tokenizer already uses (the ${vocab.size} ids of its model vocabulary have gaps)`,
        { hint: "add the token with transformers and point tokenize.tokenizer at the tokenizer it saves" },
      );
    }
    changed.set(id, specialToken(s, id));
    addedId.set(s, id);
    usedIds.add(id);
    maxAdded = id;
    newTokens.push({ content: s, id });
  }

  // tokenizer.json: a changed token replaces the entry of its id, a new one joins; sorted by id.
  const replaced = new Set<number>();
  const addedTokens: Record<string, unknown>[] = raw.map((t) => {
    const c = changed.get(Number(t.id));
    if (!c) return t;
    replaced.add(c.id);
    return { ...c };
  });
  for (const [id, t] of changed) if (!replaced.has(id)) addedTokens.push({ ...t });
  addedTokens.sort((a, b) => Number(a.id) - Number(b.id));

  // tokenizer_config.json: added_tokens_decoder by id (integer keys enumerate in ascending order).
  const decoder: Record<string, unknown> = {};
  if (config.added_tokens_decoder && typeof config.added_tokens_decoder === "object") {
    Object.assign(decoder, config.added_tokens_decoder);
    for (const [id, t] of changed) decoder[String(id)] = decoderEntry(t);
  } else {
    for (const t of addedTokens) {
      decoder[String(t.id)] = decoderEntry(addedTokenOf(t as Partial<AddedTokenSpec>));
    }
  }
  let vocabSize = baseVocabSize;
  for (const id of changed.keys()) if (id + 1 > vocabSize) vocabSize = id + 1;
  return {
    files: {
      tokenizerJson: { ...tj, added_tokens: addedTokens },
      config: {
        ...config,
        added_tokens_decoder: decoder,
        additional_special_tokens: [...listed, ...appended],
      },
      chatTemplateFile: files.chatTemplateFile,
    },
    newTokens,
    presentTokens,
    baseVocabSize,
    vocabSize,
  };
}
