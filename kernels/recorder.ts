/**
 * The command recorder: batches dispatches into one command encoder and compute pass, and
 * submits them on `flush()`. Readbacks flush first and map one staging buffer for all the
 * buffers they read.
 *
 * Uniform parameters of each dispatch go into a CPU-side copy of a uniform ring; the whole
 * ring is written with one `writeBuffer` just before the batch is submitted, and each
 * dispatch binds its slot with a dynamic offset, so bind groups are cached per set of
 * buffers. Every batch runs inside validation and out-of-memory error scopes; the next
 * readback (or `sync()`) throws the first error, naming the kernels of the batch, so a
 * failed launch never reads back as stale or zero data.
 * @module
 */
import type { Gpu } from "./device.ts";
import type { Kernel } from "./pipeline.ts";

/** Dispatches after which a batch is submitted on its own, so the GPU starts early. */
const AUTO_FLUSH_DISPATCHES = 256;
/** Bytes of the uniform ring; a batch that fills it is submitted. */
const UNIFORM_RING_BYTES = 256 * 1024;
/** Bind groups cached before the cache is cleared. */
const BIND_GROUP_CACHE_SIZE = 8192;

/** A byte range of a buffer to read back. */
export interface ReadRange {
  buffer: GPUBuffer;
  /** Byte offset (multiple of 4; default 0). */
  offset?: number;
  /** Bytes to read. */
  size: number;
}

/** Workgroup counts of a dispatch: x, y, z (y and z default to 1). */
export type Workgroups = readonly [number, number?, number?];

interface Batch {
  encoder: GPUCommandEncoder;
  pass: GPUComputePassEncoder | null;
  dispatches: number;
  labels: Set<string>;
  unverified: Set<Kernel>;
}

const recorders = new WeakMap<Gpu, Recorder>();

/** The recorder of a device (one per device). */
export function recorder(gpu: Gpu): Recorder {
  let r = recorders.get(gpu);
  if (r === undefined) recorders.set(gpu, r = new Recorder(gpu));
  return r;
}

/** Records dispatches and copies for one device; see the module documentation. */
export class Recorder {
  readonly gpu: Gpu;
  #batch: Batch | null = null;
  /** First error of the batches submitted since the last readback (chained, constant memory). */
  #errors: Promise<Error | null> = Promise.resolve(null);
  #uniformCpu: Uint8Array<ArrayBuffer>;
  #uniformUsed = 0;
  #uniformAlign: number;
  #uniformRing: GPUBuffer;
  #bindGroups = new Map<string, GPUBindGroup>();
  #ids = new WeakMap<object, number>();
  #nextId = 1;
  #validated = new WeakSet<Kernel>();
  #staging: GPUBuffer[] = [];
  /** Dispatches recorded since the recorder was made (for benchmarks and tests). */
  dispatchCount = 0;
  /** Batches submitted since the recorder was made. */
  submitCount = 0;

  constructor(gpu: Gpu) {
    this.gpu = gpu;
    this.#uniformAlign = Math.max(16, gpu.limits.minUniformBufferOffsetAlignment);
    this.#uniformCpu = new Uint8Array(UNIFORM_RING_BYTES);
    this.#uniformRing = gpu.device.createBuffer({
      label: "uniform_ring",
      size: UNIFORM_RING_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
  }

  /** Commands recorded and not yet submitted. */
  get pending(): number {
    return this.#batch?.dispatches ?? 0;
  }

  /**
   * Records one dispatch of `kernel` with `buffers` at bindings 0..n-1 and `uniforms`
   * (exactly `kernel.uniformBytes` bytes or fewer) at binding n.
   */
  dispatch(
    kernel: Kernel,
    buffers: readonly GPUBuffer[],
    uniforms: ArrayBufferView | null,
    workgroups: Workgroups,
  ): void {
    this.gpu.assertAlive();
    if (kernel.error !== null) throw kernel.error;
    if (buffers.length !== kernel.bindings.length) {
      throw new Error(
        `Cannot dispatch "${kernel.label}": it binds ${kernel.bindings.length} buffers, got ${buffers.length}`,
      );
    }
    const [x, y = 1, z = 1] = workgroups;
    const maxGroups = this.gpu.limits.maxComputeWorkgroupsPerDimension;
    if (x > maxGroups || y > maxGroups || z > maxGroups) {
      throw new Error(
        `Cannot dispatch "${kernel.label}": ${x}×${y}×${z} workgroups exceeds this adapter's ${maxGroups} per dimension`,
      );
    }
    if (x === 0 || y === 0 || z === 0) return;
    let offset = 0;
    if (kernel.uniformBytes > 0) {
      const bytes = uniforms === null ? 0 : uniforms.byteLength;
      if (bytes > kernel.uniformBytes) {
        throw new Error(
          `Cannot dispatch "${kernel.label}": ${bytes} uniform bytes exceed its ${kernel.uniformBytes}`,
        );
      }
      if (this.#uniformUsed + kernel.uniformBytes > UNIFORM_RING_BYTES) this.flush();
      offset = this.#uniformUsed;
      if (uniforms !== null) {
        this.#uniformCpu.set(new Uint8Array(uniforms.buffer, uniforms.byteOffset, bytes), offset);
      }
      this.#uniformCpu.fill(0, offset + bytes, offset + kernel.uniformBytes);
      this.#uniformUsed = Math.ceil((offset + kernel.uniformBytes) / this.#uniformAlign) * this.#uniformAlign;
    }
    const batch = this.#open();
    if (batch.pass === null) batch.pass = batch.encoder.beginComputePass({ label: "lathe_pass" });
    batch.pass.setPipeline(kernel.pipeline);
    if (kernel.uniformBytes > 0) batch.pass.setBindGroup(0, this.#bindGroup(kernel, buffers), [offset]);
    else batch.pass.setBindGroup(0, this.#bindGroup(kernel, buffers));
    batch.pass.dispatchWorkgroups(x, y, z);
    batch.dispatches++;
    batch.labels.add(kernel.label);
    if (!this.#validated.has(kernel)) batch.unverified.add(kernel);
    this.gpu.lastKernel = kernel.label;
    this.dispatchCount++;
    if (batch.dispatches >= AUTO_FLUSH_DISPATCHES) this.flush();
  }

  /** Records `clearBuffer` (zeros) in stream order. */
  clearBuffer(buffer: GPUBuffer, offset = 0, size?: number): void {
    const batch = this.#open();
    this.#endPass(batch);
    batch.encoder.clearBuffer(buffer, offset, size);
    batch.dispatches++;
  }

  /** Records a buffer-to-buffer copy in stream order (offsets and size multiples of 4). */
  copyBuffer(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, size: number): void {
    const batch = this.#open();
    this.#endPass(batch);
    batch.encoder.copyBufferToBuffer(src, srcOffset, dst, dstOffset, size);
    batch.dispatches++;
  }

  /** Submits the recorded commands (no-op when nothing is recorded). */
  flush(): void {
    const batch = this.#batch;
    if (batch === null) return;
    this.#batch = null;
    this.#endPass(batch);
    const queue = this.gpu.device.queue;
    if (this.#uniformUsed > 0) {
      queue.writeBuffer(this.#uniformRing, 0, this.#uniformCpu, 0, this.#uniformUsed);
    }
    this.#uniformUsed = 0;
    queue.submit([batch.encoder.finish({ label: "lathe_batch" })]);
    this.submitCount++;
    const device = this.gpu.device;
    const oom = device.popErrorScope();
    const validation = device.popErrorScope();
    const describe = () => {
      const labels = [...batch.labels];
      const shown = labels.slice(0, 8).map((l) => `"${l}"`).join(", ");
      return `a batch of ${batch.dispatches} commands (kernels ${shown || "none"}${
        labels.length > 8 ? ", ..." : ""
      })`;
    };
    const kernels = [...batch.unverified];
    const check = (async (): Promise<Error | null> => {
      for (const kernel of kernels) {
        try {
          await kernel.ready;
          this.#validated.add(kernel);
        } catch (error) {
          return error as Error;
        }
      }
      const [o, v] = await Promise.all([oom, validation]);
      const error = v ?? o;
      if (error === null) return null;
      return new Error(`Cannot run GPU kernels: ${error.message.trim()} (in ${describe()})`);
    })();
    const previous = this.#errors;
    this.#errors = Promise.all([previous, check]).then(([a, b]) => a ?? b);
  }

  /** Submits, waits until the GPU has finished, and throws any error of the work so far. */
  async sync(): Promise<void> {
    this.flush();
    await this.#guardLost(this.gpu.device.queue.onSubmittedWorkDone());
    await this.#throwErrors();
  }

  /**
   * Reads byte ranges of buffers back to the host: one copy each into one staging buffer,
   * one submit, one `mapAsync`. Throws the first error of any work submitted before.
   */
  async read(ranges: readonly ReadRange[]): Promise<Uint8Array[]> {
    this.gpu.assertAlive();
    const offsets: number[] = [];
    let total = 0;
    for (const r of ranges) {
      offsets.push(total);
      total += Math.ceil(r.size / 4) * 4;
    }
    if (total === 0) return ranges.map(() => new Uint8Array(0));
    const staging = this.#takeStaging(total);
    const batch = this.#open();
    this.#endPass(batch);
    ranges.forEach((r, i) => {
      const size = Math.ceil(r.size / 4) * 4;
      if (size > 0) batch.encoder.copyBufferToBuffer(r.buffer, r.offset ?? 0, staging, offsets[i], size);
    });
    batch.dispatches++;
    this.flush();
    try {
      await this.#guardLost(staging.mapAsync(GPUMapMode.READ, 0, total));
    } catch (error) {
      await this.#throwErrors();
      throw error;
    }
    const mapped = new Uint8Array(staging.getMappedRange(0, total));
    const out = ranges.map((r, i) => mapped.slice(offsets[i], offsets[i] + r.size));
    staging.unmap();
    this.#staging.push(staging);
    await this.#throwErrors();
    return out;
  }

  /** Drops cached bind groups that reference `buffer` (call before destroying it). */
  forget(buffer: GPUBuffer): void {
    const id = this.#ids.get(buffer);
    if (id === undefined) return;
    const tag = `|${id}|`;
    for (const key of this.#bindGroups.keys()) if (key.includes(tag)) this.#bindGroups.delete(key);
  }

  #open(): Batch {
    if (this.#batch === null) {
      this.gpu.assertAlive();
      const device = this.gpu.device;
      device.pushErrorScope("validation");
      device.pushErrorScope("out-of-memory");
      this.#batch = {
        encoder: device.createCommandEncoder({ label: "lathe_batch" }),
        pass: null,
        dispatches: 0,
        labels: new Set(),
        unverified: new Set(),
      };
    }
    return this.#batch;
  }

  #endPass(batch: Batch): void {
    if (batch.pass !== null) {
      batch.pass.end();
      batch.pass = null;
    }
  }

  #id(o: object): number {
    let id = this.#ids.get(o);
    if (id === undefined) this.#ids.set(o, id = this.#nextId++);
    return id;
  }

  #bindGroup(kernel: Kernel, buffers: readonly GPUBuffer[]): GPUBindGroup {
    let key = `${this.#id(kernel.layout)}:${kernel.uniformBytes}|`;
    for (const b of buffers) key += `${this.#id(b)}|`;
    let group = this.#bindGroups.get(key);
    if (group === undefined) {
      const entries: GPUBindGroupEntry[] = buffers.map((buffer, binding) => ({
        binding,
        resource: { buffer },
      }));
      if (kernel.uniformBytes > 0) {
        entries.push({
          binding: buffers.length,
          resource: { buffer: this.#uniformRing, offset: 0, size: kernel.uniformBytes },
        });
      }
      if (this.#bindGroups.size >= BIND_GROUP_CACHE_SIZE) this.#bindGroups.clear();
      group = this.gpu.device.createBindGroup({
        label: `${kernel.label}:bind`,
        layout: kernel.layout,
        entries,
      });
      this.#bindGroups.set(key, group);
    }
    return group;
  }

  #takeStaging(size: number): GPUBuffer {
    const i = this.#staging.findIndex((b) => b.size >= size && b.size <= 4 * size);
    if (i >= 0) return this.#staging.splice(i, 1)[0];
    if (this.#staging.length > 4) this.#staging.shift()!.destroy();
    return this.gpu.device.createBuffer({
      label: "readback_staging",
      size: Math.max(256, 2 ** Math.ceil(Math.log2(size))),
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }

  async #throwErrors(): Promise<void> {
    const errors = this.#errors;
    this.#errors = Promise.resolve(null);
    const first = await errors;
    if (first !== null) throw first;
  }

  /** Awaits `p`; if the device was lost meanwhile, throws the loss error naming the last kernel. */
  async #guardLost<T>(p: Promise<T>): Promise<T> {
    try {
      const value = await p;
      this.gpu.assertAlive();
      return value;
    } catch (error) {
      // The lost promise may settle a moment after the failed operation.
      await new Promise((resolve) => setTimeout(resolve, 0));
      this.gpu.assertAlive();
      throw error;
    }
  }
}
