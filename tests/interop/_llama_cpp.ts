/**
 * llama.cpp as the consumer of lathe's GGUF files, for the interop tests: runs
 * `scripts/llama_cpp/probe.mjs` (node-llama-cpp's prebuilt CPU llama.cpp, pinned in
 * `scripts/llama_cpp/package.json`) with Node.js and returns its typed answer.
 *
 * ```ts
 * const available = await llamaCppAvailable();
 * Deno.test({ name: "…", ignore: !available.ok, fn: async () => {
 *   const { results: [meta, next] } = await llamaCpp({
 *     model, lora: null, contextSize: 256, threads: 1,
 *     tasks: [{ kind: "metadata" }, { kind: "logits", tokens: [1, 2, 3] }],
 *   });
 *   meta.tensorInfos.length; next.logprobs[0];
 * } });
 * ```
 *
 * The first {@link llamaCppAvailable} of a process installs the probe's npm packages when they are
 * missing or differ from the pins (`npm ci`, under an exclusive lock on the probe's package.json so
 * that test processes running side by side install once). Each {@link llamaCpp} call is one Node.js
 * process: about 1.3 s before the first task on an idle machine, 2–3 s on a busy one (Node.js start,
 * node-llama-cpp testing its prebuilt binary in a child process, ~0.1 s model load), then milliseconds
 * per task for tiny models.
 *
 * Logits: node-llama-cpp exposes only the softmax of the next-token logits, so the probe answers
 * log-softmax values (`logprobs`), not raw logits; see {@link LogitsResult}.
 * @module
 */
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The probe's directory: package.json, package-lock.json, probe.mjs, node_modules/. */
export const PROBE_DIR: string = fileURLToPath(new URL("../../scripts/llama_cpp/", import.meta.url));
const PROBE_SCRIPT = join(PROBE_DIR, "probe.mjs");
/** node-llama-cpp needs Node.js 20 or newer. */
const MIN_NODE_MAJOR = 20;
/** Longest an `npm ci` may take. */
const INSTALL_TIMEOUT_MS = 10 * 60_000;
/** Longest one probe run may take by default. */
const PROBE_TIMEOUT_MS = 5 * 60_000;

/** Whether the llama.cpp probe can run here, and why not when it cannot. */
export type LlamaCppAvailability = { ok: true } | { ok: false; reason: string };

/** Reads `metadata` and `tensorInfos` of the GGUF file (@huggingface/gguf's parse). */
export interface MetadataTask {
  kind: "metadata";
}
/** Tokenizes `text` with llama.cpp's tokenizer, never adding BOS/EOS. */
export interface TokenizeTask {
  kind: "tokenize";
  text: string;
  /** Parse special-token text (`<|im_start|>`) as the special token; default false. */
  special?: boolean;
}
/** Next-token log-probabilities after `tokens`, from an empty KV cache. */
export interface LogitsTask {
  kind: "logits";
  tokens: readonly number[];
}
/** `n` argmax tokens after `tokens` (no penalties, never stopping at EOS). */
export interface GreedyTask {
  kind: "greedy";
  tokens: readonly number[];
  n: number;
}
/** Summed next-token negative log-likelihood of each sequence, each from an empty KV cache. */
export interface PerplexityTask {
  kind: "perplexity";
  sequences: readonly (readonly number[])[];
}
/** One task of a {@link ProbeRequest}. */
export type ProbeTask = MetadataTask | TokenizeTask | LogitsTask | GreedyTask | PerplexityTask;

/** A GGUF metadata value as JSON carries it (64-bit integers past 2^53 as decimal strings). */
export type GgufJsonValue = string | number | boolean | GgufJsonValue[];

/** Answer to a {@link MetadataTask}. */
export interface MetadataResult {
  /** Header fields (`version`, `tensor_count`, `kv_count`) and every key/value pair. */
  metadata: Record<string, GgufJsonValue>;
  /** Tensors in file order; `shape` in ggml order (ne0 first), `dtype` the ggml type number. */
  tensorInfos: { name: string; shape: number[]; dtype: number }[];
}
/** Answer to a {@link TokenizeTask}. */
export interface TokenizeResult {
  /** llama.cpp's `common_tokenize(vocab, text, add_special = false, parse_special = special)`. */
  tokens: number[];
  /**
   * llama.cpp's `llama_vocab_get_add_bos` / `llama_vocab_get_add_eos`: what a llama.cpp front end adds
   * (`tokenizer.ggml.add_bos_token` / `add_eos_token`, else the vocabulary type's default).
   */
  addBos: boolean;
  addEos: boolean;
  /** node-llama-cpp's `shouldPrependBosToken`: `addBos` and the model has a BOS token. */
  shouldPrependBos: boolean;
  bos: number | null;
  eos: number | null;
}
/**
 * Answer to a {@link LogitsTask}: `logprobs[id]` = log-softmax of the next-token logits, in float64
 * from llama.cpp's float32 probabilities (null where the probability is 0 in float32, i.e. the
 * logit is ~87+ below the largest). Raw logits are not reachable through node-llama-cpp: it
 * returns `softmax(logits)` of the unmodified logits (greedy sampler chain), which loses the additive
 * constant; compare against lathe's log-softmax (equivalently, logit − logsumexp).
 */
export interface LogitsResult {
  logprobs: (number | null)[];
}
/** Answer to a {@link GreedyTask}: exactly `n` token ids. */
export interface GreedyResult {
  tokens: number[];
}
/** Answer to a {@link PerplexityTask}: Σ −ln p(x_t | x_<t) over t ≥ 1, and Σ (length − 1). */
export interface PerplexityResult {
  /** Natural log; null when some probability was 0 in float32. */
  nll: number | null;
  count: number;
}

/** The result type answering task type `T`. */
export type ProbeResult<T extends ProbeTask> = T extends MetadataTask ? MetadataResult
  : T extends TokenizeTask ? TokenizeResult
  : T extends LogitsTask ? LogitsResult
  : T extends GreedyTask ? GreedyResult
  : T extends PerplexityTask ? PerplexityResult
  : never;

/** What {@link llamaCpp} runs: one model (and LoRA), one context, the tasks in order. */
export interface ProbeRequest<T extends readonly ProbeTask[] = readonly ProbeTask[]> {
  /** The GGUF model file. */
  model: string;
  /** A llama.cpp LoRA GGUF applied to the context, or null. */
  lora: string | null;
  /** Scale the LoRA is applied at; default 1. */
  loraScale?: number;
  /**
   * Context size, also the batch size (a sequence up to it is one decode). llama.cpp rounds it up
   * to a multiple of 256. A task longer than the context fails the request.
   */
  contextSize: number;
  /**
   * CPU threads. Prefer 1 on a busy machine: ggml's threads wait for each other by spinning, and
   * with more threads than free cores a token can take 100× longer.
   */
  threads: number;
  /** KV cache type; default "F16" (llama.cpp's default). */
  kvCacheType?: "F16" | "F32";
  /** Flash attention; default false. */
  flashAttention?: boolean;
  tasks: T;
}

/** The probe's answer: one result per task, in task order. */
export interface ProbeResponse<T extends readonly ProbeTask[] = readonly ProbeTask[]> {
  ok: true;
  /** The llama.cpp release node-llama-cpp's binary was built from (`llama.llamaCppRelease`). */
  llamaCpp: string;
  llamaCppRepo: string;
  /** node-llama-cpp's version. */
  nodeLlamaCpp: string | null;
  /** Milliseconds inside the probe: loading llama.cpp, the model (and LoRA), each task. */
  timings: { llamaMs: number; modelMs: number; tasksMs: number[] };
  /** Milliseconds of the whole run as the caller saw it (Node.js start included). */
  wallMs: number;
  results: { -readonly [K in keyof T]: T[K] extends ProbeTask ? ProbeResult<T[K]> : never };
}

/** Output of a finished subprocess. */
interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `cmd args` in `cwd`; null when the program is not installed. */
async function run(
  cmd: string,
  args: string[],
  options: { cwd?: string; stdin?: string; timeoutMs: number },
): Promise<Ran | null> {
  const command = new Deno.Command(cmd, {
    args,
    cwd: options.cwd,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(options.timeoutMs),
  });
  let child: Deno.ChildProcess;
  try {
    child = command.spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    try {
      await writer.write(new TextEncoder().encode(options.stdin));
      await writer.close();
    } catch {
      // The child exited before reading its input; its output says why.
    }
  }
  const out = await child.output();
  const decoder = new TextDecoder();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** The last `n` characters of `text`, trimmed. */
function tail(text: string, n = 2000): string {
  const t = text.trim();
  return t.length > n ? `…${t.slice(-n)}` : t;
}

/** Reads a JSON file; null when it is missing or unreadable. */
async function readJson(path: string): Promise<Record<string, unknown> | null> {
  try {
    return JSON.parse(await Deno.readTextFile(path));
  } catch {
    return null;
  }
}

/** The pinned packages whose installed version differs from package.json (or is missing). */
async function stalePackages(): Promise<string[]> {
  const manifest = await readJson(join(PROBE_DIR, "package.json"));
  const deps = (manifest?.dependencies ?? {}) as Record<string, string>;
  const stale: string[] = [];
  for (const [name, version] of Object.entries(deps)) {
    const installed = await readJson(join(PROBE_DIR, "node_modules", name, "package.json"));
    if (installed?.version !== version) stale.push(name);
  }
  return stale;
}

/** Installs the probe's packages (npm ci, or npm install without a lockfile); a reason on failure. */
async function install(): Promise<string | null> {
  const flags = ["--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund"];
  let hasLock = true;
  try {
    await Deno.stat(join(PROBE_DIR, "package-lock.json"));
  } catch {
    hasLock = false;
  }
  const verb = hasLock ? "ci" : "install";
  const npm = await findOnPath("npm");
  if (npm === null) return "npm is not installed (needed once to install scripts/llama_cpp's packages)";
  let ran: Ran | null;
  try {
    ran = await run(npm, [verb, ...flags], { cwd: PROBE_DIR, timeoutMs: INSTALL_TIMEOUT_MS });
  } catch (error) {
    return `npm ${verb} failed: ${(error as Error).message}`;
  }
  if (ran === null) return "npm is not installed (needed once to install scripts/llama_cpp's packages)";
  if (ran.code !== 0) return `npm ${verb} failed in ${PROBE_DIR}: ${tail(ran.stderr || ran.stdout, 1000)}`;
  const stale = await stalePackages();
  if (stale.length > 0) return `npm ${verb} did not install ${stale.join(", ")} at the pinned versions`;
  return null;
}

/** The program `name` on PATH, as an absolute path; null when none. */
async function findOnPath(name: string): Promise<string | null> {
  const windows = Deno.build.os === "windows";
  const dirs = (Deno.env.get("PATH") ?? "").split(windows ? ";" : ":").filter((d) => d !== "");
  const names = windows ? [`${name}.exe`, `${name}.cmd`, name] : [name];
  for (const dir of dirs) {
    for (const n of names) {
      const path = resolve(dir, n);
      try {
        const stat = await Deno.stat(path);
        if (stat.isFile && (windows || stat.mode === null || (stat.mode & 0o111) !== 0)) return path;
      } catch {
        // Not in this directory.
      }
    }
  }
  return null;
}

/** The checked Node.js, once {@link llamaCppAvailable} said yes. */
let nodePath: string | null = null;

async function checkAvailable(): Promise<LlamaCppAvailability> {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") {
    return {
      ok: false,
      reason:
        `the pinned llama.cpp binaries (@node-llama-cpp/linux-x64) do not run on ${Deno.build.os}-${Deno.build.arch}`,
    };
  }
  const node = await findOnPath("node");
  if (node === null) return { ok: false, reason: "Node.js is not installed (no node on PATH)" };
  let version: Ran | null;
  try {
    version = await run(node, ["--version"], { timeoutMs: 30_000 });
  } catch (error) {
    return { ok: false, reason: `Node.js (${node}) does not run: ${(error as Error).message}` };
  }
  if (version?.stdout.startsWith("deno ")) {
    // Deno puts a `node` that is Deno itself on a subprocess's PATH when Node.js is missing.
    return { ok: false, reason: `Node.js is not installed (the node on PATH, ${node}, is Deno's shim)` };
  }
  const major = Number(version?.stdout.trim().match(/^v(\d+)\./)?.[1]);
  if (version === null || version.code !== 0 || !Number.isFinite(major)) {
    return {
      ok: false,
      reason: `Node.js (${node}) does not run: ${tail(version?.stderr || version?.stdout || "", 500)}`,
    };
  }
  if (major < MIN_NODE_MAJOR) {
    return {
      ok: false,
      reason: `Node.js ${version.stdout.trim()} is too old (node-llama-cpp needs ${MIN_NODE_MAJOR}+)`,
    };
  }
  const ready = async (): Promise<LlamaCppAvailability> => {
    if ((await stalePackages()).length > 0) {
      // Test processes run side by side: one installs, the others wait for it and then find the packages.
      using lock = await Deno.open(join(PROBE_DIR, "package.json"), { read: true });
      await lock.lock(true);
      try {
        if ((await stalePackages()).length > 0) {
          const reason = await install();
          if (reason !== null) return { ok: false, reason };
        }
      } finally {
        await lock.unlock();
      }
    }
    return { ok: true };
  };
  const answer = await ready();
  if (answer.ok) nodePath = node;
  return answer;
}

let availability: Promise<LlamaCppAvailability> | null = null;

/**
 * Whether the llama.cpp probe can run: Linux x86-64, Node.js 20+ on PATH, and the pinned npm
 * packages in `scripts/llama_cpp/node_modules` (installed here with `npm ci` when missing). The
 * answer is memoised for the process.
 */
export function llamaCppAvailable(): Promise<LlamaCppAvailability> {
  availability ??= checkAvailable();
  return availability;
}

/**
 * Runs `request` through llama.cpp (`node scripts/llama_cpp/probe.mjs`) and returns the probe's
 * answer, with one typed result per task. Relative model and LoRA paths are resolved against the
 * current directory. Throws when llama.cpp is not available, or with the probe's error and stderr
 * when it fails (a bad request, an unreadable or unsupported model, an invalid token, …).
 */
export async function llamaCpp<const T extends readonly ProbeTask[]>(
  request: ProbeRequest<T>,
  options: { timeoutMs?: number } = {},
): Promise<ProbeResponse<T>> {
  const available = await llamaCppAvailable();
  if (!available.ok) throw new Error(`llama.cpp probe is not available: ${available.reason}`);
  const body = {
    ...request,
    model: resolve(request.model),
    lora: request.lora === null ? null : resolve(request.lora),
  };
  const start = performance.now();
  const ran = await run(nodePath!, [PROBE_SCRIPT], {
    stdin: JSON.stringify(body),
    timeoutMs: options.timeoutMs ?? PROBE_TIMEOUT_MS,
  });
  const wallMs = performance.now() - start;
  if (ran === null) throw new Error(`llama.cpp probe: Node.js (${nodePath}) is gone`);
  let answer: { ok?: boolean; error?: string } | null = null;
  try {
    answer = JSON.parse(ran.stdout);
  } catch {
    // Reported below with the exit status and stderr.
  }
  if (ran.code !== 0 || answer?.ok !== true) {
    const timeoutMs = options.timeoutMs ?? PROBE_TIMEOUT_MS;
    const why = answer?.error ??
      (wallMs >= timeoutMs
        ? `killed after ${timeoutMs} ms (timeoutMs)`
        : `exit status ${ran.code}, no answer on stdout`);
    throw new Error(
      `llama.cpp probe failed: ${why}${ran.stderr.trim() ? `\n--- stderr ---\n${tail(ran.stderr)}` : ""}`,
    );
  }
  return { ...(answer as ProbeResponse<T>), wallMs };
}
