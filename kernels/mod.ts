/**
 * lathe's WebGPU engine: the device, tensors, the command recorder, compiled kernels and the
 * core ops (matmul, elementwise helpers).
 *
 * Work is recorded, not run: ops append dispatches to the device's recorder, which submits
 * them in batches; reading a tensor back submits what is pending and throws any GPU error of
 * that work, naming the kernels involved.
 *
 * @example
 * ```ts
 * import { getGpu, matmul, Tensor } from "./kernels/mod.ts";
 *
 * const gpu = await getGpu();
 * // T = tokens, D = hidden, F = ffn: y[T,F] = x[T,D] · W[F,D]ᵀ + b[F]
 * using x = Tensor.from(gpu, new Float32Array(4 * 8).fill(1), [4, 8]);
 * using W = Tensor.from(gpu, new Float32Array(16 * 8).fill(0.5), [16, 8]);
 * using b = Tensor.from(gpu, new Float32Array(16).fill(1), [16]);
 * using y = matmul(x, W, { layout: "NT", bias: b });
 * console.log(await y.read()); // 5 everywhere
 * ```
 * @module
 */

export { backendName, getGpu, Gpu, type GpuInfo, noAdapterError, requestGpu, tryGetGpu } from "./device.ts";
export type { RequestGpuOptions } from "./device.ts";
export {
  bucketSize,
  type DType,
  DTYPE_BYTES,
  type HostArray,
  type MemoryStats,
  memoryStats,
  readTensors,
  resetPeakMemory,
  shapeSize,
  Tensor,
  type TensorChunk,
  type TensorOptions,
  trimPool,
} from "./tensor.ts";
export {
  bf16ArrayToF32,
  f16ArrayToF32,
  f16ToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
  f32BitsToBf16Bits,
  f32BitsToF16Bits,
  f32ToF16,
} from "./half.ts";
export {
  type BindingAccess,
  getKernel,
  type Kernel,
  kernelLabel,
  type KernelParams,
  type KernelSpec,
} from "./pipeline.ts";
export { type ReadRange, Recorder, recorder, type Workgroups } from "./recorder.ts";
export {
  chooseConfig,
  DIRECT_TILES,
  type FloatDType,
  matmul,
  MATMUL_TILES,
  matmulCandidates,
  type MatmulChoice,
  matmulChoice,
  type MatmulConfig,
  type MatmulDirectTile,
  type MatmulLayout,
  matmulNaive,
  type MatmulOptions,
  type MatmulShape,
  type MatmulTile,
  type RowRange,
} from "./ops/matmul.ts";
export { readTuningTable, type TuningTable, tuningTablePath } from "./ops/matmul_table.ts";
export { tuneMatmul, type TuneOptions, type TuneShape } from "./ops/matmul_tune.ts";
export { add, axpy, cast, copy, type ElementwiseOptions, fill, mul, scale } from "./ops/elementwise.ts";

// Training kernels: each op dispatches WGSL from kernels/wgsl/ and is tested against kernels/reference/.
export { rmsnormBackward, rmsnormForward } from "./ops/rmsnorm.ts";
export { ropeBackward, ropeForward, ropeTable } from "./ops/rope.ts";
export { swigluBackward, swigluBackwardFused, swigluForward, swigluForwardFused } from "./ops/swiglu.ts";
export { embeddingBackward, embeddingForward } from "./ops/embedding.ts";
export { attentionBackward, attentionForward } from "./ops/attention.ts";
export { crossEntropyBackward, crossEntropyForward, IGNORE_INDEX } from "./ops/cross_entropy.ts";
export { gradNorm } from "./ops/grad_norm.ts";
export { adamwState, adamwStep } from "./ops/adamw.ts";
export { loraBackward, loraDropout, loraForward, loraScaling } from "./ops/lora.ts";
export { dequantize4bitGpu, Quant4bitWeight, uploadQuant4bit } from "./ops/quant_4bit.ts";

// Models: the WebGPU decoder graph and the CPU reference backend, both TrainableModel.
export { createGpuModel } from "./models/graph.ts";
export {
  fitAdvice,
  formatMemoryPlan,
  memoryLimits,
  type MemoryPlan,
  planTrainingMemory,
  type TrainingMemorySettings,
} from "./models/memory_plan.ts";
export { createReferenceModel } from "./models/reference_backend.ts";
