#!/usr/bin/env bash
# The Zipper-LoRA reproduction (issue 3): from the stage-1 model in runs/stage1, train every method
# for the same number of stage-2 steps, evaluate on the test split, run the Initial-B ablation and
# the chunked-encoder evaluation for the variant that is best on dev, and write the report to
# benchmarks/results/zipper.{md,json,*.png}. Runs that already have a test report are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/zipper_common.sh

[ -f runs/stage1/eval-test.json ] || $ZASR eval --model runs/stage1/model --split test --out runs/stage1/eval-test
for variant in shared independent static hard soft; do
    train_and_eval "$variant" warm
done
best=$(.venv/bin/python -m benchmarks.zipper_report --best)
train_and_eval "$best" zero
[ -f "runs/stage2/$best-warm/eval-test-chunked.json" ] ||
    $ZASR eval --model "runs/stage2/$best-warm/model" --split test --chunk-size 16 \
        --out "runs/stage2/$best-warm/eval-test-chunked"
.venv/bin/python -m benchmarks.zipper_report
