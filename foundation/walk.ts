/**
 * Directory listing: every file below a directory, as sorted "/"-separated relative paths.
 * @module
 */
import { join } from "node:path";

/**
 * Every file under `dir` as a "/"-separated path relative to it, sorted. Symbolic links
 * to files count as files (the Hugging Face cache links snapshot files to blobs); names
 * starting with "." are skipped.
 */
export async function walkFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(abs: string, rel: string): Promise<void> {
    for await (const entry of Deno.readDir(abs)) {
      if (entry.name.startsWith(".")) continue;
      const childAbs = join(abs, entry.name);
      const childRel = rel === "" ? entry.name : `${rel}/${entry.name}`;
      let isDir = entry.isDirectory;
      let isFile = entry.isFile;
      if (entry.isSymlink) {
        const info = await Deno.stat(childAbs).catch(() => null);
        isDir = info?.isDirectory ?? false;
        isFile = info?.isFile ?? false;
      }
      if (isDir) await walk(childAbs, childRel);
      else if (isFile) out.push(childRel);
    }
  }
  await walk(dir, "");
  return out.sort();
}
