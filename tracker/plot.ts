/**
 * Line plots of streamed metrics as standalone SVG: one polyline per series over the
 * step index, axes with "nice" ticks (1, 2 or 5 times a power of ten), labels and a legend.
 * @module
 */
import { formatNumber } from "./table.ts";

/** A series to draw; points in any order (drawn sorted by x). */
export interface PlotSeries {
  label: string;
  points: { x: number; y: number }[];
}

/** Options for {@link renderSvg}. */
export interface PlotOptions {
  title?: string;
  xLabel?: string;
  yLabel?: string;
  width?: number;
  height?: number;
}

/** Ten distinguishable colours (matplotlib's tab10). */
const PALETTE = [
  "#1f77b4",
  "#ff7f0e",
  "#2ca02c",
  "#d62728",
  "#9467bd",
  "#8c564b",
  "#e377c2",
  "#7f7f7f",
  "#bcbd22",
  "#17becf",
];

/** Escapes text for SVG element content and attribute values. */
export function escapeXml(text: string): string {
  return text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;").replaceAll(
    '"',
    "&quot;",
  );
}

/**
 * Tick positions covering [lo, hi] with about `target` intervals; the spacing is
 * 1, 2 or 5 × 10^k. Returns the spacing too (it sets the label precision).
 */
export function niceTicks(lo: number, hi: number, target = 6): { ticks: number[]; step: number } {
  if (!(hi > lo)) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  // Rounded to 12 digits so that 2 × 5e-6 reads 1e-5, not 9.999999999999999e-6.
  const round = (v: number) => Number(v.toPrecision(12));
  const step = round((f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag);
  const first = Math.floor(lo / step + 1e-9);
  const last = Math.ceil(hi / step - 1e-9);
  const ticks: number[] = [];
  for (let k = first; k <= last; k++) ticks.push(round(k * step));
  return { ticks, step };
}

function tickLabel(v: number, step: number): string {
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const abs = Math.abs(v);
  if (abs !== 0 && (abs >= 1e6 || abs < 1e-4)) return v.toExponential(1);
  return formatNumber(Number(v.toFixed(Math.min(decimals, 10))));
}

const fmt = (v: number) => Number(v.toFixed(2)).toString();

/**
 * Renders series as an SVG document. Each series is one `<polyline>` whose `points`
 * holds exactly its finite points.
 *
 * @example
 * ```ts
 * import { renderSvg } from "./plot.ts";
 * const svg = renderSvg([{ label: "loss", points: [{ x: 0, y: 2.3 }, { x: 1, y: 1.9 }] }], { yLabel: "loss" });
 * ```
 */
export function renderSvg(series: PlotSeries[], options: PlotOptions = {}): string {
  const width = options.width ?? 720;
  const height = options.height ?? 420;
  const m = { left: 70, right: 20, top: options.title ? 40 : 20, bottom: 50 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const clean = series.map((s) => ({
    label: s.label,
    points: s.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)).sort((a, b) => a.x - b.x),
  }));
  const all = clean.flatMap((s) => s.points);
  const xs = all.map((p) => p.x);
  const ys = all.map((p) => p.y);
  const xt = niceTicks(all.length ? Math.min(...xs) : 0, all.length ? Math.max(...xs) : 1);
  const yt = niceTicks(all.length ? Math.min(...ys) : 0, all.length ? Math.max(...ys) : 1);
  const [x0, x1] = [xt.ticks[0], xt.ticks[xt.ticks.length - 1]];
  const [y0, y1] = [yt.ticks[0], yt.ticks[yt.ticks.length - 1]];
  const sx = (x: number) => m.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y: number) => m.top + plotH - ((y - y0) / (y1 - y0)) * plotH;

  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
  );
  out.push(`<rect width="${width}" height="${height}" fill="white"/>`);
  if (options.title) {
    out.push(
      `<text x="${width / 2}" y="24" text-anchor="middle" font-size="14">${escapeXml(options.title)}</text>`,
    );
  }
  out.push(`<g class="grid" stroke="#e5e5e5" stroke-width="1">`);
  for (const t of xt.ticks) {
    out.push(`<line x1="${fmt(sx(t))}" y1="${m.top}" x2="${fmt(sx(t))}" y2="${m.top + plotH}"/>`);
  }
  for (const t of yt.ticks) {
    out.push(`<line x1="${m.left}" y1="${fmt(sy(t))}" x2="${m.left + plotW}" y2="${fmt(sy(t))}"/>`);
  }
  out.push(`</g>`);
  out.push(`<g class="axes" stroke="#333" stroke-width="1">`);
  out.push(`<line x1="${m.left}" y1="${m.top + plotH}" x2="${m.left + plotW}" y2="${m.top + plotH}"/>`);
  out.push(`<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${m.top + plotH}"/>`);
  out.push(`</g>`);
  out.push(`<g class="x-ticks" text-anchor="middle">`);
  for (const t of xt.ticks) {
    out.push(`<text x="${fmt(sx(t))}" y="${m.top + plotH + 16}">${escapeXml(tickLabel(t, xt.step))}</text>`);
  }
  out.push(`</g>`);
  out.push(`<g class="y-ticks" text-anchor="end">`);
  for (const t of yt.ticks) {
    out.push(`<text x="${m.left - 6}" y="${fmt(sy(t) + 4)}">${escapeXml(tickLabel(t, yt.step))}</text>`);
  }
  out.push(`</g>`);
  out.push(
    `<text class="x-label" x="${m.left + plotW / 2}" y="${height - 10}" text-anchor="middle">${
      escapeXml(options.xLabel ?? "step")
    }</text>`,
  );
  if (options.yLabel) {
    const cy = m.top + plotH / 2;
    out.push(
      `<text class="y-label" x="16" y="${cy}" text-anchor="middle" transform="rotate(-90 16 ${cy})">${
        escapeXml(options.yLabel)
      }</text>`,
    );
  }
  clean.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const pts = s.points.map((p) => `${fmt(sx(p.x))},${fmt(sy(p.y))}`).join(" ");
    out.push(
      `<polyline class="series" data-label="${
        escapeXml(s.label)
      }" fill="none" stroke="${color}" stroke-width="1.5" stroke-linejoin="round" points="${pts}"/>`,
    );
    if (s.points.length === 1) {
      out.push(
        `<circle cx="${fmt(sx(s.points[0].x))}" cy="${fmt(sy(s.points[0].y))}" r="3" fill="${color}"/>`,
      );
    }
  });
  if (clean.length > 1 || (clean.length === 1 && options.yLabel !== clean[0].label)) {
    // Label width estimated at 7 px per character of the 12 px font.
    const boxW = 36 + 7 * Math.max(...clean.map((s) => s.label.length));
    const boxX = m.left + plotW - boxW - 6;
    out.push(`<g class="legend">`);
    out.push(
      `<rect x="${boxX}" y="${m.top + 2}" width="${boxW}" height="${
        clean.length * 16 + 4
      }" fill="white" fill-opacity="0.85"/>`,
    );
    clean.forEach((s, i) => {
      const y = m.top + 10 + i * 16;
      const x = boxX + 4;
      out.push(
        `<line x1="${x}" y1="${y}" x2="${x + 20}" y2="${y}" stroke="${
          PALETTE[i % PALETTE.length]
        }" stroke-width="2"/>`,
      );
      out.push(`<text x="${x + 26}" y="${y + 4}">${escapeXml(s.label)}</text>`);
    });
    out.push(`</g>`);
  }
  out.push(`</svg>`);
  return out.join("\n") + "\n";
}
