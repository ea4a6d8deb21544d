#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, for a machine with a GPU driver and Deno but no
# network (no npm): tune the matmul tiles, benchmark matmul against TF.js and the card's peak,
# benchmark attention against the previous kernels and matmul, LoRA fused against unfused, train a
# Mistral-7B-shaped random model for a few steps, then the NF4 benchmark (4-bit matmul against f16,
# dequantization against a copy, the quantize step against plain I/O), a Mistral-7B-shaped QLoRA
# step against the LoRA step on the same random model, and PyTorch + transformers + peft LoRA on the
# same shape (bf16, SDPA, gradient checkpointing; bench/peft_lora.py) side by side with lathe's.
#
# Build the bundle first where npm is reachable, and carry it with the tree:
#   deno bundle bench/main.ts -o kernels/ops/bench.bundle.js
# (the bundle lives in kernels/ops/ because the ops read their WGSL relative to their own folder).
#
# Usage: bench/gpu.sh OUT_DIR [PEAK_TFLOPS]
#   OUT_DIR      receives tune.log, matmul.log, attention.{log,json}, lora.{log,json}, train.{log,json},
#                nf4.{log,json}, qlora.{log,json}, peft_lora.{log,json}, generate.{log,json} and cache/
#                (the tuning table)
#   PEAK_TFLOPS  the card's FP32 vector peak (H100 SXM: 66.9), for "% of peak" columns
# Each phase takes its arguments from TUNE_ARGS, MATMUL_ARGS, ATTENTION_ARGS, LORA_ARGS, TRAIN_ARGS,
# NF4_ARGS, QLORA_ARGS, PEFT_ARGS, GENERATE_ARGS and EXPORT_ARGS when set. PHASES picks phases (default: all, in this order):
#   PHASES="nf4 qlora peft" bench/gpu.sh OUT_DIR
# The qlora phase writes the 14.5 GB bf16 checkpoint, then the quantize step makes its 4-bit copy on
# one CPU core (tens of MB/s: minutes for all 32 layers); QLORA_ARGS="--parts train --layers 8" is
# quicker. The peft phase runs $PYTHON (default python3); without transformers and peft it says so
# and the script goes on.
set -euo pipefail

out=${1:?usage: bench/gpu.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
bundle="$root/kernels/ops/bench.bundle.js"
if [[ ! -f $bundle ]]; then
  echo "bench/gpu.sh: $bundle is missing; build it with: deno bundle bench/main.ts -o kernels/ops/bench.bundle.js" >&2
  exit 2
fi
mkdir -p "$out/cache"
export LATHE_CACHE_DIR="$out/cache"
[[ -n $peak ]] && export LATHE_PEAK_TFLOPS="$peak"

bench() { deno run -A "$bundle" "$@"; }
phases=" ${PHASES:-tune matmul attention lora train nf4 qlora peft generate export} "
want() { [[ $phases == *" $1 "* ]] && echo "== $1 ($(date -u +%FT%TZ))"; }

# shellcheck disable=SC2086
if want tune; then bench tune ${TUNE_ARGS:-} 2>&1 | tee "$out/tune.log"; fi

# shellcheck disable=SC2086
if want matmul; then bench matmul ${MATMUL_ARGS:---sizes 256,512,1024,2048,4096} 2>&1 | tee "$out/matmul.log"; fi

# shellcheck disable=SC2086
if want attention; then bench attention ${ATTENTION_ARGS:-} --json "$out/attention.json" 2>&1 | tee "$out/attention.log"; fi

# shellcheck disable=SC2086
if want lora; then bench lora ${LORA_ARGS:-} --json "$out/lora.json" 2>&1 | tee "$out/lora.log"; fi

# shellcheck disable=SC2086
if want train; then
  bench train ${TRAIN_ARGS:---shape mistral-7b --rows 2 --seq 2048 --steps 3 --warmup 1 --objectives sft,dpo,dpo-live} --json "$out/train.json" 2>&1 |
    tee "$out/train.log"
fi

# NF4 at the GPU defaults: T 2048 with W 4096×4096 and 14336×4096; quantize 512 MB of bf16.
# shellcheck disable=SC2086
if want nf4; then bench nf4 ${NF4_ARGS:---parts matmul,quantize} --json "$out/nf4.json" 2>&1 | tee "$out/nf4.log"; fi

# QLoRA against LoRA on all of Mistral 7B (hidden 4096, 32 layers), B×S 1×2048, r 16.
# shellcheck disable=SC2086
if want qlora; then
  bench nf4 ${QLORA_ARGS:---parts train --shape mistral-7b --layers 32 --rows 1 --seq 2048 --steps 3 --warmup 1} \
    --json "$out/qlora.json" 2>&1 | tee "$out/qlora.log"
fi

# The same shape and settings in PyTorch + transformers + peft (bf16, SDPA, gradient checkpointing),
# with lathe's QLoRA and LoRA figures beside it.
if want peft; then
  lathe=()
  [[ -f $out/qlora.json ]] && lathe=(--lathe "$out/qlora.json")
  # shellcheck disable=SC2086
  "${PYTHON:-python3}" "$root/bench/peft_lora.py" ${PEFT_ARGS:---layers 32 --rows 1 --seq 2048 --steps 3 --warmup 1} \
    --json "$out/peft_lora.json" ${lathe[@]+"${lathe[@]}"} 2>&1 | tee "$out/peft_lora.log" ||
    echo "bench/gpu.sh: peft_lora.py exited with ${PIPESTATUS[0]} (3: transformers or peft missing)"
fi

# KV-cache decoding of all of Mistral 7B in f16 and NF4, batch 1 and 8: decode step time against a copy
# of the weights (the memory-bandwidth bound of a batch-1 step).
# shellcheck disable=SC2086
if want generate; then
  bench generate ${GENERATE_ARGS:---shape mistral-7b --nf4 --prompt 512 --new 64 --batches 1,8} \
    --json "$out/generate.json" 2>&1 | tee "$out/generate.log"
fi

# Merge and GGUF export (Q8_0, Q4_K_M) of 512 MB of bf16 against a read + write of the same bytes, with the
# machine's cores quantizing (CPU only; the GPU machines have 16 cores).
# shellcheck disable=SC2086
if want export; then bench export ${EXPORT_ARGS:---mb 512 --rounds 2} --json "$out/export.json" 2>&1 | tee "$out/export.log"; fi
