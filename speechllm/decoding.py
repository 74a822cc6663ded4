"""Batched decoding over prompt embeddings: greedy at temperature 0, sampling above. The forward passes and
their KV cache are the decoder's (speechllm.decoder).

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; positions are counted from each row's first real input, so padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from speechllm.decoder import Decoder


@dataclass
class Hypothesis:
    tokens: list[int]
    sum_logprob: float

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / max(len(self.tokens), 1)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_i, D) prompts → embeddings (B, L, D) and attention mask (B, L)."""
    length = max(p.shape[0] for p in prompts)
    embeds = prompts[0].new_zeros(len(prompts), length, prompts[0].shape[1])
    mask = torch.zeros(len(prompts), length, dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        embeds[row, length - prompt.shape[0]:] = prompt
        mask[row, length - prompt.shape[0]:] = 1
    return embeds, mask


# Called after every step with (row, token) for each row that emitted a text token.
TokenCallback = Callable[[list[tuple[int, int]]], None]
# Called when finished rows leave the running batch, with the positions (in the running batch) that stay.
RowsCallback = Callable[[torch.Tensor], None]


@torch.no_grad()
def generate(decoder: Decoder, prompts: list[torch.Tensor], eos_id: int, max_new_tokens: list[int] | int,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             on_tokens: TokenCallback | None = None, on_rows_kept: RowsCallback | None = None) -> list[Hypothesis]:
    """Rows that finish leave the batch (with their KV cache) once they are a quarter of it, so that a long
    transcript does not keep the finished rows of its batch computing: whoever holds per-row state for the
    model's layers (the Zipper adapters of a mixed batch) follows along through `on_rows_kept`."""
    batch = len(prompts)
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    logits, state = decoder.prefill(*left_pad(prompts), max(limits))
    tokens: list[list[int]] = [[] for _ in range(batch)]
    sum_logprob = [0.0] * batch
    done = [False] * batch
    alive = list(range(batch))  # the row of each position of the running batch
    for _ in range(max(limits)):
        logits = logits.float()
        logprobs = logits.log_softmax(-1)
        if temperature > 0:
            probs = (logits / temperature).softmax(-1).cpu()
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
        else:
            next_tokens = logprobs.argmax(-1)
        chosen = logprobs.gather(1, next_tokens[:, None])[:, 0].tolist()
        emitted, running = [], []
        for position, (row, token) in enumerate(zip(alive, next_tokens.tolist(), strict=True)):
            if done[row]:
                continue
            sum_logprob[row] += chosen[position]
            if token == eos_id:
                done[row] = True
                continue
            tokens[row].append(token)
            emitted.append((row, token))
            done[row] = len(tokens[row]) >= limits[row]
            if not done[row]:
                running.append(position)
        if on_tokens is not None and emitted:
            on_tokens(emitted)
        if not running:
            break
        if 4 * (len(alive) - len(running)) >= len(alive):
            keep = torch.tensor(running, device=next_tokens.device)
            alive = [alive[position] for position in running]
            next_tokens = next_tokens[keep]
            state.keep(keep)
            if on_rows_kept is not None:
                on_rows_kept(keep)
        logits = decoder.step(next_tokens, state)
    return [Hypothesis(t, s) for t, s in zip(tokens, sum_logprob, strict=True)]
