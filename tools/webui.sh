#!/usr/bin/env bash
# A real webui for the host-contract tests (tests/webui), built from a source archive.
#
#   bash tools/webui.sh a1111          # build once (cached by a stamp), print the variables (hosts: a1111, reforge, forge, forge-classic)
#   eval "$(bash tools/webui.sh a1111)" # ... and export them into this shell
#
# Prints `export SDTRAIN_WEBUI_HOST=… SDTRAIN_WEBUI_DIR=… SDTRAIN_WEBUI_PYTHON=…` on stdout (progress
# goes to stderr). With SDTRAIN_WEBUI_DIR already set (a developer's own checkout), nothing is built:
# the checkout and its Python (SDTRAIN_WEBUI_PYTHON, default <dir>/venv/bin/python) are checked and
# printed. Otherwise the archive is taken from SDTRAIN_HOSTS_DIR (default ../shared/hosts beside
# this checkout), unpacked into webuis/<host>/ (ignored by git; SDTRAIN_WEBUIS_DIR moves it) and given its own virtual environment
# with the webui's pinned packages (its requirements_versions.txt) on the local CPU build of torch.
# Exit status 3 (and a reason on stderr) when the archive is not there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${1:-a1111}"
say() { echo "[sdtrain webui] $*" >&2; }

emit() {  # dir python
  [ -f "$1/launch.py" ] || { say "no launch.py in $1"; exit 2; }
  [ -x "$2" ] || { say "no webui Python at $2 (set SDTRAIN_WEBUI_PYTHON)"; exit 2; }
  printf 'export SDTRAIN_WEBUI_HOST=%q SDTRAIN_WEBUI_DIR=%q SDTRAIN_WEBUI_PYTHON=%q\n' "$HOST" "$1" "$2"
}

if [ -n "${SDTRAIN_WEBUI_DIR:-}" ]; then
  emit "$(cd "$SDTRAIN_WEBUI_DIR" && pwd)" "${SDTRAIN_WEBUI_PYTHON:-$SDTRAIN_WEBUI_DIR/venv/bin/python}"
  exit 0
fi

case "$HOST" in
  a1111)
    ARCHIVE=a1111-v1.10.1-src.tar.gz TOP=stable-diffusion-webui
    # The webui's own pins, with the changes current torch forces (see ../shared/hosts/README.md):
    # setuptools 69 lacks what torch 2.13 needs, numpy 1.26.2 has no wheel for this Python,
    # torch is the local CPU build, open-clip/clip come without their (CUDA-pulling) dependencies.
    DROP='^(setuptools|numpy|torch|open-clip-torch)\b'
    EXTRA=("numpy==1.26.4" "setuptools>=77.0.3,<81" ftfy regex tqdm sentencepiece "timm==0.9.2")
    CONSTRAINTS=("torch==2.13.0+cpu" "torchvision==0.28.0" "pydantic<2" "httpx==0.24.1" "transformers==4.30.2"
                 "gradio==3.41.2" "fastapi==0.94.0" "pytorch_lightning==1.9.4")
    NODEPS=("open-clip-torch==2.20.0")
    ;;
  reforge)
    ARCHIVE=reforge-main-src.tar.gz TOP=stable-diffusion-webui-reForge
    # reForge's pins (gradio 3.41 / pydantic 1 like A1111, transformers 4.48, open-clip 2.30, timm 1.0),
    # with the same changes for current torch: setuptools 69 lacks what torch 2.13 needs, torch is the
    # local CPU build, open-clip comes without its dependencies; its pydantic is a wheel on a release
    # page (a 1.10.15 fork, not reachable here): the registry's 1.10.15 stands in.
    DROP='^(setuptools|torch|open-clip-torch|https?://)\b'
    EXTRA=("setuptools>=77.0.3,<81" "pydantic==1.10.15" ftfy regex tqdm sentencepiece)
    CONSTRAINTS=("torch==2.13.0+cpu" "torchvision==0.28.0" "pydantic<2")
    NODEPS=("open-clip-torch==2.30.0")
    ;;
  forge)
    ARCHIVE=forge-dfdcbab6-src.tar.gz TOP=stable-diffusion-webui-forge
    # Forge's pins (gradio 4.40, fastapi 0.104, pydantic 2, transformers 4.46, diffusers 0.31), with the
    # same changes for current torch (setuptools, the local CPU torch, open-clip without dependencies);
    # joblib: Forge's built-in soft-inpainting imports it and no requirements file lists it. Forge's
    # text-encoder configs and tokenizers are bundled (backend/huggingface): nothing is fetched.
    DROP='^(setuptools|torch|open-clip-torch|clip|numpy)\b'
    EXTRA=("setuptools>=77.0.3,<81" "numpy==1.26.4" joblib ftfy regex tqdm sentencepiece)
    CONSTRAINTS=("torch==2.13.0+cpu" "torchvision==0.28.0")
    NODEPS=("open-clip-torch==2.20.0")
    ;;
  forge-classic)
    ARCHIVE=forge-classic-1f95d717-src.tar.gz TOP=stable-diffusion-webui-forge-classic
    # Forge Classic (Haoming02, the gradio-3 fork of the old Forge) has no requirements_versions.txt: its
    # requirements.txt pins the same way (gradio 3.41, fastapi 0.94, pydantic 1, transformers 4.30,
    # open-clip 2.20), with the same changes for current torch (setuptools — it imports pkg_resources —,
    # the local CPU torch, numpy 1.26.4, open-clip without dependencies).
    REQUIREMENTS=requirements.txt
    DROP='^(setuptools|torch|open-clip-torch|numpy)\b'
    EXTRA=("setuptools>=77.0.3,<81" "numpy==1.26.4" ftfy regex tqdm sentencepiece)
    CONSTRAINTS=("torch==2.13.0+cpu" "torchvision==0.28.0")
    NODEPS=("open-clip-torch==2.20.0")
    ;;
  *) say "unknown host '$HOST' (known: a1111, reforge, forge, forge-classic)"; exit 2 ;;
esac

HOSTS_DIR="${SDTRAIN_HOSTS_DIR:-$ROOT/../shared/hosts}"
SRC="$HOSTS_DIR/$ARCHIVE"
if [ ! -f "$SRC" ]; then
  say "no $ARCHIVE in $HOSTS_DIR (set SDTRAIN_HOSTS_DIR, or SDTRAIN_WEBUI_DIR for a checkout of your own)"
  exit 3
fi
# Not under a dot-folder: gradio refuses to serve any file whose path has one (routes.py, is_dotfile),
# and the webui serves its own page scripts through that route, so its page would break.
DEST="${SDTRAIN_WEBUIS_DIR:-$ROOT/webuis}/$HOST"
WEBUI="$DEST/$TOP"
VENV="$DEST/venv"
# The stamp names the archive (size, mtime) and this script's recipe: either changing rebuilds.
KEY="$(stat -c '%s %Y' "$SRC") $(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
STAMP="$DEST/.sdtrain-webui-stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$VENV/bin/python" ]; then
  emit "$WEBUI" "$VENV/bin/python"
  exit 0
fi

start=$SECONDS
say "building $HOST from $ARCHIVE into $DEST (one time, about two minutes)"
rm -rf "$DEST"
mkdir -p "$DEST"
tar xzf "$SRC" -C "$DEST"
PY="${SDTRAIN_WEBUI_BASE_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check uv 2> >(grep -v "WARNING: Location '" >&2)
# uv does not read pip.conf: hand it the local wheel folder that holds the CPU torch.
FIND_LINKS=()
for d in $(pip config get global.find-links 2>/dev/null || true); do FIND_LINKS+=(--find-links "$d"); done
UV=("$VENV/bin/python" -m uv pip install --quiet --python "$VENV/bin/python" "${FIND_LINKS[@]}")
grep -vE "$DROP" "$WEBUI/${REQUIREMENTS:-requirements_versions.txt}" > "$DEST/requirements.txt"
printf '%s\n' "${EXTRA[@]}" >> "$DEST/requirements.txt"
printf '%s\n' "${CONSTRAINTS[@]}" > "$DEST/constraints.txt"
"${UV[@]}" -r "$DEST/requirements.txt" -c "$DEST/constraints.txt"
"${UV[@]}" --no-deps "${NODEPS[@]}" -c "$DEST/constraints.txt"
"${UV[@]}" --no-deps --no-build-isolation "$DEST/clip"
"$VENV/bin/python" "$ROOT/tools/patch_torchvision.py"
"$VENV/bin/python" -c "import torch, torchvision, gradio, fastapi, transformers, clip, open_clip" \
  || { say "the webui's environment does not import"; exit 1; }
echo "$KEY" > "$STAMP"
say "built $HOST in $((SECONDS - start)) s"
emit "$WEBUI" "$VENV/bin/python"
