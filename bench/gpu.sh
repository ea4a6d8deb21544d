#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, for a machine with a GPU driver and Deno but no
# network (no npm): tune the matmul tiles, benchmark matmul against TF.js and the card's peak,
# benchmark attention against the previous kernels and matmul, LoRA fused against unfused, then train a
# Mistral-7B-shaped random model for a few steps.
#
# Build the bundle first where npm is reachable, and carry it with the tree:
#   deno bundle bench/main.ts -o kernels/ops/bench.bundle.js
# (the bundle lives in kernels/ops/ because the ops read their WGSL relative to their own folder).
#
# Usage: bench/gpu.sh OUT_DIR [PEAK_TFLOPS]
#   OUT_DIR      receives tune.log, matmul.log, attention.{log,json}, lora.{log,json}, train.{log,json} and cache/ (the tuning table)
#   PEAK_TFLOPS  the card's FP32 vector peak (H100 SXM: 66.9), for "% of peak" columns
# Each phase takes its arguments from TUNE_ARGS, MATMUL_ARGS, ATTENTION_ARGS, LORA_ARGS and TRAIN_ARGS when set.
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

echo "== tune ($(date -u +%FT%TZ))"
# shellcheck disable=SC2086
bench tune ${TUNE_ARGS:-} 2>&1 | tee "$out/tune.log"

echo "== matmul ($(date -u +%FT%TZ))"
# shellcheck disable=SC2086
bench matmul ${MATMUL_ARGS:---sizes 256,512,1024,2048,4096} 2>&1 | tee "$out/matmul.log"

echo "== attention ($(date -u +%FT%TZ))"
# shellcheck disable=SC2086
bench attention ${ATTENTION_ARGS:-} --json "$out/attention.json" 2>&1 | tee "$out/attention.log"

echo "== lora ($(date -u +%FT%TZ))"
# shellcheck disable=SC2086
bench lora ${LORA_ARGS:-} --json "$out/lora.json" 2>&1 | tee "$out/lora.log"

echo "== train ($(date -u +%FT%TZ))"
# shellcheck disable=SC2086
bench train ${TRAIN_ARGS:---shape mistral-7b --rows 1 --seq 2048 --steps 3 --warmup 1} --json "$out/train.json" 2>&1 |
  tee "$out/train.log"
