/**
 * Content hashing: canonical JSON (sorted keys) for configs and keys, streamed sha256
 * for files of any size.
 * @module
 */
import { createHash } from "node:crypto";

/** JSON with object keys sorted recursively, so equal values hash equally. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(sortKeys(value));
}

function sortKeys(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === "object") {
    const out: Record<string, unknown> = {};
    for (const key of Object.keys(value).sort()) {
      const v = (value as Record<string, unknown>)[key];
      if (v !== undefined) out[key] = sortKeys(v);
    }
    return out;
  }
  return value;
}

/** sha256 of a string (UTF-8) or bytes, as lowercase hex. */
export function sha256Hex(data: string | Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** sha256 and size of a file, read in 1 MiB chunks. */
export async function sha256File(path: string): Promise<{ sha256: string; bytes: number }> {
  const hash = createHash("sha256");
  let bytes = 0;
  using file = await Deno.open(path, { read: true });
  const buf = new Uint8Array(1 << 20);
  while (true) {
    const n = await file.read(buf);
    if (n === null) break;
    hash.update(buf.subarray(0, n));
    bytes += n;
  }
  return { sha256: hash.digest("hex"), bytes };
}

/**
 * sha256 and size of a step source. Files in the Hugging Face cache that resolve to
 * `blobs/<64 hex>` are LFS objects stored under the sha256 of their content (the Hub's
 * content addressing), so that name is the hash and multi-GB weights are not read again each
 * time a step is planned; every other file is hashed.
 */
export async function sourceHash(path: string): Promise<{ sha256: string; bytes: number }> {
  const real = await Deno.realPath(path);
  const parts = real.split(/[\\/]/);
  const name = parts[parts.length - 1];
  if (parts[parts.length - 2] === "blobs" && /^[0-9a-f]{64}$/.test(name)) {
    return { sha256: name, bytes: (await Deno.stat(real)).size };
  }
  return await sha256File(path);
}
