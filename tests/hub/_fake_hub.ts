/**
 * A fake Hugging Face Hub for upload tests: the endpoints `@huggingface/hub`'s `repoExists`,
 * `createRepo` and `commit` (plain LFS transfers) call, over repos kept in memory, with the
 * Hub's status codes and `{"error": "..."}` bodies.
 *
 * | request | answer |
 * | --- | --- |
 * | `GET /api/models/{ns}/{name}` | the repo's info; 404 (401 anonymous) when missing or private to others |
 * | `POST /api/repos/create` | `{url, name, id}`; 403 outside the token's namespaces or for a read token; 409 when it exists |
 * | `POST /api/models/{ns}/{name}/preupload/{rev}` | `uploadMode` "lfs" from `lfsThreshold` bytes up, else "regular" |
 * | `POST /{ns}/{name}.git/info/lfs/objects/batch` | basic (or multipart above `multipartChunk`) upload actions, none for stored objects |
 * | `PUT /_lfs/{oid}`, `PUT /_lfs/{oid}/part/{n}`, `POST /_lfs/{oid}/complete` | the LFS storage: the sha256 and size are checked |
 * | `POST /api/models/{ns}/{name}/commit/{rev}` | NDJSON header, `file` (base64) and `lfsFile` lines; `{commitOid, commitUrl}` |
 *
 * Every `/api` and `.git` request checks `Authorization: Bearer <token>`: another token is
 * 401, writing outside `namespaces` or with `readOnly` is 403, a missing repo or branch 404.
 * @module
 */
/** A file of a fake repo. */
export interface FakeFile {
  bytes: Uint8Array;
  sha256: string;
  /** True when it came through LFS. */
  lfs: boolean;
}

/** A commit of a fake repo. */
export interface FakeCommit {
  oid: string;
  branch: string;
  title: string;
  description: string;
  /** Paths it added or replaced. */
  paths: string[];
}

/** A repo kept by the fake Hub. */
export interface FakeRepo {
  name: string;
  private: boolean;
  /** branch -> path -> file. */
  branches: Map<string, Map<string, FakeFile>>;
  commits: FakeCommit[];
}

/** The routes that `fail` can break. */
export type FakeRoute = "info" | "create" | "preupload" | "lfs-batch" | "lfs-upload" | "commit";

export interface FakeHubOptions {
  /** The one valid token. */
  token: string;
  /** Namespaces the token may create repos in and write to (its user and organizations). */
  namespaces: string[];
  /** The token has the read role: every write is 403. */
  readOnly?: boolean;
  /** Files of at least this many bytes upload through LFS; default 1 MiB (the Hub: 10 MB or binary). */
  lfsThreshold?: number;
  /** LFS objects larger than this upload in parts of this many bytes; default none (one PUT). */
  multipartChunk?: number;
  /** Repos that exist from the start: "ns/name" -> visibility, files on main, other branches. */
  repos?: Record<string, { private?: boolean; files?: Record<string, string>; branches?: string[] }>;
  /**
   * Break one route: answer `status` with the Hub's JSON error; or (`close`, LFS uploads only)
   * send the uploads to a storage that closes each connection as the request starts arriving.
   */
  fail?: { route: FakeRoute; status: number } | { route: "lfs-upload"; close: true };
}

export interface FakeHub {
  /** The endpoint, for HF_ENDPOINT: `http://127.0.0.1:<port>`. */
  url: string;
  repos: Map<string, FakeRepo>;
  /** Every request: method, path, the route it matched, its Authorization header. */
  requests: { method: string; path: string; route: FakeRoute | "other"; auth: string | null }[];
  close(): Promise<void>;
}

const encoder = new TextEncoder();

async function sha256Hex(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function randomOid(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(20)), (b) => b.toString(16).padStart(2, "0"))
    .join("");
}

/** The Hub's error answer: `{"error": message}`, with `X-Error-Code` when it sends one. */
function hubError(status: number, error: string, code?: string): Response {
  return Response.json({ error }, { status, headers: code ? { "X-Error-Code": code } : {} });
}

/** S3, which holds the Hub's LFS files, refuses a PUT without a length (a chunked body). */
function lengthRequired(): Response {
  return new Response("<Error><Code>MissingContentLength</Code></Error>", { status: 411 });
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/**
 * Starts the fake Hub on 127.0.0.1 (a random port).
 *
 * @example
 * ```ts
 * const hub = startFakeHub({ token: "hf_valid", namespaces: ["me"] });
 * // HF_ENDPOINT=hub.url ... then hub.repos.get("me/x")
 * await hub.close();
 * ```
 */
export function startFakeHub(options: FakeHubOptions): FakeHub {
  const lfsThreshold = options.lfsThreshold ?? 1 << 20;
  const repos = new Map<string, FakeRepo>();
  const requests: FakeHub["requests"] = [];
  /** LFS storage: oid -> bytes, shared by all repos as the Hub's is content-addressed. */
  const lfs = new Map<string, Uint8Array>();
  /** Multipart uploads under way: oid -> part number -> bytes. */
  const parts = new Map<string, Map<number, Uint8Array>>();
  let url = "";
  // Deno.serve cannot drop a connection without logging, so a dropping storage is raw TCP.
  const dropper = options.fail && "close" in options.fail ? dropConnections() : null;

  const newRepo = (name: string, isPrivate: boolean): FakeRepo => {
    const repo: FakeRepo = {
      name,
      private: isPrivate,
      branches: new Map([["main", new Map()]]),
      commits: [],
    };
    const attributes = encoder.encode("*.gguf filter=lfs diff=lfs merge=lfs -text\n");
    repo.branches.get("main")!.set(".gitattributes", { bytes: attributes, sha256: "", lfs: false });
    repo.commits.push({
      oid: randomOid(),
      branch: "main",
      title: "initial commit",
      description: "",
      paths: [".gitattributes"],
    });
    repos.set(name, repo);
    return repo;
  };
  for (const [name, spec] of Object.entries(options.repos ?? {})) {
    const repo = newRepo(name, spec.private ?? false);
    for (const [path, text] of Object.entries(spec.files ?? {})) {
      repo.branches.get("main")!.set(path, { bytes: encoder.encode(text), sha256: "", lfs: false });
    }
    for (const branch of spec.branches ?? []) repo.branches.set(branch, new Map(repo.branches.get("main")!));
  }

  /** Who the request is: "anonymous", "valid", or "invalid" (a token that is not the valid one). */
  const caller = (req: Request) => {
    const auth = req.headers.get("authorization");
    if (auth === null) return "anonymous";
    return auth === `Bearer ${options.token}` ? "valid" : "invalid";
  };
  const canRead = (repo: FakeRepo, who: string) =>
    !repo.private || (who === "valid" && options.namespaces.includes(repo.name.split("/")[0]));
  const canWrite = (name: string) => !options.readOnly && options.namespaces.includes(name.split("/")[0]);

  /** The checks every write route makes: token, repo, write access, branch. */
  const writable = (req: Request, name: string, branch?: string): Response | FakeRepo => {
    const who = caller(req);
    if (who !== "valid") return hubError(401, "Invalid credentials in Authorization header");
    const repo = repos.get(name);
    if (!repo || !canRead(repo, who)) return hubError(404, "Repository not found", "RepoNotFound");
    if (!canWrite(name)) {
      return hubError(403, "Forbidden: pass `create_pr=1` as a query parameter to create a Pull Request");
    }
    if (branch !== undefined && !repo.branches.has(branch)) {
      return hubError(404, `Invalid rev id: ${branch}`, "RevisionNotFound");
    }
    return repo;
  };

  const routes: [FakeRoute, string, RegExp, (req: Request, m: RegExpMatchArray) => Promise<Response>][] = [
    ["info", "GET", /^\/api\/models\/([^/]+\/[^/]+)$/, (req, m) => {
      const who = caller(req);
      if (who === "invalid") {
        return Promise.resolve(hubError(401, "Invalid credentials in Authorization header"));
      }
      const repo = repos.get(m[1]);
      if (!repo || !canRead(repo, who)) {
        return Promise.resolve(
          hubError(who === "anonymous" ? 401 : 404, "Repository not found", "RepoNotFound"),
        );
      }
      const sha = repo.commits.findLast((c) => c.branch === "main")?.oid;
      return Promise.resolve(Response.json({ _id: repo.name, id: repo.name, private: repo.private, sha }));
    }],
    ["create", "POST", /^\/api\/repos\/create$/, async (req) => {
      const who = caller(req);
      if (who !== "valid") return hubError(401, "Invalid credentials in Authorization header");
      const body = await req.json() as {
        name?: string;
        organization?: string;
        type?: string;
        visibility?: string;
      };
      if (body.type !== "model" || !body.name || !body.organization) {
        return hubError(400, "Cannot create repo: expected a model with a name and an organization");
      }
      const name = `${body.organization}/${body.name}`;
      if (!canWrite(name)) {
        return hubError(
          403,
          `You don't have the rights to create a model under the namespace "${body.organization}"`,
        );
      }
      if (repos.has(name)) {
        return Response.json({ error: "You already created this model repo", url }, { status: 409 });
      }
      newRepo(name, body.visibility === "private");
      return Response.json({ url: `${url}/${name}`, name, id: name });
    }],
    ["preupload", "POST", /^\/api\/models\/([^/]+\/[^/]+)\/preupload\/([^/]+)$/, async (req, m) => {
      const repo = writable(req, m[1], decodeURIComponent(m[2]));
      if (repo instanceof Response) return repo;
      const body = await req.json() as { files: { path: string; size: number; sample: string }[] };
      return Response.json({
        files: body.files.map((f) => ({
          path: f.path,
          uploadMode: f.size >= lfsThreshold ? "lfs" : "regular",
        })),
      });
    }],
    ["lfs-batch", "POST", /^\/([^/]+\/[^/]+)\.git\/info\/lfs\/objects\/batch$/, async (req, m) => {
      const repo = writable(req, m[1]);
      if (repo instanceof Response) return repo;
      const body = await req.json() as {
        operation: string;
        transfers?: string[];
        objects: { oid: string; size: number }[];
      };
      if (body.operation !== "upload" || !body.transfers?.includes("basic")) {
        return hubError(400, "expected an upload with the basic transfer");
      }
      const chunk = options.multipartChunk;
      const storage = dropper?.url ?? url;
      const objects = body.objects.map(({ oid, size }) => {
        if (lfs.has(oid)) return { oid, size };
        if (chunk === undefined || size <= chunk) {
          return { oid, size, authenticated: true, actions: { upload: { href: `${storage}/_lfs/${oid}` } } };
        }
        const header: Record<string, string> = { chunk_size: String(chunk) };
        for (let n = 1; n <= Math.ceil(size / chunk); n++) {
          header[String(n).padStart(5, "0")] = `${storage}/_lfs/${oid}/part/${n}`;
        }
        return {
          oid,
          size,
          authenticated: true,
          actions: { upload: { href: `${storage}/_lfs/${oid}/complete`, header } },
        };
      });
      return Response.json({ transfer: "basic", objects }, {
        headers: { "Content-Type": "application/vnd.git-lfs+json" },
      });
    }],
    ["lfs-upload", "PUT", /^\/_lfs\/([0-9a-f]{64})$/, async (req, m) => {
      if (req.headers.get("content-length") === null) return lengthRequired();
      const bytes = new Uint8Array(await req.arrayBuffer());
      if (await sha256Hex(bytes) !== m[1]) {
        return hubError(400, "the uploaded content does not match its oid");
      }
      lfs.set(m[1], bytes);
      return new Response(null, { status: 200 });
    }],
    ["lfs-upload", "PUT", /^\/_lfs\/([0-9a-f]{64})\/part\/(\d+)$/, async (req, m) => {
      if (req.headers.get("content-length") === null) return lengthRequired();
      const bytes = new Uint8Array(await req.arrayBuffer());
      if (!parts.has(m[1])) parts.set(m[1], new Map());
      parts.get(m[1])!.set(Number(m[2]), bytes);
      return new Response(null, { status: 200, headers: { ETag: `"part-${m[2]}-${bytes.length}"` } });
    }],
    ["lfs-upload", "POST", /^\/_lfs\/([0-9a-f]{64})\/complete$/, async (req, m) => {
      const body = await req.json() as { oid: string; parts: { partNumber: number; etag: string }[] };
      const got = parts.get(m[1]) ?? new Map<number, Uint8Array>();
      const ordered: Uint8Array[] = [];
      for (const { partNumber, etag } of body.parts) {
        const part = got.get(partNumber);
        if (!part || etag !== `"part-${partNumber}-${part.length}"`) {
          return hubError(400, `part ${partNumber} is missing or its etag is wrong`);
        }
        ordered.push(part);
      }
      const bytes = concat(ordered);
      if (body.oid !== m[1] || await sha256Hex(bytes) !== m[1]) {
        return hubError(400, "the assembled content does not match its oid");
      }
      lfs.set(m[1], bytes);
      parts.delete(m[1]);
      return new Response(null, { status: 200 });
    }],
    ["commit", "POST", /^\/api\/models\/([^/]+\/[^/]+)\/commit\/([^/]+)$/, async (req, m) => {
      const branch = decodeURIComponent(m[2]);
      const repo = writable(req, m[1], branch);
      if (repo instanceof Response) return repo;
      const lines = (await req.text()).split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l));
      const header = lines.find((l) => l.key === "header")?.value as {
        summary?: string;
        description?: string;
      };
      if (!header?.summary) return hubError(400, "the commit has no header with a summary");
      const changes = new Map<string, FakeFile>();
      for (const { key, value } of lines) {
        if (key === "file") {
          if (value.encoding !== "base64") return hubError(400, `unexpected encoding ${value.encoding}`);
          const bytes = Uint8Array.from(atob(value.content), (c) => c.charCodeAt(0));
          changes.set(value.path, { bytes, sha256: await sha256Hex(bytes), lfs: false });
        } else if (key === "lfsFile") {
          const bytes = lfs.get(value.oid);
          if (!bytes || bytes.length !== value.size) {
            return hubError(
              422,
              `Your push was rejected because an LFS pointer pointed to a file that does not exist`,
            );
          }
          changes.set(value.path, { bytes, sha256: value.oid, lfs: true });
        } else if (key !== "header") {
          return hubError(400, `unexpected commit line ${key}`);
        }
      }
      const files = repo.branches.get(branch)!;
      for (const [path, file] of changes) files.set(path, file);
      const oid = randomOid();
      repo.commits.push({
        oid,
        branch,
        title: header.summary,
        description: header.description ?? "",
        paths: [...changes.keys()],
      });
      return Response.json({
        success: true,
        commitOid: oid,
        commitUrl: `${url}/${repo.name}/commit/${oid}`,
        hookOutput: "",
      });
    }],
  ];

  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const path = new URL(req.url).pathname;
    for (const [route, method, pattern, handle] of routes) {
      const m = path.match(pattern);
      if (!m || req.method !== method) continue;
      requests.push({ method: req.method, path, route, auth: req.headers.get("authorization") });
      if (options.fail?.route === route && "status" in options.fail) {
        await req.arrayBuffer();
        return hubError(
          options.fail.status,
          "Internal Error - We're working hard to fix this as soon as possible!",
        );
      }
      return await handle(req, m);
    }
    requests.push({ method: req.method, path, route: "other", auth: req.headers.get("authorization") });
    return hubError(404, `Not found: ${req.method} ${path}`);
  });
  url = `http://127.0.0.1:${server.addr.port}`;
  return {
    url,
    repos,
    requests,
    close: async () => {
      dropper?.close();
      await server.shutdown();
    },
  };
}

/** A TCP listener that closes each connection once the first bytes of a request arrive. */
function dropConnections(): { url: string; close(): void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  (async () => {
    for await (const conn of listener) {
      await conn.read(new Uint8Array(1024)).catch(() => null);
      conn.close();
    }
  })().catch(() => {});
  return { url: `http://127.0.0.1:${listener.addr.port}`, close: () => listener.close() };
}
