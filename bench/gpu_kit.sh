#!/usr/bin/env bash
# What bench/gpu_check.sh needs on a bare GPU machine, made here (where the package index is reachable):
#
#   bash bench/gpu_kit.sh            # -> .gpu/ (ignored by git): the webui tree and its packages, 29 MiB
#
# The lent GPU machines have a python3 with a CUDA torch and a set of common packages (numpy, Pillow,
# scipy, scikit-image, safetensors, opencv, matplotlib, pandas, requests, pytest, ...), and no network.
# A1111 v1.10.1 (the in-tree trainer sdtrain is measured against) needs more, and some of it at older
# versions than that image has (transformers 4, huggingface_hub 0.x, gradio 3 with pydantic 1). So:
#
#   .gpu/a1111-v1.10.1-src.tar.gz   the webui at v1.10.1 with its repositories/ (ldm, sgm, k-diffusion)
#                                   and openai's clip package, as ../shared/hosts holds it
#   .gpu/site-cpXY.tar.xz           those packages, installed for that Python (pip --target): pure-Python
#                                   wheels (a few built here from source archives) and four compiled
#                                   ones for that Python: tokenizers, orjson, rpds-py, pillow-avif-plugin
#
# bench/gpu_check.sh --kit .gpu unpacks both into a venv that sees the machine's own packages after
# these (a .pth line), so torch, numpy and the other compiled packages are the machine's. Pins: A1111's
# requirements_versions.txt where that Python has a wheel; tokenizers 0.13.3 has none for 3.12, so
# tokenizers 0.14.1 and the transformers that takes it (4.35.2, instead of 4.30.2); setuptools 80 (the
# machine's may lack pkg_resources, which lightning_fabric imports) and pytz (A1111 imports it; pandas 3
# no longer brings it).
#
# SDTRAIN_KIT_PYTHON: the target Python's version (default 3.12, the GPU machines'); 3.11 builds the
# same kit for this machine's Python (the CPU rehearsal in docs/development.md). SDTRAIN_HOSTS_DIR: the
# source archives (default ../shared/hosts beside this checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.gpu}"
PYV="${SDTRAIN_KIT_PYTHON:-3.12}"
HOSTS_DIR="${SDTRAIN_HOSTS_DIR:-$ROOT/../shared/hosts}"
[ -d "$HOSTS_DIR" ] || HOSTS_DIR=/work/shared/hosts
ARCHIVE="$HOSTS_DIR/a1111-v1.10.1-src.tar.gz"
[ -f "$ARCHIVE" ] || { echo "[gpu_kit] no $ARCHIVE (set SDTRAIN_HOSTS_DIR)" >&2; exit 3; }
TAG="cp${PYV/./}"
say() { echo "[gpu_kit] $*" >&2; }

# A1111 v1.10.1's packages that the machine's image lacks or holds at versions the webui cannot use.
PURE=(
  GitPython==3.1.32 gitdb==4.0.12 smmap==5.0.3 aenum==3.1.17 aiofiles==23.2.1 altair==5.5.0 narwhals==2.29.0
  antlr4-python3-runtime==4.9.3 anyio==3.7.1 sniffio==1.3.1 blendmodes==2022 clean-fid==0.1.35
  deprecation==2.1.0 diskcache==5.6.3 einops==0.4.1 facexlib==0.3.0 filterpy==2.0.0 fastapi==0.94.0
  starlette==0.26.1 ffmpy==1.0.0 ftfy==6.3.1 wcwidth==0.9.5 gradio==3.41.2 gradio_client==0.5.0 h11==0.12.0
  httpcore==0.15.0 httpx==0.24.1 huggingface_hub==0.36.2 importlib_resources==6.5.2 inflection==0.5.1
  jsonmerge==1.8.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 kornia==0.6.7
  lark==1.1.2 omegaconf==2.2.3 open-clip-torch==2.20.0 piexif==1.1.3 pydub==0.25.1 python-multipart==0.0.34
  pytorch-lightning==1.9.4 resize-right==0.0.2 semantic-version==2.10.0 spandrel==0.3.4
  spandrel_extra_arches==0.1.1 timm==0.9.2 tomesd==0.1.3 torchsde==0.2.6 trampoline==0.1.2 uvicorn==0.55.0
  transformers==4.35.2 setuptools==80.9.0 pytz==2026.6
)
ANY=(pydantic==1.10.27 websockets==11.0.3)  # their pure-Python wheels (both also ship compiled ones)
BINARY=(tokenizers==0.14.1 orjson==3.13.0 rpds-py==2026.9.1 pillow-avif-plugin==1.4.3)
PLATFORM=(--python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/wheels" "$WORK/site"
say "wheels for Python $PYV"
# pure-Python: wheels as published, or built here from the source archive where there is none (4 of them)
# (some setup.py import pkg_resources, which setuptools 81 dropped: built without isolation, in a venv
# holding an older setuptools)
python3 -m venv "$WORK/build"
"$WORK/build/bin/python" -m pip install -q "setuptools>=77.0.3,<81" wheel
"$WORK/build/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "${PURE[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation py \
  --abi none --platform any -d "$WORK/wheels" "${ANY[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$WORK/wheels" "${BINARY[@]}"
tar -C "$WORK" -xzf "$ARCHIVE" clip  # openai's clip at the commit A1111 installs (a source tree: made a wheel)
"$WORK/build/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK/clip"
python3 -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: "${PLATFORM[@]}" \
  --target "$WORK/site" "$WORK/wheels"/*.whl
# gradio's copy of its front end for CDN hosting and the front end's source maps are never served by a
# local server: two thirds of gradio's size, left out. The front end itself stays (the UI still loads).
rm -rf "$WORK/site/gradio/templates/cdn" "$WORK/site/bin"
find "$WORK/site/gradio/templates" -name '*.map' -delete
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
XZ_OPT="-6 -T2" tar -C "$WORK/site" -cJf "$OUT/site-$TAG.tar.xz" .
cp "$ARCHIVE" "$OUT/"
say "$(du -sh "$WORK/wheels" | cut -f1) of wheels -> $(du -h "$OUT/site-$TAG.tar.xz" | cut -f1) site-$TAG.tar.xz; webui $(du -h "$OUT/$(basename "$ARCHIVE")" | cut -f1)"
du -cb "$OUT"/* | tail -1 | awk '{printf "[gpu_kit] %s: %.1f MiB in all\n", "'"$OUT"'", $1/1048576}' >&2
