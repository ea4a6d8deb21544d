/**
 * Progress for long work, on stderr: a live line on a terminal, a line every few seconds
 * otherwise (CI logs). `[tokenize] 45% 4500/10000 rows · 1.2M tok/s · ETA 3s`.
 * @module
 */

/** Formats a count with k/M/G suffixes: 1234567 -> "1.23M". */
export function humanCount(n: number): string {
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${(n / 1e9).toFixed(2)}G`;
  if (abs >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (abs >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return Number.isInteger(n) ? String(n) : n.toFixed(2);
}

/** Formats seconds as "42s", "3m05s", "1h02m". */
export function humanDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** A progress reporter for `total` units of work (unknown total: 0). */
export class Progress {
  #label: string;
  #unit: string;
  #total: number;
  #done = 0;
  #start = performance.now();
  #lastPrint = 0;
  #tty: boolean;
  #quiet: boolean;
  #extra = "";

  constructor(label: string, total: number, unit = "items", quiet = false) {
    this.#label = label;
    this.#total = total;
    this.#unit = unit;
    this.#quiet = quiet || Deno.env.get("LATHE_QUIET") === "1";
    this.#tty = Deno.stderr.isTerminal();
  }

  /** Advances by `n` units; `extra` is shown after the rate (e.g. "loss 2.31"). */
  tick(n = 1, extra?: string): void {
    this.#done += n;
    if (extra !== undefined) this.#extra = extra;
    const now = performance.now();
    if (now - this.#lastPrint > (this.#tty ? 100 : 5000)) this.#print(false);
  }

  /** Prints the final line. */
  done(extra?: string): void {
    if (extra !== undefined) this.#extra = extra;
    this.#print(true);
  }

  #print(final: boolean): void {
    this.#lastPrint = performance.now();
    if (this.#quiet) return;
    const elapsed = (this.#lastPrint - this.#start) / 1000;
    const rate = elapsed > 0 ? this.#done / elapsed : 0;
    const parts = [`[${this.#label}]`];
    if (this.#total > 0) {
      parts.push(`${Math.floor((100 * this.#done) / this.#total)}%`);
      parts.push(`${humanCount(this.#done)}/${humanCount(this.#total)} ${this.#unit}`);
    } else parts.push(`${humanCount(this.#done)} ${this.#unit}`);
    parts.push(`· ${humanCount(rate)} ${this.#unit}/s`);
    if (this.#extra) parts.push(`· ${this.#extra}`);
    if (final) parts.push(`· ${humanDuration(elapsed)}`);
    else if (this.#total > 0 && rate > 0) {
      parts.push(`· ETA ${humanDuration((this.#total - this.#done) / rate)}`);
    }
    const line = parts.join(" ");
    const enc = new TextEncoder();
    if (this.#tty) Deno.stderr.writeSync(enc.encode(`\r\x1b[2K${line}${final ? "\n" : ""}`));
    else Deno.stderr.writeSync(enc.encode(line + "\n"));
  }
}
