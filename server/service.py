"""Transcription as the gateway needs it, apart from HTTP: an upload (or decoded samples) in; its windows and rows
(from the audio workers: server/audio_workers.py) through the batcher, and the windows joined back with their
timestamps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from server.audio_workers import MIN_SAMPLES, Audio, AudioWorkers, PreparedAudio
from server.batcher import Batcher, ExpectedRows
from server.engine import EngineInput, EngineOutput
from server.metrics import Metrics, language_label
from server.settings import Settings
from speechllm.audio import SAMPLE_RATE
from speechllm.languages import BY_CODE


class NoSpeech(ValueError):
    """The audio decoded, but holds no speech (silence or noise only)."""


class AudioTooShort(NoSpeech):
    """Under 100 ms (MIN_SAMPLES), too short to hold speech: OpenAI's `audio_too_short`."""


def untagged_rows(prepared: PreparedAudio) -> list[EngineInput]:
    """A request's windows as rows without a language: what language detection reads."""
    return [EngineInput(row.features, None, heard=row.heard) for row in prepared.rows]


def require_speech(prepared: PreparedAudio) -> None:
    """NoSpeech, or AudioTooShort, unless the audio has a window of speech."""
    if prepared.spans:
        return
    if round(prepared.duration * SAMPLE_RATE) < MIN_SAMPLES:
        raise AudioTooShort("Audio file is too short. Minimum audio length is 0.1 seconds")
    raise NoSpeech("The audio contains no speech")


@dataclass
class Segment:
    start: float
    end: float
    text: str
    avg_logprob: float


@dataclass
class TranscriptionResult:
    text: str
    language: str | None
    language_source: str
    language_probability: float
    detected_language: str  # LID's best guess, also when the language was given
    adapter: str
    duration: float
    segments: list[Segment]
    processing_seconds: float

    @property
    def reported_language(self) -> str:
        """The language a response names: the one transcribed with, or else LID's guess, whose confidence was too low
        to pick an adapter (the fallback: verbose_json says so in `language_source`)."""
        return self.language or self.detected_language


@contextlib.contextmanager
def abandoned_unless_answered(futures: list[asyncio.Future]) -> Iterator[None]:
    """Around waiting for a request's rows: if the wait ends without them (a timeout, an engine error in another
    window, the request cancelled because its client went away), the rows not answered yet are cancelled, which
    takes them out of the batcher's queue or the engine's batch (Batcher: abandoned rows)."""
    try:
        yield
    except BaseException:
        cancel_unanswered(futures)
        raise


def cancel_unanswered(futures: list[asyncio.Future]) -> None:
    """Rows nobody will wait for: each not answered yet is cancelled, which abandons it (a no-op for the others)."""
    for future in futures:
        future.cancel()


class TranscriptionService:
    def __init__(self, settings: Settings, batcher: Batcher, audio: AudioWorkers, metrics: Metrics) -> None:
        self.settings = settings
        self.batcher = batcher
        self.audio = audio  # decoding, windows and features, off the event loop
        self.metrics = metrics

    async def submit(self, audio: Audio, language: str | None, temperature: float, streaming: bool = False,
                     expected: ExpectedRows | None = None, timed: bool = False, offline: bool = False
                     ) -> tuple[PreparedAudio, list[asyncio.Future], list[asyncio.Queue] | None]:
        """Queue the request's windows (all or none: QueueFull, or, offline, wait for room). Streaming: one delta
        queue per window; `timed`: segments timed by their speech (server.audio_workers.speech_windows).
        `expected`: the request is already announced to the batcher (Batcher.expecting_rows); else it is now.
        Raises AudioDecodeError and AudioTooLong (an upload), NoSpeech, QueueFull, TooManyRows."""
        announced = contextlib.nullcontext(expected) if expected else self.batcher.expecting_rows()
        with announced as expected:
            prepared = await self.audio.prepare(audio, timed)
            require_speech(prepared)
            loop = asyncio.get_running_loop()
            queues = [asyncio.Queue() for _ in prepared.spans] if streaming else None
            items = []
            for index, row in enumerate(prepared.rows):
                callback = None
                if queues is not None:
                    queue = queues[index]
                    callback = lambda delta, q=queue: loop.call_soon_threadsafe(q.put_nowait, delta)  # noqa: E731
                items.append(EngineInput(row.features, language, temperature, callback, heard=row.heard))
            if offline:
                return prepared, await self.batcher.submit_when_room(items, expected), queues
            return prepared, self.batcher.submit(items, expected), queues

    async def transcribe(self, audio: Audio, language: str | None, temperature: float = 0.0,
                         expected: ExpectedRows | None = None, timed: bool = False, offline: bool = False
                         ) -> TranscriptionResult:
        """Within ZASR_REQUEST_TIMEOUT_S, from the upload on (its decoding and encoding count too), unless `offline`:
        the offline command's files wait their turn for the audio worker and for room in the queue, with no client
        to answer 504 or 503."""
        start = time.monotonic()
        async with asyncio.timeout(None if offline else self.settings.request_timeout_s):
            prepared, futures, _ = await self.submit(audio, language, temperature, expected=expected, timed=timed,
                                                     offline=offline)
            with abandoned_unless_answered(futures):
                # asyncio.wait, not wait_for(gather): cancelled (the client left) or timed out, a gather is cancelled
                # too and, its rows then cancelled one by one, may end with an exception nobody retrieves (logged)
                done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
                for future in done:  # an engine error in one window fails the request at once
                    if future.exception() is not None:
                        raise future.exception()
        return self.join(prepared, [future.result() for future in futures], time.monotonic() - start)

    async def stream(self, audio: Audio, language: str | None, temperature: float = 0.0,
                     expected: ExpectedRows | None = None
                     ) -> tuple[AsyncIterator[str | TranscriptionResult], list[asyncio.Future]]:
        """Queue the request now (bad audio, QueueFull and NoSpeech are raised here, before any response is sent),
        and return its events (text deltas in order, window after window, then the final TranscriptionResult) and
        its rows' futures. Whoever stops reading the events early, or never starts, cancels the rows
        (`cancel_unanswered`): a generator that never started runs no code of its own to do it."""
        start = time.monotonic()
        async with asyncio.timeout(self.settings.request_timeout_s):
            prepared, futures, queues = await self.submit(audio, language, temperature, streaming=True,
                                                          expected=expected)
        return self._events(prepared, futures, queues, start), futures

    async def _events(self, prepared: PreparedAudio, futures: list[asyncio.Future],
                      queues: list[asyncio.Queue], start: float) -> AsyncIterator[str | TranscriptionResult]:
        """The deadline is the request's, not each delta's: a long stream that keeps sending deltas ends too."""
        deadline = start + self.settings.request_timeout_s
        for index, (future, queue) in enumerate(zip(futures, queues, strict=True)):
            if index > 0:
                yield self._separator(futures[index - 1].result())
            while not (future.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                try:
                    done, _ = await asyncio.wait({getter, future}, timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:  # no task left waiting on the queue, also when the stream is cancelled (its client left)
                    getter.cancel()  # a no-op once it has its delta
                if getter in done:
                    yield getter.result()
                elif not done:
                    raise TimeoutError
            future.result()  # re-raises an engine error
        outputs = [f.result() for f in futures]
        yield self.join(prepared, outputs, time.monotonic() - start)

    @staticmethod
    def _separator(previous: EngineOutput) -> str:
        unspaced = previous.language is not None and BY_CODE[previous.language].unspaced
        return "" if unspaced or not previous.text else " "

    def join(self, prepared: PreparedAudio, outputs: list[EngineOutput], seconds: float) -> TranscriptionResult:
        segments = [Segment(span.start / SAMPLE_RATE, span.end / SAMPLE_RATE, out.text, out.avg_logprob)
                    for span, out in zip(prepared.spans, outputs, strict=True)]
        text = ""
        for index, out in enumerate(outputs):
            text += (self._separator(outputs[index - 1]) if index else "") + out.text
        first = outputs[0]
        duration = prepared.duration
        self.metrics.audio_seconds.labels(language_label(first.language)).inc(duration)
        self.metrics.real_time_factor.observe(seconds / max(duration, 1e-6))
        return TranscriptionResult(text, first.language, first.language_source, first.language_probability,
                                   first.candidates[0][0], first.adapter, duration, segments, seconds)
