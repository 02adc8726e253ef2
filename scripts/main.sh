#!/usr/bin/env bash
# The main job: MixedAE pretraining on the embedded default data, then evaluation and a report.
# Extra arguments go to `mixedae-fast pretrain` (e.g. --config vit_base --data.path=/imagenet).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/env.sh"
exec "${MIXEDAE_VENV:-$root/.venv}/bin/mixedae-fast" pretrain "$@"
