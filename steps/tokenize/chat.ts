/**
 * Chat rendering with the model's own Jinja `chat_template` (through `@huggingface/jinja`,
 * which preprocesses with trim_blocks / lstrip_blocks like transformers), and the character
 * spans of assistant turns used for loss masks.
 *
 * Template variables are those transformers' `apply_chat_template` passes: `messages`,
 * `add_generation_prompt`, every entry of the tokenizer's `special_tokens_map` (`bos_token`,
 * `eos_token`, `pad_token`, `unk_token`, `additional_special_tokens`, ...; unset tokens are left
 * undefined), and the `raise_exception` / `strftime_now` functions the library provides.
 * String stripping (`strip` / `lstrip` / `rstrip` with `chars`, the `trim` filter) follows Python
 * (jinja_strings.ts), where the library alone differs from jinja2.
 *
 * Span rule (docs/shards.md, "Loss masks"): the assistant turn `i` starts where
 * `render(messages[:i], add_generation_prompt=True)` ends (that render must be a prefix of the
 * whole conversation's render: the template's own assistant header, e.g.
 * `<|im_start|>assistant\n`, stays outside), and ends after the first special token at or
 * after its start (the end-of-turn token: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`)
 * plus the whitespace that follows it (the `\n` of ChatML and Gemma), which is what trl's
 * training templates put inside `{% generation %}`. A template without special tokens ends
 * the turn where `render(messages[:i+1])` ends. Special tokens inside the assistant message's
 * own content (e.g. `<tool_call>` added by `tokenize.add_special_tokens`) are not its end: when
 * the content appears verbatim after the turn start with no special token before it, the
 * end-of-turn token is the first one after the content, as trl's `{% generation %}` block
 * (content, then the end-of-turn token) marks it.
 * @module
 */
import { Template } from "@huggingface/jinja";
import { LatheError } from "../../foundation/errors.ts";
import { useFastLookup } from "./jinja_lookup.ts";
import { usePythonStripping } from "./jinja_strings.ts";
import type { TokenizerFacts } from "./tokenizer.ts";

/** One chat message. Extra fields (e.g. `name`, `tool_calls`) are passed to the template as they are. */
export interface Message {
  role: string;
  content: string;
  [key: string]: unknown;
}

/**
 * The template used when a tokenizer has none (base models) and no `chat_template` override is
 * given: ChatML, as Qwen2 / the demo tokenizer use it, without a default system prompt.
 */
export const CHATML_TEMPLATE = "{%- for message in messages %}" +
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}" +
  "{%- endfor %}" +
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** A character span [start, end) of the rendered text. */
export type Span = [number, number];

/** Renders conversations with a chat template and finds assistant spans. */
export class ChatRenderer {
  #template: Template;
  #vars: Record<string, unknown>;
  #special: RegExp | null;
  /** The template source in use. */
  readonly source: string;

  constructor(loaded: TokenizerFacts, override?: string | null) {
    this.source = override ?? loaded.chatTemplate ?? CHATML_TEMPLATE;
    usePythonStripping();
    useFastLookup();
    try {
      this.#template = new Template(this.source);
    } catch (error) {
      throw new LatheError(`Cannot parse the chat template: ${(error as Error).message}`, {
        hint: override
          ? "check tokenize.chat_template"
          : "set tokenize.chat_template to a valid Jinja template",
      });
    }
    this.#vars = { ...loaded.specialTokens };
    const specials = loaded.addedTokens.filter((t) => t.special && t.content.length > 0).map((t) => t.content)
      .sort((a, b) => b.length - a.length || (a < b ? -1 : a > b ? 1 : 0));
    this.#special = specials.length > 0 ? new RegExp(specials.map(escapeRegExp).join("|"), "g") : null;
  }

  /** Renders `messages` (throws the template's own error, e.g. from `raise_exception`). */
  render(messages: readonly Message[], addGenerationPrompt: boolean): string {
    return this.#template.render({ ...this.#vars, messages, add_generation_prompt: addGenerationPrompt });
  }

  /**
   * The whole conversation's text and the character span of each assistant message listed in
   * `which` (indices into `messages`, ascending). Errors are plain `Error`s; callers add the row.
   */
  spans(messages: readonly Message[], which: readonly number[]): { text: string; spans: Span[] } {
    const text = this.render(messages, false);
    const spans: Span[] = [];
    let floor = 0;
    for (const i of which) {
      const prompt = this.render(messages.slice(0, i), true);
      if (!text.startsWith(prompt)) {
        throw new Error(
          `the chat template renders messages[0:${i}] with add_generation_prompt=True as text that is ` +
            `not a prefix of the whole conversation, so the assistant turn ${i} cannot be located`,
        );
      }
      const start = prompt.length;
      if (start < floor) throw new Error(`assistant turn ${i} starts inside the previous turn`);
      const end = this.#turnEnd(messages, i, text, start);
      spans.push([start, end]);
      floor = end;
    }
    return { text, spans };
  }

  #turnEnd(messages: readonly Message[], i: number, text: string, start: number): number {
    const re = this.#special;
    if (re) {
      re.lastIndex = start;
      let m = re.exec(text);
      // A special token inside the message's own text (an added `<tool_call>`) does not end the
      // turn: when the first one lies in the content, the search goes on after the content.
      const content = messages[i].content;
      if (m && typeof content === "string" && content.length > 0) {
        re.lastIndex = 0;
        if (re.test(content)) {
          const at = text.indexOf(content, start);
          if (at >= 0 && at <= m.index && m.index < at + content.length) {
            re.lastIndex = at + content.length;
            m = re.exec(text);
          }
        }
      }
      if (m) {
        let end = m.index + m[0].length;
        while (end < text.length && /\s/.test(text[end])) end++;
        return end;
      }
    }
    const through = this.render(messages.slice(0, i + 1), false);
    return text.startsWith(through) && through.length >= start ? through.length : text.length;
  }
}
