/**
 * From token shards to training micro-batches: a split held in memory, the seeded row order
 * of each epoch, and {@link Batch} objects with next-token targets, per-document positions
 * and document ids.
 *
 * B = rows, S = tokens per row. For row b, token t of document d = [start, end):
 *   target[b,t]   = tokens[b,t+1]  when t+1 < end and mask[b,t+1] = 1, else −100
 *   position[b,t] = t − start
 *   doc[b,t]      = d
 * Padding (after the row's last document, and up to S when rows of one batch differ in length)
 * is one more document of its own: positions count from 0, targets are −100, tokens are pad_id.
 * @module
 */
import { Pcg32 } from "../../foundation/random.ts";
import type { Batch } from "../../kernels/models/trainable.ts";
import { LatheError } from "../../foundation/errors.ts";
import { type ShardIndex, ShardReader, type ShardRow } from "../tokenize/shards.ts";

/** The ignore index of the loss. */
export const IGNORE = -100;

/**
 * PCG32 stream of epoch e's shuffle is SHUFFLE_STREAM + e; distinct from the adapter-init
 * streams (layer·7 + projection < 2³²) and the dropout streams.
 */
export const SHUFFLE_STREAM = 2 ** 40;

/** A split in memory. */
export interface Split {
  readonly index: ShardIndex;
  /** Every row, in stored order (views into the loaded shard arrays). */
  readonly rows: readonly ShardRow[];
}

/**
 * Loads every row of the split at `indexPath` (the token, mask and bounds arrays of all
 * shards are held in memory; rows are views into them).
 */
export async function loadSplit(indexPath: string): Promise<Split> {
  const reader = await ShardReader.open(indexPath);
  const rows: ShardRow[] = [];
  for (let k = 0; k < reader.index.shards.length; k++) {
    const data = await reader.shard(k);
    for (let r = 0; r < data.entry.rows; r++) rows.push(ShardReader.row(data, r));
  }
  if (rows.length !== reader.index.rows) {
    throw new LatheError(
      `Cannot read shards "${indexPath}": the index counts ${reader.index.rows} rows, the shards hold ${rows.length}`,
      { hint: "rerun the tokenize step" },
    );
  }
  return { index: reader.index, rows };
}

/**
 * The order of rows [0, n) in epoch `epoch`: a Fisher–Yates shuffle driven by
 * PCG32(seed, {@link SHUFFLE_STREAM} + epoch), j = ⌊u · (i + 1)⌋ for i = n−1 … 1.
 */
export function epochOrder(n: number, seed: number, epoch: number): Uint32Array {
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  const rng = new Pcg32(seed, SHUFFLE_STREAM + epoch);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng.uniform() * (i + 1));
    const t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  return order;
}

/**
 * One micro-batch of `rows`, all padded to the longest (packed rows all have seq_len tokens).
 * See the module documentation for targets, positions and document ids.
 */
export function buildBatch(rows: readonly ShardRow[], padId: number): Batch {
  if (rows.length === 0) throw new RangeError("Cannot build a batch of no rows");
  const B = rows.length;
  const S = Math.max(...rows.map((r) => r.tokens.length));
  const tokens = new Uint32Array(B * S).fill(padId);
  const targets = new Int32Array(B * S).fill(IGNORE);
  const positions = new Uint32Array(B * S);
  const docs = new Uint32Array(B * S);
  for (let b = 0; b < B; b++) {
    const row = rows[b];
    const o = b * S;
    tokens.set(row.tokens, o);
    const m = row.bounds.length - 1; // documents in the row
    for (let d = 0; d < m; d++) {
      const start = row.bounds[d];
      const end = row.bounds[d + 1];
      for (let t = start; t < end; t++) {
        positions[o + t] = t - start;
        docs[o + t] = d;
        if (t + 1 < end && row.mask[t + 1] === 1) targets[o + t] = row.tokens[t + 1];
      }
    }
    const padStart = m > 0 ? row.bounds[m] : 0;
    for (let t = padStart; t < S; t++) {
      positions[o + t] = t - padStart;
      docs[o + t] = m;
    }
  }
  return { rows: B, seqLen: S, tokens, targets, positions, docs };
}

/** Trained targets of a batch (targets other than −100). */
export function trainedTokens(batch: Batch): number {
  let n = 0;
  for (let i = 0; i < batch.targets.length; i++) if (batch.targets[i] !== IGNORE) n++;
  return n;
}

/** Splits `items` into consecutive chunks of at most `size`. */
export function chunks<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}
