#!/usr/bin/env bash
# CS-ReFT's cost on one GPU at Llama-2-7B's shape: d=4096, 32 layers, intermediate 11008,
# 32 heads, vocab 32000, bf16, random weights built from the config (nothing is downloaded).
# k=4, rank 4, layers 3,9,18,24, positions f7+l7, batch 4 x 512. Prints the train-step ratio
# against the reference step, the decode ratio against the base and the peak-memory ratios
# last. About 4-6 minutes on one H100/H200 (the budget is 8).
#
#   bash benchmarks/gpu_check.sh [RESULT.json] [more speed.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
shift || true
exec "${PYTHON:-python}" benchmarks/speed.py --model-shape llama2-7b --device cuda --dtype bfloat16 \
    --batch-size 4 --seq-len 512 --repeats 5 --new-tokens 128 --gen-batch-sizes 1,4 \
    --skip lora --memory-jobs 2 --json "$out" "$@"
