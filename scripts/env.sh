#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with the pinned CPU versions.
# Usage: bash scripts/env.sh [EXTRAS]   EXTRAS: setup.py extras, comma-separated (default: none).
# The main job needs no extra, so its venv holds no CUDA library; the tests ask for dev,dali,log (triton's
# interpreter and DALI's CPU graphs are tested on CPU, which pulls in their CUDA builds).
# Idempotent: installs only when setup.py or the constraints changed, or an extra is missing; the extras
# installed before are kept. Source-free: call with bash.
# MIXEDAE_VENV overrides the location; MIXEDAE_CONSTRAINTS the pins (e.g. for a GPU machine).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${MIXEDAE_VENV:-$root/.venv}
pins=${MIXEDAE_CONSTRAINTS:-$root/constraints/cpu.txt}
stamp=$venv/.mixedae-installed
want=$(cat "$root/setup.py" "$pins" | sha256sum | cut -c1-16)
# the stamp: "<hash> <extras installed>"
read -r have had 2>/dev/null < "$stamp" || { have=; had=; }
asked=${1:-}
extras=$(printf '%s\n' ${had//,/ } ${asked//,/ } | sort -u | grep . | paste -sd, - || true)
if [[ $have == "$want" && $extras == "${had:-}" ]]; then
  exit 0
fi
python=${PYTHON:-python3}
echo "[env] creating $venv with $($python --version 2>&1) (pins: ${pins#"$root"/}; extras: ${extras:-none})" >&2
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
"$venv/bin/python" -m pip install -q -c "$pins" -e "$root${extras:+[$extras]}" >&2
echo "$want $extras" > "$stamp"
echo "[env] ready" >&2
