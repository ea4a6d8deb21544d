/**
 * Every base weight as a trainable parameter, for full fine-tuning: an f32 master copy of each
 * tensor, its f32 gradient and its AdamW moments (exp_avg, exp_avg_sq), as PyTorch trains with
 * f32 master weights under mixed precision.
 *
 * With f32 compute weights the masters are the model's own tensors. With f16 compute weights the
 * masters are a second, f32 load of the checkpoint, and after each optimizer step every compute
 * tensor is refreshed from its master (cast to f16, rounded once). 4-bit bases do not train in
 * full (QLoRA trains adapters).
 *
 * Memory per parameter: 4 (master) + 4 (gradient) + 8 (moments) bytes, plus the compute copy.
 * @module
 */
import type { Gpu } from "../device.ts";
import { cast, copy } from "../ops/elementwise.ts";
import type { AdamWTensors } from "../ops/adamw.ts";
import { recorder } from "../recorder.ts";
import { readTensors, Tensor } from "../tensor.ts";
import { clear, writeTensor } from "./adapters.ts";
import { expectedTensors, type ModelConfig } from "../../formats/model_config.ts";
import { type GpuWeights, loadGpuWeights } from "./gpu_weights.ts";
import { ModelWeights } from "../../formats/safetensors.ts";

function modelError(what: string): never {
  throw new RangeError(`Cannot use the webgpu model: ${what}`);
}

/** One trained tensor: its master, the compute tensor the layers read, gradient and moments. */
interface Param extends AdamWTensors {
  name: string;
  /** The tensor the forward reads (the master itself with f32 compute weights). */
  compute: Tensor;
  /** Only these rows train (peft's trainable_token_indices); null: every row. */
  rows: readonly number[] | null;
}

/** Which weights train, when not all of them (LoRA's `modules_to_save`, `trainable_token_indices`). */
export interface TrainedSubset {
  /** HF weight names trained in full. */
  names: readonly string[];
  /** `model.embed_tokens.weight` rows trained (the rest stays bit for bit), or none. */
  embedRows?: readonly number[];
}

/** The trainable copies of every base weight; see the module documentation. */
export class FullParams implements Disposable {
  readonly #params: Map<string, Param>;
  /** The separate f32 load (f16 compute weights), or null when the masters are the weights. */
  readonly #masters: GpuWeights | null;
  /** A subset's own f32 masters (f16 compute weights). */
  readonly #own: Tensor[];
  /** Every weight trains (full fine-tuning), not a subset beside adapters. */
  readonly all: boolean;

  private constructor(params: Map<string, Param>, masters: GpuWeights | null, own: Tensor[], all: boolean) {
    this.#params = params;
    this.#masters = masters;
    this.#own = own;
    this.all = all;
  }

  /**
   * Clears the gradient rows that do not train (rows outside `embedRows`): called before the
   * gradient norm and the update, so those rows stay bit for bit (their moments stay 0).
   */
  maskGradients(): void {
    for (const p of this.#params.values()) {
      if (p.rows === null) continue;
      const keep = new Set(p.rows);
      const rec = recorder(p.grad.gpu);
      const rowBytes = p.grad.rowSize * 4;
      for (const c of p.grad.chunks) {
        let start = -1;
        for (let r = 0; r <= c.rows; r++) {
          const cleared = r < c.rows && !keep.has(c.rowStart + r);
          if (cleared && start === -1) start = r;
          if (!cleared && start !== -1) {
            rec.clearBuffer(c.buffer, start * rowBytes, (r - start) * rowBytes);
            start = -1;
          }
        }
      }
    }
  }

  /**
   * The parameters of `weights` (the model's compute weights, loaded from `modelDir`): every weight,
   * or the `subset` trained beside LoRA adapters (its masters read from the checkpoint).
   */
  static async create(
    gpu: Gpu,
    config: ModelConfig,
    weights: GpuWeights,
    modelDir: string,
    subset: TrainedSubset | null = null,
  ): Promise<FullParams> {
    if (subset === null && weights.quantizedCount > 0) {
      modelError("a 4-bit base cannot be fine-tuned in full (train LoRA adapters on it: QLoRA)");
    }
    const shapes = expectedTensors(config);
    const names = subset?.names ?? [...shapes.keys()];
    let masters: GpuWeights | null = null;
    const own = new Map<string, Tensor>();
    if (weights.dtype !== "f32") {
      if (subset === null) masters = await loadGpuWeights(gpu, config, modelDir, { dtype: "f32" });
      else {
        using file = await ModelWeights.open(modelDir);
        for (const name of names) {
          const values = await file.readFloat32(name);
          own.set(name, Tensor.from(gpu, values, shapes.get(name)!, "f32", { label: `${name}.master` }));
        }
      }
    }
    const params = new Map<string, Param>();
    for (const name of names) {
      const compute = weights.get(name);
      const param = masters?.get(name) ?? own.get(name) ?? compute;
      if (param.dtype !== "f32") modelError(`the master copy of "${name}" is ${param.dtype}, not f32`);
      const rows = name === "model.embed_tokens.weight" && subset?.embedRows ? [...subset.embedRows] : null;
      for (const r of rows ?? []) {
        if (!Number.isInteger(r) || r < 0 || r >= config.vocabSize) {
          modelError(`trainable token ${r} is outside the vocabulary [0, ${config.vocabSize})`);
        }
      }
      params.set(name, {
        name,
        compute,
        param,
        rows,
        grad: Tensor.zeros(gpu, param.shape, "f32", { label: `${name}.grad` }),
        m: Tensor.zeros(gpu, param.shape, "f32", { label: `${name}.exp_avg` }),
        v: Tensor.zeros(gpu, param.shape, "f32", { label: `${name}.exp_avg_sq` }),
      });
    }
    return new FullParams(params, masters, [...own.values()], subset === null);
  }

  /** The gradient tensor of weight `name` (HF name), or null when it is not a parameter. */
  grad(name: string): Tensor | null {
    return this.#params.get(name)?.grad ?? null;
  }

  /** Names of the parameters, in checkpoint order. */
  names(): string[] {
    return [...this.#params.keys()];
  }

  /** Every gradient tensor. */
  gradients(): Tensor[] {
    return [...this.#params.values()].map((p) => p.grad);
  }

  /**
   * Parameter, gradient and moments of every tensor, for `adamwStep`. `rows`: the tensors of which
   * only some rows train (true) or the others (false); such a tensor takes no weight decay, which
   * would move the rows that do not train (peft decays only its delta rows).
   */
  optimizerTensors(rows?: boolean): AdamWTensors[] {
    return [...this.#params.values()]
      .filter((p) => rows === undefined || (p.rows !== null) === rows)
      .map(({ param, grad, m, v }) => ({ param, grad, m, v }));
  }

  /** The rows of weight `name` that train, or null when all do. */
  rowsOf(name: string): readonly number[] | null {
    return this.#params.get(name)?.rows ?? null;
  }

  /** Zeroes every gradient (in stream order). */
  zeroGrad(): void {
    const first = this.#params.values().next().value;
    if (!first) return;
    const rec = recorder(first.param.gpu);
    for (const p of this.#params.values()) clear(rec, p.grad);
  }

  /** Writes each master into its compute tensor (cast to f16 once) after the masters changed. */
  refresh(): void {
    for (const p of this.#params.values()) {
      if (p.compute === p.param) continue;
      if (p.compute.dtype === "f32") copy(p.param, p.compute);
      else cast(p.param, "f16", { out: p.compute });
    }
  }

  /** The masters, read back, by HF name. */
  async read(): Promise<Map<string, Float32Array>> {
    return await this.#readEach((p) => p.param);
  }

  /** The accumulated gradients, read back, by HF name. */
  async readGradients(): Promise<Map<string, Float32Array>> {
    return await this.#readEach((p) => p.grad);
  }

  /** The moments, read back, by HF name. */
  async readMoments(): Promise<{ m: Map<string, Float32Array>; v: Map<string, Float32Array> }> {
    return { m: await this.#readEach((p) => p.m), v: await this.#readEach((p) => p.v) };
  }

  async #readEach(pick: (p: Param) => Tensor): Promise<Map<string, Float32Array>> {
    const params = [...this.#params.values()];
    const host = await readTensors(params.map(pick));
    return new Map(params.map((p, i) => [p.name, host[i] as Float32Array]));
  }

  /** Overwrites the masters (and the compute copies) with `weights`, which must hold every tensor. */
  write(weights: ReadonlyMap<string, Float32Array>): void {
    for (const p of this.#params.values()) writeTensor(p.param, this.#pick(weights, p, "weights"));
    this.refresh();
  }

  /** Overwrites the moments. */
  writeMoments(m: ReadonlyMap<string, Float32Array>, v: ReadonlyMap<string, Float32Array>): void {
    for (const p of this.#params.values()) {
      writeTensor(p.m, this.#pick(m, p, "exp_avg"));
      writeTensor(p.v, this.#pick(v, p, "exp_avg_sq"));
    }
  }

  #pick(map: ReadonlyMap<string, Float32Array>, p: Param, what: string): Float32Array {
    const value = map.get(p.name);
    if (!value) modelError(`the ${what} have no "${p.name}"`);
    if (value.length !== p.param.size) {
      modelError(`the ${what} of "${p.name}" hold ${value.length} values, expected ${p.param.size}`);
    }
    return value;
  }

  /** Frees the gradients, moments and the separate masters (the compute weights are the model's). */
  destroy(): void {
    for (const p of this.#params.values()) for (const t of [p.grad, p.m, p.v]) t.destroy();
    this.#masters?.destroy();
    for (const t of this.#own) t.destroy();
    this.#params.clear();
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}
