#!/usr/bin/env bash
# GPU checks on a lent machine: install offline, then the stages in $STAGES, in this order:
#   tests      the CUDA tests of the kernels, the attention backends, compile and the model (every test in
#              these files runs on the GPU; the wide sweeps stay on the CPU interpreter); TESTS=... narrows it
#   step       the model-step benchmark for ViT-B/16 (reference paths and auto backends)
#   kernels    the mixing kernels' GPU tests, their effective bandwidth against the eager and compiled
#              references (with `step` first: their share of a step) and the card's kernel_backends.json row
#   attention  every attention backend at ViT-B/16 (64 and 256 groups) and ViT-L against plain SDPA, each
#              row checked for correctness, the fused kernel in each forward tiling and without its select
#              (the select's share); then the card's attention_backends.json row built from it (backend and
#              tiling)
#   triton     the model step with the fused TopK kernel (MIXEDAE_ATTENTION_BACKEND=triton)
#   train      mixedae-fast bench, compiled: our MAE mode vs MixedAE with the fused TopK kernel
#
# A device session has 15 minutes, the machine's start (~2 min) included, and one call at most 10. Run:
#   call 1:  STAGES=tests bash benchmarks/device_check.sh               (stage limit 240 s)
#   call 2:  STAGES="attention train" bash benchmarks/device_check.sh   (200 s + 20 s + 270 s)
# worst case with the start (~2 min) and the two offline installs: ~880 s of the 900.
# right after each other (the machine stays warm ~30 s). step, kernels (~230 s) and triton fit another session.
# Each stage tees its output into $OUT/device_check.log and, the moment it ends, appends "stage rc seconds"
# to $OUT/stages.txt, so a call cut short still returns what finished. $OUT (or ./device-out) gets at most
# 8 files per call (call 2: the log, stages.txt, bench_attention.{json,csv}, attention_backends_row.json,
# bench_train/bench_train.{json,csv,png}). Once the results sit in benchmarks/results/<date>_<card>/, put the
# card's row into the table naming that file: python -m mixedae_fast.benchmarks.bench_attention \
#   --table-row benchmarks/results/<date>_<card>/bench_attention.json --write
set -uo pipefail
out=${OUT:-device-out}
stages=" ${STAGES:-tests} "
mkdir -p "$out"
log="$out/device_check.log"
export PYTHONUNBUFFERED=1
export MIXEDAE_GIT_SHA=${MIXEDAE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, tee into the log, record rc and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "$name $rc $((SECONDS - start))" | tee -a "$out/stages.txt"
}

python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$log" 2>&1 || { tail -20 "$log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" \
  | tee -a "$log"
batch=${BENCH_BATCH:-256}
if [[ $stages == *" tests "* ]]; then
  stage tests 240 python3 -m pytest -q -rs --durations=15 --junitxml="$out/pytest.xml" ${TESTS:-tests/test_homologous_attention_triton.py \
    tests/test_attention_backends.py tests/test_compile.py tests/test_gpu.py tests/test_patch_mix_triton.py tests/test_unmix_triton.py}
fi
if [[ $stages == *" step "* ]]; then
  timeout 200 python3 -m mixedae_fast.benchmarks.bench_step --config vit_base --batch "$batch" \
    --out "$out/bench_step.json" 2>&1 | tee "$out/bench.log"
fi
if [[ $stages == *" kernels "* ]]; then
  stage kernel_tests 90 python3 -m pytest -q -rs tests/test_patch_mix_triton.py tests/test_unmix_triton.py \
    tests/test_patch_mix.py tests/test_unmix.py
  stage kernels 120 python3 -m mixedae_fast.benchmarks.bench_kernels --config vit_base --batch 256,1024 \
    $([[ -f $out/bench_step.json ]] && echo --step-json "$out/bench_step.json") --out "$out/bench_kernels.json"
  [[ -f $out/bench_kernels.json ]] && stage kernel_table 20 sh -c "python3 -m mixedae_fast.benchmarks.bench_kernels \
    --table-row '$out/bench_kernels.json' > '$out/kernel_backends_row.json'"
fi
if [[ $stages == *" attention "* ]]; then
  stage attention 200 python3 -m mixedae_fast.benchmarks.bench_attention --shapes "${ATTN_SHAPES:-vit_b,vit_b_256,vit_l}" \
    --triton-tilings all --ablate-select --out "$out/bench_attention.json"
  # --write: this machine's copy of the table takes the row, so the train stage after it runs the fused
  # kernel in the tiling just measured fastest (the committed table changes only by hand, from the result file)
  [[ -f $out/bench_attention.json ]] && stage table 20 sh -c "python3 -m mixedae_fast.benchmarks.bench_attention \
    --table-row '$out/bench_attention.json' --write > '$out/attention_backends_row.json'"
fi
if [[ $stages == *" triton "* ]]; then
  MIXEDAE_ATTENTION_BACKEND=triton timeout 150 python3 -m mixedae_fast.benchmarks.bench_step --config vit_base \
    --batch "$batch" --modes topk --out "$out/bench_step_topk_triton.json" 2>&1 | tee "$out/bench_step_triton.log"
fi
if [[ $stages == *" train "* ]]; then
  # attention_backend=triton: MixedAE's TopK blocks run the fused kernel; MAE mode (ha=none) runs SDPA either way
  MIXEDAE_ATTENTION_BACKEND=triton stage train 270 python3 -m mixedae_fast.benchmarks.bench_train --config vit_base \
    --batch "$batch" --modes mae,mixedae --source synthetic --compile compiled --warmup 3 --windows 3 --steps 10 \
    --out "$out/bench_train"
fi
