/**
 * What every benchmark program shares: its usage error, the device line of its JSON report, and
 * the context a step's run gets when a benchmark times it without the runner.
 * @module
 */
import { dirname, join } from "node:path";
import { LatheError } from "../foundation/errors.ts";
import { Progress } from "../foundation/progress.ts";
import type { Gpu } from "../kernels/device.ts";
import type { StepContext } from "../steps/define.ts";

/** Throws a benchmark's usage error: what was wrong, and where the options are documented. */
export type Usage = (what: string, hint?: string) => never;

/**
 * The usage error of benchmark `name` (bench/<name>.ts documents its options). Declare the
 * result with its type, `const usage: Usage = benchUsage("x")`, so calls end control flow.
 */
export function benchUsage(name: string): Usage {
  return (what, hint) => {
    throw new LatheError(`Cannot run benchmark "${name}": ${what}`, {
      hint: hint ?? `The options are listed in the module documentation of bench/${name}.ts.`,
    });
  };
}

/** The adapter a report's figures come from. */
export interface BenchDevice {
  description: string;
  backend: string;
  features: string[];
  software: boolean;
}

/** {@link BenchDevice} of `gpu`. */
export function benchDevice(gpu: Gpu): BenchDevice {
  return {
    description: gpu.info.description,
    backend: gpu.info.backend,
    features: [...gpu.info.features],
    software: gpu.software,
  };
}

/**
 * A {@link StepContext} for timing a step's `run` alone (no hashing, manifest or git state): outputs
 * under `stepDir`, `sources` as given, quiet progress labelled `label`.
 */
export function benchStepContext(
  stepDir: string,
  sources: Record<string, string>,
  label: string,
): StepContext {
  return {
    runId: `bench-${label}`,
    runDir: dirname(stepDir),
    stepDir,
    projectRoot: stepDir,
    seed: 0,
    key: `bench-${label}`,
    sources,
    sourceHashes: {},
    async out(rel: string): Promise<string> {
      const path = join(stepDir, rel);
      await Deno.mkdir(dirname(path), { recursive: true });
      return path;
    },
    log: () => {},
    progress: (total, unit) => new Progress(label, total, unit, true),
    setGpu: () => {},
  };
}
