/**
 * Plain aligned text tables and CSV for the `runs` command: a header row, a rule, then
 * the rows; numeric columns right-aligned.
 * @module
 */

/** A cell value as the tracker produces it (DuckDB JSON values, already flattened). */
export type Cell = string | number | boolean | null | undefined;

/** Options for {@link formatTable}. */
export interface TableOptions {
  /** How a null cell reads (default "-"). */
  nullText?: string;
  /** Column indices to right-align; default: columns whose non-null cells are all numbers. */
  rightAlign?: number[];
  /** Spaces between columns (default 2). */
  gap?: number;
}

/** Formats a number for a person: integers as they are, others to 6 significant digits. */
export function formatNumber(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (Number.isInteger(n)) return String(n);
  const abs = Math.abs(n);
  if (abs !== 0 && (abs < 1e-4 || abs >= 1e9)) return n.toExponential(4);
  return String(Number(n.toPrecision(6)));
}

function cellText(cell: Cell, nullText: string): string {
  if (cell === null || cell === undefined) return nullText;
  if (typeof cell === "number") return formatNumber(cell);
  return String(cell);
}

function isNumeric(cell: Cell): boolean {
  return typeof cell === "number" || (typeof cell === "string" && /^-?\d+(\.\d+)?(e[+-]?\d+)?$/i.test(cell));
}

/** Display width of a string: code points, so "é" and "·" count as one column. */
function width(text: string): number {
  return [...text].length;
}

function pad(text: string, to: number, right: boolean): string {
  const fill = " ".repeat(Math.max(0, to - width(text)));
  return right ? fill + text : text + fill;
}

/**
 * Formats rows as an aligned text table; multi-line cells show their first line.
 *
 * @example
 * ```ts
 * import { formatTable } from "./table.ts";
 * console.log(formatTable(["step", "seconds"], [["tokenize", 1.5], ["train-sft", 312]]));
 * // step       seconds
 * // ---------  -------
 * // tokenize       1.5
 * // train-sft      312
 * ```
 */
export function formatTable(headers: string[], rows: Cell[][], options: TableOptions = {}): string {
  const nullText = options.nullText ?? "-";
  const gap = " ".repeat(options.gap ?? 2);
  const right = new Set(
    options.rightAlign ??
      headers.map((_, i) => i).filter((i) => {
        const cells = rows.map((r) => r[i]).filter((c) => c !== null && c !== undefined && c !== "");
        return cells.length > 0 && cells.every(isNumeric);
      }),
  );
  const text = rows.map((r) => headers.map((_, i) => cellText(r[i], nullText).split("\n")[0]));
  const widths = headers.map((h, i) => Math.max(width(h), ...text.map((r) => width(r[i]))));
  const line = (cells: string[]) => cells.map((c, i) => pad(c, widths[i], right.has(i))).join(gap).trimEnd();
  return [line(headers), line(widths.map((w) => "-".repeat(w))), ...text.map(line)].join("\n");
}

function csvField(cell: Cell): string {
  if (cell === null || cell === undefined) return "";
  const s = String(cell);
  return /[",\r\n]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
}

/** Formats rows as CSV (RFC 4180: CRLF line ends, fields with `"` `,` or newlines quoted). */
export function formatCsv(headers: string[], rows: Cell[][]): string {
  return [headers, ...rows].map((r) => r.map(csvField).join(",")).join("\r\n") + "\r\n";
}
