#!/usr/bin/env bash
# Seed replication for the Zipper-LoRA report (issue 3): the two baselines and the shipped variant
# trained again with other seeds (initialisation, batch order and dev subset), exactly as
# scripts/zipper_experiments.sh trains seed 0, so that the report can show the spread of test CER
# across seeds next to the differences between methods. Runs that already have a test report are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ZASR=.venv/bin/zipper-asr
STEPS="${STAGE2_STEPS:-250}"
EVAL_EVERY="${STAGE2_EVAL_EVERY:-50}"
TEMPERATURE="${STAGE2_SAMPLING_TEMPERATURE:-0.5}"
SEEDS="${SEEDS:-1 2}"
VARIANTS="${VARIANTS:-shared independent soft}"

for seed in $SEEDS; do
    for variant in $VARIANTS; do
        run="runs/stage2/$variant-warm-seed$seed"
        [ -f "$run/eval-test.json" ] && continue
        $ZASR train-adapters --variant "$variant" --init-b warm --steps "$STEPS" --eval-every "$EVAL_EVERY" \
            --sampling-temperature "$TEMPERATURE" --seed "$seed" --out "$run"
        $ZASR eval --model "$run/model" --split test --out "$run/eval-test"
    done
done
.venv/bin/python -m benchmarks.zipper_report
