/**
 * Dataset statistics: character lengths per role (mean, p50, p95, max) and turns per row,
 * reported as step metrics and in `stats.json`. Lengths count Unicode code points.
 * @module
 */
import type { Example } from "./example.ts";

/** Number of Unicode code points in `text` (a surrogate pair counts once). */
export function codePoints(text: string): number {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n--;
        i++;
      }
    }
  }
  return n;
}

/** Summary of a list of lengths. */
export interface LengthSummary {
  count: number;
  mean: number;
  p50: number;
  p95: number;
  max: number;
}

/** Collects non-negative integers and summarises them (nearest-rank percentiles). */
export class LengthStats {
  #values = new Uint32Array(1024);
  #count = 0;
  #sum = 0;

  add(value: number): void {
    if (this.#count === this.#values.length) {
      const grown = new Uint32Array(this.#values.length * 2);
      grown.set(this.#values);
      this.#values = grown;
    }
    this.#values[this.#count++] = value;
    this.#sum += value;
  }

  /** count, mean, p50, p95 (nearest rank: the value at ceil(p·n) in sorted order), max. */
  summary(): LengthSummary {
    const n = this.#count;
    if (n === 0) return { count: 0, mean: 0, p50: 0, p95: 0, max: 0 };
    const sorted = this.#values.slice(0, n).sort();
    const rank = (p: number) => sorted[Math.max(0, Math.ceil(p * n) - 1)];
    return { count: n, mean: this.#sum / n, p50: rank(0.5), p95: rank(0.95), max: sorted[n - 1] };
  }
}

/**
 * Statistics over the examples written: lengths by role (`system`, `user`, `assistant`, over
 * the messages of sft rows and of preference prompts; preference rows add `chosen` and
 * `rejected`, the characters of each reply; text rows have `text`) and turns, the number of
 * user messages in a row's conversation (the prompt, for preference rows).
 */
export class DatasetStats {
  #roles = new Map<string, LengthStats>();
  #rows = 0;
  #turns = 0;

  #length(role: string, text: string): void {
    let stats = this.#roles.get(role);
    if (!stats) this.#roles.set(role, stats = new LengthStats());
    stats.add(codePoints(text));
  }

  /** Counts one example. */
  add(example: Example): void {
    this.#rows++;
    if (example.kind === "text") {
      this.#length("text", example.text);
      return;
    }
    const conversation = example.kind === "sft" ? example.messages : example.prompt;
    for (const m of conversation) {
      this.#length(m.role, m.content);
      if (m.role === "user") this.#turns++;
    }
    if (example.kind === "preference") {
      this.#length("chosen", example.chosen.map((m) => m.content).join(""));
      this.#length("rejected", example.rejected.map((m) => m.content).join(""));
    }
  }

  /** Length summaries by role, roles in a fixed order, means rounded to 2 decimals. */
  lengths(): Record<string, LengthSummary> {
    const order = ["system", "user", "assistant", "chosen", "rejected", "text"];
    const out: Record<string, LengthSummary> = {};
    for (const role of order) {
      const stats = this.#roles.get(role);
      if (!stats) continue;
      const s = stats.summary();
      out[role] = { ...s, mean: Math.round(s.mean * 100) / 100 };
    }
    return out;
  }

  /** Mean user turns per row (null for text rows). */
  turnsMean(): number | null {
    if (this.#rows === 0 || this.#roles.has("text")) return null;
    return this.#turns / this.#rows;
  }

  /** Flat metrics: `chars_<role>_{mean,p50,p95,max}` and `turns_mean`. */
  metrics(): Record<string, number | null> {
    const out: Record<string, number | null> = {};
    for (const [role, s] of Object.entries(this.lengths())) {
      out[`chars_${role}_mean`] = s.mean;
      out[`chars_${role}_p50`] = s.p50;
      out[`chars_${role}_p95`] = s.p95;
      out[`chars_${role}_max`] = s.max;
    }
    const turns = this.turnsMean();
    if (turns !== null) out.turns_mean = Math.round(turns * 1000) / 1000;
    return out;
  }
}
