/**
 * Private launch helpers of the loss, optimizer and LoRA ops: spreading a 1-D workgroup count
 * over x and y, and pairing the row chunks of two tensors that are split differently.
 * @module
 */
import type { Gpu } from "../device.ts";
import type { Tensor } from "../tensor.ts";

/**
 * Workgroups for `count` linear workgroup ids: x up to the per-dimension limit, then y. A
 * kernel recovers the id as `wg.y·nwg.x + wg.x` and returns when it is ≥ count (the last row
 * of a 2-D grid may hold a few extra workgroups).
 */
export function grid(gpu: Gpu, count: number): [number, number] {
  const max = gpu.limits.maxComputeWorkgroupsPerDimension;
  if (count <= max) return [count, 1];
  const y = Math.ceil(count / max);
  return [Math.ceil(count / y), y];
}

/** A row range that lies in one chunk of each of two tensors. */
export interface ChunkPair {
  /** First row of the range (in tensor rows). */
  row: number;
  /** Rows in the range. */
  rows: number;
  /** The chunk buffer of the first tensor and the range's first element in it. */
  a: GPUBuffer;
  aOffset: number;
  /** The chunk buffer of the second tensor and the range's first element in it. */
  b: GPUBuffer;
  bOffset: number;
}

/**
 * Splits the rows of two tensors with the same row count at every chunk boundary of either,
 * so each range lies in one buffer of each (offsets in elements: row · rowSize).
 */
export function chunkPairs(a: Tensor, b: Tensor): ChunkPair[] {
  const cuts = new Set([0, a.rows]);
  for (const c of a.chunks) cuts.add(c.rowStart);
  for (const c of b.chunks) cuts.add(c.rowStart);
  const sorted = [...cuts].sort((x, y) => x - y);
  const out: ChunkPair[] = [];
  for (let i = 0; i + 1 < sorted.length; i++) {
    const row = sorted[i];
    const rows = sorted[i + 1] - row;
    if (rows === 0) continue;
    const ca = a.chunks.find((c) => row >= c.rowStart && row < c.rowStart + c.rows)!;
    const cb = b.chunks.find((c) => row >= c.rowStart && row < c.rowStart + c.rows)!;
    out.push({
      row,
      rows,
      a: ca.buffer,
      aOffset: (row - ca.rowStart) * a.rowSize,
      b: cb.buffer,
      bOffset: (row - cb.rowStart) * b.rowSize,
    });
  }
  return out;
}
