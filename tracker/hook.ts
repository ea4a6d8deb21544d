/**
 * The runners' link to the tracker: after every step (success or failure) the manifest
 * it wrote is indexed. Indexing never fails a step: the manifest on disk is the record,
 * and `deno task runs reindex` rebuilds the index from it.
 * @module
 */
import type { Manifest } from "../foundation/manifest.ts";
import { trackerDbPath } from "../foundation/paths.ts";
import { indexManifestFile } from "./index.ts";

/**
 * Returns the `onFinish` callback for step and recipe runners: it indexes the manifest
 * at `path` into the runs root's tracker database. On any error it prints one warning
 * line and returns; `LATHE_NO_TRACKER=1` turns it off.
 *
 * @example
 * ```ts
 * import { trackerHook } from "./hook.ts";
 * const onFinish = trackerHook("runs");
 * // runStep(def, { ..., onFinish })
 * ```
 */
export function trackerHook(runsRoot: string): (path: string, manifest: Manifest) => Promise<void> {
  return async (path: string, manifest: Manifest): Promise<void> => {
    if (Deno.env.get("LATHE_NO_TRACKER") === "1") return;
    try {
      const done = await indexManifestFile(trackerDbPath(runsRoot), runsRoot, path, manifest);
      if (done.warnings.length > 0) {
        console.error(`warning: ${done.warnings.length} line(s) of metrics skipped (${done.warnings[0]})`);
      }
    } catch (error) {
      const why = error instanceof Error ? error.message.split("\n")[0] : String(error);
      console.error(`warning: run not indexed (${why}); \`deno task runs reindex\` rebuilds the index`);
    }
  };
}
