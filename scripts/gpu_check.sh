#!/usr/bin/env bash
# The prepared device check of issue 21: one call on a lent accelerator machine, about 10 minutes on an H100/H200.
# Random-weight SD1.5- and SDXL-shaped models (published configs, ablation/published.py), bf16 at native resolution:
#   1. the memory plan against torch.cuda.max_memory_allocated (dense K/V and LoRA 16; SDXL with checkpointing);
#   2. seconds of a run with the defaults' anchor count and with the paper's 1000 anchors, anchor images/s, train
#      steps/s and peak memory (scripts/benchmark_train.py).
# Each step has its own time limit so one slow step cannot eat the budget; every result is a JSON file in $OUT.
#
#   run: bash scripts/gpu_check.sh      (with the repository's .venv carried, or after `pip install -e .`)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "{\"step\": \"$name\", \"rc\": $?, \"seconds\": $((SECONDS - start))}" >> "$OUT/steps.jsonl"
}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
step memory_sd15 150 python scripts/check_memory_plan.py --models sd15 --resolution 512 --mixed-precision bf16
step memory_sdxl 200 python scripts/check_memory_plan.py --models sdxl --resolution 1024 --mixed-precision bf16 \
  --gradient-checkpointing
step bench_sd15_defaults 90 python scripts/benchmark_train.py --only sd15 --device cuda --steps 20 --resolution 512 \
  --batch-size 4 --mixed-precision bf16 --anchor-images 16 --anchor-steps 25 --anchor-batch-size 16
step bench_sd15_paper 150 python scripts/benchmark_train.py --only sd15 --device cuda --steps 20 --resolution 512 \
  --batch-size 4 --mixed-precision bf16 --anchor-images 1000 --anchor-steps 25 --anchor-batch-size 50
step bench_sdxl 120 python scripts/benchmark_train.py --only sdxl --device cuda --steps 10 --resolution 1024 \
  --mixed-precision bf16 --anchor-images 8 --anchor-steps 25 --anchor-batch-size 4
cat "$OUT/steps.jsonl"
