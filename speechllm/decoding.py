"""Batched decoding over prompt embeddings: greedy at temperature 0, sampling above. The forward passes and
their KV cache are the decoder's (speechllm.decoder).

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; positions are counted from each row's first real input, so padding changes nothing.

A row that starts repeating itself has fallen into a loop, the decoder LLM's known failure on audio it cannot
read (Whisper re-decodes when the text compresses too well). It stops there and keeps one copy: `RowTokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from speechllm.decoder import Decoder, DecoderState


@dataclass
class Hypothesis:
    tokens: list[int]
    sum_logprob: float
    looped: bool = False  # stopped in a repetition loop, its repeats dropped

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


# A loop: the transcript ends with a block of at most MAX_LOOP_PERIOD tokens that appears LOOP_MIN_COPIES
# times or more in a row, the copies together at least LOOP_MIN_TOKENS long. No transcript of the corpus
# (train, dev or test, as the shipped tokenizer writes it) contains one; docs/model.md has the count.
MAX_LOOP_PERIOD = 32
LOOP_MIN_COPIES = 3
LOOP_MIN_TOKENS = 16
# per period (index 0 unused): the run of repeating tokens (the copies after the first) that makes a loop
_LOOP_RUN = [0] + [max((LOOP_MIN_COPIES - 1) * p, LOOP_MIN_TOKENS - p) for p in range(1, MAX_LOOP_PERIOD + 1)]


class RowTokens:
    """One row's generated text tokens, watched for a repetition loop.

    For each period p it counts how many trailing tokens equal the token p places before them: that run is
    the loop's copies after the first, once it is long enough. Only tokens inside such a run can still be
    removed, so everything before the longest run is settled and may be streamed (what is held back is the
    repeating tail: at most 2 × MAX_LOOP_PERIOD - 1 tokens, and none while the text does not repeat itself).

    `context`: tokens the row was forced to begin with (a realtime turn's text already sent). A loop may
    begin in them, but they are never dropped, streamed or counted as the row's tokens.
    """

    def __init__(self, stop_loops: bool = True, context: Sequence[int] = ()) -> None:
        self.stop_loops = stop_loops
        self.looped = False
        self._written: list[int] = []
        self._runs = [0] * (MAX_LOOP_PERIOD + 1)  # index = period
        for token in context:
            self._append(token)
        self._start = self._streamed = len(self._written)

    @property
    def tokens(self) -> list[int]:
        return self._written[self._start:]

    def __len__(self) -> int:
        return len(self._written) - self._start

    def _append(self, token: int) -> None:
        written, runs = self._written, self._runs
        written.append(token)
        last = len(written) - 1
        for period in range(1, min(MAX_LOOP_PERIOD, last) + 1):
            runs[period] = runs[period] + 1 if written[last - period] == token else 0

    def add(self, token: int) -> bool:
        """Appends a token; True when the row has fallen into a loop, whose repeats are then dropped."""
        self._append(token)
        if not self.stop_loops:
            return False
        for period in range(1, min(MAX_LOOP_PERIOD, len(self._written) - 1) + 1):
            if self._runs[period] >= _LOOP_RUN[period]:  # the shortest period first: keep the smallest copy
                del self._written[max(len(self._written) - self._runs[period], self._start):]
                self.looped = True
                return True
        return False

    def settled(self, finished: bool) -> list[int]:
        """The tokens that no loop can remove any more (all of them once the row is finished), not returned before."""
        if finished or self.looped or not self.stop_loops:
            end = len(self._written)
        else:
            end = max(len(self._written) - max(self._runs), self._streamed)
        new = self._written[self._streamed:end]
        self._streamed = end
        return new


def _argmax(logprobs: torch.Tensor) -> torch.Tensor:
    """Each row's first largest entry, as `argmax(-1)`. On a CPU through numpy, whose argmax is vectorised where
    torch's is not: 2.8 against 22.7 µs for a step's 9 rows of 4096 tokens."""
    if logprobs.device.type != "cpu":
        return logprobs.argmax(-1)
    return torch.from_numpy(logprobs.detach().numpy().argmax(-1))


def kept_in_place(running: list[int]) -> list[int]:
    """The positions (in increasing order: `running`) of the rows that stay in a batch, in the order they stay in:
    each where it is, but those beyond the rows that stay, which fill the places of rows that left. Only those
    have their state copied (KVCache.keep, RowsRoom.keep); rows decode alike whatever their position."""
    count = len(running)
    fillers = iter(position for position in running if position >= count)
    staying = set(running)
    return [position if position in staying else next(fillers) for position in range(count)]


# Called after every step with (row, token) for each text token that became settled (RowTokens.settled).
TokenCallback = Callable[[list[tuple[int, int]]], None]
# Called when finished rows leave the running batch, with the positions (in the running batch) that stay.
RowsCallback = Callable[[torch.Tensor], None]


@dataclass
class _Row:
    tokens: RowTokens
    limit: int  # most tokens
    temperature: float  # 0: greedy
    logprobs: list[float] = field(default_factory=list)  # of each token chosen, the end-of-text token's included
    done: bool = False
    read: bool = False  # its hypothesis was taken for good (Generation.hypothesis(forget=True))


class Generation:
    """Rows decoding together, one token each per step. Rows join between steps (`join`: their prompts are
    prefilled and their state merged into the running batch's, when the decoder can merge: continuous batching;
    when it can also mix, the next step prefills them in the same forward pass as it decodes the running rows,
    as vLLM's mixed batches do) and leave once finished: finished rows leave the batch (with their KV cache) once
    they are a quarter of it, so that a long transcript does not keep finished rows computing. Whoever holds
    per-row state for the model's layers (the Zipper adapters of a mixed batch) follows along through
    `on_rows_kept`.

    A row also finishes when it falls into a repetition loop (`RowTokens`), unless `stop_loops` is False.
    Rows are named by ids, in the order they joined, from 0. A batch that rows keep joining may never end, so a
    row whose hypothesis was taken for good is forgotten once it has left the batch."""

    def __init__(self, decoder: Decoder, eos_id: int, generator: torch.Generator | None = None,
                 stop_loops: bool = True, on_rows_kept: RowsCallback | None = None) -> None:
        self.decoder = decoder
        self.eos_id = eos_id
        self.generator = generator
        self.stop_loops = stop_loops
        self.on_rows_kept = on_rows_kept
        self.rows: dict[int, _Row] = {}
        self._next_id = 0
        # The row of each position of the running batch: rows decoding (finished ones too), then rows joining at
        # the next step (`pending`).
        self.alive: list[int] = []
        self.pending: list[int] = []  # rows whose prompts the next step prefills (`join`)
        self._prompts: dict[int, torch.Tensor] = {}  # their prompts
        self._state: DecoderState | None = None
        self._logits: torch.Tensor | None = None  # (len(alive) - len(pending), vocab): each position's next token

    @property
    def running(self) -> int:
        """Rows still decoding."""
        return sum(not self.rows[row].done for row in self.alive)

    def join(self, prompts: list[torch.Tensor], limits: list[int], temperatures: list[float],
             contexts: list[list[int]] | None = None) -> list[int]:
        """Add rows for `prompts` (L_i, D) to the batch; `contexts` are the tokens each prompt ends with as if its
        row had written them (forced prefixes). Returns the new rows' ids. With rows decoding, and a decoder that
        can, the prompts are prefilled by the next step, in the same forward pass as the running rows' tokens
        (`pending`); otherwise here."""
        ids = list(range(self._next_id, self._next_id + len(prompts)))
        self._next_id += len(prompts)
        for index, row in enumerate(ids):
            context = contexts[index] if contexts else ()
            self.rows[row] = _Row(RowTokens(self.stop_loops, context), limits[index], temperatures[index])
        # Whether the decoder can mix depends on the model's adapters (a shared A) and on their being set per row
        # for serving: the same for every join of a batch, so once one is pending the next ones are too.
        if self.pending or (self.alive and getattr(self.decoder, "can_mix", lambda: False)()):
            self.pending += ids
            self._prompts.update(zip(ids, prompts, strict=True))
            self.alive += ids
            return ids
        logits, state = self.decoder.prefill(*left_pad(prompts), max(limits))
        if self.alive:
            self._state = self.decoder.join(self._state, state)
            self._logits = torch.cat([self._logits, logits])
        else:
            self._state, self._logits = state, logits
        self.alive += ids
        return ids

    def step(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Every running row's next token, and the prompts of the rows joining (`pending`) prefilled. Returns the
        tokens that became settled ((row, token): see RowTokens.settled) and the rows that finished."""
        decoding = self.alive[: len(self.alive) - len(self.pending)]
        logits = self._logits.float()
        logprobs = logits.log_softmax(-1)
        next_tokens = _argmax(logprobs)
        temperatures = [self.rows[row].temperature for row in decoding]
        if any(temperature > 0 for temperature in temperatures):
            row_temperatures = torch.tensor(temperatures, device=logits.device)
            sampled = row_temperatures > 0
            probs = (logits[sampled] / row_temperatures[sampled, None]).softmax(-1).cpu()
            next_tokens[sampled] = torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(logits.device)
        chosen = logprobs.gather(1, next_tokens[:, None])[:, 0].tolist()
        emitted, finished, running = [], [], []
        for position, (row_id, token) in enumerate(zip(decoding, next_tokens.tolist(), strict=True)):
            row = self.rows[row_id]
            if row.done:
                continue
            row.logprobs.append(chosen[position])
            if token == self.eos_id:
                row.done = True
            else:
                looped = row.tokens.add(token)
                if looped:
                    del row.logprobs[len(row.tokens):]
                row.done = looped or len(row.tokens) >= row.limit
            emitted += [(row_id, ready) for ready in row.tokens.settled(row.done)]
            if row.done:
                finished.append(row_id)
            else:
                running.append(position)
        if not running and not self.pending:
            self._leave([])
            self._state, self._logits = None, None
            return emitted, finished
        if not running or 4 * (len(decoding) - len(running)) >= len(decoding):
            joining = list(range(len(decoding), len(self.alive)))  # positions of the pending rows
            staying = kept_in_place(running)
            keep = torch.tensor(staying, dtype=torch.long, device=next_tokens.device)
            self._leave([self.alive[position] for position in staying + joining])
            next_tokens = next_tokens[keep]
            if running:
                self._state.keep(keep)
            if self.on_rows_kept is not None:
                self.on_rows_kept(torch.tensor(staying + joining, dtype=torch.long, device=next_tokens.device))
        if not running:
            self._prefill_pending(None)
        elif self.pending:
            self._prefill_pending(next_tokens)
        else:
            self._logits = self.decoder.step(next_tokens, self._state)
        return emitted, finished

    def _prefill_pending(self, next_tokens: torch.Tensor | None) -> None:
        """The pending rows' prompts prefilled, in the running rows' step (their `next_tokens`) if there are any."""
        prompts = [self._prompts.pop(row) for row in self.pending]
        limit = max(self.rows[row].limit for row in self.pending)
        if next_tokens is None:
            self._logits, self._state = self.decoder.prefill(*left_pad(prompts), limit)
        else:
            self._logits, self._state = self.decoder.step_and_prefill(next_tokens, self._state, *left_pad(prompts),
                                                                      limit)
        self.pending = []

    def drop(self, row_id: int) -> None:
        """A row nobody waits for any more (its request gave up): it decodes no further, leaves the batch with
        the next rows that finish, and is then forgotten. A row still pending is prefilled with the others all the
        same (taking it out would mean taking its adapters out of the batch too)."""
        row = self.rows[row_id]
        row.done = row.read = True

    def hypothesis(self, row_id: int, forget: bool = False) -> Hypothesis:
        """A row's tokens (final once it has finished); `forget`: taken for good, the row can be forgotten."""
        row = self.rows[row_id]
        hypothesis = Hypothesis(row.tokens.tokens, sum(row.logprobs), row.tokens.looped)
        if forget:
            row.read = True
            if row_id not in self.alive:
                del self.rows[row_id]
        return hypothesis

    def _leave(self, alive: list[int]) -> None:
        """Only the rows `alive` stay in the batch; those that left and were read are forgotten."""
        for row_id in set(self.alive) - set(alive):
            if self.rows[row_id].read:
                del self.rows[row_id]
        self.alive = alive


@torch.no_grad()
def generate(decoder: Decoder, prompts: list[torch.Tensor], eos_id: int, max_new_tokens: list[int] | int,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             on_tokens: TokenCallback | None = None, on_rows_kept: RowsCallback | None = None,
             stop_loops: bool = True, contexts: list[list[int]] | None = None) -> list[Hypothesis]:
    """One batch decoded to its end (`Generation`, with no row joining later)."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    generation = Generation(decoder, eos_id, generator, stop_loops, on_rows_kept)
    rows = generation.join(prompts, limits, [temperature] * len(prompts), contexts)
    while generation.alive:
        emitted, _ = generation.step()
        if on_tokens is not None and emitted:
            on_tokens(emitted)
    return [generation.hypothesis(row) for row in rows]
