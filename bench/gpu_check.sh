#!/usr/bin/env bash
# The GPU path in one command. On a CUDA machine:
#
#   bash bench/gpu_check.sh /path/to/stable-diffusion-webui
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
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEBUI="${1:-${SDTRAIN_WEBUI_DIR:-}}"
DEVICE="${SDTRAIN_BENCH_DEVICE:-cuda}"
PY="${SDTRAIN_PYTHON:-}"
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
for kind in ti hn; do
  "$PY" "$ROOT/bench/ti_step.py" --device "$DEVICE" --kind "$kind" "${SD1[@]}" | tee -a "$LOG"
done
"$PY" "$ROOT/bench/ti_step.py" --family sdxl --device "$DEVICE" --webui "$WEBUI" | tee -a "$LOG"
echo
echo "== one table =="
{ echo "model kind phase s/step peak-GB x-floor x-unfrozen"; grep '^ROW ' "$LOG" | grep -v '^ROW ti \|^ROW hn ' | cut -d' ' -f2-; } | column -t

# The same step inside a real webui (bench/host_step.py): A1111's in-tree trainer against sdtrain through
# /sdapi/v1/train/*, alternating, on a random SD1.5 at its real shapes written here (cuda: 512x512, the
# host's fp16; cpu: the tiny model, a rehearsal of the same commands). It needs the webui's own Python
# with its packages (SDTRAIN_WEBUI_PYTHON, default WEBUI/venv/bin/python); without one it is skipped.
# Budget: ~2 minutes per server start on a GPU machine, then the rounds.
WEBUI_PY="${SDTRAIN_WEBUI_PYTHON:-$WEBUI/venv/bin/python}"
if [ -x "$WEBUI_PY" ] && [ -f "$WEBUI/launch.py" ]; then
  if [ "$DEVICE" = cuda ]; then
    HOSTSTEP=(--device cuda --model sd15 --size 512 --threads 4 --rounds "${SDTRAIN_HOST_ROUNDS:-5}" --short 5 --long 25)
  else
    HOSTSTEP=(--rounds 1 --short 2 --long 5)
  fi
  SDTRAIN_WEBUI_HOST=a1111 SDTRAIN_WEBUI_DIR="$WEBUI" SDTRAIN_WEBUI_PYTHON="$WEBUI_PY" PYTHONPATH="" \
    "$PY" "$ROOT/bench/host_step.py" "${HOSTSTEP[@]}" | tee -a "$LOG"
  echo
  echo "== inside the webui (per step: in-tree vs sdtrain; wall and process CPU) =="
  { echo "kind variant wall-in-tree wall-sdtrain ratio lo hi cpu-in-tree cpu-sdtrain ratio lo hi"
    grep '^ROW ti \|^ROW hn ' "$LOG" | cut -d' ' -f2-; } | column -t
else
  echo "[gpu_check] webui benchmark skipped: no webui Python at $WEBUI_PY (set SDTRAIN_WEBUI_PYTHON)"
fi
