#!/usr/bin/env bash
# The whole toy pipeline on CPU, set-up included: offline toy data and tiny models, then every stage in
# order with its defaults (which point at toy/). About 7 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash runs/setup.sh
PY=${PY:-.venv/bin/python}

$PY 00_toy_data.py ${TOY_ARGS:-}
$PY 01_collect_meta_pairs.py
$PY 02_rewrite.py
if $PY -c "import importlib, sys; sys.path.insert(0, '.'); importlib.import_module('02_rewrite').find_wordnet(None)" 2>/dev/null; then
  $PY 02_rewrite.py --engine eda --out-dir toy/rewrites_eda
else
  echo "toy: EDA baseline skipped, no WordNet here (apt-get install wordnet-base, or nltk.download('wordnet'))"
fi
$PY 03_visual_concepts.py
$PY 04_fuse.py
$PY 05_train.py
$PY 05_train.py --texts toy/rewrites --text-mode uniform --out-dir toy/train/laclip
$PY 05_train.py --texts toy/rewrites --text-mode multi --out-dir toy/train/laclip_mt
$PY 05_train.py --texts toy/fused --text-mode mix --out-dir toy/train/veclip
$PY 06_eval.py --name AltText --pretrained toy/train/alt/latest.pt
$PY 06_eval.py --name LaCLIP --pretrained toy/train/laclip/latest.pt
$PY 06_eval.py --name VeCLIP --pretrained toy/train/veclip/latest.pt
$PY 06_eval.py --name LaCLIP-MT --pretrained toy/train/laclip_mt/latest.pt
$PY 07_cc_finetune.py
$PY 08_embed_texts.py
$PY 05_train.py --text-cache toy/text_emb --out-dir toy/train/llm2clip
$PY 06_eval.py --text-tower toy/models/minilm --name MiniLM
$PY 06_eval.py --text-tower toy/cc_minilm/model --name MiniLM-CC
$PY 06_eval.py --name LLM2CLIP --pretrained toy/train/llm2clip/latest.pt
$PY 09_browse.py
