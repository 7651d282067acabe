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
ruff check lib_sdtrain tests bench scripts install.py preload.py tools/options_doc.py
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
  "$PY310" -m compileall -q lib_sdtrain scripts install.py preload.py tests bench tools/options_doc.py >/dev/null
else
  echo "[sdtrain] no Python 3.10 here: skipping its syntax check"
fi
# One torch thread per worker (2 shared cores); pytest's exit 5 (no tests ran) counts as a failure.
if [ "$#" -gt 0 ]; then  # a developer's selection: pytest as asked
  echo "[sdtrain] tests: $*"
  OMP_NUM_THREADS=1 python -m pytest -n 2 -q "$@"
  exit
fi
start=$SECONDS
# the browser the UI tests drive (Debian's chromium: installed here when missing)
SDTRAIN_CHROMIUM="$(bash tools/browser.sh)" || SDTRAIN_CHROMIUM=""
export SDTRAIN_CHROMIUM
echo "[sdtrain] unit tests"
OMP_NUM_THREADS=1 python -m pytest -n 2 -q tests --ignore=tests/webui
# One UI and API code base for both gradio majors: the same tests on Forge's package set.
echo "[sdtrain] UI and API tests on Forge's package set (gradio 4.40, fastapi 0.104, pydantic 2)"
FORGE_PY="$(bash tools/env_forge.sh)"
OMP_NUM_THREADS=1 "$FORGE_PY" -m pytest -n 2 -q tests/test_ui.py tests/test_api.py tests/test_places.py tests/test_fuzz_api.py
# The host-contract suite inside real webuis: a developer's checkout (SDTRAIN_WEBUI_DIR, with
# SDTRAIN_WEBUI_HOST naming its kind), or each host built from its archive in ../shared/hosts
# (tools/webui.sh); a host whose archive is absent reports its tests as skipped, with the reason.
if [ -n "${SDTRAIN_WEBUI_DIR:-}" ]; then HOSTS="${SDTRAIN_WEBUI_HOST:-a1111}"; else HOSTS="${SDTRAIN_WEBUI_HOSTS:-a1111 reforge forge forge-classic}"; fi
# Files cross between the webuis: each leaves what it trained (and its stock trainer wrote) in one
# folder and loads what the ones before it left (tests/webui/test_contract.py, test_files_swap_...).
SDTRAIN_EXCHANGE_DIR="$(mktemp -d -t sdtrain-exchange-XXXX)"
export SDTRAIN_EXCHANGE_DIR
trap 'rm -rf "$SDTRAIN_EXCHANGE_DIR"' EXIT
RAN=""
for HOST in $HOSTS; do
  host_start=$SECONDS
  rc=0
  ENV_LINE="$(bash tools/webui.sh "$HOST")" || rc=$?
  if [ "$rc" -eq 0 ]; then
    eval "$ENV_LINE"
    echo "[sdtrain] host-contract tests in $HOST: $SDTRAIN_WEBUI_DIR"
  elif [ "$rc" -eq 3 ]; then
    echo "[sdtrain] host-contract tests: no $HOST webui here (see the line above); they will be skipped"
    unset SDTRAIN_WEBUI_DIR SDTRAIN_WEBUI_PYTHON
    export SDTRAIN_WEBUI_HOST="$HOST"
  else
    echo "[sdtrain] could not set up the $HOST webui (exit $rc)"; exit "$rc"
  fi
  # Each test module starts its own servers; one module per worker overlaps their start-ups.
  OMP_NUM_THREADS=1 python -m pytest -n 2 --dist loadfile -q -rfEs tests/webui
  echo "[sdtrain] $HOST: $((SECONDS - host_start)) s"
  [ "$rc" -eq 0 ] && RAN="$RAN $HOST"
  unset SDTRAIN_WEBUI_DIR SDTRAIN_WEBUI_PYTHON
done
# ... and the first webui loads what the later ones left (Forge's and reForge's files in A1111).
read -ra RAN_HOSTS <<< "$RAN"
if [ "${#RAN_HOSTS[@]}" -gt 1 ]; then
  FIRST="${RAN_HOSTS[0]}"
  eval "$(bash tools/webui.sh "$FIRST")"
  echo "[sdtrain] files of the later webuis, in $FIRST"
  OMP_NUM_THREADS=1 python -m pytest -q -rfEs tests/webui/test_contract.py -k test_files_swap_between_webuis
  unset SDTRAIN_WEBUI_DIR SDTRAIN_WEBUI_PYTHON
fi
echo "[sdtrain] all tests done in $((SECONDS - start)) s"
