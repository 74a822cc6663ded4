"""Plot the training recipe's logged curves (runs/*/curve.jsonl) into one PNG.

    .venv/bin/python -m benchmarks.plot_training [--runs runs] [--out models/default/eval/training_curves.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("models/default/eval/training_curves.png"))
    args = parser.parse_args()
    panels = [("LLM pretraining: loss (nats/token)",
               [("llm", "lm_loss", "text LM"), ("llm", "reading_loss", "reading")]),
              ("LLM pretraining: dev reading accuracy", [("llm", "dev_reading_accuracy", "teacher-forced tokens")]),
              ("encoder CTC pretraining: loss", [("encoder", "loss", "CTC")]),
              ("stage 1 (shared LoRA): ASR loss", [("stage1", "asr_loss", "ASR")]),
              ("stage 1: dev CER", [("stage1", "dev_cer", "all 12"), ("stage1", "dev_cer_high", "high"),
                                    ("stage1", "dev_cer_mid", "mid"), ("stage1", "dev_cer_low", "low")])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6))
    for axis, (title, lines) in zip(axes, panels, strict=True):
        for run, key, label in lines:
            path = args.runs / run / "curve.jsonl"
            if path.exists():
                steps, values = series(read_curve(path), key)
                axis.plot(steps, values, marker="o" if "dev" in key else None, markersize=3, label=label)
        if len(lines) > 1:
            axis.legend(fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
