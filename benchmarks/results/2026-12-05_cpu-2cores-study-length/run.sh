#!/usr/bin/env bash
# Issue 27 item 1: the study at the main job's length (2,808 steps of cpu_tiny), 5 variants x 3 seeds,
# checkpoints every 468 steps kept for the kNN curve. Runs niced, from a checkout of 03f28d7 with its own venv (bash scripts/env.sh dev).
cd <checkout at 03f28d7>
V=mae,naive,oracle,default,supcon_head0
for spec in embedded:18 digits:67 photos:108; do
  ds=${spec%%:*}; ep=${spec##*:}
  echo "=== $(date -u +%FT%TZ) $ds epochs $ep sha $(git rev-parse --short HEAD)"
  nice -n 19 .venv/bin/mixedae-fast study --dataset $ds --epochs $ep --variants $V --seeds 0,1,2 --jobs 2 \
    --out <study-runs>/$ds --no-progress --run.ckpt_every=468 --run.keep_last=10
  echo "=== $(date -u +%FT%TZ) $ds rc $?"
done
