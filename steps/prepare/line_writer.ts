/**
 * A buffered writer of text lines to a file: lines are collected and written in blocks of
 * about 1 MiB, so millions of short writes cost a few hundred system calls.
 * @module
 */

const BLOCK = 1 << 20;

/** Writes lines ("\n"-terminated) to a file; call {@link LineWriter.close} to flush. */
export class LineWriter {
  #file: Deno.FsFile;
  #parts: string[] = [];
  #size = 0;
  #encoder = new TextEncoder();
  #closed = false;
  /** Lines written so far. */
  lines = 0;

  private constructor(file: Deno.FsFile) {
    this.#file = file;
  }

  /** Creates (or truncates) `path` for writing. */
  static async create(path: string): Promise<LineWriter> {
    return new LineWriter(await Deno.open(path, { write: true, create: true, truncate: true }));
  }

  /** Appends `line` and a newline. */
  async write(line: string): Promise<void> {
    this.#parts.push(line, "\n");
    this.#size += line.length + 1;
    this.lines++;
    if (this.#size >= BLOCK) await this.#flush();
  }

  async #flush(): Promise<void> {
    if (this.#parts.length === 0) return;
    let bytes = this.#encoder.encode(this.#parts.join(""));
    this.#parts = [];
    this.#size = 0;
    while (bytes.length > 0) bytes = bytes.subarray(await this.#file.write(bytes));
  }

  /** Flushes and closes the file; later calls do nothing. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#flush();
    } finally {
      this.#file.close();
    }
  }
}
