/**
 * The eval step's reports: `report.md` (a metrics table per model and sample generations side
 * by side) and a self-contained `report.html` (the same table, a bar chart of the share metrics,
 * and the samples), no script and no external file.
 * @module
 */
import { escapeXml } from "../../tracker/plot.ts";

/** What one model got. */
export interface ModelResult {
  /** Its name in the report: "base", or the step that trained its adapter. */
  label: string;
  /** What it is: the model and adapters. */
  description: string;
  metrics: Record<string, number | null>;
}

/** One eval prompt with every model's output. */
export interface SampleRow {
  prompt: string;
  reference: string;
  outputs: Record<string, string>;
}

/** One line of generations.jsonl, as far as the reports read it. */
export interface GenerationRow {
  prompt: string;
  reference: string;
  outputs: Record<string, { text: string }>;
}

/** A generations.jsonl row as a report sample: each model's text. */
export function sampleRow(r: GenerationRow): SampleRow {
  return {
    prompt: r.prompt,
    reference: r.reference,
    outputs: Object.fromEntries(Object.entries(r.outputs).map(([k, v]) => [k, v.text])),
  };
}

/** Metric names as the report shows them, in order; shares are printed as percentages. */
export const METRIC_LABELS: Record<string, { label: string; share: boolean }> = {
  eval_loss: { label: "eval loss", share: false },
  perplexity: { label: "perplexity", share: false },
  eval_mean_token_accuracy: { label: "token accuracy", share: true },
  json_valid: { label: "valid JSON", share: true },
  json_field_accuracy: { label: "JSON fields right", share: true },
  exact_match: { label: "exact match", share: true },
  exact_match_normalized: { label: "exact match (normalised)", share: true },
  rouge_l: { label: "ROUGE-L F1", share: true },
  bleu: { label: "BLEU", share: false },
  preference_accuracy: { label: "chosen more likely", share: true },
  reward_accuracy: { label: "DPO reward accuracy", share: true },
  judge_score: { label: "judge score (1–10)", share: false },
  judge_unscored: { label: "judge: answers without a score", share: false },
};

/** How the report shows a metric: a known one, a benchmark's acc / acc_norm (shares), or as named. */
function metaOf(name: string): { label: string; share: boolean } {
  return METRIC_LABELS[name] ?? { label: name, share: /\/acc(_norm)?$/.test(name) };
}

function format(value: number | null | undefined, share: boolean, digits = 4): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return share ? `${(100 * value).toFixed(1)}%` : value.toFixed(value >= 100 ? 1 : digits);
}

/** The metric names any model has, in {@link METRIC_LABELS}' order, then the others. */
function metricNames(models: readonly ModelResult[]): string[] {
  const present = new Set(models.flatMap((m) => Object.keys(m.metrics).filter((k) => m.metrics[k] !== null)));
  return [
    ...Object.keys(METRIC_LABELS).filter((k) => present.has(k)),
    ...[...present].filter((k) => !(k in METRIC_LABELS)).sort(),
  ];
}

/** The metrics table as Markdown rows (one row per metric, one column per model). */
export function metricsTable(models: readonly ModelResult[]): string[][] {
  return metricNames(models).map((name) => {
    const meta = metaOf(name);
    // BLEU is on a 0–100 scale, read to two decimals as sacreBLEU prints it.
    return [meta.label, ...models.map((m) => format(m.metrics[name], meta.share, name === "bleu" ? 2 : 4))];
  });
}

/** report.md. */
export function reportMarkdown(
  title: string,
  models: readonly ModelResult[],
  samples: readonly SampleRow[],
): string {
  const head = ["metric", ...models.map((m) => m.label)];
  const rows = metricsTable(models);
  const line = (cells: string[]) =>
    `| ${cells.map((c) => c.replaceAll("|", "\\|").replaceAll("\n", " ")).join(" | ")} |`;
  const out = [
    `# ${title}`,
    "",
    ...models.map((m) => `- **${m.label}**: ${m.description}`),
    "",
    line(head),
    line(head.map(() => "---")),
    ...rows.map(line),
    "",
  ];
  if (samples.length > 0) {
    out.push("## Sample generations", "");
    samples.forEach((s, i) => {
      out.push(
        `### ${i + 1}`,
        "",
        "Prompt:",
        "",
        "```",
        s.prompt,
        "```",
        "",
        "Reference:",
        "",
        "```",
        s.reference,
        "```",
        "",
      );
      for (const m of models) out.push(`${m.label}:`, "", "```", s.outputs[m.label] ?? "", "```", "");
    });
  }
  return out.join("\n");
}

/**
 * Samples side by side for a terminal: per sample the prompt, the reference and each model's
 * output, one line each, cut to `width` characters ("…" marks a cut; newlines read as "⏎").
 */
export function samplesText(
  samples: readonly SampleRow[],
  labels: readonly string[],
  width = 100,
): string[] {
  const pad = Math.max("reference".length, ...labels.map((l) => l.length)) + 2;
  const cut = (text: string) => {
    const flat = text.replaceAll("\n", " ⏎ ");
    return flat.length > width ? `${flat.slice(0, width - 1)}…` : flat;
  };
  const out: string[] = [];
  samples.forEach((s, i) => {
    out.push(`  ${`#${i + 1}`.padEnd(pad)}${cut(s.prompt)}`);
    out.push(`  ${"reference".padEnd(pad)}${cut(s.reference)}`);
    for (const l of labels) out.push(`  ${l.padEnd(pad)}${cut(s.outputs[l] ?? "")}`);
  });
  return out;
}

/** A grouped bar chart (SVG) of the share metrics, one group per metric, one bar per model. */
export function barChart(models: readonly ModelResult[]): string {
  const names = metricNames(models).filter((n) => metaOf(n).share);
  if (names.length === 0) return "";
  const colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  const bar = 18;
  const gap = 22;
  // Wide enough for its label under it.
  const group = Math.max(models.length * bar + gap, 120);
  const left = 50;
  const top = 30;
  const h = 200;
  const width = left + names.length * group + 20;
  const height = top + h + 70;
  const parts: string[] = [];
  for (let t = 0; t <= 4; t++) {
    const y = top + h - (t / 4) * h;
    parts.push(`<line x1="${left}" x2="${width - 10}" y1="${y}" y2="${y}" stroke="#ddd"/>`);
    parts.push(`<text x="${left - 6}" y="${y + 4}" text-anchor="end" font-size="11">${t * 25}%</text>`);
  }
  names.forEach((name, g) => {
    const x0 = left + g * group + (group - models.length * bar) / 2;
    models.forEach((m, i) => {
      const v = m.metrics[name];
      const value = typeof v === "number" && Number.isFinite(v) ? Math.max(0, Math.min(1, v)) : 0;
      const x = x0 + i * bar;
      const y = top + h - value * h;
      parts.push(
        `<rect x="${x}" y="${y}" width="${bar - 2}" height="${value * h}" fill="${
          colors[i % colors.length]
        }">` +
          `<title>${escapeXml(`${m.label}: ${format(v, true)}`)}</title></rect>`,
      );
    });
    parts.push(
      `<text x="${x0 + (models.length * bar) / 2}" y="${top + h + 16}" text-anchor="middle" font-size="11">${
        escapeXml(metaOf(name).label)
      }</text>`,
    );
  });
  models.forEach((m, i) => {
    const x = left + i * 140;
    parts.push(
      `<rect x="${x}" y="${height - 22}" width="12" height="12" fill="${colors[i % colors.length]}"/>`,
    );
    parts.push(`<text x="${x + 16}" y="${height - 12}" font-size="12">${escapeXml(m.label)}</text>`);
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif">` +
    `${parts.join("")}</svg>`;
}

/** report.html: self-contained (inline CSS and SVG). */
export function reportHtml(
  title: string,
  models: readonly ModelResult[],
  samples: readonly SampleRow[],
): string {
  const e = escapeXml;
  const rows = metricsTable(models)
    .map((r) => `<tr><th>${e(r[0])}</th>${r.slice(1).map((c) => `<td>${e(c)}</td>`).join("")}</tr>`)
    .join("\n");
  const sampleHtml = samples.map((s, i) =>
    `<section class="sample"><h3>${i + 1}</h3><div class="grid">` +
    `<div><h4>prompt</h4><pre>${e(s.prompt)}</pre></div>` +
    `<div><h4>reference</h4><pre>${e(s.reference)}</pre></div>` +
    models.map((m) => `<div><h4>${e(m.label)}</h4><pre>${e(s.outputs[m.label] ?? "")}</pre></div>`).join("") +
    `</div></section>`
  ).join("\n");
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${e(title)}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child { text-align: left; }
thead th { background: #f3f3f3; }
.grid { display: grid; grid-template-columns: repeat(${models.length + 2}, 1fr); gap: 8px; }
pre { white-space: pre-wrap; word-break: break-word; background: #f8f8f8; padding: 6px; margin: 0; font-size: 12px;
  max-height: 12em; overflow: auto; }
h4 { margin: 0 0 4px; font-size: 13px; }
ul { padding-left: 1.2em; }
</style></head>
<body>
<h1>${e(title)}</h1>
<ul>${models.map((m) => `<li><b>${e(m.label)}</b>: ${e(m.description)}</li>`).join("")}</ul>
<table><thead><tr><th>metric</th>${models.map((m) => `<th>${e(m.label)}</th>`).join("")}</tr></thead>
<tbody>
${rows}
</tbody></table>
${barChart(models)}
${samples.length > 0 ? `<h2>Sample generations</h2>\n${sampleHtml}` : ""}
</body></html>
`;
}
