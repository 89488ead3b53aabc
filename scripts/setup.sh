#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the node pack's,
# the trainer's and the tests' dependencies, and the pinned ComfyUI for tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt ".[train,test]"
.venv/bin/python tests/comfyui_setup.py
