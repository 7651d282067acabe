#!/usr/bin/env bash
# The test command: sets up .venv if missing, then lint, import contracts and the test suite.
#   bash tools/test.sh            # everything
#   bash tools/test.sh -k formats # extra args go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tools/env.sh
echo "[sdtrain] ruff"
ruff check lib_sdtrain tests bench scripts install.py preload.py
echo "[sdtrain] import contracts"
lint-imports --no-cache
if command -v python3.10 >/dev/null 2>&1; then
  echo "[sdtrain] python 3.10 syntax check"
  python3.10 -m compileall -q lib_sdtrain scripts install.py preload.py tests bench >/dev/null
fi
echo "[sdtrain] tests"
# One torch thread per worker (2 shared cores); pytest's exit 5 (no tests ran) counts as a failure.
OMP_NUM_THREADS=1 python -m pytest -n 2 -q "$@"
