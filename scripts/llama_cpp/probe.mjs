#!/usr/bin/env node
/**
 * llama.cpp (through node-llama-cpp's prebuilt CPU binaries) as the consumer of a GGUF file lathe
 * wrote: reads one JSON request on stdin, runs its tasks against the model, writes one JSON
 * response on stdout.
 *
 *   node scripts/llama_cpp/probe.mjs < request.json > response.json
 *
 * Request:
 *   {
 *     "model": "/abs/model.gguf",
 *     "lora": "/abs/lora.gguf" | null,     // a llama.cpp LoRA GGUF, applied to the context
 *     "loraScale": 1,                        // optional, default 1
 *     "contextSize": 256,                    // also the batch size: a sequence up to it is one decode
 *     "threads": 2,
 *     "kvCacheType": "F16" | "F32",          // optional, default "F16" (llama.cpp's default)
 *     "flashAttention": false,               // optional, default false
 *     "tasks": [ ... ]
 *   }
 *
 * Tasks and their results (one result per task, in order):
 *   {"kind": "metadata"}
 *     → {"metadata": {...}, "tensorInfos": [{"name", "shape": [ne0, ne1, ...], "dtype": ggml type}]}
 *       (@huggingface/gguf's parse; 64-bit integers become numbers, or decimal strings past 2^53)
 *   {"kind": "tokenize", "text": "...", "special": true}
 *     → {"tokens": [...], "addBos": bool, "addEos": bool, "shouldPrependBos": bool, "bos": id|null, "eos": id|null}
 *       `tokens` is llama.cpp's `common_tokenize(vocab, text, add_special = false, parse_special = special)`:
 *       never a BOS/EOS added. `addBos` / `addEos` are llama.cpp's `llama_vocab_get_add_bos` /
 *       `_add_eos` (from `tokenizer.ggml.add_bos_token` / `add_eos_token`, else the vocabulary type's
 *       default); `shouldPrependBos` is node-llama-cpp's `shouldPrependBosToken` (addBos and a BOS exists).
 *   {"kind": "logits", "tokens": [...]}
 *     → {"logprobs": [V numbers | null]}: log-softmax of the next-token logits after the whole
 *       sequence, indexed by token id (null where the probability underflowed float32 to 0).
 *       node-llama-cpp 3.21.1 exposes no raw logits, only the softmax of the unmodified logits
 *       (greedy sampler chain: no temperature, penalties or bias). Softmax drops the additive
 *       constant, so raw logits are not recoverable; compare log-softmax on both sides.
 *   {"kind": "greedy", "tokens": [...], "n": 16}
 *     → {"tokens": [n ids]}: argmax decoding (temperature 0, no penalties), never stopping early.
 *   {"kind": "perplexity", "sequences": [[...], ...]}
 *     → {"nll": Σ −ln p(x_t | x_<t) over t ≥ 1 of every sequence, "count": Σ (len − 1)}
 *
 * Every evaluating task starts from an empty KV cache (the sequence's history is cleared), and
 * evaluates its whole input as one batch. Sequences longer than the context fail the request
 * (no context shift).
 *
 * Response: {"ok": true, "llamaCpp": "<release>", "llamaCppRepo": "...", "nodeLlamaCpp": "...",
 *            "timings": {...ms}, "results": [...]}
 *   or, on any failure, {"ok": false, "error": "..."} and exit status 1.
 */
import { readFileSync } from "node:fs";

/** Reads all of stdin as text. */
async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

/** Throws a request error unless `cond`. */
function check(cond, message) {
  if (!cond) throw new Error(`bad request: ${message}`);
}

function isTokenArray(value) {
  return Array.isArray(value) && value.every((t) => Number.isInteger(t) && t >= 0);
}

/** Checks the request's shape; returns it with defaults filled in. */
function parseRequest(text) {
  let req;
  try {
    req = JSON.parse(text);
  } catch (error) {
    throw new Error(`bad request: stdin is not JSON (${error.message})`);
  }
  check(req !== null && typeof req === "object", "not an object");
  check(typeof req.model === "string" && req.model.length > 0, '"model" must be a path');
  check(req.lora == null || typeof req.lora === "string", '"lora" must be a path or null');
  const loraScale = req.loraScale ?? 1;
  check(typeof loraScale === "number" && Number.isFinite(loraScale), '"loraScale" must be a number');
  const contextSize = req.contextSize ?? 256;
  check(Number.isInteger(contextSize) && contextSize > 0, '"contextSize" must be a positive integer');
  const threads = req.threads ?? 2;
  check(Number.isInteger(threads) && threads > 0, '"threads" must be a positive integer');
  const kvCacheType = req.kvCacheType ?? "F16";
  check(kvCacheType === "F16" || kvCacheType === "F32", '"kvCacheType" must be "F16" or "F32"');
  const flashAttention = req.flashAttention ?? false;
  check(typeof flashAttention === "boolean", '"flashAttention" must be a boolean');
  check(Array.isArray(req.tasks), '"tasks" must be an array');
  req.tasks.forEach((task, i) => {
    const where = `tasks[${i}]`;
    check(task !== null && typeof task === "object", `${where} is not an object`);
    switch (task.kind) {
      case "metadata":
        break;
      case "tokenize":
        check(typeof task.text === "string", `${where}.text must be a string`);
        check(
          task.special === undefined || typeof task.special === "boolean",
          `${where}.special must be a boolean`,
        );
        break;
      case "logits":
        check(
          isTokenArray(task.tokens) && task.tokens.length > 0,
          `${where}.tokens must be a non-empty id array`,
        );
        break;
      case "greedy":
        check(
          isTokenArray(task.tokens) && task.tokens.length > 0,
          `${where}.tokens must be a non-empty id array`,
        );
        check(Number.isInteger(task.n) && task.n >= 0, `${where}.n must be a non-negative integer`);
        break;
      case "perplexity":
        check(
          Array.isArray(task.sequences) && task.sequences.every((s) => isTokenArray(s)),
          `${where}.sequences must be an array of id arrays`,
        );
        break;
      default:
        throw new Error(
          `bad request: ${where}.kind "${task.kind}" is not one of metadata, tokenize, logits, greedy, perplexity`,
        );
    }
  });
  return { ...req, lora: req.lora ?? null, loraScale, contextSize, threads, kvCacheType, flashAttention };
}

/** JSON-safe copy of a @huggingface/gguf value: bigints become numbers (or strings past 2^53). */
function plain(value) {
  if (typeof value === "bigint") {
    return value <= BigInt(Number.MAX_SAFE_INTEGER) && value >= BigInt(Number.MIN_SAFE_INTEGER)
      ? Number(value)
      : value.toString();
  }
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

/** The version of an installed package beside this script (null when unreadable). */
function packageVersion(name) {
  try {
    return JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), "utf8"))
      .version;
  } catch {
    return null;
  }
}

/** Number → JSON number, non-finite → null. */
function finiteOrNull(x) {
  return Number.isFinite(x) ? x : null;
}

/** The `metadata` task: @huggingface/gguf's parse of the file. */
async function metadataTask(path) {
  const { gguf } = await import("@huggingface/gguf");
  const parsed = await gguf(path, { allowLocalFile: true });
  return {
    metadata: plain(parsed.metadata),
    tensorInfos: parsed.tensorInfos.map((t) => ({
      name: t.name,
      shape: t.shape.map((d) => Number(d)),
      dtype: t.dtype,
    })),
  };
}

/** Loads llama.cpp's CPU build. */
async function openLlama(req) {
  const { getLlama } = await import("node-llama-cpp");
  return await getLlama({
    gpu: false,
    build: "never",
    logLevel: "error",
    progressLogs: false,
    maxThreads: req.threads,
  });
}

/** Loads the model and one context (with the LoRA, when given). */
async function openModel(llama, req) {
  const { GgmlType } = await import("node-llama-cpp");
  const model = await llama.loadModel({ modelPath: req.model, gpuLayers: 0, useMmap: true });
  const context = await model.createContext({
    contextSize: req.contextSize,
    batchSize: req.contextSize,
    sequences: 1,
    threads: { ideal: req.threads, min: req.threads },
    flashAttention: req.flashAttention,
    experimentalKvCacheKeyType: GgmlType[req.kvCacheType],
    experimentalKvCacheValueType: GgmlType[req.kvCacheType],
    ...(req.lora === null ? {} : { lora: { adapters: [{ filePath: req.lora, scale: req.loraScale }] } }),
  });
  const sequence = context.getSequence();
  return { model, context, sequence };
}

/** Sampling options of every next-token query: the greedy chain, which leaves the logits as they are. */
const GREEDY = { temperature: 0 };

/** Fails unless `length` tokens fit the context (node-llama-cpp would otherwise shift it silently). */
function checkFits(session, length, where) {
  const size = session.context.contextSize;
  if (length > size) throw new Error(`${where}: ${length} tokens do not fit the context of ${size}`);
}

/** Empties the sequence's KV cache and history. */
async function fresh(session) {
  await session.sequence.clearHistory();
}

/** Log-softmax vector (indexed by token id) from node-llama-cpp's probability map (one entry per vocabulary token). */
function logprobsOf(probabilities) {
  let size = probabilities.size;
  for (const token of probabilities.keys()) size = Math.max(size, token + 1);
  const out = new Array(size).fill(null);
  for (const [token, p] of probabilities) out[token] = finiteOrNull(Math.log(p));
  return out;
}

async function logitsTask(session, task, where) {
  checkFits(session, task.tokens.length, where);
  await fresh(session);
  const last = task.tokens.length - 1;
  const input = task.tokens.map((t, i) =>
    i === last ? [t, { generateNext: { probabilities: true, options: GREEDY } }] : t
  );
  const out = await session.sequence.controlledEvaluate(input);
  const probabilities = out[last]?.next?.probabilities;
  if (probabilities == null) throw new Error(`${where}: llama.cpp returned no probabilities`);
  return { logprobs: logprobsOf(probabilities) };
}

async function greedyTask(session, task, where) {
  checkFits(session, task.tokens.length + task.n, where);
  await fresh(session);
  const tokens = [];
  if (task.n === 0) return { tokens };
  const ask = { generateNext: { token: true, options: GREEDY } };
  const last = task.tokens.length - 1;
  let out = await session.sequence.controlledEvaluate(task.tokens.map((t, i) => i === last ? [t, ask] : t));
  let next = out[last]?.next?.token;
  while (true) {
    if (next == null) throw new Error(`${where}: llama.cpp sampled no token after ${tokens.length}`);
    tokens.push(next);
    if (tokens.length === task.n) break;
    out = await session.sequence.controlledEvaluate([[next, ask]]);
    next = out[0]?.next?.token;
  }
  return { tokens };
}

async function perplexityTask(session, task, where) {
  let nll = 0;
  let count = 0;
  for (const [s, seq] of task.sequences.entries()) {
    if (seq.length < 2) continue;
    checkFits(session, seq.length, `${where}.sequences[${s}]`);
    await fresh(session);
    const ask = { generateNext: { probabilities: true, options: GREEDY } };
    const out = await session.sequence.controlledEvaluate(
      seq.map((t, i) => i < seq.length - 1 ? [t, ask] : t),
    );
    for (let i = 0; i < seq.length - 1; i++) {
      const probabilities = out[i]?.next?.probabilities;
      if (probabilities == null) {
        throw new Error(`${where}.sequences[${s}]: no probabilities at position ${i}`);
      }
      const p = probabilities.get(seq[i + 1]) ?? 0;
      nll -= Math.log(p);
      count++;
    }
  }
  return { nll: finiteOrNull(nll), count };
}

async function main() {
  const req = parseRequest(await readStdin());
  const timings = { llamaMs: 0, modelMs: 0, tasksMs: [] };
  let t0 = performance.now();
  const llama = await openLlama(req);
  timings.llamaMs = performance.now() - t0;
  let session = null;
  const results = [];
  try {
    if (req.tasks.some((t) => t.kind !== "metadata")) {
      t0 = performance.now();
      session = await openModel(llama, req);
      timings.modelMs = performance.now() - t0;
    }
    for (const [i, task] of req.tasks.entries()) {
      const where = `tasks[${i}] (${task.kind})`;
      t0 = performance.now();
      switch (task.kind) {
        case "metadata":
          results.push(await metadataTask(req.model));
          break;
        case "tokenize": {
          const tokens = session.model.tokenize(task.text, task.special ?? false);
          const t = session.model.tokens;
          // The addon's own answers are llama_vocab_get_add_bos / _add_eos (node-llama-cpp's public
          // shouldAppendEosToken also requires a BOS token, so it is not used).
          const addon = session.model._model;
          results.push({
            tokens: Array.from(tokens),
            addBos: addon.shouldPrependBosToken(),
            addEos: addon.shouldAppendEosToken(),
            shouldPrependBos: t.shouldPrependBosToken,
            bos: t.bos ?? null,
            eos: t.eos ?? null,
          });
          break;
        }
        case "logits":
          results.push(await logitsTask(session, task, where));
          break;
        case "greedy":
          results.push(await greedyTask(session, task, where));
          break;
        case "perplexity":
          results.push(await perplexityTask(session, task, where));
          break;
      }
      timings.tasksMs.push(performance.now() - t0);
    }
    return {
      ok: true,
      llamaCpp: llama.llamaCppRelease.release,
      llamaCppRepo: llama.llamaCppRelease.repo,
      nodeLlamaCpp: packageVersion("node-llama-cpp"),
      timings,
      results,
    };
  } finally {
    if (session !== null) {
      await session.context.dispose();
      await session.model.dispose();
    }
    await llama.dispose();
  }
}

try {
  const response = await main();
  process.stdout.write(JSON.stringify(response) + "\n");
} catch (error) {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.stdout.write(JSON.stringify({ ok: false, error: String(error?.message ?? error) }) + "\n");
  process.exitCode = 1;
}
