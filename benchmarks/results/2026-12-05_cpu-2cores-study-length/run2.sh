#!/usr/bin/env bash
# Follows run.sh (killed after its first study started): waits for the embedded study (pid $1), then the
# cause runs (mixing ratio r = 2, K = 8; seed 0), then digits and photos at the main job's length.
cd <checkout at 03f28d7>
while kill -0 "$1" 2>/dev/null; do sleep 20; done
V=mae,naive,oracle,default,supcon_head0
st() { echo "=== $(date -u +%FT%TZ) $* sha $(git rev-parse --short HEAD)"
       nice -n 19 .venv/bin/mixedae-fast study --jobs 2 --no-progress --run.ckpt_every=468 --run.keep_last=10 "$@"
       echo "=== $(date -u +%FT%TZ) rc $?"; }
st --dataset embedded --epochs 18 --variants default,naive --seeds 0 --out <study-runs>/embedded-r2 --mixing.group_size=2
st --dataset embedded --epochs 18 --variants hc_k8,supcon_k8 --seeds 0 --out <study-runs>/embedded-k8
st --dataset digits --epochs 67 --variants $V --seeds 0,1,2 --out <study-runs>/digits
st --dataset photos --epochs 108 --variants $V --seeds 0,1,2 --out <study-runs>/photos
