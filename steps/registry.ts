/**
 * The steps lathe knows, by name, loaded lazily so a program pays only for the steps it runs.
 * @module
 */
import type { StepDef } from "./define.ts";
import { LatheError } from "../foundation/errors.ts";

const MODULES: Record<string, () => Promise<{ step: StepDef }>> = {
  prepare: () => import("./prepare.ts"),
  tokenize: () => import("./tokenize.ts"),
  quantize: () => import("./quantize.ts"),
  "train-sft": () => import("./train_sft.ts"),
  "train-dpo": () => import("./train_dpo.ts"),
  eval: () => import("./eval.ts"),
  merge: () => import("./merge.ts"),
  export: () => import("./export.ts"),
};

/** Names of all registered steps, in pipeline order. */
export const STEP_NAMES: readonly string[] = Object.keys(MODULES);

/** Loads the step called `name`; an unknown name is an error listing the known ones. */
export async function loadStep(name: string): Promise<StepDef> {
  const load = MODULES[name];
  if (!load) {
    throw new LatheError(
      `Cannot find step "${name}": known steps are ${STEP_NAMES.map((s) => `"${s}"`).join(", ")}`,
    );
  }
  return (await load()).step;
}
