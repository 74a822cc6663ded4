#!/usr/bin/env bash
# Dev-only probes for the Zipper-LoRA report (issue 3): why does Zipper stay so close to the shared LoRA?
# Every run is trained as in scripts/zipper_experiments.sh but selected and compared on the whole dev split
# (100 utterances per language instead of 20) and never evaluated on test: this is where we look for the
# cause, so it must not touch the test split. The question asked: do the routers learn at all at the
# stage-2 learning rate, and what changes when they may (routers and language embedding at 100× the lr)?
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/zipper_common.sh
# A longer stage 2 goes elsewhere, e.g. STAGE2_STEPS=1000 PROBES_DIR=runs/stage2-probes-1000; PROBE_RUNS picks
# which probes run, in that order (default: all).
PROBES_DIR="${PROBES_DIR:-runs/stage2-probes}"
PROBE_RUNS="${PROBE_RUNS:-shared independent soft soft-router-lr100 hard-router-lr100}"

probe() {  # name variant [extra train-adapters arguments...]
    local run="$PROBES_DIR/$1" variant="$2"
    shift 2
    [ -f "$run/summary.json" ] && return
    $ZASR train-adapters --variant "$variant" --init-b warm --steps "$STEPS" --eval-every 125 \
        --sampling-temperature "$TEMPERATURE" --dev-per-language 100 --out "$run" "$@"
}
for name in $PROBE_RUNS; do
    case "$name" in
        shared|independent|soft) probe "$name" "$name" ;;
        soft-router-lr100) probe "$name" soft --router-lr-scale 100 ;;
        hard-router-lr100) probe "$name" hard --router-lr-scale 100 ;;
        # with a prior towards sharing of that weight, e.g. soft-router-lr100-sharing-0.1 (adapters/train.py)
        soft-router-lr100-sharing-*) probe "$name" soft --router-lr-scale 100 --router-sharing-weight "${name##*-}" ;;
        # the same, each language's share (n_min / n_l) ** 0.5 of it: e.g. soft-router-lr100-data-sharing-0.1
        soft-router-lr100-data-sharing-*) probe "$name" soft --router-lr-scale 100 \
            --router-sharing-weight "${name##*-}" --router-sharing-data-power 0.5 ;;
        *) echo "unknown probe: $name" >&2; exit 2 ;;
    esac
done
PROBES_DIR="$PROBES_DIR" .venv/bin/python - <<'PY'
import json
import os
from pathlib import Path

print("| run | best dev CER % (step) | dev high | dev mid | dev low |")
print("|---|---:|---:|---:|---:|")
for run in sorted(Path(os.environ["PROBES_DIR"]).glob("*/curve.jsonl")):
    evals = [r for r in map(json.loads, run.read_text().splitlines()) if "dev_cer" in r]
    best = min(evals, key=lambda r: r["dev_cer"])
    tiers = " | ".join(f"{100 * best[f'dev_cer_{tier}']:.1f}" for tier in ("high", "mid", "low"))
    print(f"| {run.parent.name} | {100 * best['dev_cer']:.1f} ({best['step']}) | {tiers} |")
PY
