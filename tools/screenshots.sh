#!/usr/bin/env bash
# Retakes the README's and the docs' pictures: runs the browser test (tests/webui/test_session.py) in the
# real A1111 with SDTRAIN_SCREENSHOTS set, then copies its screenshots into docs/ with the test that took
# them, the webui and the commit written into each PNG (tests/test_docs.py checks that record).
#   bash tools/screenshots.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tools/env.sh
SDTRAIN_CHROMIUM="$(bash tools/browser.sh)"
export SDTRAIN_CHROMIUM
eval "$(bash tools/webui.sh a1111)"
SHOTS="$(mktemp -d -t sdtrain-shots-XXXX)"
trap 'rm -rf "$SHOTS"' EXIT
SDTRAIN_SCREENSHOTS="$SHOTS" OMP_NUM_THREADS=1 python -m pytest -q -rfEs \
  "tests/webui/test_session.py::test_train_from_the_tab_in_a_browser"
python - "$SHOTS" <<'PY'
import json, subprocess, sys
from pathlib import Path

from PIL import Image, PngImagePlugin

from lib_sdtrain import version

TEST = "tests/webui/test_session.py::test_train_from_the_tab_in_a_browser"
# docs picture: (the webui, the test's shot name)
PICTURES = {"screenshot-tabs.png": ("a1111", "tab"), "screenshot-training.png": ("a1111", "training"),
            "screenshot-jobs.png": ("a1111", "jobs")}
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
for name, (host, shot) in PICTURES.items():
    meta = PngImagePlugin.PngInfo()
    meta.add_text("sdtrain-picture", json.dumps({"test": TEST, "shot": shot, "webui": host,
                                                 "version": version(), "commit": commit}))
    Image.open(Path(sys.argv[1]) / f"{host}-{shot}.png").save(Path("docs") / name, pnginfo=meta, optimize=True)
    print(f"docs/{name} <- {host}-{shot}.png")
PY
