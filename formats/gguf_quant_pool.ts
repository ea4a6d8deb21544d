/**
 * GGUF block quantization on every core: a tensor's rows split into contiguous ranges, each range
 * quantized by a worker (formats/gguf_quant_worker.ts, which runs formats/gguf_quants.ts `quantize`),
 * the encoded ranges concatenated in order. Rows are independent, so the bytes equal a single-thread
 * `quantize` of the whole tensor. The K-quants cost ~100–200 ns a value in JavaScript (a 7B model is
 * 7·10⁹ values), so a llama.cpp-sized export needs the cores as llama-quantize uses them.
 * @module
 */
import { ggmlBlock, type GgmlTypeName, quantize } from "./gguf_quants.ts";

/** Below this many values a tensor is quantized on the calling thread (posting costs more). */
const MIN_PARALLEL_VALUES = 1 << 18;

interface Job {
  resolve: (bytes: Uint8Array) => void;
  reject: (error: Error) => void;
}

/** A pool of quantization workers; dispose it to end them. */
export class QuantizePool implements Disposable {
  #workers: Worker[] = [];
  #jobs = new Map<number, Job>();
  #next = 0;
  #started: Promise<void> | null = null;
  size: number;

  /** `size` workers (default: the machine's cores); 1 quantizes on the calling thread. */
  constructor(size = navigator.hardwareConcurrency || 1) {
    this.size = Math.max(1, size);
  }

  /**
   * Starts the workers and waits for each to say it is ready. Where the worker module cannot load
   * (a bundled build has no worker file beside it), the pool quantizes on the calling thread.
   */
  #start(): Promise<void> {
    this.#started ??= (async () => {
      const url = new URL("./gguf_quant_worker.ts", import.meta.url);
      const workers = Array.from({ length: this.size }, () => new Worker(url.href, { type: "module" }));
      try {
        await Promise.all(workers.map((w) =>
          new Promise<void>((resolve, reject) => {
            w.onmessage = () => resolve();
            w.onerror = (e) => {
              e.preventDefault();
              reject(new Error(e.message));
            };
          })
        ));
      } catch (error) {
        for (const w of workers) w.terminate();
        console.warn(
          `[gguf] quantizing on one thread: the workers did not start (${(error as Error).message})`,
        );
        this.size = 1;
        return;
      }
      for (const w of workers) {
        w.onmessage = (e: MessageEvent<{ id: number; bytes?: Uint8Array; error?: string }>) => {
          const job = this.#jobs.get(e.data.id)!;
          this.#jobs.delete(e.data.id);
          if (e.data.error !== undefined) job.reject(new Error(e.data.error));
          else job.resolve(e.data.bytes!);
        };
        w.onerror = (e) => {
          e.preventDefault();
          for (const job of this.#jobs.values()) {
            job.reject(new Error(`quantization worker failed: ${e.message}`));
          }
          this.#jobs.clear();
        };
      }
      this.#workers = workers;
    })();
    return this.#started;
  }

  /** `quantize(type, values, rowLength)`, the rows spread over the workers. */
  async quantize(type: GgmlTypeName, values: Float32Array, rowLength: number): Promise<Uint8Array> {
    const rows = values.length / rowLength;
    if (this.size === 1 || values.length < MIN_PARALLEL_VALUES || rows < 2) {
      return quantize(type, values, rowLength);
    }
    await this.#start();
    if (this.size === 1) return quantize(type, values, rowLength);
    const { blockSize, typeSize } = ggmlBlock(type);
    const rowBytes = (rowLength / blockSize) * typeSize;
    const parts = Math.min(this.#workers.length, rows);
    const out = new Uint8Array(rows * rowBytes);
    const pending: Promise<void>[] = [];
    for (let p = 0; p < parts; p++) {
      const r0 = Math.floor((p * rows) / parts), r1 = Math.floor(((p + 1) * rows) / parts);
      const chunk = values.slice(r0 * rowLength, r1 * rowLength);
      const id = this.#next++;
      pending.push(
        new Promise<Uint8Array>((resolve, reject) => {
          this.#jobs.set(id, { resolve, reject });
          this.#workers[p].postMessage({ id, type, values: chunk, rowLength }, [chunk.buffer as ArrayBuffer]);
        }).then((bytes) => out.set(bytes, r0 * rowBytes)),
      );
    }
    await Promise.all(pending);
    return out;
  }

  [Symbol.dispose](): void {
    for (const w of this.#workers) w.terminate();
    this.#workers = [];
  }
}
