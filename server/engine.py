"""The engines: the speech half of the Speech-LLM in this process (PyTorch, CPU or CUDA) for the rows no audio
worker heard (server/audio_workers.py), and, for the embedded engine, the decoder too, with continuous batching
(EmbeddedEngine.start: a batch joins the rows decoding now at the next step).

It knows nothing of HTTP. A batch may mix languages: the encoder, LID and projector run once for all its rows
that need them; rows are then ordered by adapter so that every Zipper layer computes A x once for the
batch and each row's B(l) step as one batched GEMM (adapters.zipper.use_segments, joining_rows).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from adapters.zipper import (
    MergedAdapter,
    Variant,
    clear_rows,
    joining_rows,
    keep_rows,
    language_runs,
    merge_language,
    use_segments,
)
from server.adapter_cache import SHARED_KEY, AdapterCache
from server.metrics import Metrics
from speechllm.decoder import LlamaDecoder, decoder_for
from speechllm.decoding import Generation, Hypothesis, TokenCallback, generate
from speechllm.inference import choose_language, token_limits
from speechllm.languages import BY_CODE
from speechllm.model import HeardWindow, SpeechLLM
from speechllm.padding import encode_each
from speechllm.prompt import eos_id, target_ids
from speechllm.tokenizer import INVALID, decode, readable, transcript_text

logger = logging.getLogger("zipper_asr.engine")
TextCallback = Callable[[str], None]
RunInThread = Callable[..., Awaitable]  # runs fn(*args) in the engine thread (Batcher.run_exclusive)
OtherWorkWaiting = Callable[[], bool]  # whether other calls wait for the engine thread (EngineExecutor)

@dataclass
class EngineInput:
    features: torch.Tensor | None  # (n_mels, frames); None when `heard` or `states` are given
    language: str | None  # the request's language tag, already validated; None: detect
    temperature: float = 0.0
    on_text: TextCallback | None = None  # receives text deltas as they are decoded (engine thread)
    enqueued_at: float = field(default_factory=time.monotonic)
    # For realtime streams (server/realtime.py): a partial update brings the encoder states its incremental
    # chunked encoder computed, and a decode may have to continue text that was already sent to the client.
    states: torch.Tensor | None = None  # (frames, d_model): the encoder is skipped for this row
    # What an audio worker's speech half made of the row (server/audio_workers.py): the whole speech half is skipped.
    heard: HeardWindow | None = None
    prefix: str = ""  # forced after the prompt; the row's text is this prefix followed by what the model adds
    partial: bool = False  # a realtime turn's partial re-decode (metrics count those apart)


@dataclass
class EngineOutput:
    text: str
    language: str | None  # the language the decoder was prompted with; None: unknown
    language_source: str  # "given", "detected", or "fallback" (LID below the threshold)
    language_probability: float
    candidates: list[tuple[str, float]]  # LID's top languages with probabilities
    adapter: str  # which adapter served the row
    avg_logprob: float


@dataclass
class LanguageGuess:
    language: str
    probability: float
    candidates: list[tuple[str, float]]


@dataclass
class PreparedBatch:
    """A batch after the speech half (encoder, LID, projector), rows ordered by adapter."""

    order: list[int]  # batch rows in decoding order (grouped by adapter)
    keys: list[str]  # adapter key per decoding position
    languages: list[str | None]  # prompt language per decoding position
    prompts: list[torch.Tensor]  # (length, dim) prompt embeddings per decoding position
    limits: list[int]  # most tokens per decoding position
    choices: list[tuple[str | None, str]]  # (language, source) per batch row
    guesses: list[LanguageGuess]  # per batch row
    probabilities: torch.Tensor  # LID posteriors per batch row
    prefixes: list[str] = field(default_factory=list)  # forced text per decoding position ("" for most rows)
    prefix_ids: list[list[int]] = field(default_factory=list)  # its tokens, as if the model had written them


class SpeechEngine:
    """What every backend shares: the speech half of the Speech-LLM in this process (encoder, LID,
    projector, prompt) and the language → adapter policy. Backends add the decoder."""

    def __init__(self, model: SpeechLLM, metrics: Metrics, lid_threshold: float = 0.5) -> None:
        self.model = model
        self.metrics = metrics
        self.lid_threshold = lid_threshold
        self.device = next(model.parameters()).device
        self.languages = list(model.config.languages)

    @property
    def adapter_variant(self) -> Variant | None:
        return self.model.config.adapter.variant if self.model.config.adapter else None

    def adapter_key(self, language: str | None) -> str:
        """Which merged adapter serves a language: every language shares one under a shared LoRA."""
        if self.adapter_variant in (None, Variant.SHARED) or language is None:
            return SHARED_KEY
        return language

    def cached_adapters(self) -> list[str]:
        """Adapter keys resident on the decoder's device now."""
        raise NotImplementedError

    def pinned_adapters(self) -> list[str]:
        return []

    async def start(self, batch: list[EngineInput], run_in_thread: RunInThread,
                    other_work_waiting: OtherWorkWaiting = lambda: False) -> list[asyncio.Future[EngineOutput]]:
        """Begin a batch. Returns once the next batch may begin, with one future per row of the batch: each is
        resolved as soon as its row is decoded, not when the whole batch is (a row would otherwise wait for the
        batch's longest one). Work of the engine's own runs through `run_in_thread`, and gives the thread up soon
        where `other_work_waiting` says so."""
        raise NotImplementedError

    def abandon(self, output: asyncio.Future[EngineOutput]) -> None:
        """A row whose request gave up (timed out, its client gone, a realtime decode no longer wanted): its output, a
        future `start` returned, is cancelled, and the engine stops decoding the row if it can (vLLM aborts the
        request when its task is cancelled; the embedded engine drops the row at its next step)."""
        output.cancel()

    async def close(self) -> None:
        """Release the decoder."""

    # ---- the speech half ------------------------------------------------------------------------------
    @torch.no_grad()
    def _hear(self, batch: list[EngineInput]) -> list[HeardWindow]:
        """What the speech half makes of every row (LID posteriors, audio embeddings). Rows an audio worker heard
        bring it; rows that bring their encoder states (a realtime stream's incremental encoder) skip the encoder."""
        unheard = [item for item in batch if item.heard is None]
        encoded = iter(encode_each(self.model.encoder, [item.features for item in unheard if item.states is None],
                                   self.device))
        states = [item.states.to(self.device) if item.states is not None else next(encoded) for item in unheard]
        heard = iter(self.model.hear(states) if states else [])
        return [item.heard.to(self.device) if item.heard is not None else next(heard) for item in batch]

    def _guess(self, probabilities: torch.Tensor, top: int = 3) -> LanguageGuess:
        values, indices = probabilities.topk(min(top, len(self.languages)))
        candidates = [(self.languages[i], float(v)) for v, i in zip(values, indices, strict=True)]
        return LanguageGuess(candidates[0][0], candidates[0][1], candidates)

    def detect(self, batch: list[EngineInput]) -> list[LanguageGuess]:
        return [self._guess(window.language_probabilities) for window in self._hear(batch)]

    def detect_whole(self, windows: list[EngineInput]) -> LanguageGuess:
        """One language for a recording cut into windows: the windows' log posteriors summed, weighted by their
        lengths, and normalised again (a geometric mean). On the dev split's minute-long recordings in 3 s windows,
        48 of 55 right, against 44 from the first window and 45 from averaging the posteriors themselves
        (benchmarks/results/long_audio_dev.md)."""
        heard = self._hear(windows)
        weights = torch.tensor([window.frames for window in heard], dtype=torch.float32)
        probabilities = torch.stack([window.language_probabilities for window in heard])
        return self._guess((probabilities.clamp_min(1e-9).log() * (weights / weights.sum())[:, None]).sum(0)
                           .softmax(-1))

    # ---- the speech half of transcription ----------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: list[EngineInput]) -> PreparedBatch:
        start = time.perf_counter()
        heard = self._hear(batch)
        probabilities = torch.stack([window.language_probabilities for window in heard])
        choices = [choose_language(item.language, p, self.languages, self.lid_threshold)
                   for item, p in zip(batch, probabilities, strict=True)]
        keys = [self.adapter_key(language) for language, _ in choices]
        order = sorted(range(len(batch)), key=lambda row: (keys.index(keys[row]), row))  # group by adapter
        languages = [choices[row][0] for row in order]
        prompts = [self.model.prompt(heard[row].audio, choices[row][0]) for row in order]
        limits = token_limits([len(heard[row].audio) for row in order])
        prefixes = [batch[row].prefix for row in order]
        prefix_ids = [target_ids(self.model.tokenizer, prefix)[:-1] if prefix else [] for prefix in prefixes]
        for position, ids in enumerate(prefix_ids):
            if ids:  # the prefix's tokens follow the prompt as if the model had emitted them
                prompts[position] = torch.cat([prompts[position],
                                               self.model.embed_tokens(torch.tensor(ids, device=self.device))])
                limits[position] = max(1, limits[position] - len(ids))
        self.metrics.encode_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_languages.observe(len(set(keys)))
        return PreparedBatch(order, [keys[row] for row in order], languages, prompts, limits,
                             choices, [self._guess(p) for p in probabilities], probabilities, prefixes, prefix_ids)

    def output(self, prepared: PreparedBatch, position: int, text: str, avg_logprob: float) -> EngineOutput:
        """The output of the row at a decoding position, from its decoded text."""
        row = prepared.order[position]
        language, source = prepared.choices[row]
        guess = prepared.guesses[row]
        probability = (float(prepared.probabilities[row, self.languages.index(language)]) if language
                       else guess.probability)
        adapter = prepared.keys[position] if self.model.config.adapter else "none"
        if prepared.prefixes and prepared.prefixes[position]:
            text = continue_text(prepared.prefixes[position], text, language)
        return EngineOutput(text, language, source, probability, guess.candidates, adapter, avg_logprob)

    def count_loop(self, prepared: PreparedBatch, item: EngineInput, position: int) -> None:
        self.metrics.decoding_loops.labels(prepared.keys[position], "partial" if item.partial else "final").inc()


def continue_text(prefix: str, continuation: str, language: str | None) -> str:
    """A forced prefix and the model's continuation as one text. The prefix always ends on a whole word (see
    server/realtime.py), so the continuation starts a new one: a space between them, unless the language is
    written without spaces."""
    if not prefix or not continuation:
        return prefix or continuation
    unspaced = language is not None and BY_CODE[language].unspaced
    return prefix + ("" if unspaced else " ") + continuation


TICK_S = 0.05  # longest run of decoding steps in the engine thread before the event loop looks in


@dataclass(eq=False)
class _Group:
    """A batch handed to EmbeddedEngine.start, while it waits, joins and decodes."""

    batch: list[EngineInput]
    admitted: asyncio.Future  # set when it is taken to join (the batcher may then begin the next batch)
    outputs: list[asyncio.Future]  # per batch row, resolved as soon as that row is decoded
    prepared: PreparedBatch | None = None
    streams: list[TextStream] = field(default_factory=list)  # per decoding position
    started: float = 0.0


class EmbeddedEngine(SpeechEngine):
    """The decoder in this process too: KV-cached batched decoding with Zipper adapters applied
    unmerged, each language's merged B(l) from an LRU adapter cache."""

    def __init__(self, model: SpeechLLM, metrics: Metrics, cache_bytes: int, lid_threshold: float = 0.5,
                 pinned_languages: list[str] | None = None, max_rows: int = 16,
                 prompt_gemm_dtype: torch.dtype = torch.float32) -> None:
        """`max_rows`: most rows decoding at once (`start`). `prompt_gemm_dtype`: the decoder's GEMMs over more than
        EXACT_ROWS rows (LlamaDecoder.set_gemm_dtype's `wide`): prefills, and the passes that carry joining prompts,
        with the running rows' step in them; plain steps of up to EXACT_ROWS rows stay float32."""
        super().__init__(model, metrics, lid_threshold)
        pinned = [self.adapter_key(code) for code in pinned_languages or []]
        self.cache = AdapterCache(self._merge, cache_bytes, metrics, pinned)
        self.decoder = decoder_for(model.llm)  # built once: it packs the projections' weights
        if isinstance(self.decoder, LlamaDecoder):
            self.decoder.set_gemm_dtype(torch.float32, wide=prompt_gemm_dtype)
        self.max_rows = max_rows
        # Continuous batching (start): the groups waiting to join, the rows decoding, and which group each is of.
        self._waiting: deque[_Group] = deque()
        self._generation = self._new_generation()
        self._row_group: dict[int, tuple[_Group, int]] = {}  # row id → (its group, its position in the group)
        self._driver: asyncio.Task | None = None
        self._abandoned = False  # set by the event loop (abandon), cleared by the engine thread (_drop_abandoned)
        self._taken: list[_Group] = []  # the groups the tick running has taken to join (answered if it fails)

    def _merge(self, key: str) -> MergedAdapter:
        index = None if key == SHARED_KEY else self.languages.index(key)
        merged = merge_language(self.model.llm, index)
        if self.device.type == "cuda":  # the merge's time (zasr_adapter_merge_duration_seconds) is its kernels'
            torch.cuda.synchronize(self.device)
        return merged

    def cached_adapters(self) -> list[str]:
        return self.cache.cached()

    def pinned_adapters(self) -> list[str]:
        return list(self.cache.pinned)

    def preload(self, languages: list[str]) -> None:
        self.cache.preload([self.adapter_key(code) for code in languages])

    def abandon(self, output: asyncio.Future[EngineOutput]) -> None:
        output.cancel()
        self._abandoned = True

    async def start(self, batch: list[EngineInput], run_in_thread: RunInThread,
                    other_work_waiting: OtherWorkWaiting = lambda: False) -> list[asyncio.Future[EngineOutput]]:
        """The batch joins the rows decoding now at the next step (continuous batching) once they leave room for
        it (`max_rows`); returns when it is taken to join (its speech half and prefill may still fail: its outputs
        then say so)."""
        loop = asyncio.get_running_loop()
        group = _Group(batch, loop.create_future(), [loop.create_future() for _ in batch])
        self._waiting.append(group)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(run_in_thread, other_work_waiting))
        await group.admitted
        return group.outputs

    async def _drive(self, run_in_thread: RunInThread, other_work_waiting: OtherWorkWaiting) -> None:
        """Runs the decoding in ticks of the engine thread: TICK_S of decoding steps at most, less when other work
        waits for the thread (language detection, a realtime window's encoder), which runs between ticks. Groups
        that wait join at a tick's start, or inside it between its steps once they fit (`_tick`). Rows are answered
        from inside the ticks, as each is decoded (`_answer`)."""
        joining: list[_Group] = []
        try:
            while self._waiting or self._generation.alive:  # (alive: rows decoding, and abandoned rows leaving)
                joining = self._take_waiting()
                await run_in_thread(self._tick, joining, other_work_waiting)
        except BaseException as error:  # the engine thread is gone (shutdown), say: no row is left hanging
            groups = {*joining, *list(self._waiting), *list(self._taken),
                      *(group for group, _ in list(self._row_group.values()))}
            self._waiting.clear()
            for group in groups:
                if not group.admitted.done():
                    group.admitted.set_result(None)
                for output in group.outputs:
                    _settle(output, None, error if isinstance(error, Exception) else RuntimeError("stopped"))
            if isinstance(error, Exception):  # the tick is not running (it raised): its state can go
                self._reset()
                logger.exception("the embedded engine's decoding loop failed")
            else:
                raise

    def _room_for(self, group: _Group, joining: list[_Group]) -> bool:
        rows = self._generation.running + sum(len(g.batch) for g in joining)
        if rows == 0:
            return True
        return hasattr(self.decoder, "join") and rows + len(group.batch) <= self.max_rows

    @torch.no_grad()
    def _tick(self, joining: list[_Group], other_work_waiting: OtherWorkWaiting) -> None:
        """In the engine thread: the joining groups join, then decoding steps until TICK_S has passed or other work
        waits for the thread; between steps, groups that wait and fit join too, here, without the event loop's turn
        between ticks (which left the engine thread idle while the loop took its turn). Each row is answered as soon
        as it is decoded; with an error: a group whose speech half failed, and every row decoding when joining or a
        step failed, since the batch's state is then in doubt."""
        self._taken = list(joining)
        try:
            self._join_groups(joining)
            deadline = time.perf_counter() + TICK_S
            while self._generation.alive:
                if self._abandoned:
                    self._drop_abandoned()
                self.metrics.step_rows.observe(len(self._generation.alive) - len(self._generation.pending))
                emitted, ended = self._generation.step()
                for row, token in emitted:
                    group, position = self._row_group[row]
                    group.streams[position].add(token)
                for row in ended:
                    group, position = self._row_group.pop(row)
                    self._answer_row(group, position, row)
                if time.perf_counter() > deadline or other_work_waiting():
                    break
                more = self._take_waiting()
                self._taken += more
                self._join_groups(more)
        except Exception as error:
            for group in {group for group, _ in self._row_group.values()} | set(self._taken):
                self._answer_all(group, error)  # rows already answered keep their outputs
            self._reset()
        if not self._generation.alive:
            self._reset()

    def _take_waiting(self) -> list[_Group]:
        """The waiting groups that fit now, admitted (EmbeddedEngine.start returns for them, at the event loop's
        next turn): between ticks in the event loop (`_drive`), and between steps in the engine thread (`_tick`),
        while the event loop only appends to `_waiting` (a deque: thread-safe) or, if the driver stops, clears it."""
        taken: list[_Group] = []
        while self._waiting and self._room_for(self._waiting[0], taken):
            taken.append(self._waiting.popleft())
            _call_in_loop(taken[-1].admitted, _settle, taken[-1].admitted, None, None)
        return taken

    def _join_groups(self, joining: list[_Group]) -> None:
        for group in joining:
            try:
                self._prepare(group)
            except Exception as error:
                self._answer_all(group, error)
                continue
            self._join(group)
        if joining:  # an output cancelled before its row joined was missed by the scans until now
            self._abandoned = True

    def _drop_abandoned(self) -> None:
        """Rows whose outputs were cancelled (abandon) stop decoding."""
        self._abandoned = False
        for row, (group, position) in list(self._row_group.items()):
            if group.outputs[group.prepared.order[position]].cancelled():
                del self._row_group[row]
                self._generation.drop(row)

    def _prepare(self, group: _Group) -> None:
        """The speech half of a group (encoder, LID, projector, for rows no audio worker heard) and its prompts."""
        group.prepared = self.prepare(group.batch)
        group.streams = [TextStream(group.batch[row].on_text, self.model.tokenizer) for row in group.prepared.order]

    def _join(self, group: _Group) -> None:
        """A prepared group's rows join the decoding (prefill, KV cache, adapters)."""
        prepared = group.prepared
        group.started = time.perf_counter()
        with joining_rows(self.model.llm, len(self._generation.alive), self._segments(prepared.keys)):
            rows = self._generation.join(prepared.prompts, prepared.limits,
                                         [group.batch[row].temperature for row in prepared.order],
                                         prepared.prefix_ids or None)
        for position, row in enumerate(rows):
            self._row_group[row] = (group, position)

    def _answer_row(self, group: _Group, position: int, row: int) -> None:
        """A row that finished decoding: its output (or the error making it raised) to its future."""
        prepared = group.prepared
        try:
            # The stream's last delta goes out first: the event loop runs these callbacks in order.
            output = self._row_output(group.batch, prepared, position, group.streams[position],
                                      self._generation.hypothesis(row, forget=True))
            error = None
            self.metrics.decode_seconds.observe(time.perf_counter() - group.started)
        except Exception as failure:
            output, error = None, failure
        self._answer(group.outputs[prepared.order[position]], output, error)

    def _answer_all(self, group: _Group, error: Exception) -> None:
        """Every row of a group not answered yet gets the error."""
        for output in group.outputs:
            self._answer(output, None, error)

    def _answer(self, future: asyncio.Future, output: EngineOutput | None, error: Exception | None) -> None:
        """From the engine thread: the future is resolved in its event loop (unless that loop is gone: shutdown)."""
        _call_in_loop(future, _settle, future, output, error)

    def _reset(self) -> None:
        """No rows decode any more: a fresh batch for whoever comes next."""
        self._generation = self._new_generation()
        self._row_group.clear()
        clear_rows(self.model.llm)

    def _new_generation(self) -> Generation:
        return Generation(self.decoder, eos_id(self.model.tokenizer),
                          on_rows_kept=self._keep_adapter_rows)

    @torch.no_grad()
    def run(self, batch: list[EngineInput]) -> list[EngineOutput]:
        prepared = self.prepare(batch)
        start = time.perf_counter()
        streams = [TextStream(batch[row].on_text, self.model.tokenizer) for row in prepared.order]
        temperature = max(item.temperature for item in batch)  # rows of a batch share one temperature
        hypotheses = self.decode(prepared, temperature,
                                 on_tokens=lambda emitted: [streams[row].add(token) for row, token in emitted])
        for _ in hypotheses:  # per row, as in continuous decoding (here every row ends with the batch)
            self.metrics.decode_seconds.observe(time.perf_counter() - start)
        return self._answers(batch, prepared, streams, hypotheses)

    def _answers(self, batch: list[EngineInput], prepared: PreparedBatch, streams: list[TextStream],
                 hypotheses: list[Hypothesis]) -> list[EngineOutput]:
        """A decoded batch's outputs, per batch row."""
        outputs: list[EngineOutput | None] = [None] * len(batch)
        for position, (stream, hypothesis) in enumerate(zip(streams, hypotheses, strict=True)):
            outputs[prepared.order[position]] = self._row_output(batch, prepared, position, stream, hypothesis)
        return outputs

    def _row_output(self, batch: list[EngineInput], prepared: PreparedBatch, position: int, stream: TextStream,
                    hypothesis: Hypothesis) -> EngineOutput:
        """A decoded row's output (its stream's last delta sent, a loop counted)."""
        if hypothesis.looped:
            self.count_loop(prepared, batch[prepared.order[position]], position)
        return self.output(prepared, position, stream.finish(), hypothesis.avg_logprob)

    @torch.no_grad()
    def decode(self, prepared: PreparedBatch, temperature: float = 0.0,
               on_tokens: TokenCallback | None = None) -> list[Hypothesis]:
        """The decoder half of a prepared batch, each row with its language's merged adapter."""
        with use_segments(self.model.llm, self._segments(prepared.keys)):
            return generate(self.decoder, prepared.prompts, eos_id(self.model.tokenizer), prepared.limits,
                            temperature, on_tokens=on_tokens, on_rows_kept=self._keep_adapter_rows,
                            contexts=prepared.prefix_ids or None)

    def _keep_adapter_rows(self, keep: torch.Tensor) -> None:
        """Generation's on_rows_kept: the Zipper layers' per-row adapters follow the rows that stay."""
        keep_rows(self.model.llm, keep)

    def _segments(self, keys: list[str]) -> list[tuple[int, int, MergedAdapter]]:
        return [] if self.model.config.adapter is None else language_runs(keys, self.cache.get)


def _call_in_loop(future: asyncio.Future, callback: Callable[..., None], *args: object) -> None:
    """From the engine thread: `callback(*args)` in the future's event loop (unless that loop is gone: shutdown)."""
    try:
        future.get_loop().call_soon_threadsafe(callback, *args)
    except RuntimeError:
        logger.warning("the engine thread answered after its event loop closed")


def _settle(future: asyncio.Future, output: EngineOutput | None, error: Exception | None) -> None:
    """Resolve a row's future, unless it was already (answered, failed or cancelled: the first word stands)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(output)


class TextStream:
    """Turns one row's tokens into text deltas that never need retracting: a delta is sent only once
    its bytes form whole characters, and trailing spaces wait for the next word."""

    def __init__(self, callback: TextCallback | None, tokenizer) -> None:
        self.callback = callback
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return transcript_text(self.tokenizer, self.tokens)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.callback is None:
            return
        decoded = decode(self.tokenizer, self.tokens)
        if decoded.endswith(INVALID):  # an incomplete UTF-8 sequence: wait for the rest of it
            return
        ready = readable(decoded)  # as `text` (trailing spaces wait for the next word)
        if ready.startswith(self.sent) and len(ready) > len(self.sent):
            self.callback(ready[len(self.sent):])
            self.sent = ready

    def finish(self) -> str:
        text = self.text()
        if self.callback is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.callback(text[len(self.sent):])
            self.sent = text
        return text
