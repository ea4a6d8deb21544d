import assert from "node:assert/strict";
import { join, resolve } from "node:path";

const CI_RUN = resolve(import.meta.dirname!, "../../.ci/run");

interface Result {
  code: number;
  output: string;
  lastLine: string;
}

async function run(args: string[], env: Record<string, string> = {}, clearEnv = false): Promise<Result> {
  const out = await new Deno.Command("bash", {
    args: [CI_RUN, ...args],
    env,
    clearEnv,
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const text = new TextDecoder();
  const stdout = text.decode(out.stdout);
  const lines = stdout.trimEnd().split("\n");
  return { code: out.code, output: stdout + text.decode(out.stderr), lastLine: lines[lines.length - 1] };
}

async function withTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-ci-run-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Runs a real `deno test --quiet` over `files` in `dir` (unchecked: the log format is what matters). */
async function realDenoTest(
  dir: string,
  files: Record<string, string>,
): Promise<{ log: string; code: number }> {
  for (const [name, source] of Object.entries(files)) await Deno.writeTextFile(join(dir, name), source);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["test", "-A", "--quiet", "--no-check", ...Object.keys(files)],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { log: text.decode(out.stdout) + text.decode(out.stderr), code: out.code };
}

const PASSING = `
Deno.test("passes", () => {});
Deno.test("has steps", async (t) => {
  await t.step("one", () => {});
  await t.step("two", () => {});
});
Deno.test({ name: "ignored", ignore: true, fn() {} });
`;
const FAILING = `Deno.test("fails", () => { throw new Error("boom"); });\n`;

Deno.test(".ci/run --parse-summary reads real deno test output: passed, failed and ignored counts", async () => {
  await withTempDir(async (dir) => {
    const green = await realDenoTest(dir, { "a_test.ts": PASSING });
    assert.equal(green.code, 0, green.log);
    await Deno.writeTextFile(join(dir, "green.log"), green.log);
    const ok = await run(["--parse-summary", join(dir, "green.log"), String(green.code)]);
    assert.equal(ok.lastLine, "2 passed, 0 failed, 1 skipped", ok.output);
    assert.equal(ok.code, 0);

    const red = await realDenoTest(dir, { "a_test.ts": PASSING, "b_test.ts": FAILING });
    assert.notEqual(red.code, 0);
    await Deno.writeTextFile(join(dir, "red.log"), red.log);
    const failed = await run(["--parse-summary", join(dir, "red.log"), String(red.code)]);
    assert.equal(failed.lastLine, "2 passed, 1 failed, 1 skipped", failed.output);
    assert.equal(failed.code, red.code);
  });
});

Deno.test(".ci/run --parse-summary strips colours and carriage returns and takes the last summary line", async () => {
  await withTempDir(async (dir) => {
    const log = join(dir, "test.log");
    await Deno.writeTextFile(
      log,
      "ok | 1 passed | 0 failed (printed by a test)\r\n" +
        "\r\x1b[0m\x1b[31mFAILED\x1b[0m | 55 passed (12 steps) | 2 failed (1 step) \x1b[0m\x1b[38;5;245m(3s)\x1b[0m\r\n",
    );
    const result = await run(["--parse-summary", log, "1"]);
    assert.equal(result.lastLine, "55 passed, 2 failed");
    assert.equal(result.code, 1);
  });
});

Deno.test(".ci/run --parse-summary counts a run without a summary (a crash) as one failure", async () => {
  await withTempDir(async (dir) => {
    const log = join(dir, "crash.log");
    await Deno.writeTextFile(
      log,
      "TS2322 [ERROR]: Type 'string' is not assignable to type 'number'.\nerror: Type checking failed.\n",
    );
    const result = await run(["--parse-summary", log, "1"]);
    assert.equal(result.lastLine, "0 passed, 1 failed");
    assert.notEqual(result.code, 0);
    assert.match(result.output, /no test summary/);
  });
});

Deno.test(".ci/run --parse-summary fails a run that exited non-zero with no failed test", async () => {
  await withTempDir(async (dir) => {
    // What `deno test` prints when a test uses `only`: a green summary, then exit code 1.
    const log = join(dir, "only.log");
    await Deno.writeTextFile(
      log,
      'ok | 1 passed | 0 failed | 1 filtered out (6ms)\n\nerror: Test failed because the "only" option was used\n',
    );
    const result = await run(["--parse-summary", log, "1"]);
    assert.equal(result.lastLine, "1 passed, 1 failed");
    assert.equal(result.code, 1);
  });
});

Deno.test(".ci/run runs exactly `npx -y deno@2.9.6 task test`, keeps its log and exit code", async () => {
  await withTempDir(async (dir) => {
    // A stand-in npx on PATH: checks its arguments, prints a canned log, exits with a chosen code.
    const bin = join(dir, "bin");
    await Deno.mkdir(bin);
    await Deno.writeTextFile(
      join(bin, "npx"),
      `#!/bin/sh
[ "$*" = "-y deno@2.9.6 task test" ] || { echo "unexpected: npx $*"; exit 99; }
echo "XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR"
cat "$FAKE_LOG"
exit "$FAKE_CODE"
`,
    );
    await Deno.writeTextFile(join(bin, "apt-get"), "#!/bin/sh\nexit 1\n");
    await Deno.chmod(join(bin, "npx"), 0o755);
    await Deno.chmod(join(bin, "apt-get"), 0o755);
    const ciLog = join(dir, "ci.log");
    const cases: [string, number, string, number][] = [
      ["ok | 3 passed | 0 failed (1s)\n", 0, "3 passed, 0 failed", 0],
      ["FAILED | 2 passed | 1 failed | 4 ignored (1s)\n", 3, "2 passed, 1 failed, 4 skipped", 3],
      ["ok | 1 passed | 0 failed (1s)\nerror: Test failed\n", 1, "1 passed, 1 failed", 1],
      ["error: Uncaught (in promise) Error: killed\n", 137, "0 passed, 1 failed", 1],
    ];
    for (const [log, npxCode, lastLine, code] of cases) {
      await Deno.writeTextFile(join(dir, "fake.log"), log);
      const env = {
        PATH: `${bin}:${Deno.env.get("PATH")}`,
        HOME: dir,
        LATHE_CI_LOG: ciLog,
        FAKE_LOG: join(dir, "fake.log"),
        FAKE_CODE: String(npxCode),
      };
      const result = await run([], env, true);
      assert.equal(result.lastLine, lastLine, result.output);
      assert.equal(result.code, code, result.output);
      assert.match(result.output, /XDG_RUNTIME_DIR=\/tmp/);
      assert.equal(await Deno.readTextFile(ciLog), `XDG_RUNTIME_DIR=/tmp\n${log}`);
    }
  });
});

Deno.test(".ci/run --parse-summary without a readable log prints its usage and exits 2", async () => {
  const result = await run(["--parse-summary", "/nonexistent/deno-test.log"]);
  assert.equal(result.code, 2);
  assert.match(result.output, /usage: \.ci\/run --parse-summary LOG/);
});
