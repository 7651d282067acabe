#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv.
# Sourced by tools/demo.sh and tools/test.sh. Pulls only the local CPU build of torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SDTRAIN_VENV:-$ROOT/.venv}"
# the stamp names what the environment was made from: a changed requirement rebuilds it
STAMP="$VENV/.sdtrain-env-$(cat "$ROOT/tools/requirements-dev.txt" "$ROOT/tools/constraints.txt" | sha256sum | cut -c1-16)"
PY="${SDTRAIN_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -f "$STAMP" ]; then
  echo "[sdtrain] creating virtual environment in $VENV (one time, about a minute)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  # this machine's pip.conf lists local indexes that lack most packages: pip warns once per package
  quiet() { "$@" 2> >(grep -v "WARNING: Location '" >&2); }
  # torch first, alone, pinned: any other route could resolve a CUDA build.
  quiet "${PIP[@]}" install -c "$ROOT/tools/constraints.txt" torch==2.13.0
  quiet "${PIP[@]}" install -c "$ROOT/tools/constraints.txt" -r "$ROOT/tools/requirements-dev.txt"
  # ldm (A1111's model code) and open_clip come without their stale pins; torchvision is only
  # needed for imports (make_grid, transforms) and the sole build matching torch 2.13 is a CUDA one.
  quiet "${PIP[@]}" install --no-deps stable-diffusion-sdkit==2.1.5 open-clip-torch==2.20.0 torchvision==0.28.0
  "$VENV/bin/python" "$ROOT/tools/patch_torchvision.py"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
