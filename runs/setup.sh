#!/usr/bin/env bash
# Create .venv with the CPU/test requirements (idempotent), and WordNet for the EDA baseline where we can.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -r requirements.txt  # quick when already satisfied
# 02 --engine eda takes synonyms from WordNet: Debian's wordnet-base, or NLTK's data (nltk.download('wordnet')).
if [ ! -f /usr/share/wordnet/data.noun ] && [ ! -d "${NLTK_DATA:-$HOME/nltk_data}/corpora/wordnet" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null 2>&1 \
      || echo "setup: could not install wordnet-base; 02 --engine eda will say how to get WordNet"
  else
    echo "setup: no WordNet found; for 02 --engine eda run: apt-get install wordnet-base, or python -c \"import nltk; nltk.download('wordnet')\""
  fi
fi
