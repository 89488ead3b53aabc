#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the node pack's,
# the trainer's, FaceID's and the tests' dependencies, and the pinned ComfyUI for tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt ".[train,test,faceid]"
.venv/bin/python -m devtools.comfyui_setup
# The graph-editor test (tests/test_workflows_browser.py) drives Debian's
# Chromium with Playwright (the test extra); Playwright never downloads a browser.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    echo "setup.sh: no chromium; the browser test will be skipped (as root: apt-get install chromium)" >&2
  fi
fi
