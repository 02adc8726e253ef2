#!/usr/bin/env bash
# The test suite on CPU (GPU tests run too where CUDA is present). Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/env.sh" dev,dali,log
cd "$root"
exec "${MIXEDAE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
