/**
 * Fixture run directories for the tracker tests: manifests that validate against the
 * Manifest schema, output files with their real sha256, and streamed `metrics.jsonl`.
 * @module
 */
import { join } from "node:path";
import { writeJsonAtomic } from "../../foundation/atomic.ts";
import { canonicalJson, sha256File, sha256Hex } from "../../foundation/hash.ts";
import {
  FAILURE_FILE,
  type GpuInfo,
  Manifest,
  MANIFEST_FILE,
  MANIFEST_SCHEMA,
} from "../../foundation/manifest.ts";
import { stepKey } from "../../steps/runner.ts";

/** One step of a fixture run. */
export interface FixtureStep {
  runId: string;
  step: string;
  recipe?: string | null;
  config?: Record<string, unknown>;
  seed?: number;
  status?: "success" | "failed";
  error?: string;
  /** Final scalars. */
  metrics?: Record<string, number | string | boolean | null>;
  /** Output name -> [relative path, file content]. */
  outputs?: Record<string, [string, string]>;
  /** Streamed points written to metrics.jsonl (raw lines may be appended with `rawMetrics`). */
  points?: { name: string; step: number; value: number | null }[];
  rawMetrics?: string;
  startedAt?: string;
  seconds?: number;
  cachedFrom?: string | null;
  commit?: string | null;
  dirty?: boolean;
  gpu?: GpuInfo | null;
}

/** Writes one step directory (outputs, metrics.jsonl, then the manifest) and returns the manifest. */
export async function writeStep(
  runsRoot: string,
  spec: FixtureStep,
): Promise<{ path: string; manifest: Manifest }> {
  const dir = join(runsRoot, spec.runId, spec.step);
  await Deno.mkdir(dir, { recursive: true });
  const status = spec.status ?? "success";
  const outputs: Manifest["outputs"] = {};
  if (status === "success") {
    for (const [name, [rel, content]] of Object.entries(spec.outputs ?? {})) {
      const abs = join(dir, rel);
      await Deno.writeTextFile(abs, content);
      outputs[name] = { path: rel, ...(await sha256File(abs)) };
    }
  }
  if (spec.points || spec.rawMetrics) {
    const t0 = Date.parse(spec.startedAt ?? "2026-11-22T10:00:00.000Z");
    const lines = (spec.points ?? []).map((p, i) =>
      JSON.stringify({
        name: p.name,
        step: p.step,
        value: p.value,
        time: new Date(t0 + i * 1000).toISOString(),
      })
    );
    await Deno.writeTextFile(
      join(dir, "metrics.jsonl"),
      lines.map((l) => l + "\n").join("") + (spec.rawMetrics ?? ""),
    );
  }
  const config = spec.config ?? {};
  const configHash = sha256Hex(canonicalJson(config));
  const seed = spec.seed ?? 0;
  const startedAt = spec.startedAt ?? "2026-11-22T10:00:00.000Z";
  const manifest = Manifest.parse({
    schema: MANIFEST_SCHEMA,
    step: spec.step,
    stepVersion: "1",
    runId: spec.runId,
    recipe: spec.recipe === undefined ? "tiny-demo" : spec.recipe,
    config,
    configHash,
    seed,
    inputs: {},
    sources: {},
    outputs,
    key: stepKey({ name: spec.step, version: "1" }, configHash, seed, {}, {}),
    git: {
      commit: spec.commit === undefined ? "0123456789abcdef0123456789abcdef01234567" : spec.commit,
      branch: "main",
      dirty: spec.dirty ?? false,
      diffHash: null,
    },
    env: {
      deno: "2.9.6",
      lathe: "0.1.0",
      os: "linux",
      arch: "x86_64",
      lockfileHash: null,
      gpu: spec.gpu ?? null,
    },
    startedAt,
    finishedAt: new Date(Date.parse(startedAt) + (spec.seconds ?? 1) * 1000).toISOString(),
    status,
    cachedFrom: spec.cachedFrom ?? null,
    metrics: spec.metrics ?? {},
    error: status === "failed" ? spec.error ?? "step failed" : null,
  });
  const path = join(dir, status === "success" ? MANIFEST_FILE : FAILURE_FILE);
  await writeJsonAtomic(path, manifest);
  return { path, manifest };
}

/** A loss curve that falls from `start` by `rate` per step: n points at steps 0..n-1. */
export function lossCurve(
  n: number,
  start = 3,
  rate = 0.05,
): { name: string; step: number; value: number }[] {
  return Array.from({ length: n }, (_, i) => ({ name: "loss", step: i, value: start * Math.exp(-rate * i) }));
}

/** Run ids of {@link writeStandardRuns}. */
export const RUN_A = "20261122-100000-tiny-demo-aaaa";
export const RUN_B = "20261122-110000-tiny-demo-bbbb";
export const RUN_C = "20261123-090000-tiny-dpo-cccc";

/**
 * Three runs: A (tiny-demo, 3 steps, 20 loss points), B (the same recipe with a changed
 * learning rate and rank, prepare reused from A, 30 loss points) and C (a DPO recipe
 * whose training failed). Returns the manifest paths written.
 */
export async function writeStandardRuns(runsRoot: string): Promise<string[]> {
  const prepare = { source: "data/demo.jsonl", format: "messages" };
  const train = (lr: number, r: number) => ({
    lr,
    lora: { r, alpha: 16, targets: ["q_proj", "v_proj"] },
    epochs: 1,
  });
  const specs: FixtureStep[] = [
    {
      runId: RUN_A,
      step: "prepare",
      config: prepare,
      outputs: { rows: ["rows.jsonl", '{"messages":[]}\n'] },
      metrics: { rows: 120, dropped: 2 },
      startedAt: "2026-11-22T10:00:00.000Z",
      seconds: 2,
    },
    {
      runId: RUN_A,
      step: "train-sft",
      config: train(2e-4, 8),
      outputs: { adapter: ["adapter_model.safetensors", "weights-a"], config: ["adapter_config.json", "{}"] },
      points: lossCurve(20),
      metrics: { loss: 1.2, tokens: 51200, converged: true },
      startedAt: "2026-11-22T10:00:05.000Z",
      seconds: 60,
      gpu: {
        description: "llvmpipe",
        vendor: "mesa",
        architecture: "",
        backend: "vulkan",
        features: [],
        fallback: true,
      },
    },
    {
      runId: RUN_A,
      step: "eval",
      config: { max_new_tokens: 32 },
      outputs: { report: ["report.json", '{"ok":true}'] },
      metrics: { eval_loss: 1.5, verdict: "ok" },
      startedAt: "2026-11-22T10:01:10.000Z",
      seconds: 5,
    },
    {
      runId: RUN_B,
      step: "prepare",
      config: prepare,
      outputs: { rows: ["rows.jsonl", '{"messages":[]}\n'] },
      metrics: { rows: 120, dropped: 2 },
      startedAt: "2026-11-22T11:00:00.000Z",
      seconds: 0,
      cachedFrom: RUN_A,
    },
    {
      runId: RUN_B,
      step: "train-sft",
      config: train(1e-4, 16),
      outputs: { adapter: ["adapter_model.safetensors", "weights-b"], config: ["adapter_config.json", "{}"] },
      points: lossCurve(30, 3, 0.08),
      metrics: { loss: 0.9, tokens: 51200, converged: false },
      startedAt: "2026-11-22T11:00:01.000Z",
      seconds: 90,
      dirty: true,
    },
    {
      runId: RUN_B,
      step: "eval",
      config: { max_new_tokens: 32 },
      outputs: { report: ["report.json", '{"ok":false}'] },
      metrics: { eval_loss: 1.25, verdict: "better" },
      startedAt: "2026-11-22T11:01:40.000Z",
      seconds: 4,
    },
    {
      runId: RUN_C,
      step: "prepare",
      recipe: "tiny-dpo",
      config: { source: "data/prefs.jsonl", format: "preference" },
      outputs: { rows: ["rows.jsonl", "{}\n"] },
      startedAt: "2026-11-23T09:00:00.000Z",
      seconds: 1,
    },
    {
      runId: RUN_C,
      step: "train-dpo",
      recipe: "tiny-dpo",
      config: { beta: 0.1 },
      status: "failed",
      error: 'Cannot allocate "embed_tokens": out of memory',
      startedAt: "2026-11-23T09:00:02.000Z",
      seconds: 3,
    },
  ];
  const paths: string[] = [];
  for (const spec of specs) paths.push((await writeStep(runsRoot, spec)).path);
  return paths;
}
