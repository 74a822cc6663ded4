"""server.vad: the real Silero ONNX model on real (synthesised) speech.

Speech comes from espeak-ng, decoded with speechllm.audio.load_audio. Each phrase is trimmed to its audible
extent, so where speech lies in an assembled recording is known exactly and the silences between phrases are
digital zeros of a chosen length.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest

from server.audio_workers import Window, speech_windows
from server.vad import WINDOW, GrowingSplit, SileroVAD, Span, StreamingVAD, _ModelState, split_long_audio
from speechllm.audio import SAMPLE_RATE, load_audio

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng to synthesise speech")

SR = SAMPLE_RATE
TOLERANCE = round(0.2 * SR)

# Twelve ~5 s sentences without commas: espeak pauses at a comma, and these must each be one unbroken utterance.
PHRASES = (
    "Remember to water the garden before the sun goes down because the roses are very thirsty this week",
    "Our meeting with the marketing team has been moved to Thursday morning at half past nine in the big room",
    "Many travelers prefer the window seat on long international flights so they can watch the clouds go by",
    "Nobody expected the little river town to become so famous overnight after the film was released last spring",
    "Measure the flour carefully and mix it slowly with the warm milk and the melted butter and two fresh eggs",
    "Lines of children waited in the rain outside the new library building holding their books and umbrellas",
    "When the music started everyone in the hall began to dance and sing until the lights went out at midnight",
    "Yesterday we walked along the old railway line all the way to the lake and back again before dinner",
    "Manual reviews are slow and expensive but they often catch the small mistakes that automatic checks miss",
    "Later in the year the city museum will open a wonderful exhibition about old maps and the sailors who drew them",
    "Nine of the ten volunteers arrived early on Saturday and helped us arrange the tables and chairs in the garden",
    "Every morning the baker lights the oven long before the streets wake up and the first customers knock",
)


@cache
def say(text: str) -> np.ndarray:
    """espeak-ng's rendering of text at 16 kHz, trimmed to where it is audible."""
    wav = subprocess.run(["espeak-ng", "--stdout", "--", text], capture_output=True, check=True).stdout
    samples = load_audio(wav)
    audible = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[audible[0]:audible[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), dtype=np.float32)


def assemble(parts: list[np.ndarray | float]) -> tuple[np.ndarray, list[Span]]:
    """Concatenate speech arrays and silences (given in seconds) → the audio and where each speech part lies."""
    pieces, speech, offset = [], [], 0
    for part in parts:
        piece = silence(part) if isinstance(part, float) else part
        if not isinstance(part, float):
            speech.append(Span(offset, offset + piece.size))
        pieces.append(piece)
        offset += piece.size
    return np.concatenate(pieces), speech


def assert_valid_windows(windows: list[Span], max_window_s: float, num_samples: int) -> None:
    assert windows, "speech was present, so there must be windows"
    for window in windows:
        assert 0 <= window.start < window.end <= num_samples
        assert window.duration_s <= max_window_s
    for before, after in zip(windows, windows[1:], strict=False):
        assert before.end <= after.start, "windows must be in order and must not overlap"


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2)))


def inside_one(speech: Span, windows: list[Span]) -> bool:
    return any(w.start <= speech.start and speech.end <= w.end for w in windows)


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD()


# ---------------------------------------------------------------------------------------------------------------
# Offline spans
# ---------------------------------------------------------------------------------------------------------------


def test_probabilities_one_per_window_and_no_state_leaks_between_calls(vad):
    audio, _ = assemble([0.5, say(PHRASES[0]), 0.5])
    probs = vad.speech_probabilities(audio)
    assert probs.shape == (-(-audio.size // WINDOW),)
    assert probs.dtype == np.float32 and 0.0 <= probs.min() and probs.max() <= 1.0
    vad.speech_probabilities(say(PHRASES[1]))  # a different recording in between must not change the next result
    np.testing.assert_array_equal(vad.speech_probabilities(audio), probs)
    assert vad.speech_probabilities(np.zeros(0, dtype=np.float32)).shape == (0,)
    assert vad.speech_spans(np.zeros(0, dtype=np.float32)) == []


def test_one_vad_serves_several_threads_at_once(vad):
    recordings = [assemble([0.3, say(phrase), 0.3])[0] for phrase in PHRASES[:4]]
    expected = [vad.speech_probabilities(audio) for audio in recordings]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(vad.speech_probabilities, recordings * 2))
    for got, want in zip(results, expected * 2, strict=True):
        np.testing.assert_array_equal(got, want)


def test_rejects_integer_pcm_and_multichannel_input(vad):
    with pytest.raises(TypeError):
        vad.speech_spans(np.zeros(SR, dtype=np.int16))
    with pytest.raises(ValueError):
        vad.speech_spans(np.zeros((2, SR), dtype=np.float32))


def test_silence_has_no_speech(vad):
    assert vad.speech_spans(silence(3.0)) == []
    assert split_long_audio(silence(3.0), vad) == []


def test_low_white_noise_is_not_speech(vad):
    noise = np.random.default_rng(0).normal(0.0, 0.01, 5 * SR).astype(np.float32)
    assert vad.speech_spans(noise) == []
    assert split_long_audio(noise, vad) == []


def test_has_speech_stops_early_and_answers_what_the_spans_answer(vad):
    phrase = say(PHRASES[3])
    noise = np.random.default_rng(1).normal(0.0, 0.01, 3 * SR).astype(np.float32)
    click = assemble([2.0, phrase[: round(0.05 * SR)], 0.5])[0]  # 50 ms of speech: shorter than min_speech
    recordings = [phrase, assemble([0.2, phrase, 1.0])[0], assemble([9.0, phrase])[0], assemble([3.0, phrase[:SR]])[0],
                  silence(3.0), noise, click, np.zeros(0, dtype=np.float32), phrase[: WINDOW + 7]]
    for audio in recordings:
        assert vad.has_speech(audio) == bool(vad.speech_spans(audio))
    assert vad.has_speech(phrase) and not vad.has_speech(silence(3.0)) and not vad.has_speech(click)
    looked_at = []
    step = _ModelState.step

    def counted_step(state: _ModelState, samples: np.ndarray) -> np.ndarray:
        looked_at.append(samples.size)
        return step(state, samples)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_ModelState, "step", counted_step)
        assert vad.has_speech(assemble([0.1, phrase, 20.0])[0])
    assert sum(looked_at) < 2 * SR  # 25 s of audio, speech from 0.1 s: it stopped within the first 2 s


def test_a_short_recording_is_heard_whole_and_timed_by_its_speech_when_asked(vad):
    """Up to 30 s: one window, which the model hears whole; timed, its segment runs from the first start of speech
    to the last end (it ran from 0 to the end of the file: a subtitle of 20 s for 1.7 s of speech)."""
    audio, [first, second] = assemble([6.0, say(PHRASES[0]), 1.0, say(PHRASES[1][:40]), 8.0])
    [timed] = speech_windows(audio, vad, 30.0, timed=True)
    assert timed.heard == Span(0, audio.size)
    assert abs(timed.speech.start - first.start) <= TOLERANCE and abs(timed.speech.end - second.end) <= TOLERANCE
    assert speech_windows(audio, vad, 30.0) == [Window(Span(0, audio.size), Span(0, audio.size))]
    assert speech_windows(silence(5.0), vad, 30.0, timed=True) == speech_windows(silence(5.0), vad, 30.0) == []


def test_one_phrase_between_silences_is_one_span(vad):
    audio, [speech] = assemble([1.0, say(PHRASES[0]), 1.0])
    [span] = vad.speech_spans(audio)
    assert abs(span.start - speech.start) <= TOLERANCE
    assert abs(span.end - speech.end) <= TOLERANCE
    assert span.start <= speech.start and speech.end <= span.end, "the padded span holds all of the speech"


def test_two_phrases_two_seconds_apart_are_two_spans(vad):
    audio, speech = assemble([1.0, say(PHRASES[1]), 2.0, say(PHRASES[2]), 1.0])
    spans = vad.speech_spans(audio)
    assert len(spans) == 2
    for span, truth in zip(spans, speech, strict=True):
        assert abs(span.start - truth.start) <= TOLERANCE and abs(span.end - truth.end) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Splitting long uploads
# ---------------------------------------------------------------------------------------------------------------


def test_short_recording_with_speech_is_one_trimmed_window(vad):
    audio, speech = assemble([2.0, say(PHRASES[3]), 1.0, say(PHRASES[4]), 3.0])
    [window] = split_long_audio(audio, vad)
    assert window.start <= speech[0].start and speech[-1].end <= window.end
    assert window.start > speech[0].start - TOLERANCE and window.end < speech[-1].end + TOLERANCE, "silence trimmed"


def test_75_seconds_of_phrases_split_at_pauses(vad):
    pauses = np.random.default_rng(1).uniform(0.6, 1.5, len(PHRASES) - 1)
    parts: list[np.ndarray | float] = [0.5]
    for phrase, pause in zip(PHRASES, [*pauses, 0.5], strict=True):
        parts += [say(phrase), float(pause)]
    audio, speech = assemble(parts)
    assert 70 <= audio.size / SR <= 80

    windows = split_long_audio(audio, vad)
    assert_valid_windows(windows, 30.0, audio.size)
    # ~77 s needs at least 3 windows; phrases are merged while they fit, so far fewer windows than phrases.
    assert 3 <= len(windows) <= 4
    for phrase in speech:
        assert inside_one(phrase, windows), f"phrase at {phrase.start / SR:.2f}-{phrase.end / SR:.2f} s was cut"


def test_continuous_speech_longer_than_the_limit_is_still_split(vad):
    audio, [speech] = assemble([0.5, np.concatenate([say(p) for p in PHRASES[:8]]), 0.5])
    assert speech.end - speech.start > 40 * SR

    windows = split_long_audio(audio, vad)
    assert_valid_windows(windows, 30.0, audio.size)
    assert len(windows) == 2
    # No pause long enough to end a span: the windows follow each other without a gap and hold all the speech.
    assert windows[0].start <= speech.start and speech.end <= windows[-1].end
    assert all(a.end == b.start for a, b in zip(windows, windows[1:], strict=False))
    # The cut is at a quiet point (a gap between words), not in the middle of a loud syllable.
    cut = windows[0].end
    assert rms(audio[cut - 400:cut + 400]) < 0.5 * rms(audio[speech.start:speech.end])


class ScriptedVAD(SileroVAD):
    """A SileroVAD whose window probabilities are given, to drive split_long_audio's choices exactly."""

    def __init__(self, probs: np.ndarray) -> None:
        super().__init__()
        self.probs = probs.astype(np.float32)

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        return self.probs


def scripted(segments: list[tuple[float, float]]) -> tuple[np.ndarray, ScriptedVAD]:
    """(seconds, probability) segments → silent audio of that length and a VAD that reports those probabilities."""
    probs = np.concatenate([np.full(round(seconds * SR / WINDOW), prob) for seconds, prob in segments])
    return np.zeros(probs.size * WINDOW, dtype=np.float32), ScriptedVAD(probs)


def test_window_ends_at_the_longest_pause_that_fits():
    # Speech 8 s | 0.5 s | 8 s | 2 s | 8 s | 0.5 s | 8 s: the 2 s pause wins over the later, shorter one.
    audio, vad = scripted([(8, 1.0), (0.5, 0.0), (8, 1.0), (2, 0.0), (8, 1.0), (0.5, 0.0), (8, 1.0)])
    windows = split_long_audio(audio, vad)
    assert_valid_windows(windows, 30.0, audio.size)
    assert len(windows) == 2
    assert abs(windows[0].end / SR - 16.6) < 0.1 and abs(windows[1].start / SR - 18.4) < 0.1


def test_speech_without_any_dip_is_hard_cut_at_the_limit():
    audio, vad = scripted([(1, 0.0), (70, 0.9), (1, 0.0)])
    windows = split_long_audio(audio, vad, max_window_s=30.0)
    assert_valid_windows(windows, 30.0, audio.size)
    assert [round(w.duration_s) for w in windows] == [30, 30, 10]


def test_speech_just_over_the_limit_leaves_no_sliver():
    """A stretch of speech 20 ms longer than the limit was cut at the limit, leaving a 20 ms window that the
    encoder's convolutions cannot take (a 500 in the server; found with 3 s windows on the test split)."""
    audio, vad = scripted([(1, 0.0), (3.1, 0.9), (1, 0.0)])
    windows = split_long_audio(audio, vad, max_window_s=3.0)
    assert_valid_windows(windows, 3.0, audio.size)
    assert len(windows) == 2 and min(w.duration_s for w in windows) >= 1.0
    # a limit under twice min_window_s cannot leave min_window_s on both sides: the span is halved instead
    audio, vad = scripted([(1, 0.0), (1.5, 0.9), (1, 0.0)])  # 1.7 s with its padding
    windows = split_long_audio(audio, vad, max_window_s=1.5)
    assert_valid_windows(windows, 1.5, audio.size)
    assert len(windows) == 2 and min(w.duration_s for w in windows) >= 0.8


@pytest.mark.parametrize(("max_window_s", "pauses_s"), [(3.0, (0.05, 0.6)), (3.0, (0.3, 0.9)), (8.0, (0.1, 1.2))])
def test_a_growing_split_settles_on_the_windows_of_the_whole_audio(vad, max_window_s, pauses_s):
    """Fed 100 ms at a time, the windows it calls settled are always the first windows split_long_audio gives for
    the whole recording, and they keep coming as the audio does. Speech: the test phrases cut into pieces of 0.4-4 s
    (some longer than the limit, cut inside speech), with pauses short and long enough to end a span or not."""
    rng = np.random.default_rng(7)
    parts: list[np.ndarray | float] = [0.3]
    for phrase in PHRASES[:6]:
        speech = say(phrase)
        cuts = np.sort(rng.choice(np.arange(SR // 2, speech.size - SR // 2), 2, replace=False))
        for piece in np.split(speech, cuts):
            parts += [piece, float(rng.uniform(*pauses_s))]
    audio, _ = assemble(parts)
    whole = split_long_audio(audio, vad, max_window_s)
    split, chunk, seen = GrowingSplit(vad, max_window_s), SR // 10, []
    for start in range(0, audio.size, chunk):
        split.feed(audio[start:start + chunk])
        settled, rest = split.settled()
        assert settled == whole[:len(settled)], f"after {split.samples / SR:.1f} s"
        assert len(settled) >= len(seen)
        assert rest is None or not settled or rest >= settled[-1].end
        seen = settled
    assert len(whole) >= 6 and len(seen) >= len(whole) - 2  # all but the windows at the very end settled


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


def stream(audio: np.ndarray, chunk: int, **options) -> list[tuple[str, int, int]]:
    """Feed audio in chunks → (event, offset, samples fed when it was reported)."""
    vad, events = StreamingVAD(**options), []
    for start in range(0, audio.size, chunk):
        fed = min(audio.size, start + chunk)
        events += [(name, offset, fed) for name, offset in vad.feed(audio[start:fed])]
    return events


def test_streaming_reports_start_and_stop_around_a_phrase():
    audio, [speech] = assemble([1.0, say(PHRASES[5]), 1.5])
    events = stream(audio, chunk=320, silence_duration_ms=500, prefix_padding_ms=300)  # 20 ms chunks
    assert [name for name, _, _ in events] == ["speech_started", "speech_stopped"]
    (_, started, _), (_, stopped, reported_at) = events
    assert abs(started - (speech.start - round(0.3 * SR))) <= TOLERANCE, "onset moved back by the prefix padding"
    assert abs(stopped - speech.end) <= TOLERANCE
    assert 0.5 * SR <= reported_at - stopped <= 0.5 * SR + 2 * WINDOW, "stop reported once 500 ms of silence passed"
    # Chunking does not matter: the same stream in one piece or in odd-sized chunks gives the same events.
    assert [e[:2] for e in stream(audio, chunk=audio.size)] == [e[:2] for e in events]
    assert [e[:2] for e in stream(audio, chunk=1234)] == [e[:2] for e in events]


def test_streaming_waits_for_the_configured_silence():
    audio, _ = assemble([1.0, say(PHRASES[6]), 1.5])
    assert [name for name, _, _ in stream(audio, 320, silence_duration_ms=2000)] == ["speech_started"]


def test_streaming_ignores_silence_and_low_noise():
    noise = np.random.default_rng(2).normal(0.0, 0.01, 3 * SR).astype(np.float32)
    assert stream(np.concatenate([silence(1.0), noise]), chunk=320) == []
