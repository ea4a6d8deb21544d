/**
 * The LoRA adapters of a GPU model with their training state: per adapted projection of every
 * layer, A[r,K] and B[N,r] (PEFT layout), their gradients dA, dB (summed over the micro-batches
 * of an optimizer step) and the AdamW moments m, v — all f32 tensors on the GPU.
 *
 * K = in features, N = out features of the projection, r = LoRA rank.
 *
 * Adapters start as PEFT's `init_lora_weights=True` through kernels/models/trainable.ts `initialAdapters`
 * (A ~ U(−1/√K, 1/√K) from PCG32 (seed, stream = layer·7 + projection index), B = 0), the same
 * call the CPU reference backend makes, so both backends start from identical adapters.
 * @module
 */
import { loraKey } from "../../formats/peft.ts";
import type { Gpu } from "../device.ts";
import { adamwState } from "../ops/adamw.ts";
import { recorder } from "../recorder.ts";
import { readTensors, Tensor } from "../tensor.ts";
import {
  type ModelConfig,
  type Projection,
  projectionPath,
  projectionShape,
} from "../../formats/model_config.ts";
import { initialAdapters, type LoraSpec, type LoraWeights, type OptimizerState } from "./trainable.ts";

/** One adapted projection and its state on the GPU. */
export interface AdapterSlot {
  readonly layer: number;
  readonly module: Projection;
  /** K and N of the projection W[N,K]. */
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** lora_A.weight[r,K]. */
  readonly A: Tensor;
  /** lora_B.weight[N,r]. */
  readonly B: Tensor;
  /** Gradients, same shapes (added into by every micro-batch). */
  readonly dA: Tensor;
  readonly dB: Tensor;
  /** AdamW exp_avg and exp_avg_sq of A and B. */
  readonly mA: Tensor;
  readonly vA: Tensor;
  readonly mB: Tensor;
  readonly vB: Tensor;
}

function modelError(what: string): never {
  throw new RangeError(`Cannot use the webgpu model: ${what}`);
}

/** Every adapter of a model, addressable by (layer, module). */
export class GpuAdapters implements Disposable {
  readonly slots: readonly AdapterSlot[];
  #byKey: Map<string, AdapterSlot>;

  private constructor(slots: AdapterSlot[]) {
    this.slots = slots;
    this.#byKey = new Map(slots.map((s) => [`${s.layer}/${s.module}`, s]));
  }

  /**
   * Fresh adapters for every layer × target (PEFT init, seeded), zero gradients and moments.
   *
   * @example
   * ```ts
   * using adapters = GpuAdapters.init(gpu, config, { r: 8, alpha: 16, dropout: 0, targets: ["q_proj"], useRslora: false }, 42);
   * ```
   */
  static init(gpu: Gpu, config: ModelConfig, lora: LoraSpec, seed: number): GpuAdapters {
    if (!Number.isInteger(lora.r) || lora.r <= 0) {
      modelError(`LoRA rank r ${lora.r} must be a positive integer`);
    }
    if (lora.targets.length === 0) return new GpuAdapters([]); // full fine-tuning: no adapter
    const pairs = initialAdapters(config, lora, seed);
    const slots = pairs.map((p): AdapterSlot => {
      const [N, K] = projectionShape(config, p.module);
      const name = (which: string) => `${projectionPath(p.layer, p.module)}.${which}`;
      const A = Tensor.from(gpu, p.a, [lora.r, K], "f32", { label: name("lora_A") });
      const B = Tensor.from(gpu, p.b, [N, lora.r], "f32", { label: name("lora_B") });
      const a = adamwState(A);
      const b = adamwState(B);
      return {
        layer: p.layer,
        module: p.module,
        inFeatures: K,
        outFeatures: N,
        A,
        B,
        dA: Tensor.zeros(gpu, A.shape, "f32", { label: `${A.label}.grad` }),
        dB: Tensor.zeros(gpu, B.shape, "f32", { label: `${B.label}.grad` }),
        mA: a.m,
        vA: a.v,
        mB: b.m,
        vB: b.v,
      };
    });
    return new GpuAdapters(slots);
  }

  /** The adapter of `module` in `layer`, or null when that projection is not a target. */
  find(layer: number, module: Projection): AdapterSlot | null {
    return this.#byKey.get(`${layer}/${module}`) ?? null;
  }

  /** Every gradient tensor (dA, dB of each slot), in slot order. */
  gradients(): Tensor[] {
    return this.slots.flatMap((s) => [s.dA, s.dB]);
  }

  /** Zeroes every gradient (in stream order). */
  zeroGrad(): void {
    if (this.slots.length === 0) return;
    const rec = recorder(this.slots[0].A.gpu);
    for (const t of this.gradients()) clear(rec, t);
  }

  /** The adapter weights, read back. */
  async read(): Promise<LoraWeights[]> {
    const host = await readTensors(this.slots.flatMap((s) => [s.A, s.B]));
    return this.slots.map((s, i) => ({
      layer: s.layer,
      module: s.module,
      A: host[2 * i] as Float32Array,
      B: host[2 * i + 1] as Float32Array,
    }));
  }

  /** The gradients, read back, by PEFT tensor name (`base_model.model.….lora_A.weight`). */
  async readGradients(): Promise<Map<string, Float32Array>> {
    const host = await readTensors(this.gradients());
    const out = new Map<string, Float32Array>();
    this.slots.forEach((s, i) => {
      out.set(loraKey(s.layer, s.module, "A"), host[2 * i] as Float32Array);
      out.set(loraKey(s.layer, s.module, "B"), host[2 * i + 1] as Float32Array);
    });
    return out;
  }

  /**
   * Replaces the adapter weights. Every adapter must be given exactly once, with its shapes;
   * nothing is written unless all of them check.
   */
  write(weights: readonly LoraWeights[]): void {
    const seen = new Set<AdapterSlot>();
    for (const w of weights) {
      const s = this.find(w.layer, w.module);
      if (s === null) modelError(`layer ${w.layer} ${w.module} carries no adapter`);
      if (w.A.length !== s.A.size || w.B.length !== s.B.size) {
        modelError(
          `layer ${w.layer} ${w.module} got A of ${w.A.length} and B of ${w.B.length} values, ` +
            `expected ${s.A.size} and ${s.B.size}`,
        );
      }
      if (seen.has(s)) modelError(`layer ${w.layer} ${w.module} is given twice`);
      seen.add(s);
    }
    if (seen.size !== this.slots.length) {
      modelError(`setLora got ${seen.size} distinct adapters, the model has ${this.slots.length}`);
    }
    for (const w of weights) {
      const s = this.find(w.layer, w.module)!;
      writeTensor(s.A, w.A);
      writeTensor(s.B, w.B);
    }
  }

  /** The AdamW moments, read back, by PEFT tensor name. */
  async readMoments(): Promise<{ m: Map<string, Float32Array>; v: Map<string, Float32Array> }> {
    const host = await readTensors(this.slots.flatMap((s) => [s.mA, s.vA, s.mB, s.vB]));
    const m = new Map<string, Float32Array>();
    const v = new Map<string, Float32Array>();
    this.slots.forEach((s, i) => {
      m.set(loraKey(s.layer, s.module, "A"), host[4 * i] as Float32Array);
      v.set(loraKey(s.layer, s.module, "A"), host[4 * i + 1] as Float32Array);
      m.set(loraKey(s.layer, s.module, "B"), host[4 * i + 2] as Float32Array);
      v.set(loraKey(s.layer, s.module, "B"), host[4 * i + 3] as Float32Array);
    });
    return { m, v };
  }

  /** Replaces the AdamW moments; every adapter tensor needs both, with its size. */
  writeMoments(state: OptimizerState): void {
    const pick = (map: Map<string, Float32Array>, key: string, into: Tensor, what: string): Float32Array => {
      const value = map.get(key);
      if (!value) modelError(`optimizer state has no ${what} for "${key}"`);
      if (value.length !== into.size) {
        modelError(`optimizer ${what} of "${key}" holds ${value.length} values, expected ${into.size}`);
      }
      return value;
    };
    const writes: [Tensor, Float32Array][] = [];
    for (const s of this.slots) {
      for (const [which, m, v] of [["A", s.mA, s.vA], ["B", s.mB, s.vB]] as const) {
        const key = loraKey(s.layer, s.module, which);
        writes.push([m, pick(state.m, key, m, "exp_avg")], [v, pick(state.v, key, v, "exp_avg_sq")]);
      }
    }
    const expected = 2 * this.slots.length;
    if (state.m.size !== expected || state.v.size !== expected) {
      modelError(`optimizer state holds ${state.m.size}/${state.v.size} moments, expected ${expected}`);
    }
    for (const [t, data] of writes) writeTensor(t, data);
  }

  /** Every AdamW parameter group (A and B of each slot). */
  optimizerTensors(): { param: Tensor; grad: Tensor; m: Tensor; v: Tensor }[] {
    return this.slots.flatMap((s) => [
      { param: s.A, grad: s.dA, m: s.mA, v: s.vA },
      { param: s.B, grad: s.dB, m: s.mB, v: s.vB },
    ]);
  }

  destroy(): void {
    for (const s of this.slots) {
      for (const t of [s.A, s.B, s.dA, s.dB, s.mA, s.vA, s.mB, s.vB]) t.destroy();
    }
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

export function clear(rec: ReturnType<typeof recorder>, t: Tensor): void {
  for (const c of t.chunks) rec.clearBuffer(c.buffer, 0, Math.ceil(c.byteLength / 4) * 4);
}

/** Overwrites an f32 tensor with host data, after the work recorded so far (which may read it). */
export function writeTensor(t: Tensor, data: Float32Array): void {
  recorder(t.gpu).flush();
  const rowSize = t.rowSize;
  for (const c of t.chunks) {
    const part = data.subarray(c.rowStart * rowSize, (c.rowStart + c.rows) * rowSize);
    t.gpu.device.queue.writeBuffer(c.buffer, 0, part as Float32Array<ArrayBuffer>);
  }
}
