import assert from "node:assert/strict";
import { join } from "node:path";
import { DuckDBInstance } from "@duckdb/node-api";
import { LatheError } from "../../../foundation/errors.ts";
import {
  type RawRow,
  readJson,
  readJsonl,
  readRows,
  readWithDuckDb,
} from "../../../steps/prepare/readers.ts";

async function collect(rows: AsyncIterable<RawRow>): Promise<RawRow[]> {
  const out: RawRow[] = [];
  for await (const row of rows) out.push(row);
  return out;
}

async function withTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-readers-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("readJsonl() streams rows with physical line numbers, skipping blank lines", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "a.jsonl");
    await Deno.writeTextFile(path, '\uFEFF{"text":"one"}\r\n\n   \n{"text":"two é"}\n{"text":"three"}');
    let bytes = 0;
    const rows = await collect(readJsonl(path, { label: "data/a.jsonl", onBytes: (n) => bytes += n }));
    assert.deepEqual(rows, [
      { value: { text: "one" }, where: "data/a.jsonl:1" },
      { value: { text: "two é" }, where: "data/a.jsonl:4" },
      { value: { text: "three" }, where: "data/a.jsonl:5" },
    ]);
    assert.equal(bytes, (await Deno.stat(path)).size);
  });
});

Deno.test("readJsonl() yields an error row naming the line of malformed JSON or bad UTF-8", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "bad.jsonl");
    const enc = new TextEncoder();
    await Deno.writeFile(
      path,
      new Uint8Array([
        ...enc.encode('{"text":"ok"}\n{"text": oops}\n'),
        0xff,
        0xfe,
        ...enc.encode("\n[1]\n"),
      ]),
    );
    const rows = await collect(readJsonl(path, { label: "bad.jsonl" }));
    assert.equal(rows.length, 4);
    assert.equal(rows[1].where, "bad.jsonl:2");
    assert.match(rows[1].error!.message, /^is not valid JSON \(/);
    assert.equal(rows[2].where, "bad.jsonl:3");
    assert.equal(rows[2].error!.message, "is not valid UTF-8");
    assert.deepEqual(rows[3], { value: [1], where: "bad.jsonl:4" });
  });
});

Deno.test("readJsonl() reads lines longer than its read buffer and many short lines across chunks", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "long.jsonl");
    const long = "x".repeat(3 * 1024 * 1024);
    const short = Array.from({ length: 50_000 }, (_, i) => JSON.stringify({ text: `row ${i}` }));
    await Deno.writeTextFile(path, [JSON.stringify({ text: long }), ...short].join("\n") + "\n");
    const rows = await collect(readJsonl(path, { label: "long.jsonl" }));
    assert.equal(rows.length, 50_001);
    assert.equal((rows[0].value as { text: string }).text.length, long.length);
    assert.deepEqual(rows[50_000], { value: { text: "row 49999" }, where: "long.jsonl:50001" });
  });
});

Deno.test("readJson() reads an array or {data: [...]}, numbering rows from 1", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(join(dir, "a.json"), JSON.stringify([{ text: "a" }, { text: "b" }], null, 2));
    await Deno.writeTextFile(join(dir, "b.json"), JSON.stringify({ version: 1, data: [{ text: "c" }] }));
    assert.deepEqual(await collect(readJson(join(dir, "a.json"), { label: "a.json" })), [
      { value: { text: "a" }, where: "a.json:row 1" },
      { value: { text: "b" }, where: "a.json:row 2" },
    ]);
    assert.deepEqual(await collect(readJson(join(dir, "b.json"), { label: "b.json" })), [
      { value: { text: "c" }, where: "b.json:row 1" },
    ]);
  });
});

Deno.test("readJson() reads a .json file of JSON lines as JSONL, and rejects other shapes", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(join(dir, "lines.json"), '{"text":"a"}\n{"text":"b"}\n');
    assert.deepEqual(await collect(readJson(join(dir, "lines.json"), { label: "lines.json" })), [
      { value: { text: "a" }, where: "lines.json:1" },
      { value: { text: "b" }, where: "lines.json:2" },
    ]);
    await Deno.writeTextFile(join(dir, "obj.json"), '{"rows": []}');
    await assert.rejects(
      () => collect(readJson(join(dir, "obj.json"), { label: "obj.json" })),
      (e: Error) =>
        e instanceof LatheError && e.message.includes('"obj.json": expected a list of rows') &&
        e.message.includes('keys "rows"'),
    );
    await Deno.writeTextFile(join(dir, "broken.json"), '[{"text": "a"},');
    await assert.rejects(
      () => collect(readJson(join(dir, "broken.json"), { label: "broken.json" })),
      (e: Error) =>
        e instanceof LatheError && e.message.startsWith('Cannot prepare "broken.json": not valid JSON'),
    );
  });
});

Deno.test("readWithDuckDb() reads CSV cells as text, quoted newlines included, empty cells as null", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "a.csv");
    await Deno.writeTextFile(path, 'instruction,input,output\nAdd.,"1, 2",3\n"Say ""hi"".",,"hi\nthere"\n');
    const rows = await collect(readWithDuckDb(path, "csv", { label: "a.csv" }));
    assert.deepEqual(rows, [
      { value: { instruction: "Add.", input: "1, 2", output: "3" }, where: "a.csv:row 1" },
      { value: { instruction: 'Say "hi".', input: null, output: "hi\nthere" }, where: "a.csv:row 2" },
    ]);
  });
});

Deno.test("readWithDuckDb() reads Parquet with nested message lists", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "chat.parquet");
    const instance = await DuckDBInstance.create(":memory:");
    const connection = await instance.connect();
    try {
      await connection.run(`COPY (
        SELECT * FROM (VALUES
          (1, [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]),
          (2, [{'role': 'user', 'content': 'bye'}, {'role': 'assistant', 'content': 'ciao'}])
        ) AS t(n, messages) ORDER BY n
      ) TO '${path}' (FORMAT parquet)`);
    } finally {
      connection.closeSync();
      instance.closeSync();
    }
    let bytes = 0;
    const rows = await collect(
      readRows(path, "parquet", { label: "chat.parquet", onBytes: (n) => bytes += n }),
    );
    assert.equal(rows.length, 2);
    assert.equal(rows[1].where, "chat.parquet:row 2");
    assert.deepEqual((rows[1].value as Record<string, unknown>).messages, [
      { role: "user", content: "bye" },
      { role: "assistant", content: "ciao" },
    ]);
    assert.equal(bytes, (await Deno.stat(path)).size);
  });
});

Deno.test("readWithDuckDb() names the file it cannot read", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "fake.parquet");
    await Deno.writeTextFile(path, "this is not parquet");
    await assert.rejects(
      () => collect(readWithDuckDb(path, "parquet", { label: "data/fake.parquet" })),
      (e: Error) =>
        e instanceof LatheError &&
        e.message.startsWith('Cannot prepare "data/fake.parquet": DuckDB cannot read it as PARQUET'),
    );
  });
});
