#!/usr/bin/env bash
# GPU checks on a lent machine (shared/device/README.md), one call: install offline, then the stages in
# $STAGES (default: all, in this order):
#   tests      the whole test suite (CPU tests + the GPU-marked ones; the only place torch 2.11 / CUDA
#              meets the code); TESTS=... narrows it
#   step       the model-step benchmark for ViT-B/16 (reference paths and auto backends)
#   kernels    the mixing kernels' effective bandwidth (needs `step` for the share of a step)
#   attention  every attention backend at ViT-B/16 (64 and 256 groups) and ViT-L, plain SDPA baseline
#   triton     the model step with the fused TopK kernel (MIXEDAE_ATTENTION_BACKEND=triton)
#   train      mixedae-fast bench: official-recipe MAE / MAE mode / MixedAE, eager and compiled
# Full logs and JSON under $OUT (or ./device-out). Each stage has its own timeout; together they exceed
# one 10-minute device call, so split them: STAGES=tests, then 'step kernels triton', then 'attention train'.
set -uo pipefail
out=${OUT:-device-out}
stages=" ${STAGES:-tests step kernels attention triton train} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
batch=${BENCH_BATCH:-256}
if [[ $stages == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -rs ${TESTS:-tests} 2>&1 | tee "$out/pytest.log" | tail -15
fi
if [[ $stages == *" step "* ]]; then
  timeout 200 python3 -m mixedae_fast.benchmarks.bench_step --config vit_base --batch "$batch" \
    --out "$out/bench_step.json" 2>&1 | tee "$out/bench.log"
fi
if [[ $stages == *" kernels "* ]]; then
  timeout 200 python3 -m mixedae_fast.benchmarks.bench_kernels --config vit_base --batch 256,1024 \
    $([[ -f $out/bench_step.json ]] && echo --step-json "$out/bench_step.json") \
    --out "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.log"
fi
if [[ $stages == *" attention "* ]]; then
  timeout 300 python3 -m mixedae_fast.benchmarks.bench_attention --shapes ${ATTN_SHAPES:-vit_b,vit_b_256,vit_l} \
    --out "$out/bench_attention.json" 2>&1 | tee "$out/bench_attention.log"
fi
if [[ $stages == *" triton "* ]]; then
  MIXEDAE_ATTENTION_BACKEND=triton timeout 150 python3 -m mixedae_fast.benchmarks.bench_step --config vit_base \
    --batch "$batch" --modes topk --out "$out/bench_step_topk_triton.json" 2>&1 | tee "$out/bench_step_triton.log"
fi
if [[ $stages == *" train "* ]]; then
  timeout 400 python3 -m mixedae_fast.benchmarks.bench_train --config vit_base --batch "$batch" --compile both \
    --out "$out/bench_train" 2>&1 | tee "$out/bench_train.log"
fi
