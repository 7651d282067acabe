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
# The webuis run Python 3.10: compile everything with it where one is installed (pyenv's shim
# answers even when 3.10 is not its selected version, so ask pyenv for the binary itself).
PY310=""
for c in python3.10 $(pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10; do
  if "$c" -c "" >/dev/null 2>&1; then PY310="$c"; break; fi
done
if [ -n "$PY310" ]; then
  echo "[sdtrain] python 3.10 syntax check ($("$PY310" --version 2>&1))"
  "$PY310" -m compileall -q lib_sdtrain scripts install.py preload.py tests bench >/dev/null
else
  echo "[sdtrain] no Python 3.10 here: skipping its syntax check"
fi
echo "[sdtrain] tests"
# One torch thread per worker (2 shared cores); pytest's exit 5 (no tests ran) counts as a failure.
OMP_NUM_THREADS=1 python -m pytest -n 2 -q "$@"
