/**
 * Worker of formats/gguf_quant_pool.ts: quantizes the rows it is sent.
 * Message in: `{ id, type, values: Float32Array, rowLength }`; out: `{ id, bytes }` (transferred) or
 * `{ id, error }`; `{ ready: true }` once loaded.
 * @module
 */
/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />
import { type GgmlTypeName, quantize } from "./gguf_quants.ts";

self.onmessage = (
  e: MessageEvent<{ id: number; type: GgmlTypeName; values: Float32Array; rowLength: number }>,
) => {
  const { id, type, values, rowLength } = e.data;
  try {
    const bytes = quantize(type, values, rowLength);
    self.postMessage({ id, bytes }, [bytes.buffer as ArrayBuffer]);
  } catch (error) {
    self.postMessage({ id, error: (error as Error).message });
  }
};

// Loaded: the pool waits for this before sending work.
self.postMessage({ ready: true });
