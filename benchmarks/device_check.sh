#!/usr/bin/env bash
# GPU checks on a GPU machine that has torch, triton, timm and pytest (with xdist and timeout), nothing else
# installed, and possibly a copy of the tree without a usable .git.
#
#   bash benchmarks/device_check.sh prepare     here, in the checkout, before the calls: writes .git_sha (the
#                                               code's SHA, for a copy without .git); carry it with each call
#   STAGES="attention train" bash benchmarks/device_check.sh     call 1: ~7.5 min at most with the start
#   STAGES="tests kernels" bash benchmarks/device_check.sh      call 2, at once after it: ~4 min at most
# Limits sum to 425 + 200 s, so the two calls with a machine start each (~35 s on 2026-12-04) take under
# 12 minutes. Seen on an H200 (2026-12-04): tests 111 s, attention rows 45 s (once compiled), train
# 171 s; the parts, which compile every variant first (9 forwards, 4 backwards), did not finish in 45 s.
#
# Stages, run in the order given, each under its own time limit (LIMIT_<STAGE>=seconds overrides it;
# TILINGS / BWD_TILINGS narrow the fused kernel's forward / backward tilings, default all; ROWS the
# attention rows, mode:backend pairs):
#   tests      the GPU tests of the kernels, attention backends, compile and model files, in parallel
#              (pytest -n 8, 120 s a test) against the committed tables; each failure's report lands in
#              failures.txt as it happens
#   attention  ViT-B/16 alone: the fused kernel's parts timed alone (the forward per tiling and select
#              variant, the backward per tiling: where the time goes), then every attention backend's
#              forward+backward against plain SDPA, each row checked for correctness; then the card's
#              measured.json entries, written into this copy's table so that `train` runs the
#              tilings just measured fastest (the committed table is back when the script ends)
#   kernels    the mixing kernels' bandwidth (bench_kernels, batch 256 and 1024) and their table row
#   train      mixedae-fast bench, compiled: our MAE mode vs MixedAE with the fused kernel, ViT-B/16
#   large      the attention rows at 256 groups and ViT-L (optional: only with time to spare)
# Every benchmark rewrites its result file after each row, so a stage killed at its limit keeps the rows
# that finished; each stage appends "name rc seconds" to stages.txt when it ends (rc 124: killed).
# Results go to $OUT (or ./device-out); at most 8 files come back from a call:
#   call 1: log.txt stages.txt parts.json bench_attention.json attention_row.json bench_train.json
#   call 2: log.txt stages.txt failures.txt bench_kernels.json kernel_row.json (large.json)
# DRY=1: the same stages on a CPU with tiny shapes through Triton's interpreter (tests/test_device_check.py).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [[ ${1:-} == prepare ]]; then
  sha=$(git rev-parse --short HEAD) || { echo "error: prepare runs in a git checkout" >&2; exit 2; }
  [[ -n $(git status --porcelain --untracked-files=no) ]] && sha="$sha+dirty"
  echo "$sha" > .git_sha
  echo "wrote .git_sha: $sha (carry it: run(carry=[\".git_sha\"], ...))"
  exit 0
fi
# the code's SHA: the device copy may carry a stale .git of its own, so the prepared file wins there
[[ -f .git_sha && -z ${MIXEDAE_GIT_SHA:-} ]] && export MIXEDAE_GIT_SHA=$(cat .git_sha)
out=${OUT:-device-out}
mkdir -p "$out" && touch "$out/stages.txt"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dry=${DRY:-0}
if [[ $dry == 1 ]]; then
  export TRITON_INTERPRET=1
  shape=tiny; kcfg=(--config cpu_tiny --batch 8 --iters 2 --warmup 1 --triton); iters=(--warmup 1 --iters 2)
  tilings=${TILINGS:-m64w4}; bwd_tilings=${BWD_TILINGS:-n64m32w4}; rows=${ROWS:-topk:triton,none:sdpa,oracle:sdpa}
  tcfg=(--config cpu_tiny --batch 8 --modes mixedae --compile eager --warmup 1 --windows 1 --steps 1
        --breakdown-steps 0 --model.depth=1)
else
  shape=vit_b; kcfg=(--config vit_base --batch 256,1024); iters=()
  tilings=${TILINGS:-all}; bwd_tilings=${BWD_TILINGS:-all}
  rows=${ROWS:-topk:triton,none:sdpa,topk:sdpa,topk:flex,oracle:sdpa,oracle:flex,none:flex,topk:eager,none:eager,oracle:eager}
  tcfg=(--config vit_base --batch 256 --modes mae,mixedae --compile compiled --warmup 3 --windows 3 --steps 10)
fi

# `attention` writes its entries into this copy's measured.json (so `train` runs the tilings just
# measured fastest); the shipped table comes back when the script ends, so `tests` read what is committed
table=mixedae_fast/measured.json
shipped=$(mktemp) && cp "$table" "$shipped" && trap 'cp "$shipped" "$table"; rm -f "$shipped"' EXIT

stage() {  # stage NAME DEFAULT_SECONDS COMMAND...: run under its limit, tee into the log, record rc and time
  local name=$1 limit=$2 start=$SECONDS rc var
  var="LIMIT_${1^^}"
  limit=${!var:-$limit}
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "$name $rc $((SECONDS - start))" | tee -a "$out/stages.txt"
}

if [[ $dry != 1 ]]; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e . >> "$log" 2>&1 || { tail -20 "$log"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
fi
"$py" -c "import torch, triton; from mixedae_fast.provenance import git_sha; print('torch', torch.__version__, \
'triton', triton.__version__, 'git', git_sha())" | tee -a "$log"

for name in ${STAGES:-attention train}; do
  case $name in
    tests)
      cp "$shipped" "$table"   # the committed table (tests check what it says), after any --write
      opts=(-q -rfE --tb=short)
      "$py" -c "import xdist, pytest_timeout" 2>/dev/null && opts+=(-n "${TEST_WORKERS:-8}" --timeout 120)
      if [[ $dry == 1 ]]; then files=(tests/test_homologous_attention_triton.py -k "errors or table_names")
      else files=(tests/test_homologous_attention_triton.py tests/test_attention_backends.py tests/test_compile.py
                  tests/test_gpu.py tests/test_patch_mix_triton.py tests/test_unmix_triton.py); fi
      MIXEDAE_FAILURE_LOG="$out/failures.txt" stage tests 120 "$py" -m pytest "${opts[@]}" "${files[@]}" ;;
    attention)
      stage parts 120 "$py" -m mixedae_fast.benchmarks.bench_attention --shapes "$shape" --only-parts \
        --triton-tilings "$tilings" --bwd-tilings "$bwd_tilings" --ablate-select "${iters[@]}" --no-csv --out "$out/parts.json"
      stage attention 90 "$py" -m mixedae_fast.benchmarks.bench_attention --shapes "$shape" \
        --triton-tilings "$tilings" --bwd-tilings "$bwd_tilings" --ablate-select "${iters[@]}" --no-csv \
        --out "$out/bench_attention.json" --rows "$rows"
      if [[ -f $out/bench_attention.json ]]; then
        write=(--write); [[ $dry == 1 ]] && write=()
        stage attention_row 15 sh -c "'$py' -m mixedae_fast.benchmarks.bench_attention --table-row \
          '$out/bench_attention.json' ${write[*]} > '$out/attention_row.json'"
      fi ;;
    kernels)
      stage kernels 60 "$py" -m mixedae_fast.benchmarks.bench_kernels "${kcfg[@]}" --out "$out/bench_kernels.json"
      [[ -f $out/bench_kernels.json ]] && stage kernel_row 20 sh -c "'$py' -m mixedae_fast.benchmarks.bench_kernels \
        --table-row '$out/bench_kernels.json' > '$out/kernel_row.json'" ;;
    train)
      # MixedAE's TopK blocks run the fused kernel (MAE mode has no TopK block: SDPA either way)
      MIXEDAE_ATTENTION_BACKEND=triton stage train 200 "$py" -m mixedae_fast.benchmarks.bench_train "${tcfg[@]}" --source synthetic \
        --out "$out/train"
      [[ -f $out/train/bench_train.json ]] && cp "$out/train/bench_train.json" "$out/bench_train.json"
      rm -rf "$out/train" ;;
    large)
      large=vit_b_256,vit_l; [[ $dry == 1 ]] && large=tiny
      stage large 90 "$py" -m mixedae_fast.benchmarks.bench_attention --shapes "$large" "${iters[@]}" \
        --rows topk:triton,none:sdpa,topk:flex,oracle:flex --no-csv --out "$out/large.json" ;;
    *) echo "error: unknown stage '$name'; choose from tests attention kernels train large" | tee -a "$log" >&2
       exit 2 ;;
  esac
done
echo "== stages (name rc seconds)" | tee -a "$log"
cat "$out/stages.txt" | tee -a "$log"
