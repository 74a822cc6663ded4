"""Grouping a batch's rows by length. A padded batch computes every row at the longest row's length, so one
5 s clip among 2 s clips more than doubles the work; one call per group of similar rows avoids that, as long as
another call costs less than the padding it saves. Used for the encoder (server/engine.py) and the decoder's
prefill (speechllm/decoder.py)."""

from __future__ import annotations

import torch
from torch import nn

from speechllm.features import pad_features

ENCODER_CALL_FRAMES = 100  # one more encoder call costs about as much as encoding 100 more frames (CPU, measured)
ENCODER_MAX_ROWS = 16  # rows per encoder call: bounds the attention's memory when many long windows come together


def length_groups(lengths: list[int], call_cost: int) -> list[list[int]]:
    """Rows (indices into `lengths`) in groups of similar length, one call each: consecutive runs of the rows
    sorted by length, cut where that saves more padded positions than another call costs (`call_cost`, in
    positions)."""
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    # best[j]: the least cost of the first j sorted rows; cut[j]: where the last group of that solution starts
    best, cut = [0] + [0] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best[end], cut[end] = min((best[start] + (end - start) * lengths[order[end - 1]] + call_cost, start)
                                  for start in range(end))
    groups, end = [], len(order)
    while end:
        groups.insert(0, order[cut[end]: end])
        end = cut[end]
    return groups


@torch.no_grad()
def encode_each(encoder: nn.Module, features: list[torch.Tensor], device: torch.device | str = "cpu"
                ) -> list[torch.Tensor]:
    """Each row's encoder states (T_i, d), from log-mel features (n_mels, T_i), encoded in groups of similar length
    (a row's states do not depend on the padding: the encoder masks it, and its convolutions look only back)."""
    encoded: list[torch.Tensor | None] = [None] * len(features)
    for similar in length_groups([x.shape[-1] for x in features], ENCODER_CALL_FRAMES):
        for first in range(0, len(similar), ENCODER_MAX_ROWS):
            group = similar[first: first + ENCODER_MAX_ROWS]
            batch, lengths = pad_features([features[row] for row in group])
            states, state_lengths = encoder(batch.to(device), lengths.to(device), chunk_size=0)
            for position, row in enumerate(group):
                encoded[row] = states[position, : state_lengths[position]]
    return encoded
