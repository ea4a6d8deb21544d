/**
 * A second process for the tracker's concurrency tests.
 *
 * ```
 * deno run -A _writer.ts index <db> <runs root> <barrier dir> <manifest>...
 * deno run -A _writer.ts hold <db> <milliseconds> <ready file> [<release file>]
 * ```
 * `index` creates `<barrier dir>/ready-<pid>`, waits for `<barrier dir>/go`, then indexes
 * each manifest (one open per manifest); `hold` opens the database for writing, creates
 * the ready file and keeps the lock for the given time, or until the release file appears
 * when one is named (so a test under load never races a fixed timer).
 * @module
 */
import { join } from "node:path";
import { exists } from "../../foundation/atomic.ts";
import { withDb } from "../../tracker/db.ts";
import { indexManifestFile } from "../../tracker/index.ts";

const [mode, db, ...rest] = Deno.args;
if (mode === "index") {
  const [runsRoot, barrier, ...paths] = rest;
  await Deno.writeTextFile(join(barrier, `ready-${Deno.pid}`), "");
  while (!(await exists(join(barrier, "go")))) await new Promise((r) => setTimeout(r, 2));
  for (const path of paths) await indexManifestFile(db, runsRoot, path);
  console.log(`indexed ${paths.length}`);
} else if (mode === "hold") {
  const [ms, ready, release] = rest;
  await withDb(db, {}, async (conn) => {
    await conn.run("CREATE TABLE IF NOT EXISTS held (a INTEGER)");
    await Deno.writeTextFile(ready, "held");
    const until = Date.now() + Number(ms);
    if (release) {
      while (!(await exists(release)) && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
    } else await new Promise((r) => setTimeout(r, Number(ms)));
  });
} else {
  throw new Error(`unknown mode "${mode}"`);
}
