/**
 * A pool of tokenize workers (worker.ts). Chunks go to whichever worker is free, at most
 * {@link IN_FLIGHT} per worker; results come back to the caller strictly in chunk order, so
 * everything downstream (packing, shards) is independent of the number of workers.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";
import type { Chunk, ChunkResult } from "./chunk.ts";
import { byteLevelModelOf } from "./encoder.ts";
import { type LoadedTokenizer, loadTokenizer, tokenizerFacts } from "./tokenizer.ts";
import type { WorkerInit, WorkerReply } from "./worker.ts";

/** Chunks queued per worker, so a worker never waits for the main thread. */
export const IN_FLIGHT = 2;

/** How to set up the workers. */
export type PoolInit = Omit<WorkerInit, "type" | "prepared"> & {
  /** The tokenizer of `tokenizerDir`, when the caller has loaded it already. */
  loaded?: LoadedTokenizer;
};

/** Turns a worker's error reply into the error to throw. */
function toError(reply: Extract<WorkerReply, { type: "error" }>): Error {
  if (reply.user) return new LatheError(reply.message, { hint: reply.hint });
  const error = new Error(`tokenize worker failed: ${reply.message}`);
  if (reply.stack) error.stack = reply.stack;
  return error;
}

/** Started workers, ready to tokenize. */
export class WorkerPool {
  #workers: Worker[];
  /** Next job id; ids are unique across runs, so replies of a failed run's jobs are ignored. */
  #nextJob = 0;
  #busy: Map<Worker, number>;
  /** True when the workers use the byte-level fast path. */
  readonly fast: boolean;

  private constructor(workers: Worker[], fast: boolean) {
    this.#workers = workers;
    this.#busy = new Map(workers.map((w) => [w, 0]));
    this.fast = fast;
  }

  /**
   * Starts `n` workers and waits until each is ready. The tokenizer is loaded once, here: for the
   * byte-level fast path the workers get its tables (shared memory, not copied) and the facts
   * they need; otherwise each worker loads it.
   */
  static async start(n: number, init: PoolInit): Promise<WorkerPool> {
    const { loaded: given, ...options } = init;
    const url = new URL("./worker.ts", import.meta.url);
    // The workers load their modules while this thread loads the tokenizer.
    const workers = Array.from({ length: n }, () => new Worker(url.href, { type: "module" }));
    try {
      const ready = workers.map((w) =>
        new Promise<boolean>((resolve, reject) => {
          w.onmessage = (e: MessageEvent<WorkerReply>) => {
            if (e.data.type === "ready") resolve(e.data.fast);
            else if (e.data.type === "error") reject(toError(e.data));
          };
          w.onerror = (e) => {
            e.preventDefault();
            reject(new Error(`tokenize worker failed to start: ${e.message}`));
          };
        })
      );
      // A worker that fails before it is sent its init must not leave a rejection unobserved.
      for (const r of ready) r.catch(() => {});
      const loaded = given ?? await loadTokenizer(options.tokenizerDir);
      const model = byteLevelModelOf(loaded);
      const message: WorkerInit = {
        type: "init",
        ...options,
        prepared: typeof model === "string" ? null : { model, facts: tokenizerFacts(loaded) },
      };
      for (const w of workers) w.postMessage(message);
      const fast = await Promise.all(ready);
      return new WorkerPool(workers, fast.every((f) => f));
    } catch (error) {
      for (const w of workers) w.terminate();
      throw error;
    }
  }

  /**
   * Tokenizes every chunk of `chunks`; `onResult` sees the results in chunk order (it may be
   * async; the next result waits for it).
   */
  async run(
    chunks: AsyncIterable<Omit<Chunk, "id">>,
    onResult: (result: ChunkResult) => void | Promise<void>,
  ): Promise<void> {
    const iterator = chunks[Symbol.asyncIterator]();
    const done = new Map<number, ChunkResult>();
    const firstId = this.#nextJob;
    let nextOut = firstId;
    let exhausted = false;
    let failure: Error | null = null;
    let wake: (() => void) | null = null;
    const signal = () => {
      const w = wake;
      wake = null;
      w?.();
    };
    const busy = this.#busy;
    for (const w of this.#workers) {
      w.onmessage = (e: MessageEvent<WorkerReply>) => {
        busy.set(w, busy.get(w)! - 1);
        const id = e.data.type === "ready" ? null : e.data.id;
        if (id === null || id < firstId) return signal(); // a reply to an earlier, failed run
        if (e.data.type === "result") done.set(e.data.id, e.data);
        else if (e.data.type === "error") failure ??= toError(e.data);
        signal();
      };
      w.onerror = (e) => {
        e.preventDefault();
        failure ??= new Error(`tokenize worker crashed: ${e.message}`);
        signal();
      };
    }
    while (true) {
      if (failure) throw failure;
      // Feed free workers.
      let fed = false;
      for (const w of this.#workers) {
        while (!exhausted && busy.get(w)! < IN_FLIGHT) {
          const next = await iterator.next();
          if (next.done) {
            exhausted = true;
            break;
          }
          busy.set(w, busy.get(w)! + 1);
          w.postMessage({ type: "job", id: this.#nextJob++, ...next.value });
          fed = true;
        }
      }
      // Deliver results in order.
      while (done.has(nextOut)) {
        const r = done.get(nextOut)!;
        done.delete(nextOut++);
        await onResult(r);
      }
      if (exhausted && nextOut === this.#nextJob) return;
      if (!fed && !done.has(nextOut) && !failure) await new Promise<void>((resolve) => (wake = resolve));
    }
  }

  /** Stops the workers. */
  close(): void {
    for (const w of this.#workers) w.terminate();
  }
}
