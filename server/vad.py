"""Voice activity detection with Silero VAD (ONNX, run by onnxruntime): speech spans, long-upload splitting, streaming.

The model is the `silero_vad_16k_sequence.onnx` file shipped inside the `silero-vad` wheel. It is the same network
as the package's streaming `silero_vad.onnx` (an LSTM stepping over 32 ms windows), exported so that one call
takes a whole block of windows and hands the LSTM state back: its probabilities are identical to the streaming
model's, but long audio costs one call per 16 s block instead of one per 32 ms window. The TorchScript file in
the wheel is never loaded (project rule: weights are never unpickled), and nothing is downloaded at run time.

All offsets are sample indices at 16 kHz (`speechllm.audio.SAMPLE_RATE`).

Thread safety: one onnxruntime session is shared by the whole process. `InferenceSession.run` may be called from
several threads at once, and `SileroVAD` keeps no state between calls (each call starts from a zero LSTM state),
so one `SileroVAD` can serve every request thread. A `StreamingVAD` carries its stream's state: use one per
stream, from one thread at a time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime

from speechllm.audio import SAMPLE_RATE

MODEL_FILE = "silero_vad_16k_sequence.onnx"
WINDOW = 512  # samples per model step at 16 kHz (32 ms): one probability each
CONTEXT = 64  # trailing samples of the previous window that the model sees in front of each window
STATE_SHAPE = (1, 1, 128)  # LSTM hidden and cell state
BLOCK_WINDOWS = 512  # windows per onnxruntime call (16 s): bounds the memory of one call on hour-long uploads
FIRST_BLOCK_WINDOWS = 16  # has_speech's first look (0.5 s); each look after it is twice as long
NEG_THRESHOLD_GAP = 0.15  # hysteresis: once in speech, a window is silence only below threshold - 0.15 (as Silero)


@dataclass(frozen=True)
class Span:
    """A half-open range [start, end) of sample offsets at 16 kHz."""

    start: int
    end: int

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def model_path() -> Path:
    """The ONNX file inside the installed silero-vad package.

    `importlib.resources.files("silero_vad.data")` would import the package, and its `__init__` imports torch and
    calls `torch.set_num_threads(1)` process-wide, which would throttle the ASR engine. `find_spec` locates the
    installed package without running any of its code.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed (pip install --no-deps silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but ships no {MODEL_FILE} (found none at {path})")
    return path


@lru_cache(maxsize=1)
def _session() -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    # One thread: the VAD is tiny and must not compete with the ASR engine for cores.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the export carries unused initialisers; ORT warns about them on every load
    return onnxruntime.InferenceSession(str(model_path()), sess_options=options, providers=["CPUExecutionProvider"])


class _ModelState:
    """What the model carries from one window to the next: the LSTM state and the previous window's tail."""

    def __init__(self) -> None:
        self.hidden = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.cell = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)

    def step(self, samples: np.ndarray) -> np.ndarray:
        """Run whole windows (len(samples) a multiple of WINDOW) → one speech probability per window."""
        padded = np.concatenate([self.context, samples])
        # Window i is fed with the CONTEXT samples before it: overlapping rows of CONTEXT + WINDOW samples.
        rows = np.lib.stride_tricks.sliding_window_view(padded, CONTEXT + WINDOW)[::WINDOW]
        probs, self.hidden, self.cell = _session().run(
            None, {"input": np.ascontiguousarray(rows), "h": self.hidden, "c": self.cell})
        self.context = samples[-CONTEXT:].copy()
        return probs


class _Stream:
    """The model over audio fed in chunks of any size: each chunk runs the whole windows it completes."""

    def __init__(self) -> None:
        self.state = _ModelState()
        self.pending = np.zeros(0, dtype=np.float32)  # samples not yet making up a whole window

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """→ one probability per window completed (none, while a window waits for its samples)."""
        self.pending = np.concatenate([self.pending, _as_mono(samples)])
        whole = self.pending.size - self.pending.size % WINDOW
        if whole == 0:
            return np.zeros(0, dtype=np.float32)
        probs = self.state.step(self.pending[:whole])
        self.pending = self.pending[whole:]
        return probs


def _probability_blocks(samples: np.ndarray, first_windows: int = BLOCK_WINDOWS) -> Iterator[tuple[int, np.ndarray]]:
    """Mono samples' speech probabilities block by block, from the start: (samples covered so far, the block's
    probabilities). Blocks double from `first_windows` windows up to BLOCK_WINDOWS; the last window is
    zero-padded. One LSTM state runs through them all, so the blocks' sizes change no probability."""
    padded = np.zeros(-(-samples.size // WINDOW) * WINDOW, dtype=np.float32)
    padded[:samples.size] = samples
    state, start, windows = _ModelState(), 0, first_windows
    while start < padded.size:
        end = min(start + windows * WINDOW, padded.size)
        yield min(end, samples.size), state.step(padded[start:end])
        start, windows = end, min(2 * windows, BLOCK_WINDOWS)


def _as_mono(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if not np.issubdtype(samples.dtype, np.floating):  # int16 PCM would pass as ±32768 and read as loud noise
        raise TypeError(f"expected float samples in [-1, 1], got {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if samples.ndim != 1:
        raise ValueError(f"expected 1-D mono samples at 16 kHz, got shape {samples.shape}")
    return samples


class SileroVAD:
    """Offline VAD over a whole recording. Cheap to create; create once and reuse (it is stateless between calls).

    threshold: a window is speech when its probability is at least this.
    min_silence_ms: a pause must last this long to end a span (shorter pauses stay inside it).
    speech_pad_ms: spans are widened by this much on each side (onsets and tails are quiet).
    min_speech_ms: spans shorter than this (clicks, breaths) are dropped.
    """

    def __init__(self, threshold: float = 0.5, min_silence_ms: int = 300, speech_pad_ms: int = 100,
                 min_speech_ms: int = 150) -> None:
        self.threshold = threshold
        self.min_silence = min_silence_ms * SAMPLE_RATE // 1000
        self.speech_pad = speech_pad_ms * SAMPLE_RATE // 1000
        self.min_speech = min_speech_ms * SAMPLE_RATE // 1000
        _session()  # load the model now, not on the first request

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        """One speech probability per 512-sample (32 ms) window; the last window is zero-padded."""
        blocks = [probs for _, probs in _probability_blocks(_as_mono(samples))]
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)

    def has_speech(self, samples: np.ndarray) -> bool:
        """`bool(self.speech_spans(samples))`, looking no further than the first speech span: in growing blocks
        from the start, it stops at the first block that completes one. Exact, not an estimate: a span found in
        the beginning of the audio is a span of the whole (one that has ended ends there too, and one still
        running only grows), and a window's probability does not depend on the windows after it."""
        samples = _as_mono(samples)
        probs = []
        for covered, block in _probability_blocks(samples, FIRST_BLOCK_WINDOWS):
            probs.append(block)
            if self.spans_from_probabilities(np.concatenate(probs), covered):
                return True
        return False

    def speech_spans(self, samples: np.ndarray) -> list[Span]:
        samples = _as_mono(samples)
        return self.spans_from_probabilities(self.speech_probabilities(samples), samples.size)

    def spans_from_probabilities(self, probs: np.ndarray, num_samples: int) -> list[Span]:
        """Turn window probabilities into padded speech spans (the state machine of Silero's get_speech_timestamps)."""
        neg_threshold = max(self.threshold - NEG_THRESHOLD_GAP, 0.01)
        raw: list[Span] = []
        start: int | None = None  # start of the span in progress
        silence_from: int | None = None  # where the pause inside the span in progress began
        for i, prob in enumerate(probs):
            offset = i * WINDOW
            if prob >= self.threshold:
                silence_from = None
                if start is None:
                    start = offset
            elif start is not None and prob < neg_threshold:
                if silence_from is None:
                    silence_from = offset
                if offset + WINDOW - silence_from >= self.min_silence:
                    raw.append(Span(start, silence_from))
                    start = silence_from = None
        if start is not None:  # speech ran to the end, or into a pause too short to close it yet: end there
            raw.append(Span(start, silence_from if silence_from is not None else num_samples))
        raw = [span for span in raw if span.end - span.start >= self.min_speech]
        return self._pad(raw, num_samples)

    def _pad(self, spans: list[Span], num_samples: int) -> list[Span]:
        """Widen each span by speech_pad; where two pads would overlap, the pause is split at its middle."""
        padded = []
        for i, span in enumerate(spans):
            start, end = span.start - self.speech_pad, span.end + self.speech_pad
            if i > 0:
                start = max(start, (spans[i - 1].end + span.start) // 2)
            if i + 1 < len(spans):
                end = min(end, (span.end + spans[i + 1].start) // 2)
            padded.append(Span(max(0, start), min(num_samples, end)))
        return padded


def split_long_audio(samples: np.ndarray, vad: SileroVAD, max_window_s: float = 30.0,
                     min_window_s: float = 1.0) -> list[Span]:
    """Cut a long recording into windows of at most max_window_s that hold all of its speech, cut at pauses.

    Windows are in order, do not overlap, start and end on speech (leading, trailing and between-window silence is
    left out) and merge neighbouring speech spans while they fit. Where a window must end, it ends at the longest
    pause before the limit, looking first among pauses that leave the window at least half the limit long (so a
    long recording does not become many small windows), then among those leaving it at least min_window_s, then
    anywhere. Only a single stretch of speech longer than the limit is cut inside speech, at its least speech-like
    point in the second half of the window that leaves at least min_window_s of it for the next one; where the
    probabilities are flat that is the limit itself, or as near it as that allows.
    """
    samples = _as_mono(samples)
    max_len, min_len = _window_lengths(max_window_s, min_window_s)
    windows, _ = _cut(vad, vad.speech_probabilities(samples), samples.size, max_len, min_len, complete=True)
    return windows


def _window_lengths(max_window_s: float, min_window_s: float) -> tuple[int, int]:
    max_len, min_len = round(max_window_s * SAMPLE_RATE), round(min_window_s * SAMPLE_RATE)
    if not 0 < min_len < max_len:
        raise ValueError(f"need 0 < min_window_s < max_window_s, got {min_window_s} and {max_window_s}")
    return max_len, min_len


def _cut(vad: SileroVAD, probs: np.ndarray, num_samples: int, max_len: int, min_len: int, complete: bool
         ) -> tuple[list[Span], int | None]:
    """split_long_audio's windows, from the audio's probabilities. `complete=False`: the audio is still coming in,
    so only the windows that no later audio can change are returned, with the start of the rest (None: no speech
    yet). The speech span that ends the audio so far (the last) may still grow, and nothing else can change: spans
    that a long enough pause ended are final, and the probabilities of the audio so far are too."""
    spans = vad.spans_from_probabilities(probs, num_samples)
    if not spans:
        return [], None
    windows: list[Span] = []
    first = 0  # the first speech span of the window being built; it may already be cut at its front
    start = spans[0].start
    while True:
        limit = start + max_len
        if spans[-1].end <= limit:  # everything left fits (so far)
            if complete:
                windows.append(Span(start, spans[-1].end))
            return windows, start
        ends = [j for j in range(first, len(spans) - 1) if spans[j].end <= limit]  # pauses inside the budget
        if ends:  # (the last span already runs past the limit, and can only grow: the choice is final)
            last = _longest_pause(spans, ends, start, (max_len // 2, min_len, 0))
            windows.append(Span(start, spans[last].end))
            first = last + 1
            start = spans[first].start
        else:  # the span at the front is longer than the budget left: cut inside it, and leave at least
            # min_window_s of it for the next window where the limit allows (a span just over the limit left a sliver
            # of 20 ms, too short for the encoder's convolutions)
            if not complete and first == len(spans) - 1 and spans[first].end - min_len < limit:
                return windows, start  # where to cut depends on how long the span runs
            earliest = start + max(min_len, max_len // 2)
            latest = min(limit, spans[first].end - min_len)
            if latest >= earliest:
                cut = _quietest_point(probs, earliest, latest)
            else:  # a limit under twice min_window_s: share the span out evenly instead
                cut = min(limit, (start + spans[first].end) // 2)
            windows.append(Span(start, cut))
            start = cut


class GrowingSplit:
    """split_long_audio for audio that is still coming in (a realtime turn): fed as it arrives, it tells which
    windows are settled, those that the rule gives whatever audio follows, and where the rest begins. Its windows
    are the ones split_long_audio gives for the whole audio, as far as they are settled: the probabilities are the
    same (one LSTM state from the audio's first sample, whole 32 ms windows only). Offsets count from the first
    sample fed."""

    def __init__(self, vad: SileroVAD, max_window_s: float, min_window_s: float = 1.0) -> None:
        if 2 * vad.speech_pad > vad.min_silence:  # then a span heard later could move the padded end of the one
            raise ValueError("a growing split needs speech_pad_ms of at most half min_silence_ms")  # before it
        self.vad = vad
        self.max_len, self.min_len = _window_lengths(max_window_s, min_window_s)
        self._stream = _Stream()
        self._probs: list[np.ndarray] = []
        self.samples = 0  # samples with a probability: whole windows

    def feed(self, samples: np.ndarray) -> None:
        probs = self._stream.feed(samples)
        self._probs.append(probs)
        self.samples += len(probs) * WINDOW

    def feed_and_settle(self, samples: np.ndarray, not_before: int) -> tuple[list[Span], int | None]:
        """`feed`, then `settled()`; or ([], None) while no more than `not_before` samples are in (no window can
        be settled that soon: the caller knows), which spares recomputing the windows at every feed."""
        self.feed(samples)
        return self.settled() if self.samples > not_before else ([], None)

    def settled(self) -> tuple[list[Span], int | None]:
        """(the settled windows, where the rest begins: None while no speech has been heard)."""
        probs = np.concatenate(self._probs) if self._probs else np.zeros(0, dtype=np.float32)
        return _cut(self.vad, probs, self.samples, self.max_len, self.min_len, complete=False)


def _longest_pause(spans: list[Span], ends: list[int], start: int, min_lengths: tuple[int, ...]) -> int:
    """Among the spans a window may end with, the one followed by the longest pause (the later one on ties)."""
    for min_length in min_lengths:
        allowed = [j for j in ends if spans[j].end - start >= min_length]
        if allowed:
            return max(allowed, key=lambda j: (spans[j + 1].start - spans[j].end, j))
    raise AssertionError("the last tier (0) admits every end")


def _quietest_point(probs: np.ndarray, lo: int, hi: int) -> int:
    """The sample in [lo, hi] at the centre of the window least likely to be speech.

    The probabilities are averaged over 3 windows (~100 ms) first, so the cut goes to a gap between words rather
    than to a single-window dip such as a stop consonant. Ties go to the latest window, so flat probabilities
    (no dip anywhere) give a hard cut at the limit.
    """
    smooth = np.convolve(probs, np.ones(3) / 3, mode="same")
    first = max(0, -(-(lo - WINDOW // 2) // WINDOW))  # windows whose centre lies in [lo, hi]
    last = min(len(probs) - 1, (hi - WINDOW // 2) // WINDOW)
    if last < first:
        return hi
    candidates = smooth[first:last + 1]
    best = last - int(np.argmin(candidates[::-1]))
    return best * WINDOW + WINDOW // 2


class StreamingVAD:
    """Speech start/stop events over a live stream fed in chunks of any size (the WebSocket server's turn detection).

    speech_started is reported at the window where speech is detected, with an offset moved back by
    prefix_padding_ms (so the audio kept from there includes the quiet onset) but never before the previous stop.
    speech_stopped is reported once silence has lasted silence_duration_ms, with the offset where that silence
    began. Offsets count samples since the stream's first sample.
    """

    def __init__(self, vad_threshold: float = 0.5, silence_duration_ms: int = 500,
                 prefix_padding_ms: int = 300) -> None:
        self.threshold = vad_threshold
        self.neg_threshold = max(vad_threshold - NEG_THRESHOLD_GAP, 0.01)
        self.silence_duration = silence_duration_ms * SAMPLE_RATE // 1000
        self.prefix_padding = prefix_padding_ms * SAMPLE_RATE // 1000
        _session()
        self.reset()

    def reset(self) -> None:
        """Start a new stream: offsets restart at 0."""
        self._stream = _Stream()
        self._offset = 0  # stream offset of the first pending sample
        self._in_speech = False
        self._silence_from: int | None = None
        self._last_stop = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def silence_from(self) -> int | None:
        """Where the pause in progress began, while in speech; None when speech goes on (or none is open)."""
        return self._silence_from if self._in_speech else None

    def feed(self, samples: np.ndarray) -> list[tuple[str, int]]:
        """Add a chunk; returns the events it completed, in order, as (name, sample offset)."""
        probs = self._stream.feed(samples)
        events: list[tuple[str, int]] = []
        for i, prob in enumerate(probs):
            offset = self._offset + i * WINDOW
            if prob >= self.threshold:
                self._silence_from = None
                if not self._in_speech:
                    self._in_speech = True
                    events.append(("speech_started", max(self._last_stop, offset - self.prefix_padding)))
            elif self._in_speech and prob < self.neg_threshold:
                if self._silence_from is None:
                    self._silence_from = offset
                if offset + WINDOW - self._silence_from >= self.silence_duration:
                    events.append(("speech_stopped", self._silence_from))
                    self._in_speech = False
                    self._last_stop = self._silence_from
                    self._silence_from = None
        self._offset += len(probs) * WINDOW
        return events
