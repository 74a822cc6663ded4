#!/usr/bin/env bash
# Seed replication for the Zipper-LoRA report (issue 3): the two baselines and the shipped variant
# trained again with other seeds (initialisation, batch order and dev subset), exactly as
# scripts/zipper_experiments.sh trains seed 0, so that the report can show the spread of test CER
# across seeds next to the differences between methods. Runs that already have a test report are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/zipper_common.sh

for seed in ${SEEDS:-1 2}; do
    for variant in ${VARIANTS:-shared independent soft}; do
        train_and_eval "$variant" warm "$seed"
    done
done
.venv/bin/python -m benchmarks.zipper_report
