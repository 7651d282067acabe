#!/usr/bin/env bash
# The demo: sets up .venv if missing, then trains an embedding on a tiny built-in model and sample
# images (nothing is downloaded) and prints where the files are.  Extra args go to the demo command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tools/env.sh
python -m lib_sdtrain demo "$@"
