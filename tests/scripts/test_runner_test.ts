import assert from "node:assert/strict";
import { deal, judge, parseSummary, summaryLine } from "../../scripts/test.ts";

Deno.test("parseSummary() reads deno test's last summary line, colours and all", () => {
  const log = "running 2 tests from ./a_test.ts\n" +
    "\x1b[0m\x1b[32mok\x1b[0m | 55 passed (12 steps) | 2 failed (1 step) | 3 ignored \x1b[38;5;245m(3s)\x1b[0m\n";
  assert.deepEqual(parseSummary(log), { passed: 55, steps: 12, failed: 2, failedSteps: 1, ignored: 3 });
  assert.deepEqual(parseSummary("ok | 7 passed | 0 failed (1s)\r\n"), {
    passed: 7,
    steps: 0,
    failed: 0,
    failedSteps: 0,
    ignored: 0,
  });
  assert.equal(parseSummary("error: Type checking failed."), null);
});

Deno.test("summaryLine() sums the processes in deno test's format, which .ci/run reads", () => {
  const a = { passed: 291, steps: 40, failed: 0, failedSteps: 0, ignored: 0 };
  const b = { passed: 332, steps: 68, failed: 1, failedSteps: 0, ignored: 2 };
  assert.equal(
    summaryLine([a, b], true, 173.4),
    "FAILED | 623 passed (108 steps) | 1 failed | 2 ignored (2m53s)",
  );
  assert.equal(summaryLine([a], false, 9), "ok | 291 passed (40 steps) | 0 failed (9s)");
});

Deno.test("deal() spreads sorted files round-robin over the processes, none empty", () => {
  assert.deepEqual(deal(["a", "b", "c", "d", "e"], 2), [["a", "c", "e"], ["b", "d"]]);
  assert.deepEqual(deal(["a"], 4), [["a"]]);
  assert.deepEqual(deal(["a", "b", "c"], 1), [["a", "b", "c"]]);
});

Deno.test("judge() fails on a failed test, a missing summary or a non-zero exit; a teardown crash only warns", () => {
  const ok = { passed: 3, steps: 0, failed: 0, failedSteps: 0, ignored: 0 };
  const one = (over: object) => [{ index: 1, code: 0, signal: null, counts: ok, ...over }];
  assert.deepEqual(judge(one({})), { failed: false, warnings: [] });
  assert.equal(judge(one({ code: 1, counts: { ...ok, failed: 1 } })).failed, true);
  assert.equal(judge(one({ code: 1, counts: null })).failed, true);
  assert.equal(judge(one({ code: 1 })).failed, true, "an exit code without a failed test still fails");
  assert.equal(judge(one({ code: 134, signal: "SIGABRT", counts: null })).failed, true, "a crash mid-run");
  const crash = judge(one({ code: 134, signal: "SIGABRT" }));
  assert.equal(crash.failed, false);
  assert.match(
    crash.warnings[0],
    /process 1 of 1 was killed by SIGABRT after its summary \(3 passed, 0 failed\)/,
  );
});
