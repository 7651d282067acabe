#!/usr/bin/env bash
# The GPU path in one command. On a CUDA machine:
#
#   bash bench/gpu_check.sh /path/to/stable-diffusion-webui
#   bash bench/gpu_check.sh --kit .gpu      # a bare machine: the webui and its packages from bench/gpu_kit.sh
#
# runs, with fp16 weights under autocast (what a webui on a GPU does): the SD1 textual-inversion and
# hypernetwork steps (floor / sdtrain's loop / weights unfrozen as the in-tree trainer leaves them),
# then SDXL at 1024x1024 with real SDXL shapes per option set (fp32, fp16, + gradient checkpointing,
# + VAE off the GPU, unfrozen), and prints one table: seconds per step, peak GPU memory, ratio to
# the floor (SDXL: to the leanest option set) and to the unfrozen way. Then the webui benchmark
# (bench/host_step.py, see the end of this file) when the webui's own Python is there.
#
# Python: SDTRAIN_PYTHON, else this checkout's .venv (tools/env.sh), else python3 — any with a CUDA
# torch, transformers<5, omegaconf, einops, pytorch_lightning, open_clip and kornia; a webui's own
# venv has them. ldm and sgm are taken from the webui's repositories/ when the package is absent.
# SDTRAIN_BENCH_DEVICE=cpu runs the same commands on the CPU (tiny sizes, SDXL as an estimate).
#
# --kit DIR (a machine with only a CUDA torch and common packages, no network): unpacks DIR's webui
# (A1111 v1.10.1) into SDTRAIN_KIT_DEST (default /tmp/sdtrain-gpu) and gives it a venv holding the kit's
# packages for this Python, which sees the machine's own packages (torch, numpy, ...) after its own;
# that venv's Python then runs everything below. SDTRAIN_GPU_STEPS=webui skips the standalone steps
# (the webui benchmark alone); SDTRAIN_HOST_MODELS (default "sd15 sdxl") picks the webui runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="${SDTRAIN_BENCH_DEVICE:-cuda}"
PY="${SDTRAIN_PYTHON:-}"
if [ "${1:-}" = --kit ]; then
  KIT="$(cd "${2:?usage: bash bench/gpu_check.sh --kit DIR}" && pwd)"
  DEST="${SDTRAIN_KIT_DEST:-/tmp/sdtrain-gpu}"
  BASE="${SDTRAIN_PYTHON:-python3}"  # the machine's own Python, with its torch
  TAG="$("$BASE" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  [ -f "$KIT/site-$TAG.tar.xz" ] || { echo "[gpu_check] no $KIT/site-$TAG.tar.xz: SDTRAIN_KIT_PYTHON=${TAG:2:1}.${TAG:3} bash bench/gpu_kit.sh" >&2; exit 2; }
  WEBUI="$DEST/stable-diffusion-webui"
  if [ ! -x "$WEBUI/venv/bin/python" ]; then
    started=$(date +%s)
    mkdir -p "$DEST"
    tar -C "$DEST" -xzf "$KIT"/a1111-v1.10.1-src.tar.gz stable-diffusion-webui
    "$BASE" -m venv --without-pip "$WEBUI/venv" 2>/dev/null || "$BASE" - "$WEBUI/venv" <<'PY'
import os, sys, sysconfig  # what `python -m venv --without-pip` makes, where its module is missing
dest = sys.argv[1]
os.makedirs(os.path.join(dest, "bin"), exist_ok=True)
os.symlink(os.path.realpath(sys._base_executable), os.path.join(dest, "bin", "python"))
with open(os.path.join(dest, "pyvenv.cfg"), "w") as f:
    f.write(f"home = {os.path.dirname(os.path.realpath(sys._base_executable))}\n"
            f"include-system-site-packages = false\nversion = {sysconfig.get_python_version()}\n")
os.makedirs(sysconfig.get_paths(vars={"base": dest, "platbase": dest})["purelib"], exist_ok=True)
PY
    SITE="$("$WEBUI/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    tar -C "$SITE" -xJf "$KIT/site-$TAG.tar.xz"
    # the machine's packages after the kit's (site.addsitedir also reads their .pth files)
    MACHINE="$("$BASE" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
    echo "import site; site.addsitedir('$MACHINE')" >"$SITE/zz-machine-packages.pth"
    echo "[gpu_check] webui and its venv ready in $(( $(date +%s) - started )) s: $WEBUI"
  fi
  PY="$WEBUI/venv/bin/python"
  export SDTRAIN_WEBUI_PYTHON="$PY" GIT_PYTHON_REFRESH=quiet  # GitPython: no git executable needed
else
  WEBUI="${1:-${SDTRAIN_WEBUI_DIR:-}}"
fi
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
[ -n "$WEBUI" ] || { echo "usage: bash bench/gpu_check.sh WEBUI_DIR  (its repositories/ hold sgm)" >&2; exit 2; }
for repo in stable-diffusion-stability-ai generative-models; do
  [ -d "$WEBUI/repositories/$repo" ] && PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$WEBUI/repositories/$repo"
done
export PYTHONPATH
"$PY" -c "import torch; assert '$DEVICE' != 'cuda' or torch.cuda.is_available(), 'no CUDA device'; print('[gpu_check]', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
if [ "$DEVICE" = cuda ]; then SD1=(--size C --resolution 512 --batch 1 --dtype float16); else SD1=(--size A --dtype bfloat16 --steps 3 --warmup 1); fi
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
if [ "${SDTRAIN_GPU_STEPS:-all}" != webui ]; then
  for kind in ti hn; do
    "$PY" "$ROOT/bench/ti_step.py" --device "$DEVICE" --kind "$kind" "${SD1[@]}" | tee -a "$LOG"
  done
  "$PY" "$ROOT/bench/ti_step.py" --family sdxl --device "$DEVICE" --webui "$WEBUI" | tee -a "$LOG"
  echo
  echo "== one table =="
  { echo "model kind phase s/step peak-GB x-floor x-unfrozen"; grep '^ROW ' "$LOG" | grep -v '^ROW ti \|^ROW hn ' | cut -d' ' -f2-; } | column -t
fi

# The same step inside a real webui (bench/host_step.py): A1111's in-tree trainer against sdtrain through
# /sdapi/v1/train/*, alternating, on random checkpoints at real shapes written here by
# bench/random_checkpoint.py (cuda: SD1.5 at 512x512 TI and HN, SDXL at 1024x1024 TI, the host's fp16;
# cpu: the tiny model with the same commands, and the SDXL file written and checked against the model
# code's shapes but not loaded — 13 GB in fp32 does not fit this rehearsal). It needs the webui's own
# Python with its packages (SDTRAIN_WEBUI_PYTHON, default WEBUI/venv/bin/python; --kit makes one);
# without one it is skipped. Budget on a GPU: ~1 minute per server start, then the rounds.
WEBUI_PY="${SDTRAIN_WEBUI_PYTHON:-$WEBUI/venv/bin/python}"
if [ -x "$WEBUI_PY" ] && [ -f "$WEBUI/launch.py" ]; then
  for model in ${SDTRAIN_HOST_MODELS:-sd15 sdxl}; do
    label=$model
    if [ "$DEVICE" = cuda ]; then
      if [ "$model" = sd15 ]; then SIZE=(--model sd15 --size 512 --kinds ti,hn); else SIZE=(--model sdxl --size 1024 --kinds ti); fi
      HOSTSTEP=(--device cuda "${SIZE[@]}" --threads 4 --rounds "${SDTRAIN_HOST_ROUNDS:-5}" --short 5 --long 25)
    elif [ "$model" = sd15 ]; then
      HOSTSTEP=(--rounds 1 --short 2 --long 5) label=tiny
    else  # the rehearsal of the SDXL run: write the real-size file and check it against sgm's shapes
      out="$(mktemp -d)"
      "$PY" "$ROOT/bench/random_checkpoint.py" sdxl "$out/random-sdxl.safetensors" --webui "$WEBUI" --device cpu \
        && "$PY" "$ROOT/bench/random_checkpoint.py" sdxl "$out/random-sdxl.safetensors" --webui "$WEBUI" --check
      rm -rf "$out"
      continue
    fi
    SDTRAIN_WEBUI_HOST=a1111 SDTRAIN_WEBUI_DIR="$WEBUI" SDTRAIN_WEBUI_PYTHON="$WEBUI_PY" \
      "$PY" "$ROOT/bench/host_step.py" "${HOSTSTEP[@]}" | sed "s/^ROW /ROW $label /" | tee -a "$LOG" \
      || echo "[gpu_check] the $model run failed (above); going on"
  done
  echo
  echo "== inside the webui (per step: in-tree vs sdtrain; wall and process CPU; nan: the in-tree trainer cannot) =="
  { echo "model kind variant wall-in-tree wall-sdtrain ratio lo hi cpu-in-tree cpu-sdtrain ratio lo hi"
    grep '^ROW sd15 \|^ROW sdxl \|^ROW tiny ' "$LOG" | cut -d' ' -f2-; } | column -t
else
  echo "[gpu_check] webui benchmark skipped: no webui Python at $WEBUI_PY (set SDTRAIN_WEBUI_PYTHON, or --kit)"
fi
