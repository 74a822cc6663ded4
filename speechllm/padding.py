"""Grouping a batch's rows by length. A padded batch computes every row at the longest row's length, so one
5 s clip among 2 s clips more than doubles the work; one call per group of similar rows avoids that, as long as
another call costs less than the padding it saves. Used for the encoder (server/engine.py) and the decoder's
prefill (speechllm/decoder.py)."""

from __future__ import annotations


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
