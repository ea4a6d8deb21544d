/**
 * `deno task test`: the whole suite, as `deno test` processes running side by side.
 *
 * The test files are dealt round-robin (in sorted order) to `LATHE_TEST_JOBS` processes (default:
 * the number of CPUs, at least 2), each a plain serial `deno test -A --quiet <files>`. Separate
 * processes rather than `deno test --parallel`, whose workers share one process environment:
 * tests that set `LATHE_RESUME`, `HF_HOME` or `LATHE_MAX_BINDING_BYTES` for the code under test
 * must not change it under a test running beside them. Much of a serial run waits on the
 * software GPU's readbacks and on subprocesses, so two processes on two cores take about 40 %
 * less time than one (docs/ci.md).
 *
 * The first process's output is printed as it runs (progress), each other's whole when it ends,
 * then one summary line in `deno test`'s own format, which `.ci/run` reads: `ok | 623 passed (108 steps) | 0 failed (1m51s)`.
 * Arguments are passed to every `deno test` (`deno task test --filter attention`); paths among
 * them choose the files to deal (default: `tests/`).
 * @module
 */
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const TEST_FILE = /(^|[._/])test\.(ts|js|mjs|tsx)$/;

/** Every test file under `dir` (relative to the project root), sorted. */
async function testFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const stat = await Deno.stat(join(ROOT, dir));
  if (stat.isFile) return [dir];
  for await (const entry of Deno.readDir(join(ROOT, dir))) {
    const path = join(dir, entry.name);
    if (entry.isDirectory && !entry.name.startsWith(".") && entry.name !== "fixtures") {
      out.push(...await testFiles(path));
    } else if (entry.isFile && TEST_FILE.test(entry.name)) out.push(path);
  }
  return out.sort();
}

/** Counts from a `deno test` summary line, e.g. `ok | 55 passed (12 steps) | 2 failed | 3 ignored (3s)`. */
interface Counts {
  passed: number;
  steps: number;
  failed: number;
  failedSteps: number;
  ignored: number;
}

/** The counts of the last summary line of a `deno test` log, or null when it has none. */
export function parseSummary(log: string): Counts | null {
  // deno-lint-ignore no-control-regex -- ANSI colour codes start with ESC
  const plain = log.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "").replace(/\r/g, "");
  const line = plain.split("\n").filter((l) => /^(ok|FAILED) \| \d+ passed/.test(l)).pop();
  if (line === undefined) return null;
  const num = (re: RegExp) => Number(line.match(re)?.[1] ?? 0);
  return {
    passed: num(/\| (\d+) passed/),
    steps: num(/passed \((\d+) steps?\)/),
    failed: num(/\| (\d+) failed/),
    failedSteps: num(/failed \((\d+) steps?\)/),
    ignored: num(/\| (\d+) ignored/),
  };
}

/** A summary line in `deno test`'s format for the sum of `counts`. */
export function summaryLine(counts: Counts[], failed: boolean, seconds: number): string {
  const sum = (k: keyof Counts) => counts.reduce((s, c) => s + c[k], 0);
  const steps = (n: number) => n > 0 ? ` (${n} step${n === 1 ? "" : "s"})` : "";
  const time = seconds >= 60
    ? `${Math.floor(seconds / 60)}m${Math.round(seconds % 60)}s`
    : `${Math.round(seconds)}s`;
  const parts = [
    failed ? "FAILED" : "ok",
    `${sum("passed")} passed${steps(sum("steps"))}`,
    `${sum("failed")} failed${steps(sum("failedSteps"))}`,
  ];
  if (sum("ignored") > 0) parts.push(`${sum("ignored")} ignored`);
  return `${parts.join(" | ")} (${time})`;
}

/** Deals `files` round-robin into `jobs` lists (none empty). */
export function deal(files: string[], jobs: number): string[][] {
  const lists: string[][] = Array.from({ length: Math.min(jobs, files.length) }, () => []);
  files.forEach((f, i) => lists[i % lists.length].push(f));
  return lists;
}

/** How one `deno test` process ended. */
export interface ProcessResult {
  /** 1-based. */
  index: number;
  code: number;
  signal: Deno.Signal | null;
  counts: Counts | null;
}

/**
 * Whether the suite failed: a process without a summary, with a failed test, or with a non-zero
 * exit. One exception, reported as a warning: a process whose summary says all its tests passed
 * and which was then killed by a signal while shutting down (glibc's "double free or corruption"
 * abort in a native teardown, seen about once in five runs on lavapipe) ran its tests.
 */
export function judge(results: ProcessResult[]): { failed: boolean; warnings: string[] } {
  const warnings: string[] = [];
  let failed = false;
  for (const r of results) {
    if (r.counts === null || r.counts.failed > 0) failed = true;
    else if (r.code !== 0 && r.signal !== null) {
      warnings.push(
        `warning: deno test process ${r.index} of ${results.length} was killed by ${r.signal} after its ` +
          `summary (${r.counts.passed} passed, 0 failed): a crash in teardown, not a test failure`,
      );
    } else if (r.code !== 0) failed = true;
  }
  return { failed, warnings };
}

if (import.meta.main) {
  const args = [...Deno.args];
  const paths = args.filter((a) => !a.startsWith("-") && (a.startsWith("tests") || a.endsWith(".ts")));
  const flags = args.filter((a) => !paths.includes(a));
  const files: string[] = [];
  for (const p of paths.length > 0 ? paths : ["tests"]) {
    files.push(...await testFiles(relative(ROOT, join(ROOT, p))));
  }
  const jobs = Math.max(
    1,
    Number(Deno.env.get("LATHE_TEST_JOBS") ?? Math.max(2, navigator.hardwareConcurrency)),
  );
  const start = performance.now();
  // The first process prints as it goes (the run shows progress); the others print whole when they end.
  const runs = deal(files, jobs).map(async (list, i) => {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["test", "-A", "--quiet", ...flags, ...list],
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // Each stream whole, so a character split across two reads decodes intact.
    const drain = async (stream: ReadableStream<Uint8Array>, live: boolean): Promise<Uint8Array> => {
      const chunks: Uint8Array[] = [];
      for await (const chunk of stream) {
        chunks.push(chunk);
        if (live) await Deno.stdout.write(chunk);
      }
      const bytes = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
      chunks.reduce((at, c) => (bytes.set(c, at), at + c.length), 0);
      return bytes;
    };
    const [status, out, err] = await Promise.all([
      child.status,
      drain(child.stdout, i === 0),
      drain(child.stderr, i === 0),
    ]);
    if (i !== 0) {
      await Deno.stdout.write(out);
      await Deno.stdout.write(err);
    }
    const log = new TextDecoder().decode(out) + new TextDecoder().decode(err);
    return { code: status.code, signal: status.signal, counts: parseSummary(log), index: i + 1 };
  });
  const results = await Promise.all(runs);
  const verdict = judge(results);
  for (const w of verdict.warnings) console.log(w);
  const failed = verdict.failed;
  const counts = results.map((r) =>
    r.counts ?? { passed: 0, steps: 0, failed: 1, failedSteps: 0, ignored: 0 }
  );
  console.log(`\n${summaryLine(counts, failed, (performance.now() - start) / 1000)}`);
  Deno.exit(failed ? 1 : 0);
}
