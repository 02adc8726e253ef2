#!/usr/bin/env bash
# 2026-12-06: does the code between 03f28d7 and 491c612 change a study run? Train the same two runs at
# 03f28d7 on this machine and compare with the 491c612 runs' metrics.csv and results (run.sh, step 1).
# Result: bitwise equal (MAE mode and the default, seed 0); see README.md.
set -euo pipefail
git worktree add /tmp/wt03 03f28d7 && cd /tmp/wt03 && bash scripts/env.sh dev
MIXEDAE_CACHE=/tmp/trace/cache .venv/bin/mixedae-fast study --dataset embedded --epochs 18 --variants mae,default \
  --seeds 0 --jobs 2 --out /tmp/trace/s03 --no-progress --run.ckpt_every=468 --run.keep_last=10
for v in mae default; do
  cmp <(cut -d, -f1-6 /tmp/trace/s03/runs/$v-seed0/metrics.csv) <(cut -d, -f1-6 <study-runs>/embedded/runs/$v-seed0/metrics.csv)
done
