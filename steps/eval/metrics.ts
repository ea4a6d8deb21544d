/**
 * Text metrics of generations against references, as the tools lathe's users compare with
 * compute them:
 * - exact match: the output equals the reference (both trimmed); normalised exact match after
 *   SQuAD's normalisation (lower case, punctuation and the articles a/an/the removed, spaces
 *   collapsed);
 * - ROUGE-L F1 as `rouge_score` (Google's package, behind `evaluate.load("rouge")`) scores it
 *   without stemming: tokens are the runs of [a-z0-9] of the lower-cased text, P = LCS/|output|,
 *   R = LCS/|reference|, F = 2PR/(P + R); the mean over samples;
 * - corpus BLEU as sacreBLEU computes it by default (tokenizer 13a, 4-grams, "exp" smoothing,
 *   mixed case, one or more references per output, the reference length closest to the output's,
 *   brevity penalty e^(1 − r/c) when c < r);
 * - JSON: the share of outputs that parse as a JSON object, and, for references that are JSON
 *   objects, the share of their fields the output has with an equal value (over all fields).
 * @module
 */

/** SQuAD's answer normalisation. */
export function normalizeAnswer(text: string): string {
  const lower = text.toLowerCase();
  const noPunct = Array.from(lower).filter((c) => !/[\p{P}\p{S}]/u.test(c) || c === " ").join("");
  return noPunct.replace(/\b(a|an|the)\b/g, " ").split(/\s+/).filter((w) => w).join(" ");
}

/** Share of outputs equal to their reference (trimmed), and after {@link normalizeAnswer}. */
export function exactMatch(
  outputs: readonly string[],
  references: readonly string[],
): { exact: number; normalized: number } {
  let exact = 0;
  let normalized = 0;
  outputs.forEach((o, i) => {
    if (o.trim() === references[i].trim()) exact++;
    if (normalizeAnswer(o) === normalizeAnswer(references[i])) normalized++;
  });
  const n = Math.max(1, outputs.length);
  return { exact: exact / n, normalized: normalized / n };
}

/** rouge_score's default tokens: lower-cased runs of a–z and 0–9. */
export function rougeTokens(text: string): string[] {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, " ").trim().split(" ").filter((t) => t);
}

function lcs(a: readonly string[], b: readonly string[]): number {
  const prev = new Array(b.length + 1).fill(0);
  for (let i = 1; i <= a.length; i++) {
    let diag = 0;
    for (let j = 1; j <= b.length; j++) {
      const up = prev[j];
      prev[j] = a[i - 1] === b[j - 1] ? diag + 1 : Math.max(prev[j], prev[j - 1]);
      diag = up;
    }
  }
  return prev[b.length];
}

/** ROUGE-L F1 of one output against its reference. */
export function rougeL(output: string, reference: string): number {
  const o = rougeTokens(output);
  const r = rougeTokens(reference);
  if (o.length === 0 || r.length === 0) return 0;
  const l = lcs(o, r);
  if (l === 0) return 0;
  const p = l / o.length;
  const rec = l / r.length;
  return (2 * p * rec) / (p + rec);
}

/** mteval-v13a's tokenisation, as sacreBLEU's default tokenizer applies it. */
export function tokenize13a(line: string): string[] {
  let s = line.replace(/<skipped>/g, "").replace(/-\n/g, "").replace(/\n/g, " ");
  if (s.includes("&")) {
    s = s.replace(/&quot;/g, '"').replace(/&amp;/g, "&").replace(/&lt;/g, "<").replace(/&gt;/g, ">");
  }
  s = ` ${s} `;
  s = s.replace(/([{-~[-` -&(-+:-@/])/g, " $1 ");
  s = s.replace(/([^0-9])([.,])/g, "$1 $2 ");
  s = s.replace(/([.,])([^0-9])/g, " $1 $2");
  s = s.replace(/([0-9])(-)/g, "$1 $2 ");
  return s.split(/\s+/).filter((t) => t);
}

function ngramCounts(tokens: readonly string[], n: number): Map<string, number> {
  const out = new Map<string, number>();
  for (let i = 0; i + n <= tokens.length; i++) {
    const g = tokens.slice(i, i + n).join(" ");
    out.set(g, (out.get(g) ?? 0) + 1);
  }
  return out;
}

/** sacreBLEU's corpus score and its parts. */
export interface BleuScore {
  score: number;
  /** Modified n-gram precisions (percent), n = 1..4. */
  precisions: number[];
  bp: number;
  sysLen: number;
  refLen: number;
}

/**
 * Corpus BLEU of `outputs` against `references` (references[k][i]: the k-th reference of output
 * i, sacreBLEU's layout), sacreBLEU's defaults; see the module documentation.
 */
export function corpusBleu(
  outputs: readonly string[],
  references: readonly (readonly string[])[],
): BleuScore {
  const N = 4;
  const correct = new Array(N).fill(0);
  const total = new Array(N).fill(0);
  let sysLen = 0;
  let refLen = 0;
  outputs.forEach((o, i) => {
    const hyp = tokenize13a(o);
    const refs = references.map((set) => tokenize13a(set[i]));
    sysLen += hyp.length;
    // The reference length closest to the output's (the shorter on a tie).
    let best = Infinity;
    let closest = 0;
    for (const r of refs) {
      const d = Math.abs(r.length - hyp.length);
      if (d < best || (d === best && r.length < closest)) {
        best = d;
        closest = r.length;
      }
    }
    refLen += closest;
    for (let n = 1; n <= N; n++) {
      const h = ngramCounts(hyp, n);
      const maxRef = new Map<string, number>();
      for (const r of refs) {
        for (const [g, c] of ngramCounts(r, n)) maxRef.set(g, Math.max(maxRef.get(g) ?? 0, c));
      }
      for (const [g, c] of h) correct[n - 1] += Math.min(c, maxRef.get(g) ?? 0);
      total[n - 1] += Math.max(0, hyp.length - n + 1);
    }
  });
  const precisions = new Array(N).fill(0);
  let smooth = 1;
  for (let n = 0; n < N; n++) {
    if (total[n] === 0) break;
    if (correct[n] === 0) {
      smooth *= 2;
      precisions[n] = 100 / (smooth * total[n]);
    } else precisions[n] = (100 * correct[n]) / total[n];
  }
  const bp = sysLen === 0 ? 0 : sysLen < refLen ? Math.exp(1 - refLen / sysLen) : 1;
  const logs = precisions.map((p) => (p === 0 ? -9999999999 : Math.log(p)));
  const score = bp * Math.exp(logs.reduce((a, x) => a + x, 0) / N);
  return { score, precisions, bp, sysLen, refLen };
}

function equalJson(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** A JSON object parsed from `text` (trimmed), or null. */
export function parseJsonObject(text: string): Record<string, unknown> | null {
  try {
    const v = JSON.parse(text.trim());
    return v !== null && typeof v === "object" && !Array.isArray(v) ? v : null;
  } catch {
    return null;
  }
}

/**
 * The JSON metrics, or null when no reference is a JSON object: `valid` the share of outputs that
 * parse as objects; `fields` the share of the reference objects' fields that the output has with
 * an equal value.
 */
export function jsonMetrics(
  outputs: readonly string[],
  references: readonly string[],
): { valid: number; fields: number } | null {
  let refs = 0;
  let valid = 0;
  let fields = 0;
  let right = 0;
  outputs.forEach((o, i) => {
    const ref = parseJsonObject(references[i]);
    if (ref === null) return;
    refs++;
    const out = parseJsonObject(o);
    if (out !== null) valid++;
    for (const [k, v] of Object.entries(ref)) {
      fields++;
      if (out !== null && Object.hasOwn(out, k) && equalJson(out[k], v)) right++;
    }
  });
  return refs === 0 ? null : { valid: valid / refs, fields: fields === 0 ? 0 : right / fields };
}
