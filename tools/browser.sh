#!/usr/bin/env bash
# The browser for the UI tests (tests/webui/test_browser.py): Debian's chromium, installed with apt when
# missing and when this runs as root (CI does); Playwright (tools/requirements-dev.txt) drives it, and
# nothing downloads a browser of its own. Prints the browser's path; exit 3 when none can be had.
set -euo pipefail
for c in "${SDTRAIN_CHROMIUM:-}" chromium chromium-browser; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then command -v "$c"; exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[sdtrain] installing Debian's chromium for the browser tests (one time)" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 || true
  if command -v chromium >/dev/null 2>&1; then command -v chromium; exit 0; fi
fi
echo "[sdtrain] no chromium here: the browser tests will be skipped" >&2
exit 3
