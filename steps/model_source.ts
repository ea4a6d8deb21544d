/**
 * The base model a step reads: a `model` reference (a directory relative to the project root,
 * or a Hub repo id through the Hugging Face cache or the Hub, hub/model.ts) resolved to a local
 * directory, and the files that determine it (config and weights), which become the step's
 * sources and so part of its key. Shared by every step that loads a model.
 * @module
 */
import { join, resolve } from "node:path";
import { exists } from "../foundation/atomic.ts";
import { INDEX_FILE, SINGLE_FILE } from "../formats/safetensors.ts";
import { resolveModel } from "../hub/model.ts";

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

/** The local directory of `model`: a path relative to the project root, else a cache or Hub reference. */
export async function modelDir(model: string, revision: string, projectRoot: string): Promise<string> {
  const local = resolve(projectRoot, model);
  const ref = await isDirectory(local) ? local : model;
  return (await resolveModel(ref, { revision })).dir;
}

/** The files that determine the model (config and weights), by source name `model/<file>`. */
export async function modelSources(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = { "model/config.json": join(dir, "config.json") };
  const index = join(dir, INDEX_FILE);
  if (await exists(index)) {
    out[`model/${INDEX_FILE}`] = index;
    const parsed = JSON.parse(await Deno.readTextFile(index)) as { weight_map?: Record<string, string> };
    for (const file of new Set(Object.values(parsed.weight_map ?? {}))) {
      out[`model/${file}`] = join(dir, file);
    }
  } else {
    out[`model/${SINGLE_FILE}`] = join(dir, SINGLE_FILE);
  }
  return out;
}
