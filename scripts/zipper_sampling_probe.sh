#!/usr/bin/env bash
# Dev-only probe for the Zipper-LoRA report (issue 3): does upsampling the extremely low tier change the
# comparison? The two baselines and Soft, trained as in scripts/zipper_experiments.sh but with language
# sampling p ∝ n_l^τ at τ = 0.5 and τ = 0.3, model selection on the whole dev split (100 utterances per
# language instead of 20), and no test evaluation: this is where we look for why the claim does not hold,
# so it never touches the test split. Curves: runs/stage2-probe-tau*/VARIANT/curve.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
ZASR=.venv/bin/zipper-asr
STEPS="${STAGE2_STEPS:-250}"
for tau in ${TAUS:-0.5 0.3}; do
    for variant in ${VARIANTS:-shared independent soft}; do
        run="runs/stage2-probe-tau$tau/$variant"
        [ -f "$run/summary.json" ] && continue
        $ZASR train-adapters --variant "$variant" --init-b warm --steps "$STEPS" --eval-every 125 \
            --sampling-temperature "$tau" --dev-per-language 100 --out "$run"
    done
done
.venv/bin/python - <<'PY'
import json
from pathlib import Path

print("| τ | method | best dev CER % (step) | dev high | dev mid | dev low |")
print("|---|---|---:|---:|---:|---:|")
for run in sorted(Path("runs").glob("stage2-probe-tau*/*/curve.jsonl")):
    evals = [r for r in map(json.loads, run.read_text().splitlines()) if "dev_cer" in r]
    best = min(evals, key=lambda r: r["dev_cer"])
    print(f"| {run.parent.parent.name.removeprefix('stage2-probe-tau')} | {run.parent.name} | "
          f"{100 * best['dev_cer']:.1f} ({best['step']}) | " +
          " | ".join(f"{100 * best[f'dev_cer_{tier}']:.1f}" for tier in ("high", "mid", "low")) + " |")
PY
