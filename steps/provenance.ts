/**
 * Where a step ran: git state of the project and the software environment. Recorded in
 * every manifest so a result can be traced to the exact code that made it.
 * @module
 */
import { simpleGit } from "simple-git";
import { join } from "node:path";
import { sha256File, sha256Hex } from "../foundation/hash.ts";
import type { EnvInfo, GitInfo, GpuInfo } from "../foundation/manifest.ts";
import denoJson from "../deno.json" with { type: "json" };

/** lathe's version, from deno.json. */
export const LATHE_VERSION: string = denoJson.version;

/** Commit, branch, dirty flag and a hash of the uncommitted diff; nulls outside git. */
export async function gitInfo(dir: string): Promise<GitInfo> {
  const none: GitInfo = { commit: null, branch: null, dirty: false, diffHash: null };
  try {
    const git = simpleGit(dir);
    if (!(await git.checkIsRepo())) return none;
    const commit = await git.revparse(["HEAD"]).catch(() => null);
    const branch = await git.revparse(["--abbrev-ref", "HEAD"]).catch(() => null);
    const status = await git.status();
    const dirty = !status.isClean();
    const diff = dirty ? await git.diff(["HEAD"]).catch(() => "") : "";
    return {
      commit: commit?.trim() || null,
      branch: branch?.trim() || null,
      dirty,
      diffHash: dirty ? sha256Hex(diff + "\0" + status.not_added.sort().join("\n")) : null,
    };
  } catch {
    return none;
  }
}

/** Deno, lathe, OS and lockfile hash; `gpu` is filled by steps that used an adapter. */
export async function envInfo(projectRoot: string, gpu: GpuInfo | null = null): Promise<EnvInfo> {
  let lockfileHash: string | null = null;
  try {
    lockfileHash = (await sha256File(join(projectRoot, "deno.lock"))).sha256;
  } catch {
    lockfileHash = null;
  }
  return {
    deno: Deno.version.deno,
    lathe: LATHE_VERSION,
    os: Deno.build.os,
    arch: Deno.build.arch,
    lockfileHash,
    gpu,
  };
}
