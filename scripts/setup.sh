#!/usr/bin/env bash
# Create .venv and install GPT Service with its test tools. Idempotent; offline-safe once cached.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch            # a CUDA build
  else
    .venv/bin/pip install -q torch==2.13.0    # the CPU build; a plain `torch` would pull several GB of CUDA
  fi
fi
.venv/bin/pip install -q -e ".[dev]"
