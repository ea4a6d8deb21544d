import assert from "node:assert/strict";
import { flattenConfig } from "../../tracker/queries.ts";

Deno.test("flattenConfig() walks objects to key paths and keeps arrays whole", () => {
  const flat = flattenConfig({
    lr: 2e-4,
    lora: { r: 8, targets: ["q_proj", "v_proj"], extra: {} },
    name: "x",
    none: null,
  });
  assert.deepEqual(Object.fromEntries(flat), {
    lr: "0.0002",
    "lora.r": "8",
    "lora.targets": '["q_proj","v_proj"]',
    "lora.extra": "{}",
    name: "x",
    none: "null",
  });
});
