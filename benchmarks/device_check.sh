#!/usr/bin/env bash
# GPU checks on a lent machine (shared/device/README.md), one call: install offline, run the whole
# test suite (CPU tests + the GPU-marked ones; the only place torch 2.11 / CUDA meets the code), then the
# model-step and mixing-kernel benchmarks for ViT-B/16. Full logs and JSON under $OUT (or ./device-out).
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
timeout 200 python3 -m mixedae_fast.benchmarks.bench_kernels --config vit_base --batch 256,1024 \
  --step-json "$out/bench_step.json" --out "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.log"
