#!/usr/bin/env bash
# 2026-12-06: do the commits since 2026-11-30 change a run on one machine? Two traces, each the old commit
# trained in a worktree beside a run of the newer code on the same machine. Result: equal cell for cell
# (see README.md here and docs/study.md, "The main job across commits and machines").
# Run from the checkout; R=<study-runs> is the folder run.sh's studies wrote to (placeholder, as in run.sh).
set -euo pipefail
R=<study-runs>
T=/tmp/trace
same() {  # same A B: metrics.csv A and B equal in every column but img_per_s and data_wait (7, 8)
  cmp <(cut -d, -f1-6,9- "$1") <(cut -d, -f1-6,9- "$2") && echo "equal: $1 $2"
}

# 1. the study: 03f28d7 against run.sh's 491c612 runs (MAE mode and the default, seed 0); own data cache
git worktree add $T/wt03 03f28d7
(cd $T/wt03 && bash scripts/env.sh dev && MIXEDAE_CACHE=$T/cache .venv/bin/mixedae-fast study --dataset embedded \
  --epochs 18 --variants mae,default --seeds 0 --jobs 2 --out $T/s03 --no-progress --run.ckpt_every=468 \
  --run.keep_last=10)
for v in mae default; do same $T/s03/runs/$v-seed0/metrics.csv $R/embedded/runs/$v-seed0/metrics.csv; done
data=synthetic-v2-32px-5000-1000-s0   # the embedded set, as each cache names it
(cd $T/cache/$data && find . -type f | sort | xargs md5sum) \
  | cmp - <(cd "${MIXEDAE_CACHE:-$HOME/.cache/mixedae_fast}/$data" && find . -type f | sort | xargs md5sum) \
  && echo "equal: the data"

# 2. the main job: 603b3c4 (2026-11-30) against this checkout
git worktree add $T/wt60 603b3c4
(cd $T/wt60 && MIXEDAE_CACHE=$T/cache60 bash scripts/main.sh --run.name=trace603 --no-progress)
bash scripts/main.sh --run.name=trace-head --run.out_dir=$T/runs --no-progress
same $T/wt60/runs/trace603/metrics.csv $T/runs/trace-head/metrics.csv
