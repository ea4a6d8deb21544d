/**
 * What is wrong with one input row: the field (a path into the row such as
 * `messages[2].content`, or "" for the row as a whole) and a short description. The
 * `prepare` step adds the file and line and turns it into a `LatheError`, or counts it
 * when bad rows are skipped.
 * @module
 */

/** A problem with one field of one input row. */
export class RowError extends Error {
  /** Path of the offending field inside the row; "" when the row as a whole is wrong. */
  readonly field: string;
  constructor(field: string, message: string) {
    super(message);
    this.name = "RowError";
    this.field = field;
  }

  /** `field: message`, or just the message for whole-row problems. */
  describe(): string {
    return this.field === "" ? this.message : `${this.field}: ${this.message}`;
  }
}

/** Names a value's type for messages: "a string", "a number", "a list", "an object", "null". */
export function describeType(value: unknown): string {
  if (value === null) return "null";
  if (value === undefined) return "nothing";
  if (Array.isArray(value)) return "a list";
  switch (typeof value) {
    case "string":
      return "a string";
    case "number":
    case "bigint":
      return "a number";
    case "boolean":
      return "a boolean";
    case "object":
      return "an object";
    default:
      return typeof value;
  }
}

/** True for a plain record (not null, not a list). */
export function isRecord(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** Returns `row[key]` if it is a non-empty string (whitespace alone counts as empty). */
export function requireText(row: Record<string, unknown>, key: string, field: string = key): string {
  const value = row[key];
  if (value === undefined || value === null) throw new RowError(field, "is missing");
  if (typeof value !== "string") throw new RowError(field, `expected a string, got ${describeType(value)}`);
  if (value.trim() === "") throw new RowError(field, "is empty");
  return value;
}
