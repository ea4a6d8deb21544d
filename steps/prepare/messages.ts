/**
 * Chat messages: reading them from rows (OpenAI-style `{role, content}` or ShareGPT-style
 * `{from, value}`) and checking that a conversation has a sensible shape: an optional
 * system message first, then user and assistant turns alternating, starting with the user.
 * @module
 */
import { describeType, isRecord, RowError } from "./row_error.ts";

/** The roles the canonical format knows. */
export type Role = "system" | "user" | "assistant";

/** One canonical chat message. Keys are written in this order. */
export interface Message {
  role: Role;
  content: string;
}

/** A message together with the fields it came from, for error messages. */
export interface Located {
  message: Message;
  /** Path of the role in the input row, e.g. `messages[2].role`; a bare prompt string is `prompt`. */
  roleField: string;
  /** Path of the content in the input row, e.g. `messages[2].content`. */
  contentField: string;
}

/** A message made from a bare string field (`prompt`, `chosen`, `output`, ...). */
export function fromString(role: Role, content: string, field: string): Located {
  return { message: { role, content }, roleField: field, contentField: field };
}

const ROLES: ReadonlySet<string> = new Set(["system", "user", "assistant"]);

/** ShareGPT speaker names -> roles (`from` keys only). */
const SHAREGPT_ROLES: ReadonlyMap<string, Role> = new Map([
  ["system", "system"],
  ["human", "user"],
  ["user", "user"],
  ["gpt", "assistant"],
  ["assistant", "assistant"],
]);

/** Reads one message object at `field`; accepts `{role, content}` or `{from, value}`. */
function readMessage(value: unknown, field: string): Located {
  if (!isRecord(value)) throw new RowError(field, `expected a message object, got ${describeType(value)}`);
  let role: Role;
  let content: unknown;
  let roleField: string;
  let contentField: string;
  if ("role" in value) {
    const raw = value.role;
    if (typeof raw !== "string") {
      throw new RowError(`${field}.role`, `expected a string, got ${describeType(raw)}`);
    }
    if (!ROLES.has(raw)) {
      throw new RowError(`${field}.role`, `"${raw}" is not one of "system", "user", "assistant"`);
    }
    role = raw as Role;
    content = value.content;
    roleField = `${field}.role`;
    contentField = `${field}.content`;
  } else if ("from" in value) {
    const raw = value.from;
    if (typeof raw !== "string") {
      throw new RowError(`${field}.from`, `expected a string, got ${describeType(raw)}`);
    }
    const mapped = SHAREGPT_ROLES.get(raw);
    if (!mapped) {
      throw new RowError(`${field}.from`, `"${raw}" is not one of "system", "human", "gpt"`);
    }
    role = mapped;
    content = value.value;
    roleField = `${field}.from`;
    contentField = `${field}.value`;
  } else {
    throw new RowError(
      field,
      'expected a message with "role" and "content" (or ShareGPT "from" and "value")',
    );
  }
  if (content === undefined) throw new RowError(contentField, "is missing");
  if (typeof content !== "string") {
    throw new RowError(contentField, `expected a string, got ${describeType(content)}`);
  }
  return { message: { role, content }, roleField, contentField };
}

/** Reads a list of messages at `field` (e.g. `messages`), keeping each one's field path. */
export function readMessages(value: unknown, field: string): Located[] {
  if (!Array.isArray(value)) {
    throw new RowError(field, `expected a list of messages, got ${describeType(value)}`);
  }
  return value.map((item, i) => readMessage(item, `${field}[${i}]`));
}

/**
 * Checks the shape of a conversation: an optional system message first, then turns
 * alternating user, assistant, user, ... starting with the user, ending with `end`, and no
 * empty content. `field` names the conversation for whole-conversation problems.
 */
export function checkTurns(list: readonly Located[], field: string, end: "user" | "assistant"): void {
  if (list.length === 0) throw new RowError(field, "has no messages");
  let expected: Role = "user";
  for (let i = 0; i < list.length; i++) {
    const { message } = list[i];
    if (message.role === "system") {
      if (i !== 0) {
        throw new RowError(list[i].roleField, 'a "system" message is only allowed first');
      }
    } else {
      if (message.role !== expected) {
        const after = i === 0 || list[i - 1].message.role === "system"
          ? "as the first turn"
          : `after ${article(list[i - 1].message.role)} message`;
        throw new RowError(list[i].roleField, `expected "${expected}" ${after}, got "${message.role}"`);
      }
      expected = expected === "user" ? "assistant" : "user";
    }
    if (message.content.trim() === "") throw new RowError(list[i].contentField, "is empty");
  }
  const last = list[list.length - 1].message.role;
  if (last !== end) {
    throw new RowError(field, `ends with ${article(last)} message; the last message must be "${end}"`);
  }
}

/** `a "user"`, `an "assistant"`. */
function article(role: Role): string {
  return `${role === "assistant" ? "an" : "a"} "${role}"`;
}

/** True when two messages have the same role and content. */
export function sameMessage(a: Message, b: Message): boolean {
  return a.role === b.role && a.content === b.content;
}

/** Prepends `system` as a system message unless the conversation already starts with one. */
export function withSystem(list: Located[], system: string | undefined): Located[] {
  if (system === undefined || list[0]?.message.role === "system") return list;
  return [fromString("system", system, "system_prompt"), ...list];
}

/** The plain messages, with keys in canonical order. */
export function plain(list: readonly Located[]): Message[] {
  return list.map(({ message }) => ({ role: message.role, content: message.content }));
}
