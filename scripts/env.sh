#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with the pinned CPU versions.
# Idempotent: re-installs only when setup.py or the constraints changed. Source-free: call with bash.
# MIXEDAE_VENV overrides the location; MIXEDAE_CONSTRAINTS the pins (e.g. for a GPU machine).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${MIXEDAE_VENV:-$root/.venv}
pins=${MIXEDAE_CONSTRAINTS:-$root/constraints/cpu.txt}
stamp=$venv/.mixedae-installed
want=$(cat "$root/setup.py" "$pins" | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
python=${PYTHON:-python3}
echo "[env] creating $venv with $($python --version 2>&1) (pins: ${pins#"$root"/})" >&2
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
"$venv/bin/python" -m pip install -q -c "$pins" -e "$root[dev,dali,log]" >&2
echo "$want" > "$stamp"
echo "[env] ready" >&2
