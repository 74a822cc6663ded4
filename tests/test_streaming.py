"""The pieces of realtime transcription that need no server: PCM decoding and resampling, log-mel frames and the
chunked encoder over a growing signal (speechllm/streaming.py), the agreement rule for partial text and the
session's audio buffer (server/realtime.py), and the engine rows realtime adds (precomputed states, forced
prefix). The WebSocket protocol itself is tested against a real server in tests/test_realtime.py."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from server.engine import EmbeddedEngine, EngineInput
from server.metrics import Metrics
from server.realtime import AudioBuffer, agreed_prefix, continue_text, extends, settled_text
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.encoder import EncoderConfig, SpeechEncoder
from speechllm.features import log_mel_spectrogram
from speechllm.streaming import IncrementalEncoder, PcmDecoder, StreamingFeatures
from tests.conftest import pcm16_wav, tiny_speech_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _speech(text: str = "where is the water today", rate: int = SAMPLE_RATE) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", "en+m5", "--stdout", "--", text], capture_output=True, check=True).stdout
    return load_audio(wav, rate)


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _splits(total: int, seed: int) -> list[int]:
    """Random cut points in [0, total], first 0 and last total."""
    rng = np.random.default_rng(seed)
    cuts = sorted(set(rng.integers(1, total, size=25).tolist()))
    return [0, *cuts, total]


# ---- agreement on partial hypotheses -------------------------------------------------------------------------


@pytest.mark.parametrize(("hypotheses", "agreed"), [
    (["the cat sat on", "the cat sat in the"], "the cat sat"),
    (["the cat", "the cat sat"], "the"),  # "cat" may still grow in the first: not finished there
    (["the cat sat", "a cat sat"], ""),
    (["one two three", "one two three", "one two four"], "one two"),
    (["single"], ""),
])
def test_agreed_prefix_keeps_finished_words(hypotheses: list[str], agreed: str) -> None:
    assert agreed_prefix(hypotheses) == agreed


def test_agreed_prefix_of_unspaced_text_holds_back_the_last_character() -> None:
    assert agreed_prefix(["こんにちは", "こんにちわ"], unspaced=True) == "こんにち"
    assert agreed_prefix(["こんに", "こんにちは"], unspaced=True) == "こん"


@pytest.mark.parametrize(("text", "prefix", "unspaced", "expected"), [
    ("the cat sat", "the cat", False, True),
    ("the cats sat", "the cat", False, False),  # not on a word boundary
    ("the cat", "the cat", False, True),
    ("anything", "", False, True),
    ("a dog", "the", False, False),
    ("こんにちは", "こんに", True, True),
])
def test_extends_means_whole_words(text: str, prefix: str, unspaced: bool, expected: bool) -> None:
    assert extends(text, prefix, unspaced) is expected


@pytest.mark.parametrize(("sent", "answer", "unspaced", "transcript"), [
    ("the cat", "the cat sat down", False, "the cat sat down"),  # the answer begins with it: the answer
    ("the cat sat", "a cat sat on the mat", False, "the cat sat on the mat"),  # "the" read as "a"
    ("one two three", "one two four five", False, "one two three five"),  # "three" read as "four"
    ("one two", "one two", False, "one two"),
    ("one two three", "one two", False, "one two three"),  # the answer holds less than was sent
    ("one", "two three four", False, "one three four"),  # of equally close beginnings, the longest
    ("", "two three", False, "two three"),
    ("one two", "", False, "one two"),  # no speech in the answer: the text sent stays
    ("sat on the", "the cat sat on the mat", False, "sat on the mat"),  # an answer with words before the text
    ("こんにち", "こんばんは世界", True, "こんにちは世界"),
])
def test_continue_text_keeps_what_was_sent_and_adds_what_follows_it(sent: str, answer: str, unspaced: bool,
                                                                    transcript: str) -> None:
    continued = continue_text(sent, answer, unspaced)
    assert continued == transcript
    assert extends(continued, sent, unspaced)


@pytest.mark.parametrize(("sent", "answer", "unspaced", "expected"), [
    ("w0 w1 w2 w3", "w0 w1 w2", False, ("w0 w1 w2", "w3")),  # "w3" was heard past the window's cut
    ("w0 w1 w2 w3", "w0 w1 x", False, ("w0 w1 w2", "w3")),
    ("w0 w1", "w0 w1 w2", False, ("w0 w1 w2", "")),  # all within: continue_text
    ("w0 x w2", "w0 w1 w2 w3", False, ("w0 x w2 w3", "")),
    ("w0 w1 w2", "w0 w1 w2", False, ("w0 w1 w2", "")),
    ("", "w0", False, ("w0", "")),
    ("こんにちは世界", "こんにちは", True, ("こんにちは", "世界")),
])
def test_settled_text_leaves_text_sent_past_the_cut_to_the_next_window(sent: str, answer: str, unspaced: bool,
                                                                       expected: tuple[str, str]) -> None:
    text, past = settled_text(sent, answer, unspaced)
    assert (text, past) == expected
    assert sent.startswith(text) or extends(text, sent, unspaced)
    assert not past or (text + ("" if unspaced else " ") + past) == sent


# ---- the session's audio buffer -------------------------------------------------------------------------------


def test_audio_buffer_slices_across_chunks_and_trims() -> None:
    signal = np.arange(1000, dtype=np.float32)
    buffer = AudioBuffer()
    for start, end in zip(_splits(1000, 0), _splits(1000, 0)[1:], strict=False):
        buffer.append(signal[start:end])
    assert buffer.end == 1000 and buffer.size == 1000
    np.testing.assert_array_equal(buffer.slice(123, 877), signal[123:877])
    buffer.trim(500)  # whole chunks before offset 500 go; the one holding it stays
    assert 0 < buffer.start <= 500
    np.testing.assert_array_equal(buffer.slice(500, 1000), signal[500:])
    buffer.trim(1000)
    assert buffer.size == 0 and buffer.slice(0, 1000).size == 0


# ---- PCM in ---------------------------------------------------------------------------------------------------


def test_pcm_at_16khz_decodes_as_ffmpeg_does() -> None:
    pcm = _pcm16(_speech())
    decoder = PcmDecoder(16_000)
    cuts = _splits(len(pcm), 1)  # odd byte counts too: a sample split across messages
    streamed = np.concatenate([decoder.feed(pcm[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)])
    np.testing.assert_array_equal(streamed, load_audio(pcm16_wav(pcm, SAMPLE_RATE)))  # the REST endpoint's samples


def test_pcm_at_24khz_fed_then_flushed_equals_a_file_of_it_each_time() -> None:
    """A realtime client's commit flushes the decoder: each turn's samples are those of a WAV of its audio, the
    REST endpoint's, and not shifted by the delay line held from the turn before."""
    pcm = _pcm16(_speech(rate=24_000))
    decoder = PcmDecoder(24_000)
    for _ in range(2):
        cuts = _splits(len(pcm), 2)
        fed = [decoder.feed(pcm[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
        np.testing.assert_array_equal(np.concatenate([*fed, decoder.flush()]), load_audio(pcm16_wav(pcm, 24_000)))
        assert decoder.held == 0


def test_a_sample_split_across_a_flush_stays_whole() -> None:
    decoder = PcmDecoder(16_000)
    assert decoder.feed(b"\x01").size == 0 and decoder.flush().size == 0
    np.testing.assert_array_equal(decoder.feed(b"\x02\x00\x40"), np.array([0x0201, 0x4000]) / 32768)


def test_pcm_at_24khz_resamples_the_same_however_it_is_split() -> None:
    pcm = _pcm16(_speech(rate=24_000))
    whole = PcmDecoder(24_000).feed(pcm)
    decoder = PcmDecoder(24_000)
    cuts = _splits(len(pcm), 2)
    pieces = np.concatenate([decoder.feed(pcm[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)])
    assert abs(whole.size - len(pcm) // 2 * 2 / 3) < 32  # the filter's delay line holds a few samples back
    np.testing.assert_array_equal(pieces, whole)
    with pytest.raises(ValueError):
        PcmDecoder(44_100)


# ---- features and the chunked encoder over a growing signal ---------------------------------------------------


def test_streaming_features_equal_the_whole_signal_frames() -> None:
    samples = _speech()
    features = StreamingFeatures()
    cuts = _splits(samples.size, 3)
    streamed = torch.cat([features.update(samples[:end]) for end in cuts[1:]], dim=1)
    whole = log_mel_spectrogram(samples)
    assert whole.shape[1] - 2 <= streamed.shape[1] <= whole.shape[1]  # the last frames wait for more audio
    torch.testing.assert_close(streamed, whole[:, : streamed.shape[1]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("left_chunks", [-1, 1])
def test_incremental_encoder_equals_the_chunked_forward_and_encodes_less(left_chunks: int) -> None:
    torch.manual_seed(0)
    encoder = SpeechEncoder(EncoderConfig(d_model=64, n_layers=2, n_heads=4, dropout=0.0, chunk_size=4,
                                          left_chunks=left_chunks)).eval()
    features = torch.randn(80, 200)
    incremental, recompute = IncrementalEncoder(encoder, 4), IncrementalEncoder(encoder, 4, incremental=False)
    cuts = [0, 10, 37, 64, 101, 150, 151, 200]
    for start, end in zip(cuts, cuts[1:], strict=False):
        fast = incremental.update(features[:, start:end])
        slow = recompute.update(features[:, start:end])
        usable = end - end % 4
        with torch.no_grad():
            reference, _ = encoder(features[None, :, :usable], torch.tensor([usable]), chunk_size=4)
        torch.testing.assert_close(fast, reference[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(slow, reference[0], rtol=0, atol=1e-5)
    assert incremental.frames_encoded < recompute.frames_encoded / 2


# ---- engine rows from realtime sessions ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_tokenizer) -> EmbeddedEngine:
    return EmbeddedEngine(tiny_speech_llm(tiny_tokenizer), Metrics(), 1 << 30, lid_threshold=0.0)


def test_rows_with_their_own_encoder_states_decode_like_rows_with_features(engine: EmbeddedEngine) -> None:
    generator = torch.Generator().manual_seed(3)
    features = [torch.randn(80, frames, generator=generator) for frames in (48, 64, 40)]
    reference = engine.run([EngineInput(f, language) for f, language in zip(features, ["en", None, "de"],
                                                                            strict=True)])
    with torch.no_grad():
        states, _ = engine.model.encode(features[1][None], torch.tensor([64]), chunk_size=0)
    mixed = engine.run([EngineInput(features[0], "en"), EngineInput(None, None, states=states[0]),
                        EngineInput(features[2], "de")])
    assert [o.text for o in mixed] == [o.text for o in reference]
    assert [o.language for o in mixed] == [o.language for o in reference]
    assert mixed[1].language_probability == pytest.approx(reference[1].language_probability, abs=1e-5)


def test_a_prefix_is_continued_never_changed(engine: EmbeddedEngine) -> None:
    generator = torch.Generator().manual_seed(4)
    features = [torch.randn(80, 56, generator=generator) for _ in range(3)]
    prefixes = ["hello", "guten tag", ""]
    outputs = engine.run([EngineInput(f, "en", prefix=p) for f, p in zip(features, prefixes, strict=True)])
    assert outputs[0].text.startswith("hello") and outputs[1].text.startswith("guten tag")
    assert outputs[2].text == engine.run([EngineInput(features[2], "en")])[0].text
