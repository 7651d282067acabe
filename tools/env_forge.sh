#!/usr/bin/env bash
# Creates (once) .venv-forge, the package set Forge runs on (gradio 4.40, fastapi 0.104, pydantic 2,
# transformers 4.46: tools/constraints-forge.txt), for the UI and API tests on the second gradio major.
# Prints the venv's python. uv, pointed at the local wheel folder, takes the CPU torch only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SDTRAIN_FORGE_VENV:-$ROOT/.venv-forge}"
KEY="$(cat "$ROOT/tools/constraints-forge.txt" "$ROOT/tools/requirements-dev.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
STAMP="$VENV/.sdtrain-env-$KEY"
if [ ! -f "$STAMP" ]; then
  echo "[sdtrain] creating $VENV (Forge's package set, one time)" >&2
  rm -rf "$VENV"
  "${SDTRAIN_PYTHON:-python3.11}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv 2> >(grep -v "WARNING: Location '" >&2)
  FIND_LINKS=()
  for d in $(pip config get global.find-links 2>/dev/null || true); do FIND_LINKS+=(--find-links "$d"); done
  UV=("$VENV/bin/python" -m uv pip install --quiet --python "$VENV/bin/python" "${FIND_LINKS[@]}")
  "${UV[@]}" -r "$ROOT/tools/requirements-dev.txt" -c "$ROOT/tools/constraints-forge.txt"
  "${UV[@]}" --no-deps stable-diffusion-sdkit==2.1.5 open-clip-torch==2.20.0 torchvision==0.28.0
  "$VENV/bin/python" "$ROOT/tools/patch_torchvision.py"
  touch "$STAMP"
fi
echo "$VENV/bin/python"
