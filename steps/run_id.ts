/**
 * Run ids: sortable by start time and readable, `20261122-103000-tiny-demo-3f2a`
 * (UTC date, time, a label, 4 random hex digits against collisions).
 * @module
 */

/** A new run id labelled `label` (recipe or step name). */
export function newRunId(label: string, now: Date = new Date()): string {
  const iso = now.toISOString(); // 2026-11-22T10:30:00.000Z
  const stamp = `${iso.slice(0, 10).replaceAll("-", "")}-${iso.slice(11, 19).replaceAll(":", "")}`;
  const slug = label.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "run";
  const rand = crypto.getRandomValues(new Uint8Array(2));
  return `${stamp}-${slug}-${[...rand].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** True when `id` has the shape {@link newRunId} makes. */
export function isRunId(id: string): boolean {
  return /^\d{8}-\d{6}-[a-z0-9-]+-[0-9a-f]{4}$/.test(id);
}
