#!/usr/bin/env bash
# The whole training recipe of the shipped model, step by step (≈ 2 h on a 2-core CPU).
# Re-running a step overwrites its output under runs/; the corpus is skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."
ZASR=.venv/bin/zipper-asr
[ -f data/corpus/test.jsonl ] || $ZASR corpus
$ZASR pretrain-llm --steps "${LLM_STEPS:-4000}"
$ZASR pretrain-encoder --steps "${ENCODER_STEPS:-2000}"
$ZASR train-stage1 --steps "${STAGE1_STEPS:-1200}" --eval-every 200
$ZASR eval --model runs/stage1/model --split dev --out runs/stage1/eval-dev
