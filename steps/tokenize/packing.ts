/**
 * Packing documents into rows. A row holds whole documents back to back; its document
 * bounds `[0, e1, ..., em]` say where each ends, so training can reset positions and forbid
 * attention across documents. Tokens after `em` are padding (pad id, mask 0).
 *
 * Packed (`packing: true`): every row is exactly `seqLen` tokens. Greedy first-fit over a
 * bounded window of open rows: a document goes into the oldest open row with room for it;
 * when none has room and {@link OPEN_ROWS} rows are open, the fullest open row is closed
 * (the oldest among equals) and a new row is opened. A row that becomes full closes at once;
 * the rest close in opening order at the end. Everything depends only on document order, so
 * the output is deterministic.
 *
 * Unpacked (`packing: false`): one document per row, rows as long as their document (no
 * padding stored; training pads a batch to its longest row).
 * @module
 */

/** A finished row: tokens, mask and document bounds (see the module doc). */
export interface PackedRow {
  tokens: Uint32Array;
  mask: Uint8Array;
  /** [0, end of doc 1, ..., end of doc m]; tokens from the last bound on are padding. */
  bounds: number[];
}

/** How many rows stay open for first-fit. */
export const OPEN_ROWS = 64;

interface OpenRow {
  docs: { ids: ArrayLike<number>; mask: ArrayLike<number> }[];
  used: number;
}

/** Packs documents into rows and hands each finished row to `emit`. */
export class Packer {
  #seqLen: number;
  #padId: number;
  #packing: boolean;
  #emit: (row: PackedRow) => void;
  #open: OpenRow[] = [];

  constructor(seqLen: number, padId: number, packing: boolean, emit: (row: PackedRow) => void) {
    this.#seqLen = seqLen;
    this.#padId = padId;
    this.#packing = packing;
    this.#emit = emit;
  }

  /** Adds one document (`ids.length <= seqLen`). */
  add(ids: ArrayLike<number>, mask: ArrayLike<number>): void {
    const n = ids.length;
    if (n === 0) return;
    if (n > this.#seqLen) throw new RangeError(`document of ${n} tokens exceeds seq_len ${this.#seqLen}`);
    const doc = { ids, mask };
    if (!this.#packing) {
      this.#close({ docs: [doc], used: n }, n);
      return;
    }
    let target = this.#open.findIndex((r) => this.#seqLen - r.used >= n);
    if (target < 0) {
      if (this.#open.length >= OPEN_ROWS) {
        let fullest = 0;
        for (let i = 1; i < this.#open.length; i++) {
          if (this.#open[i].used > this.#open[fullest].used) fullest = i;
        }
        this.#close(this.#open.splice(fullest, 1)[0], this.#seqLen);
      }
      this.#open.push({ docs: [], used: 0 });
      target = this.#open.length - 1;
    }
    const row = this.#open[target];
    row.docs.push(doc);
    row.used += n;
    if (row.used === this.#seqLen) this.#close(this.#open.splice(target, 1)[0], this.#seqLen);
  }

  /** Closes every open row (in opening order). */
  finish(): void {
    for (const row of this.#open) this.#close(row, this.#seqLen);
    this.#open = [];
  }

  #close(row: OpenRow, length: number): void {
    const tokens = new Uint32Array(length).fill(this.#padId);
    const mask = new Uint8Array(length);
    const bounds = [0];
    let at = 0;
    for (const d of row.docs) {
      tokens.set(d.ids, at);
      mask.set(d.mask, at);
      at += d.ids.length;
      bounds.push(at);
    }
    this.#emit({ tokens, mask, bounds });
  }
}
