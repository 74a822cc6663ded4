"""Streaming transcription over a WebSocket: OpenAI's Realtime API, transcription sessions (`/v1/realtime`).

One `RealtimeSession` per connection. Audio arrives as base64 PCM16 (`input_audio_buffer.append`), is resampled
to 16 kHz and cut into turns, by silero-vad (`turn_detection: server_vad`) or by the client's commits
(`turn_detection: null`). The events are the protocol's (server/realtime_protocol.py).

Partial results while a turn is open: every `realtime_update_ms` of new audio the turn's open window so far is
decoded again, through the shared batcher, so realtime rows and REST requests ride in the same engine batches. The
encoder runs chunked and incrementally (speechllm/streaming.py): each update encodes only the audio that is new.
The text that the last `n` hypotheses agree on, in whole words, is sent as a delta (LocalAgreement; n = 2 unless
the session's `transcription.delay` asks for more, and "xhigh" sends no partial text). A delta is never taken
back: later hypotheses are forced to continue the text already sent (`EngineInput.prefix`).

Windows: a turn is cut into windows as the REST endpoint cuts long audio (`server.vad.GrowingSplit`: the windows of
`split_long_audio` that no later audio can change, as the audio comes in), since the model hears windows of a few
seconds well and longer rows badly. A turn whose audio stays within one window's limit is one window. Each window
the rule settles is transcribed as the REST endpoint transcribes a window, its text is sent (after the windows before
it), and the next window opens: partial updates decode the open window only. They decode it up to the end of the
audio so far, which may run past where the rule then cuts it: text sent for a window that its REST answer places past
its end is carried to the next window as text already sent (`settled_text`), not sent twice.

The final transcript of a window is the REST endpoint's answer for its audio: for the window still open at the
commit, the turn's audio from the window's start goes through `TranscriptionService.transcribe`, full-attention
encoder, same batcher and engine (for a turn of one window, `completed` carries exactly what
POST /v1/audio/transcriptions answers for the same audio). When that answer does not begin with the partial text
already sent for the window (the full decode disagrees with the partial hypotheses), a delta cannot be taken back:
the window's text is the text sent, continued by the answer's words after the point that text aligns with
(`continue_text`), and the turn is revised: the extension field `offline_transcript` carries the REST answers.
Either way the deltas of a turn concatenate to its `completed` transcript.

With server VAD, the audio transcribed for a turn ends one speech pad (the REST VAD's `speech_pad`, 100 ms) after
its closing pause began, as the REST endpoint's windows of long audio end; the rest of the pause, up to
`audio_end_ms`, holds no words. So that audio is complete once the pause has lasted the pad, and the final decode
may start then (an early final), while the VAD still waits for `silence_duration_ms`. If speech resumes first, the
early final is dropped, its decode wasted; so it starts as late as leaves it the time recent final decodes took
before `silence_duration_ms` is out (`FinalDecodeTimes`), and no earlier than the pad. A partial delta sent during the
pause does not drop it: the REST answer it decodes does not depend on the text sent. If the turn ends at that pause,
`completed` follows the commit as soon as the early final is done.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from starlette.websockets import WebSocket, WebSocketDisconnect

from server import errors
from server.batcher import QueueFull, TooManyRows
from server.engine import EngineInput, EngineOutput
from server.errors import APIError, internal_error, invalid_request
from server.metrics import Metrics
from server.protocol import TranscriptionLanguage, UsageDuration, check_language
from server.realtime_protocol import (
    AudioFormat,
    AudioInputOptions,
    BetaSessionOptions,
    BetaSessionUpdate,
    BetaSessionUpdated,
    BetaTranscriptionSession,
    Cleared,
    ClientEventError,
    Committed,
    ErrorEvent,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    PcmFormat,
    ServerEvent,
    ServerVad,
    SessionAudio,
    SessionAudioInput,
    SessionCreated,
    SessionTranscription,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    TranscriptionSession,
    TurnDetectionOptions,
    new_id,
    parse_client_event,
)
from server.service import NoSpeech
from server.settings import Settings
from server.vad import WINDOW, GrowingSplit, Span, StreamingVAD
from speechllm.audio import SAMPLE_RATE
from speechllm.features import log_mel_spectrogram
from speechllm.languages import BY_CODE
from speechllm.streaming import FRAME_LOOKAHEAD, INPUT_RATES, IncrementalEncoder, PcmDecoder, StreamingFeatures

if TYPE_CHECKING:
    from server.app import Runtime

logger = logging.getLogger("zipper_asr.realtime")
T = TypeVar("T")

# Hypotheses that must agree before partial text is sent, by the session's `transcription.delay`.
AGREEMENT = {None: 2, "minimal": 2, "low": 2, "medium": 3, "high": 4, "xhigh": 0}
MIN_COMMIT_SAMPLES = SAMPLE_RATE // 10  # as OpenAI: a commit needs at least 100 ms of audio
OUTBOX_EVENTS = 256  # events waiting for a slow client; beyond, decoding waits and the connection is not read
CLOSE_WAIT_S = 5.0  # at shutdown, how long RealtimeHub.close waits for the sessions to end
MODEL_PARAM = "session.audio.input.transcription.model"
LANGUAGE_PARAM = "session.audio.input.transcription.language"


# ---------------------------------------------------------------------------------------------------------------
# Partial text: LocalAgreement over whole words
# ---------------------------------------------------------------------------------------------------------------


def is_unspaced(language: str | None) -> bool:
    return language is not None and BY_CODE[language].unspaced


def agreed_prefix(hypotheses: list[str], unspaced: bool = False) -> str:
    """The longest beginning that every hypothesis shares, in units each hypothesis has finished: words followed
    by another word (the last word may still grow), or for languages written without spaces, characters
    followed by another character."""
    if unspaced:
        finished = [h[:-1] for h in hypotheses]
        length = 0
        while all(length < len(h) for h in finished) and len({h[length] for h in finished}) == 1:
            length += 1
        return finished[0][:length]
    words = [h.split(" ")[:-1] for h in hypotheses]
    agreed: list[str] = []
    for column in zip(*words, strict=False):
        if len(set(column)) != 1:
            break
        agreed.append(column[0])
    return " ".join(agreed)


def extends(text: str, prefix: str, unspaced: bool = False) -> bool:
    """Whether `text` begins with `prefix` as whole words (for unspaced languages: as characters)."""
    if not text.startswith(prefix):
        return False
    return unspaced or not prefix or len(text) == len(prefix) or text[len(prefix)] == " "


def _units(text: str, unspaced: bool) -> list[str]:
    return list(text) if unspaced else text.split()


def _edit_distances(sent: list[str], answer: list[str]) -> list[list[int]]:
    """table[i][j]: the edits (insertions, deletions, substitutions) between sent[:i] and answer[:j]."""
    table = [list(range(len(answer) + 1))]
    for i, unit in enumerate(sent, 1):
        row = [i] + [0] * len(answer)
        for j, other in enumerate(answer, 1):
            row[j] = min(table[i - 1][j] + 1, row[j - 1] + 1, table[i - 1][j - 1] + (unit != other))
        table.append(row)
    return table


def continue_text(sent: str, answer: str, unspaced: bool = False) -> str:
    """A transcript that begins with the text already `sent` and goes on with what the full decode's `answer` says
    after it: `sent`, then the answer's words (for unspaced languages: characters) that follow the beginning of the
    answer closest to `sent` (fewest word edits; of equally close ones, the longest). Where the answer begins with
    `sent`, that is the answer."""
    if extends(answer, sent, unspaced):
        return answer
    answer_units = _units(answer, unspaced)
    return _continued(sent, answer_units, _edit_distances(_units(sent, unspaced), answer_units)[-1], unspaced)


def _continued(sent: str, answer_units: list[str], distances: list[int], unspaced: bool) -> str:
    """continue_text, given the edits between `sent` and each beginning of the answer."""
    rest = answer_units[min(range(len(distances)), key=lambda j: (distances[j], -j)):]
    if unspaced:
        return sent + "".join(rest)
    return " ".join(([sent] if sent else []) + rest)


def settled_text(sent: str, answer: str, unspaced: bool = False) -> tuple[str, str]:
    """A settled window's text, from the text already `sent` for it and its REST `answer`; and the text sent that lies
    past its end. Partial updates decode the open window up to the end of the audio so far, while the window may be
    settled at a cut before that end, so the text sent for it may run past the cut. When the whole answer is closer
    to a beginning of `sent` (fewer word edits) than any beginning of the answer is to all of `sent`, the rest of
    `sent` lies past the cut: → (that beginning, the rest), and the rest is the next window's text already sent.
    Otherwise → (continue_text(sent, answer), "")."""
    if extends(answer, sent, unspaced):
        return answer, ""
    sent_units, answer_units = _units(sent, unspaced), _units(answer, unspaced)
    table = _edit_distances(sent_units, answer_units)
    within = min(table[-1])  # all of `sent` against a beginning of the answer
    cut, past = min(((i, row[-1]) for i, row in enumerate(table)), key=lambda pair: (pair[1], -pair[0]))
    if past >= within or cut == len(sent_units):
        return _continued(sent, answer_units, table[-1], unspaced), ""
    if unspaced:
        return sent[:cut], sent[cut:]
    words = list(re.finditer(r"\S+", sent))
    end = words[cut - 1].end() if cut else 0
    return sent[:end], sent[end:].lstrip()


# ---------------------------------------------------------------------------------------------------------------
# Audio held by a session
# ---------------------------------------------------------------------------------------------------------------


class AudioBuffer:
    """The session's 16 kHz audio from sample offset `start` to `end` (offsets count from the session's first
    sample); audio no turn can need any more is dropped with `trim`."""

    def __init__(self) -> None:
        self.start = 0
        self.end = 0
        self._chunks: deque[np.ndarray] = deque()

    @property
    def size(self) -> int:
        return self.end - self.start

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self.end += samples.size

    def slice(self, begin: int, end: int) -> np.ndarray:
        parts, offset = [], self.start
        for chunk in self._chunks:
            if offset >= end:
                break
            low, high = max(begin - offset, 0), min(end - offset, chunk.size)
            if high > low:
                parts.append(chunk[low:high])
            offset += chunk.size
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def trim(self, before: int) -> None:
        while self._chunks and self.start + self._chunks[0].size <= before:
            self.start += self._chunks.popleft().size
        if not self._chunks:
            self.start = self.end


@dataclass
class TurnWindow:
    """The window of a turn that is still open: partial updates decode its audio so far as one row. A turn is cut
    into windows as the REST endpoint cuts long audio (`GrowingSplit`), so that no partial decode is longer than a
    window the model hears well; once the rule settles a window, it is decoded as the REST endpoint decodes it and
    its text is sent, and the next window opens."""

    start: int  # session sample offset of its first sample
    encoder: IncrementalEncoder | None  # None: partial updates re-encode the window with full attention
    features: StreamingFeatures = field(default_factory=StreamingFeatures)
    emitted: str = ""  # the text sent for this window so far
    hypotheses: list[str] = field(default_factory=list)  # the latest partial hypotheses of this window
    updates: int = 0  # update intervals of its audio already scheduled for decoding

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """The window's audio so far → encoder states, encoding only what is new (runs in the engine thread)."""
        return self.encoder.update(self.features.update(samples))


@dataclass
class Turn:
    """One item: the audio from `start` until the turn is committed, and its partial results."""

    item_id: str
    start: int  # session sample offset of the turn's first sample
    language: str | None  # the session's language, or the detected one once `locked`
    locked: bool  # the language is kept to the end of the turn
    window: TurnWindow  # the window still open
    split: GrowingSplit  # the turn's audio, fed from `start`, cut into windows as it comes
    split_fed: int = 0  # session offset up to which `split` has been fed
    window_sends: list[asyncio.Task] = field(default_factory=list)  # per settled window, in order: sends its text
    # (after the windows before it's) and answers (its REST answer, language)
    emitted: str = ""  # all the text sent as deltas so far
    revised: bool = False  # a window's REST answer did not begin with the text already sent for it
    partial: asyncio.Task | None = None  # the partial update in progress
    early_final: FinalDecode | None = None  # the final decode started during a pause, if one is open
    closed: bool = False  # committed or cleared: partial results are no longer wanted
    announced: bool = False  # its speech_started was sent (a turn opened by manual commits has none, until server
    # VAD, switched on while it is open, hears speech in it)

    def settled_text_sent(self) -> bool:
        """Whether every settled window's text is out: only then may the open window's text follow it."""
        return all(task.done() and not task.cancelled() and task.exception() is None for task in self.window_sends)


def joined(before: str, after: str, unspaced: bool) -> str:
    """Two windows' texts as the REST endpoint joins them."""
    return before + (" " if before and after and not unspaced else "") + after


@dataclass
class FinalDecode:
    """A turn's final decode in flight, on its open window's audio from `start` up to `end`: what the REST endpoint
    answers for that audio. Started at the commit, or early: while the VAD waits out a pause."""

    start: int  # session offset where the transcribed audio begins: the open window's start
    end: int  # session offset where the transcribed audio ends
    samples: np.ndarray
    language: str | None  # the turn's language when it started
    offline: asyncio.Task  # → (REST answer, language)

    def matches(self, turn: Turn, end: int) -> bool:
        """Whether it decodes what a final decode started now would: the same audio, in the same language."""
        return self.start == turn.window.start and self.end == end and self.language == turn.language

    def cancel(self) -> None:
        self.offline.cancel()  # (and with it its rows: Batcher, abandoned rows)


class FinalDecodeTimes:
    """How long the recent final decodes took, from their start to their answer, over all sessions (they share the
    engine): how long before the commit an early final has to start to be done by then."""

    KEPT = 64
    MEASURED_AFTER = 8  # decodes timed before a lead is given
    QUANTILE = 0.9
    MARGIN = 1.5  # times the quantile: decodes grow with the load and the turn's length

    def __init__(self) -> None:
        self._seconds: deque[float] = deque(maxlen=self.KEPT)

    def record(self, seconds: float) -> None:
        self._seconds.append(seconds)

    def lead_s(self) -> float | None:
        """The head start: a high quantile of the recent decodes with a margin, plus two VAD windows (a pause is
        heard a window late, and the VAD ends the turn at a window's end); None until enough are timed."""
        if len(self._seconds) < self.MEASURED_AFTER:
            return None
        return self.MARGIN * float(np.quantile(self._seconds, self.QUANTILE)) + 2 * WINDOW / SAMPLE_RATE


def early_final_lead_s(settings: Settings, decode_times: FinalDecodeTimes) -> float | None:
    """The lead an early final is given: the setting's, else learnt; None until decodes are timed."""
    return settings.realtime_early_final_lead_ms / 1000 or decode_times.lead_s()


@dataclass
class _Close:
    code: int
    reason: str


# ---------------------------------------------------------------------------------------------------------------
# One connection
# ---------------------------------------------------------------------------------------------------------------


class RealtimeSession:
    def __init__(self, websocket: WebSocket, runtime: Runtime, settings: Settings, metrics: Metrics,
                 decode_times: FinalDecodeTimes | None = None) -> None:
        self.websocket = websocket
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.decode_times = decode_times or FinalDecodeTimes()  # the hub's, shared by its sessions
        self.session = TranscriptionSession(audio=SessionAudio(input=SessionAudioInput(
            transcription=SessionTranscription(model=settings.model_name))))
        self.pcm = PcmDecoder(self.session.input.format.rate)
        self.buffer = AudioBuffer()
        self.vad: StreamingVAD | None = None
        self.vad_offset = 0  # session offset of the VAD's sample 0
        self.vad_stale = False  # turn detection changed while a turn was open: rebuilt when it ends
        self._rebuild_vad()
        self.turn: Turn | None = None
        self.turn_floor = 0  # a new turn starts no earlier than the end of the last one
        self.previous_item_id: str | None = None
        self.tasks: set[asyncio.Task] = set()  # partial and final decodes
        self.finals: set[asyncio.Task] = set()
        self.final_samples = 0  # audio held by committed turns being transcribed
        self.outbox: asyncio.Queue[ServerEvent | _Close] = asyncio.Queue(OUTBOX_EVENTS)
        self._main: asyncio.Task | None = None
        self._ending = False  # `run` is freeing what the session holds: a stop() now must not cut that short
        self.client_gone = False
        model = runtime.engine.model
        self.chunk_size = settings.realtime_chunk_size or model.config.encoder.chunk_size
        self.streaming_encoder = hasattr(model.encoder, "stream")  # ours is; a HF Whisper encoder is not
        # Not capped at one REST window: a longer turn is cut into windows as an upload is (TurnWindow).
        self.max_turn_samples = int(settings.realtime_max_turn_seconds * SAMPLE_RATE)
        self.update_samples = max(1, int(settings.realtime_update_ms * SAMPLE_RATE / 1000))
        self.speech_pad = runtime.service.audio.vad.speech_pad  # what a turn's audio keeps of its closing pause
        self.last_append = 0  # samples of the last audio appended (an early final looks one append ahead)

    # ---- what the gauges read -------------------------------------------------------------------------------
    @property
    def held_seconds(self) -> float:
        return (self.buffer.size + self.final_samples) / SAMPLE_RATE

    @property
    def agreement(self) -> int:
        return AGREEMENT[self.session.input.transcription.delay]

    # ---- the connection ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves, idles out, or the server shuts down; then free
        everything the session holds."""
        self._main = asyncio.current_task()
        sender = asyncio.create_task(self._send_loop())
        close: _Close | None = None  # None: the client is gone, nothing more can be sent
        try:
            await self.send(SessionCreated(session=self.session.model_copy(deep=True)))
            close = await self._receive_loop()
        except WebSocketDisconnect:
            pass
        except asyncio.CancelledError:  # the sender found the client gone, or server shutdown (RealtimeHub.close)
            close = None if self.client_gone else _Close(1001, "server shutting down")
        finally:
            self._ending = True
            await self._abandon()
            if close is not None and not sender.done():
                with contextlib.suppress(asyncio.QueueFull, Exception, asyncio.CancelledError):
                    self.outbox.put_nowait(close)  # after what is queued (a closing error event, say)
                    await asyncio.wait_for(sender, 5)
            sender.cancel()

    async def _receive_loop(self) -> _Close | None:
        while True:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), self.settings.realtime_idle_timeout_s)
            except TimeoutError:
                await self.send(ErrorEvent.of(APIError(
                    408, f"No message for {self.settings.realtime_idle_timeout_s:g} s: the session is closed.",
                    code="idle_timeout")))
                return _Close(1000, "idle timeout")
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("text") is None:
                await self.send(ErrorEvent.of(invalid_request(
                    "Binary messages are not part of the protocol: send JSON events as text.", code="invalid_json")))
                continue
            await self.handle(message["text"])
            while len(self.finals) >= self.settings.realtime_max_pending_turns:
                # Backpressure: stop reading the connection until a turn's transcript is out.
                await asyncio.wait(set(self.finals), return_when=asyncio.FIRST_COMPLETED)

    async def _send_loop(self) -> None:
        """Sends the outbox's events. A client that takes none of them for `realtime_send_timeout_s` counts as gone:
        a send waits while the connection's buffers are full, so one that stopped reading would otherwise hold the
        session (its audio, its decodes, its place among the sessions) for as long as it keeps the connection open,
        since neither uvicorn's pings nor the idle timeout end a connection whose buffers never drain."""
        timeout = self.settings.realtime_send_timeout_s
        try:
            while True:
                event = await self.outbox.get()
                if isinstance(event, _Close):  # (`run` waits for it a few seconds at most)
                    await self.websocket.close(event.code, event.reason)
                    return
                try:
                    text = event.model_dump_json()
                except ValueError:  # a bug of ours, not the client leaving: say so and carry on with the session
                    logger.exception("could not serialise a %s event", event.type)
                    text = ErrorEvent.of(internal_error()).model_dump_json()
                await asyncio.wait_for(self.websocket.send_text(text), timeout)
        except Exception as error:  # the client is gone: stop the session, whatever it waits for
            if isinstance(error, TimeoutError):
                logger.warning("a realtime client took no event for %g s: its session ends", timeout)
            self.client_gone = True
            self.stop()

    async def send(self, event: ServerEvent) -> None:
        await self.outbox.put(event)

    def stop(self) -> asyncio.Task | None:
        """End the session (server shutdown, or the sender finding the client gone): `run` then frees everything and
        closes. Returns the task running it, to wait for, or None when it has ended. A session already ending is left
        to end (cancelling it again would cut its teardown short)."""
        if self._main is None or self._main.done():
            return None
        if not self._ending:
            self._main.cancel()
        return self._main

    async def _abandon(self) -> None:
        """Teardown: cancel this connection's decodes, whose rows then leave the batcher and the engine (Batcher:
        abandoned rows), and drop its audio."""
        if self.turn is not None:
            self.turn.closed = True
            self.turn = None
            self.metrics.realtime_turns.labels("abandoned").inc()
        pending = [task for task in self.finals if not task.done()]
        if pending:
            self.metrics.realtime_turns.labels("abandoned").inc(len(pending))
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.buffer.trim(self.buffer.end)

    # ---- client events ----------------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        event_id = None
        try:
            event = parse_client_event(text)
            event_id = event.event_id
            if isinstance(event, InputAudioBufferAppend):
                await self._append(event)
            elif isinstance(event, InputAudioBufferCommit):
                await self._client_commit()
            elif isinstance(event, InputAudioBufferClear):
                await self._clear()
            elif isinstance(event, SessionUpdate):
                if event.session.type != "transcription":
                    raise invalid_request("This server runs transcription sessions only: set session.type to "
                                          "'transcription'.", "session.type", "invalid_value")
                audio = event.session.audio
                self._configure(audio.input if audio else None, event.session.include)
                await self.send(SessionUpdated(session=self.session.model_copy(deep=True)))
            elif isinstance(event, BetaSessionUpdate):
                self._configure(beta_input(event.session), event.session.include)
                await self.send(BetaSessionUpdated(session=BetaTranscriptionSession.of(self.session)))
        except ClientEventError as error:
            await self.send(ErrorEvent.of(error.error, error.event_id))
        except APIError as error:
            await self.send(ErrorEvent.of(error, event_id))
        except Exception:  # a bug of ours: it costs this event, not the session
            logger.exception("could not handle a client event")
            await self.send(ErrorEvent.of(internal_error(), event_id))

    def _configure(self, options: AudioInputOptions | None, include: list[str] | None) -> None:
        """Apply a session update: only the fields it holds change; nothing changes if any of them is invalid."""
        current = self.session.input
        given = options.model_fields_set if options else set()
        audio_format = current.format
        if "format" in given:
            audio_format = pcm_format(options.format or AudioFormat())
        transcription = current.transcription.model_copy()
        if "transcription" in given and options.transcription is not None:
            asked = options.transcription
            for name in asked.model_fields_set:
                value = getattr(asked, name)
                if name == "model" and value is not None:
                    if value not in {self.settings.model_name, *self.settings.model_aliases}:
                        error = errors.model_not_found(value)
                        raise APIError(400, error.message, param=MODEL_PARAM, code=error.code)
                    transcription.model = value
                elif name == "language":
                    transcription.language = session_language(value)
                elif name == "prompt":
                    transcription.prompt = value or ""
                elif name == "delay":
                    transcription.delay = value
        turn_detection = current.turn_detection
        if "turn_detection" in given:
            turn_detection = server_vad(options.turn_detection, current.turn_detection)
        detection_changed = turn_detection != current.turn_detection
        self.session.audio.input = SessionAudioInput(format=audio_format, transcription=transcription,
                                                     turn_detection=turn_detection)
        if include is not None:
            self.session.include = include
        if audio_format.rate != self.pcm.rate:
            self.pcm = PcmDecoder(audio_format.rate)
        if detection_changed:
            if self.turn is None or self.vad is None:
                self._rebuild_vad()  # a turn open without a VAD now ends at the new one's speech_stopped
            elif turn_detection is None:
                self.vad = None  # the open turn now ends when the client commits it
            else:
                self.vad_stale = True  # the new detector starts with the next turn

    def _rebuild_vad(self) -> None:
        options = self.session.input.turn_detection
        self.vad = None if options is None else StreamingVAD(options.threshold, options.silence_duration_ms,
                                                             options.prefix_padding_ms)
        self.vad_offset = self.buffer.end
        self.vad_stale = False

    async def _append(self, event: InputAudioBufferAppend) -> None:
        limit = int(self.settings.realtime_max_append_mb * 2**20)
        too_large = invalid_request(f"One append may carry at most {limit} bytes of audio; split it.", "audio",
                                    "audio_too_large")
        if len(event.audio) > (limit + 2) // 3 * 4:  # base64 of `limit` bytes: refuse before decoding
            raise too_large
        try:
            data = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_request("The audio is not valid base64.", "audio", "invalid_base64") from None
        if len(data) > limit:
            raise too_large
        if self.vad is None:  # manual commits: the turn, the one this append opens included, has a limit
            incoming = len(data) // 2 * SAMPLE_RATE // self.pcm.rate
            start = self.turn.start if self.turn is not None else self.buffer.end
            if self.buffer.end + incoming - start > self.max_turn_samples:
                raise invalid_request(
                    f"The input audio buffer holds at most {self.max_turn_samples / SAMPLE_RATE:g} s of audio: commit "
                    "or clear it before appending more.", "audio", "input_audio_buffer_full")
        await self._add_audio(self.pcm.feed(data))

    async def _client_commit(self) -> None:
        # As OpenAI, any audio since the last turn is committed, speech or not: with server VAD that is the audio
        # held while no turn is open, at most the longest turn (the buffer keeps whole appends, maybe more).
        start = self.turn.start if self.turn is not None else max(self.turn_floor, self.buffer.start,
                                                                   self.buffer.end - self.max_turn_samples)
        sent = self.buffer.end + self.pcm.held - start  # what the client sent counts
        if sent < MIN_COMMIT_SAMPLES:
            raise invalid_request(f"Error committing input audio buffer: buffer too small. Expected at least 100ms "
                                  f"of audio, but buffer only has {sent * 1000 / SAMPLE_RATE:.2f}ms of audio.", None,
                                  "input_audio_buffer_commit_empty")
        if self.turn is None:
            self._open_turn(start)
        # All the client sent is in the turn, as in a file of it (REST), up to the longest turn.
        self.buffer.append(self.pcm.flush()[: max(0, start + self.max_turn_samples - self.buffer.end)])
        await self._commit(self.buffer.end)
        if self.vad is not None or self.vad_stale:
            self._rebuild_vad()  # the speech just committed is over: the next speech opens a new turn

    async def _clear(self) -> None:
        if self.turn is not None:
            self.turn.closed = True
            if self.turn.partial is not None:
                self.turn.partial.cancel()
            for task in self.turn.window_sends:
                task.cancel()
            self._drop_early_final(self.turn)
            self.turn = None
            self.metrics.realtime_turns.labels("cleared").inc()
        self.buffer.trim(self.buffer.end)
        self.turn_floor = self.buffer.end
        self.pcm = PcmDecoder(self.pcm.rate)  # its odd byte and resampler delay line are audio cleared too
        self._rebuild_vad()
        await self.send(Cleared())

    # ---- audio and turns --------------------------------------------------------------------------------------
    async def _add_audio(self, samples: np.ndarray) -> None:
        start = self.buffer.end
        self.buffer.append(samples)
        self.last_append = samples.size
        if self.vad is not None:
            events = await asyncio.to_thread(self.vad.feed, samples) if samples.size else []
            base = self.vad_offset  # (a turn's end may replace the VAD below; these events are the old one's)
            for name, offset in events:
                offset += base
                # Before a speech_stopped, speech goes on at the cut. A speech_started with a turn open comes from a
                # VAD switched on over a manual turn, quiet until then: no turn of that silence (speech opens one).
                await self._split_long_turn(offset, base if name == "speech_started" else None)
                if name == "speech_started":
                    await self._speech_started(offset)
                else:
                    await self._speech_stopped(offset)
            if await self._split_long_turn(self.buffer.end, self._quiet_from()):
                self._rebuild_vad()  # in a pause, a resumption of speech would be no event of the VAD's
        elif self.turn is None and samples.size:
            self._open_turn(start)  # manual commits: the first audio after a commit opens the next turn
        await self._cut_windows()
        self._start_early_final()
        self._schedule_partial()
        if self.turn is not None:
            self.buffer.trim(self.turn.start)
        else:  # keep what a client commit, or the next speech_started's prefix padding, may reach back to
            padding = self.vad.prefix_padding if self.vad is not None else 0
            self.buffer.trim(max(self.turn_floor, self.buffer.end - max(self.max_turn_samples, padding + WINDOW)))

    def _open_turn(self, start: int) -> Turn:
        language = self.session.input.transcription.language
        split = GrowingSplit(self.runtime.service.audio.vad, self.settings.max_window_seconds)
        self.turn = Turn(new_id("item"), start, language, language is not None, self._new_window(start), split,
                         split_fed=start)
        return self.turn

    def _new_window(self, start: int) -> TurnWindow:
        encoder = None
        if self.agreement and self.streaming_encoder:
            encoder = IncrementalEncoder(self.runtime.engine.model.encoder, self.chunk_size,
                                         self.settings.realtime_incremental_encoding)
        return TurnWindow(start, encoder)

    async def _speech_started(self, offset: int) -> None:
        if self.turn is None:
            await self._announce(self._open_turn(max(offset, self.turn_floor, self.buffer.start)))
        elif not self.turn.announced:  # server VAD switched on over a manual turn: that turn goes on, and its
            await self._announce(self.turn)  # speech_stopped will have a speech_started to pair with

    async def _announce(self, turn: Turn) -> None:
        turn.announced = True
        await self.send(SpeechStarted(audio_start_ms=to_ms(turn.start), item_id=turn.item_id))

    async def _speech_stopped(self, silence_from: int) -> None:
        if self.turn is None:
            return
        # The VAD decides at the end of the window in which the pause reached silence_duration_ms; the turn
        # runs to there, pause included (OpenAI's audio_end_ms counts it too).
        windows = -(-self.vad.silence_duration // WINDOW)
        end = max(self.turn.start, min(self.buffer.end, silence_from + windows * WINDOW))
        await self.send(SpeechStopped(audio_end_ms=to_ms(end), item_id=self.turn.item_id))
        await self._commit(end, transcribe_until=min(end, self._transcribed_end(self.turn, silence_from)))
        if self.vad_stale:
            self._rebuild_vad()

    async def _split_long_turn(self, upto: int, quiet_from: int | None = None) -> bool:
        """Server VAD: a turn reaching the longest allowed is committed there, and the speech goes on in a new
        turn (announced with its own speech_started). Unless the VAD has heard no speech since `quiet_from`
        (session offset) and that was before the cut: then a new turn would hold nothing but silence, and the
        next speech opens the next turn. Returns whether it ended a turn so (no turn is open then)."""
        while self.turn is not None and upto - self.turn.start > self.max_turn_samples:
            end = self.turn.start + self.max_turn_samples
            await self._commit(end)
            if quiet_from is not None and quiet_from <= end:
                return True
            await self._announce(self._open_turn(end))
        return False

    def _quiet_from(self) -> int | None:
        """Session offset from which the VAD has heard no speech, after the audio fed so far: where the pause in
        progress began, or where the VAD started when it is not in speech (with a turn open, only a VAD that has
        heard no speech yet: its speech_stopped would have ended the turn); None while speech goes on."""
        if not self.vad.in_speech:
            return self.vad_offset
        return None if self.vad.silence_from is None else self.vad_offset + self.vad.silence_from

    async def _commit(self, end: int, transcribe_until: int | None = None) -> None:
        """Close the turn at `end`; its transcript covers the audio up to `transcribe_until` (default: `end`)."""
        turn, self.turn = self.turn, None
        turn.closed = True
        if turn.partial is not None:
            turn.partial.cancel()  # its result would come too late to be sent
        transcribe_until = end if transcribe_until is None else transcribe_until
        decode = turn.early_final
        if decode is not None and decode.matches(turn, transcribe_until):
            self.metrics.realtime_early_finals.labels("used").inc()
        else:
            self._drop_early_final(turn)
            decode = self._start_final(turn, transcribe_until)
        self.turn_floor = end
        await self.send(Committed(item_id=turn.item_id, previous_item_id=self.previous_item_id))
        self.previous_item_id = turn.item_id
        final = self._spawn(self._finish(turn, decode, time.monotonic()))
        self.finals.add(final)
        final.add_done_callback(self.finals.discard)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _start_early_final(self) -> None:
        """Server VAD: drop the early final when speech resumed; start one when the pause in progress has lasted
        `_early_final_wait` (the turn's audio up to the pause's start plus the speech pad is then in the buffer)."""
        turn = self.turn
        if turn is None or not self.settings.realtime_early_final:
            return
        silence_from = self.vad.silence_from if self.vad is not None else None
        end = None if silence_from is None else self._transcribed_end(turn, self.vad_offset + silence_from)
        if turn.early_final is not None and not turn.early_final.matches(turn, end):
            self._drop_early_final(turn)
        if end is None or end > self.buffer.end or turn.early_final is not None:
            return
        # Now, or after the next append (if as long as the last), which may be too late to leave the lead.
        if self.vad_offset + silence_from + self._early_final_wait() <= self.buffer.end + self.last_append:
            turn.early_final = self._start_final(turn, end)

    def _early_final_wait(self) -> int:
        """How long a pause lasts (samples) before its early final starts: one speech pad at least, and otherwise
        as late as still leaves the decode its lead before silence_duration_ms ends the turn, since every pause
        that speech interrupts after the start throws its decode away (in natural speech most pauses do). Until
        decodes are timed (and with `realtime_early_final_lead_ms` 0), the pad. The lead is wall time taken as
        audio time: a client that sends faster than real time may find the early final still running at the
        commit (its `completed` then waits for it, as it would without early finals)."""
        lead_s = early_final_lead_s(self.settings, self.decode_times)
        if lead_s is None:
            return self.speech_pad
        return max(self.speech_pad, self.vad.silence_duration - round(lead_s * SAMPLE_RATE))

    def _transcribed_end(self, turn: Turn, silence_from: int) -> int:
        """Where a server-VAD turn's transcribed audio ends, for a closing pause from `silence_from` (session
        offset): one speech pad into the pause."""
        return max(turn.start, silence_from + self.speech_pad)

    def _drop_early_final(self, turn: Turn) -> None:
        if turn.early_final is not None:
            turn.early_final.cancel()
            turn.early_final = None
            self.metrics.realtime_early_finals.labels("discarded").inc()

    # ---- windows of a long turn --------------------------------------------------------------------------------
    async def _cut_windows(self) -> None:
        """Feed the open turn's new audio to its split; each window the split settles is decoded and its text sent
        (`_settle`), and the next window opens where the split's rest begins."""
        turn = self.turn
        if turn is None or turn.split_fed >= self.buffer.end:
            return
        samples = self.buffer.slice(turn.split_fed, self.buffer.end)
        turn.split_fed = self.buffer.end
        # No window can be settled before the audio runs past the open one's longest (from its start)
        open_from = turn.window.start - turn.start
        windows, rest = await asyncio.to_thread(turn.split.feed_and_settle, samples, open_from + turn.split.max_len)
        if turn.closed or len(windows) <= len(turn.window_sends):
            return
        spans = windows[len(turn.window_sends):]
        # the open window is the first settled; each later one was never open (one append held it whole)
        settling = [turn.window] + [TurnWindow(turn.start + span.start, None) for span in spans[1:]]
        turn.window = self._new_window(turn.start + rest)
        for window, following, span in zip(settling, [*settling[1:], turn.window], spans, strict=True):
            self._settle(turn, window, following, Span(turn.start + span.start, turn.start + span.end))

    def _settle(self, turn: Turn, window: TurnWindow, following: TurnWindow, span: Span) -> None:
        """`window`'s audio is settled as `span` (session offsets): it is decoded as the REST endpoint decodes a
        window, and its text sent once the windows before it are out; text sent for it that lies past the span goes
        on as `following`'s."""
        if turn.partial is not None:
            turn.partial.cancel()  # it decodes a window that is settled now
        self._drop_early_final(turn)  # it decodes from a settled window's start
        answer = self._spawn(self._offline_text(self.buffer.slice(span.start, span.end), turn.language))
        answer.add_done_callback(_retrieve)
        previous = turn.window_sends[-1] if turn.window_sends else None
        send = self._spawn(self._send_settled(turn, window, following, answer, previous))
        send.add_done_callback(_retrieve)
        send.add_done_callback(lambda _: answer.cancel())  # (cancelled, maybe before it ever ran: its decode too)
        turn.window_sends.append(send)

    async def _send_settled(self, turn: Turn, window: TurnWindow, following: TurnWindow, answer: asyncio.Task,
                            previous: asyncio.Task | None) -> tuple[str, str | None]:
        """Send a settled window's text after the windows before it; → its REST answer and language."""
        if previous is not None:
            await asyncio.wait([previous])  # (not `await previous`: cancelling this would cancel it too)
            previous.result()  # the windows before it failed: so does the turn
        text, language = await answer
        unspaced = is_unspaced(language)
        final, following.emitted = settled_text(window.emitted, text, unspaced)
        turn.revised |= final != text
        await self._send_window_text(turn, window, final, unspaced)
        return text, language

    async def _send_window_text(self, turn: Turn, window: TurnWindow, text: str, unspaced: bool) -> None:
        """Send what `text`, the window's text so far (it begins with what was sent of it), adds."""
        added = text[len(window.emitted):]
        if not added:
            return
        if turn.emitted and not window.emitted and not unspaced:
            added = " " + added  # the window's first words after the windows before it
        await self.send(TranscriptionDelta(item_id=turn.item_id, delta=added))
        turn.emitted += added  # after the send: a cancelled send must not count as sent
        window.emitted = text

    # ---- partial results --------------------------------------------------------------------------------------
    def _schedule_partial(self) -> None:
        """Start the next partial update when a whole update interval of new audio is in and none is running.
        Updates cover whole intervals, so the same audio gives the same updates however it was split; a stream
        that outruns the engine skips intervals instead of queueing them. Each update also takes the few samples
        the last feature frame of the interval needs beyond it, so that (with the update interval equal to the
        encoder chunk, the default) the interval's chunk is complete and no unfinished chunk is encoded."""
        turn = self.turn
        if turn is None or turn.partial is not None or not self.agreement:
            return
        window = turn.window
        due = (self.buffer.end - window.start - FRAME_LOOKAHEAD) // self.update_samples
        if due <= window.updates:
            return
        window.updates = due
        samples = self.buffer.slice(window.start, window.start + due * self.update_samples + FRAME_LOOKAHEAD)
        turn.partial = self._spawn(self._partial(turn, window, samples))

    async def _partial(self, turn: Turn, window: TurnWindow, samples: np.ndarray) -> None:
        try:
            output = await self._decode_partial(turn, window, samples)
            if output is not None and not turn.closed and turn.window is window:
                await self._agree(turn, window, output, samples.size)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed update only costs this update; the turn's final decode still runs
            logger.exception("partial update failed")
        finally:
            turn.partial = None
            if self.turn is turn:
                self._schedule_partial()

    async def _decode_partial(self, turn: Turn, window: TurnWindow, samples: np.ndarray) -> EngineOutput | None:
        batcher = self.runtime.batcher
        if window.encoder is not None:
            before = window.encoder.frames_encoded
            states = await batcher.run_exclusive(window.encode, samples)
            self.metrics.realtime_encoder_frames.inc(window.encoder.frames_encoded - before)
            if not len(states) or turn.closed or turn.window is not window:
                return None
            item = EngineInput(None, turn.language, states=states, prefix=window.emitted, partial=True)
        else:
            item = EngineInput(log_mel_spectrogram(samples), turn.language, prefix=window.emitted, partial=True)
        try:
            future = batcher.submit([item])[0]
        except QueueFull:
            self.metrics.realtime_updates.labels("skipped").inc()  # a partial result can wait for the next one
            return None
        self.metrics.realtime_updates.labels("decoded").inc()
        return await future

    async def _agree(self, turn: Turn, window: TurnWindow, output: EngineOutput, samples: int) -> None:
        if not self.agreement:  # delay "xhigh" since this update started: no partial text
            return
        if not turn.locked and output.language_source == "detected" and samples >= (
                self.settings.realtime_lid_seconds * SAMPLE_RATE):
            turn.language, turn.locked = output.language, True
        window.hypotheses = (window.hypotheses + [output.text])[-self.agreement:]
        if len(window.hypotheses) < self.agreement or not turn.settled_text_sent():
            return  # (the text of the windows before this one goes first)
        unspaced = is_unspaced(turn.language or output.language)
        agreed = agreed_prefix(window.hypotheses, unspaced)
        if len(agreed) > len(window.emitted) and extends(agreed, window.emitted, unspaced):
            await self._send_window_text(turn, window, agreed, unspaced)

    # ---- the final transcript ---------------------------------------------------------------------------------
    async def _finish(self, turn: Turn, decode: FinalDecode, committed_at: float) -> None:
        """Send the turn's last deltas and `completed` (or `failed`)."""
        samples = decode.samples
        self.final_samples += samples.size
        try:
            offline, language = await self._final_text(turn, decode)
            transcript = turn.emitted
            await self.send(TranscriptionCompleted(
                item_id=turn.item_id, transcript=transcript,
                usage=UsageDuration.of((decode.end - turn.start) / SAMPLE_RATE),
                languages=[TranscriptionLanguage(code=language)] if language else [],
                offline_transcript=offline if turn.revised else None))
            self.metrics.realtime_turns.labels("completed").inc()
            self.metrics.realtime_completion_seconds.observe(time.monotonic() - committed_at)
            if turn.revised:
                self.metrics.realtime_revised.inc()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # a turn cannot be sent again: no advice to retry after a wait or to send a shorter file
            if isinstance(error, TooManyRows):  # more windows than ZASR_MAX_QUEUE: it would never be queued
                failure = errors.invalid_request(f"The turn is too long for this server: {error}.",
                                                 code="audio_too_long")
            elif isinstance(error, QueueFull):
                failure = errors.overloaded(error.retry_after_s, "The server was too busy to transcribe this turn.")
            elif isinstance(error, TimeoutError):
                failure = errors.timeout(self.settings.request_timeout_s, "The transcription of this turn", None)
            else:
                logger.exception("the final transcription of a turn failed")
                failure = errors.internal_error()
            self.metrics.realtime_turns.labels("failed").inc()
            await self.send(TranscriptionFailed.of(turn.item_id, failure))
        finally:
            decode.cancel()
            self.final_samples -= samples.size

    def _start_final(self, turn: Turn, end: int) -> FinalDecode:
        start = turn.window.start
        samples = self.buffer.slice(start, max(start, end))
        offline = self._spawn(self._offline_text(samples, turn.language))
        offline.add_done_callback(_retrieve)
        started = time.monotonic()
        offline.add_done_callback(lambda task: self._time_final(started, task))
        return FinalDecode(start, end, samples, turn.language, offline)

    def _time_final(self, started: float, decode: asyncio.Task) -> None:
        """Records how long a final decode took to answer (FinalDecodeTimes). Retries for a full queue count too:
        when the server is overloaded, early finals start sooner, so that turns still end on time."""
        if not decode.cancelled() and decode.exception() is None:
            self.decode_times.record(time.monotonic() - started)

    async def _offline_text(self, samples: np.ndarray, language: str | None) -> tuple[str, str | None]:
        try:
            result = await self._retry(lambda: self.runtime.service.transcribe(samples, language))
            return result.text, result.language
        except NoSpeech:
            return "", language

    async def _final_text(self, turn: Turn, decode: FinalDecode) -> tuple[str, str | None]:
        """Send the rest of a committed turn's text: each settled window's (in order), then the open window's, which
        `decode` transcribes. → (what the REST endpoint answers for those windows, joined; the first's language)."""
        answers = [await task for task in turn.window_sends]
        answer, language = await decode.offline
        answers.append((answer, language))
        unspaced = is_unspaced(language)
        text = continue_text(turn.window.emitted, answer, unspaced)
        turn.revised |= text != answer
        await self._send_window_text(turn, turn.window, text, unspaced)
        offline = answers[0][0]
        for (_, previous_language), (text, _) in zip(answers, answers[1:], strict=False):
            offline = joined(offline, text, is_unspaced(previous_language))  # as REST: by the previous window's
        return offline, answers[0][1]

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """A committed turn is never dropped for a full queue: try again until the request timeout."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            try:
                return await attempt()
            except QueueFull as full:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(full.retry_after_s, 0.25, left))


# ---------------------------------------------------------------------------------------------------------------
# Session options
# ---------------------------------------------------------------------------------------------------------------


def _retrieve(future: asyncio.Future) -> None:
    """Mark a background decode's outcome as seen, so that asyncio does not warn about an unused error."""
    if not future.cancelled():
        future.exception()


def to_ms(offset: int) -> int:
    return offset * 1000 // SAMPLE_RATE


def pcm_format(requested: AudioFormat) -> PcmFormat:
    if requested.type != "audio/pcm":
        raise invalid_request(f"Unsupported input format '{requested.type}': send 16-bit little-endian mono PCM "
                              "(audio/pcm).", "session.audio.input.format.type", "unsupported_value")
    rate = 24_000 if requested.rate is None else requested.rate  # 0 is a rate, a wrong one
    if rate not in INPUT_RATES:
        raise invalid_request(f"Unsupported sample rate {rate}: use 24000 (OpenAI's) or 16000.",
                              "session.audio.input.format.rate", "invalid_value")
    return PcmFormat(rate=rate)


def session_language(value: str | None) -> str | None:
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    try:
        return check_language(value)
    except APIError as error:
        raise APIError(400, error.message, param=LANGUAGE_PARAM, code=error.code) from None


def server_vad(options: TurnDetectionOptions | None, current: ServerVad | None = None) -> ServerVad | None:
    """The turn detection a session update asks for: the fields it gives, the others as they are now (a session on
    server VAD already) or the defaults."""
    if options is None:
        return None
    if options.type != "server_vad":
        raise invalid_request(f"Turn detection '{options.type}' is not supported: use server_vad, or null to "
                              "commit turns yourself.", "session.audio.input.turn_detection.type",
                              "unsupported_value")
    given = {name: getattr(options, name) for name in ("threshold", "prefix_padding_ms", "silence_duration_ms")
             if getattr(options, name) is not None}
    return (current or ServerVad()).model_copy(update=given)


def beta_input(session: BetaSessionOptions) -> AudioInputOptions:
    """The older `transcription_session.update` fields in the current shape (fields it leaves out stay out)."""
    given = session.model_fields_set
    values: dict = {}
    if "input_audio_format" in given:
        kind = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
        values["format"] = AudioFormat(type=kind[session.input_audio_format or "pcm16"], rate=24_000)
    if "input_audio_transcription" in given:
        values["transcription"] = session.input_audio_transcription
    if "turn_detection" in given:
        values["turn_detection"] = session.turn_detection
    return AudioInputOptions(**values)


# ---------------------------------------------------------------------------------------------------------------
# All connections of one app
# ---------------------------------------------------------------------------------------------------------------


class RealtimeHub:
    """Admits connections (model loaded, session limit, intent, model) and keeps the live sessions, which the
    realtime gauges read at every scrape."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sessions: set[RealtimeSession] = set()
        self.decode_times = FinalDecodeTimes()
        metrics.realtime_early_final_lead_seconds.set_function(
            lambda: early_final_lead_s(settings, self.decode_times) or 0.0)
        metrics.realtime_sessions.set_function(lambda: len(self.sessions))
        metrics.realtime_buffered_seconds.set_function(lambda: sum(s.held_seconds for s in self.sessions))
        metrics.realtime_tasks.set_function(lambda: sum(len(s.tasks) for s in self.sessions))

    async def serve(self, websocket: WebSocket, runtime: Runtime | None) -> None:
        await websocket.accept()
        refusal = self._refusal(websocket, runtime)
        if refusal is not None:
            error, code = refusal
            await websocket.send_text(ErrorEvent.of(error).model_dump_json())
            await websocket.close(code, error.message[:120])
            return
        session = RealtimeSession(websocket, runtime, self.settings, self.metrics, self.decode_times)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def _refusal(self, websocket: WebSocket, runtime: Runtime | None) -> tuple[APIError, int] | None:
        """Why this connection cannot be served (an error event, then a close code), or None."""
        intent = websocket.query_params.get("intent")
        if intent not in (None, "transcription"):
            return invalid_request(f"Unsupported intent '{intent[:50]}': this server runs transcription sessions "
                                   "(intent=transcription).", "intent", "invalid_value"), 1008
        model = websocket.query_params.get("model")
        if model is not None and model not in {self.settings.model_name, *self.settings.model_aliases}:
            return errors.model_not_found(model), 1008
        if runtime is None:
            self.metrics.rejected.labels("loading").inc()
            return APIError(503, "The model is still loading; retry shortly.", type=errors.SERVER_ERROR,
                            code="model_loading"), 1013
        if len(self.sessions) >= self.settings.realtime_max_sessions:
            self.metrics.rejected.labels("realtime_sessions").inc()
            return APIError(503, f"The server holds its limit of {self.settings.realtime_max_sessions} realtime "
                                 "sessions; retry later.", type=errors.SERVER_ERROR, code="session_limit"), 1013
        return None

    async def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Shutdown: end every session still open, and wait (at most `wait_s`) until each has freed what it holds,
        before the batcher stops. Under uvicorn this finds none, normally: its own shutdown closes every WebSocket
        (1012) and waits for their handlers first; sessions are left after its graceful-shutdown timeout
        (`ZASR_SHUTDOWN_TIMEOUT_S`), whose clients may get a close frame (1001) still."""
        running = [task for session in list(self.sessions) if (task := session.stop()) is not None]
        if running:
            await asyncio.wait(running, timeout=wait_s)
