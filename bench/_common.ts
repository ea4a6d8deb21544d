/**
 * What every benchmark program shares: its usage error, and the device line of its JSON report.
 * @module
 */
import { LatheError } from "../foundation/errors.ts";
import type { Gpu } from "../kernels/device.ts";

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
