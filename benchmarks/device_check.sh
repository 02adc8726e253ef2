#!/usr/bin/env bash
# GPU checks on a lent machine (shared/device/README.md), one call: install offline, run the whole
# test suite (CPU tests + the GPU-marked ones; the only place torch 2.11 / CUDA meets the code), then the
# model-step benchmark for ViT-B/16, the attention benchmark, and the model step with the fused TopK kernel.
# Full logs and JSON under $OUT (or ./device-out).
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
timeout 300 python3 -m pytest -q -rs ${TESTS:-tests} 2>&1 | tee "$out/pytest.log" | tail -15
timeout 200 python3 -m mixedae_fast.benchmarks.bench_step --config vit_base --batch ${BENCH_BATCH:-256} \
  --out "$out/bench_step.json" 2>&1 | tee "$out/bench.log"
# attention backends at ViT-B/16 (64 and 256 groups) and ViT-L shapes, baseline plain SDPA in the same run
timeout 300 python3 -m mixedae_fast.benchmarks.bench_attention --shapes ${ATTN_SHAPES:-vit_b,vit_b_256,vit_l} \
  --out "$out/bench_attention.json" 2>&1 | tee "$out/bench_attention.log"
# the model step with the fused TopK kernel (the env var overrides runtime.attention_backend)
MIXEDAE_ATTENTION_BACKEND=triton timeout 150 python3 -m mixedae_fast.benchmarks.bench_step --config vit_base \
  --batch ${BENCH_BATCH:-256} --modes topk --out "$out/bench_step_topk_triton.json" 2>&1 | tee "$out/bench_step_triton.log"
