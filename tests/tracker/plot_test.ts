import assert from "node:assert/strict";
import { join } from "node:path";
import { LatheError } from "../../foundation/errors.ts";
import { niceTicks, renderSvg } from "../../tracker/plot.ts";
import { runs, withRoot } from "./_cli.ts";
import { lossCurve, RUN_A, RUN_B, writeStandardRuns, writeStep } from "./_fixtures.ts";

/**
 * Checks that `svg` is well-formed XML with an <svg> root in the SVG namespace (tags
 * nest and close, attributes are quoted, entities are the five XML ones).
 */
function assertWellFormedSvg(svg: string): void {
  const stack: string[] = [];
  const tag = /<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>/y;
  let i = 0;
  let roots = 0;
  while (i < svg.length) {
    const lt = svg.indexOf("<", i);
    const text = svg.slice(i, lt < 0 ? svg.length : lt);
    assert.ok(!/&(?!(amp|lt|gt|quot|apos);)/.test(text), `bad entity in text "${text}"`);
    if (lt < 0) break;
    tag.lastIndex = lt;
    const m = tag.exec(svg);
    assert.ok(m, `malformed tag at ${lt}: ${svg.slice(lt, lt + 60)}`);
    const [, close, name, , selfClose] = m;
    if (close) assert.equal(stack.pop(), name, `</${name}> closes the wrong element`);
    else if (!selfClose) {
      if (stack.length === 0) roots++;
      stack.push(name);
    } else if (stack.length === 0) roots++;
    i = tag.lastIndex;
  }
  assert.deepEqual(stack, [], "unclosed elements");
  assert.equal(roots, 1);
  assert.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg" /);
}

function polylines(svg: string): { label: string; points: [number, number][] }[] {
  return [...svg.matchAll(/<polyline class="series" data-label="([^"]*)"[^>]* points="([^"]*)"\/>/g)].map((
    m,
  ) => ({
    label: m[1],
    points: m[2] === "" ? [] : m[2].split(" ").map((p) => p.split(",").map(Number) as [number, number]),
  }));
}

Deno.test("niceTicks() covers the range with 1, 2 or 5 times a power of ten", () => {
  assert.deepEqual(niceTicks(0, 29).ticks, [0, 5, 10, 15, 20, 25, 30]);
  const { ticks, step } = niceTicks(0.27, 3.01);
  assert.equal(step, 0.5);
  assert.equal(ticks[0], 0);
  assert.equal(ticks[ticks.length - 1], 3.5);
  const flat = niceTicks(2, 2);
  assert.ok(flat.ticks[0] <= 2 && flat.ticks[flat.ticks.length - 1] >= 2 && flat.ticks.length >= 2);
  for (const [lo, hi] of [[-3.7, 12.2], [1e-5, 3e-5], [100, 12345]]) {
    const t = niceTicks(lo, hi);
    const mantissa = t.step / 10 ** Math.floor(Math.log10(t.step));
    assert.ok([1, 2, 5].some((m) => Math.abs(mantissa - m) < 1e-9), `step ${t.step}`);
    assert.ok(t.ticks[0] <= lo && t.ticks[t.ticks.length - 1] >= hi);
  }
});

Deno.test("renderSvg() draws every point inside the plot area, higher values higher up", () => {
  const curve = lossCurve(50).map((p) => ({ x: p.step, y: p.value }));
  const svg = renderSvg([{ label: "loss", points: curve }], { title: "a <b> & c", yLabel: "loss" });
  assertWellFormedSvg(svg);
  assert.ok(svg.includes("a &lt;b&gt; &amp; c"));
  const [line] = polylines(svg);
  assert.equal(line.points.length, 50);
  for (const [x, y] of line.points) assert.ok(x >= 70 && x <= 700 && y >= 40 && y <= 370, `${x},${y}`);
  // The loss falls, so screen y grows (SVG y points down) and x grows with the step.
  for (let i = 1; i < 50; i++) {
    assert.ok(line.points[i][0] > line.points[i - 1][0]);
    assert.ok(line.points[i][1] > line.points[i - 1][1]);
  }
  assert.ok(svg.includes(">step</text>"));
});

Deno.test("runs plot writes runs/<id>/loss.svg with one polyline per series and every point", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    const out = await runs(root, "plot", "20261122-11");
    const path = join(root, RUN_B, "loss.svg");
    assert.match(out, /loss\.svg \(1 series, 30 points\)$/);
    const svg = await Deno.readTextFile(path);
    assertWellFormedSvg(svg);
    const lines = polylines(svg);
    assert.equal(lines.length, 1);
    assert.equal(lines[0].points.length, 30);
    assert.ok(svg.includes(`${RUN_B} · loss`));
  });
});

Deno.test("runs plot draws one line per step and metric, to --out", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    await writeStep(root, {
      runId: RUN_A,
      step: "train-dpo",
      points: [
        ...lossCurve(12),
        ...Array.from({ length: 12 }, (_, i) => ({ name: "reward_margin", step: i, value: i / 10 })),
      ],
      startedAt: "2026-11-22T10:02:00.000Z",
    });
    const target = join(root, "plots", "a.svg");
    const out = await runs(root, "plot", RUN_A, "--metric", "loss,reward_margin", "--out", target);
    assert.match(out, /a\.svg \(3 series, 44 points\)$/);
    const lines = polylines(await Deno.readTextFile(target));
    assert.deepEqual(lines.map((l) => [l.label, l.points.length]), [
      ["train-sft/loss", 20],
      ["train-dpo/loss", 12],
      ["train-dpo/reward_margin", 12],
    ]);
  });
});

Deno.test("runs plot of a metric the run never logged lists the ones it did", async () => {
  await withRoot(async (root) => {
    await writeStandardRuns(root);
    await assert.rejects(runs(root, "plot", RUN_A, "--metric", "accuracy"), (error: unknown) => {
      assert.ok(error instanceof LatheError);
      assert.equal(error.message, `Cannot plot "accuracy" for run "${RUN_A}": it logged only "loss"`);
      return true;
    });
  });
});
