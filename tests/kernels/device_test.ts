import assert from "node:assert/strict";
import { backendName, getGpu, noAdapterError, requestGpu } from "../../kernels/device.ts";
import { getKernel } from "../../kernels/pipeline.ts";
import { recorder } from "../../kernels/recorder.ts";
import { Tensor } from "../../kernels/tensor.ts";
import { LatheError } from "../../foundation/errors.ts";
import { GpuInfo } from "../../foundation/manifest.ts";
import { gpuTest } from "./_harness.ts";

/** A kernel that writes out[i] = i + 0.5 for i < n: every element, never zero. */
const WRITE_ALL = `
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<uniform> n: vec4<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  if (id.x < n.x) { out[id.x] = f32(id.x) + 0.5; }
}`;

Deno.test("backendName() reports DENO_WEBGPU_BACKEND, else the platform's primary backend", () => {
  assert.equal(backendName("gl", "linux"), "gl");
  assert.equal(backendName("Vulkan", "linux"), "vulkan");
  assert.equal(backendName("opengl", "linux"), "gl");
  assert.equal(backendName("vulkan,gl", "linux"), "vulkan,gl");
  assert.equal(backendName(null, "linux"), "vulkan");
  assert.equal(backendName("", "darwin"), "metal");
  assert.equal(backendName(null, "windows"), "dx12");
});

Deno.test("noAdapterError() says which driver to install", () => {
  const error = noAdapterError();
  assert.ok(error instanceof LatheError);
  assert.match(error.message, /^Cannot use the GPU: no WebGPU adapter found/);
  if (backendName() !== "gl") {
    assert.match(error.hint!, /mesa-vulkan-drivers/);
    assert.match(error.hint!, /DENO_WEBGPU_BACKEND=gl/);
  }
});

gpuTest("getGpu() requests every limit and wanted feature the adapter offers", async (gpu) => {
  assert.equal(await getGpu(), gpu, "the shared device is cached");
  const adapter = (await navigator.gpu.requestAdapter({ powerPreference: "high-performance" }))!;
  for (const key in adapter.limits) {
    const want = (adapter.limits as unknown as Record<string, number>)[key];
    assert.equal((gpu.limits as unknown as Record<string, number>)[key], want, `limit ${key}`);
  }
  const offered = new Set<string>(adapter.features);
  for (const feature of ["shader-f16", "timestamp-query", "subgroups"]) {
    if (offered.has(feature) && !(feature === "shader-f16" && Deno.env.get("LATHE_F16") === "0")) {
      assert.ok(gpu.info.features.includes(feature), `feature ${feature} requested`);
    }
  }
  assert.equal(gpu.f16, gpu.info.features.includes("shader-f16") && Deno.env.get("LATHE_F16") !== "0");
  assert.equal(gpu.timestamps, gpu.info.features.includes("timestamp-query"));
});

gpuTest("gpu.info is a valid manifest GpuInfo naming the adapter and backend", (gpu) => {
  const info = GpuInfo.parse(gpu.info);
  assert.ok(info.description.length > 0);
  assert.equal(info.backend, backendName());
  assert.ok(Deno.env.get("XDG_RUNTIME_DIR"), "XDG_RUNTIME_DIR is set for the backends");
});

gpuTest("requestGpu({ f16: false }) leaves f16 off", async () => {
  const gpu = await requestGpu({ f16: false });
  assert.equal(gpu.f16, false);
  assert.ok(!gpu.info.features.includes("shader-f16"));
  gpu.device.destroy();
});

gpuTest("a WGSL error is reported with the kernel's label", async (gpu) => {
  const kernel = getKernel(gpu, {
    name: "broken_on_purpose",
    params: { variant: 1 },
    code: "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
    bindings: [],
  });
  await assert.rejects(kernel.ready, (error: Error) => {
    assert.match(error.message, /^Cannot compile kernel "broken_on_purpose\[variant=1\]"/);
    assert.match(error.message, /u32/, "the compiler's message is kept");
    return true;
  });
  assert.throws(() => recorder(gpu).dispatch(kernel, [], null, [1]), /broken_on_purpose/);
});

gpuTest("a launch of a broken kernel makes the readback throw instead of returning data", async (gpu) => {
  const kernel = getKernel(gpu, {
    name: "broken_launch",
    code: "@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n" +
      "@compute @workgroup_size(1) fn main() { out[0] = undefined_name; }",
    bindings: ["write"],
  });
  const out = Tensor.from(gpu, new Float32Array([1, 2, 3]), [3], "f32", { label: "broken_out" });
  // Recorded before the compile error is known: the error must surface at the readback.
  recorder(gpu).dispatch(kernel, [out.buffer], null, [1]);
  await assert.rejects(out.read(), /broken_launch/);
  // The device is still usable afterwards.
  assert.deepEqual([...await out.read()], [1, 2, 3]);
  out.destroy();
});

gpuTest("a validation error at submit names the batch's kernels", async (gpu) => {
  const kernel = getKernel(gpu, {
    name: "write_all",
    code: WRITE_ALL,
    bindings: ["write"],
    uniformBytes: 16,
  });
  const dead = gpu.device.createBuffer({
    label: "destroyed_on_purpose",
    size: 256,
    usage: GPUBufferUsage.STORAGE,
  });
  dead.destroy();
  recorder(gpu).dispatch(kernel, [dead], new Uint32Array([4, 0, 0, 0]), [1]);
  await assert.rejects(recorder(gpu).sync(), (error: Error) => {
    assert.match(error.message, /^Cannot run GPU kernels: /);
    assert.match(error.message, /"write_all"/);
    return true;
  });
});

gpuTest("a kernel that runs overwrites every element of a NaN-filled output", async (gpu) => {
  const kernel = getKernel(gpu, {
    name: "write_all",
    code: WRITE_ALL,
    bindings: ["write"],
    uniformBytes: 16,
  });
  const n = 1000;
  const out = Tensor.from(gpu, new Float32Array(n).fill(NaN), [n]);
  recorder(gpu).dispatch(kernel, [out.buffer], new Uint32Array([n, 0, 0, 0]), [Math.ceil(n / 64)]);
  const host = await out.read();
  for (let i = 0; i < n; i++) assert.equal(host[i], i + 0.5, `element ${i}`);
  out.destroy();
});

gpuTest("device loss is an error naming the last kernel dispatched", async () => {
  const gpu = await requestGpu();
  const kernel = getKernel(gpu, {
    name: "last_before_loss",
    code: WRITE_ALL,
    bindings: ["write"],
    uniformBytes: 16,
  });
  const out = Tensor.empty(gpu, [64]);
  recorder(gpu).dispatch(kernel, [out.buffer], new Uint32Array([64, 0, 0, 0]), [1]);
  await recorder(gpu).sync();
  gpu.device.destroy();
  await gpu.device.lost;
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.match(gpu.lost!.message, /was lost .*last kernel "last_before_loss"/);
  assert.throws(() => recorder(gpu).dispatch(kernel, [out.buffer], null, [1]), /last_before_loss/);
  await assert.rejects(out.read(), /last_before_loss/);
});

gpuTest("dispatch() refuses more workgroups than the adapter allows", (gpu) => {
  const kernel = getKernel(gpu, {
    name: "write_all",
    code: WRITE_ALL,
    bindings: ["write"],
    uniformBytes: 16,
  });
  const out = Tensor.empty(gpu, [4]);
  assert.throws(
    () =>
      recorder(gpu).dispatch(kernel, [out.buffer], null, [gpu.limits.maxComputeWorkgroupsPerDimension + 1]),
    /exceeds this adapter's/,
  );
  out.destroy();
});
