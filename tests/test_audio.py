"""speechllm.audio: decoding of every container a client may send, typed errors, resampling and WAV writing.

Every test file is generated and encoded here with PyAV, so the tests need no fixtures on disk and check the
decoded samples against a signal whose content is known exactly.
"""

from __future__ import annotations

import io
import tracemalloc
import wave
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest

from speechllm import audio
from speechllm.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    AudioTooLong,
    EmptyAudioError,
    load_audio,
    resample,
    write_wav,
)

TONES_HZ = (440.0, 1000.0)
DURATION_S = 1.5
AMPLITUDE = 0.3  # per tone: the two-tone mix peaks at 0.6, far from clipping in any codec
EDGE = 400  # samples at 16 kHz trimmed from both ends before exact comparisons: resampler filter edges


# ---------------------------------------------------------------------------------------------------------------
# Signal helpers
# ---------------------------------------------------------------------------------------------------------------


def tone(freq_hz: float, sample_rate: int, duration_s: float = DURATION_S) -> np.ndarray:
    t = np.arange(round(duration_s * sample_rate)) / sample_rate
    return AMPLITUDE * np.sin(2 * np.pi * freq_hz * t)


def two_tone(sample_rate: int, duration_s: float = DURATION_S) -> np.ndarray:
    return sum(tone(f, sample_rate, duration_s) for f in TONES_HZ)


def source_channels(sample_rate: int, channels: int, split: bool = True) -> np.ndarray:
    """(channels, samples). Stereo puts one tone in each channel (split), so both tones survive only if the decoder
    really mixes both channels down (taking just the left channel would lose 1 kHz)."""
    if channels == 1 or not split:
        return np.tile(two_tone(sample_rate), (channels, 1))
    return np.stack([tone(TONES_HZ[0], sample_rate), tone(TONES_HZ[1], sample_rate)])


def quantise_s16(samples: np.ndarray) -> np.ndarray:
    """What a pcm_s16le/flac file made from these float32 samples stores, back as float: FFmpeg converts with
    lrintf(x * 32768) (round half to even, as np.round) and reads int16 back as x / 32768."""
    pcm = np.clip(np.round(samples.astype(np.float32) * 32768.0), -32768, 32767)
    return (pcm / 32768.0).astype(np.float32)


def dominant_frequencies(samples: np.ndarray, count: int, sample_rate: int = SAMPLE_RATE) -> list[float]:
    """The `count` strongest spectral peaks, each at least 50 Hz from the others (a Hann window keeps leakage
    from producing a second "peak" on the skirt of the first)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1 / sample_rate)
    peaks: list[float] = []
    for _ in range(count):
        peak = float(freqs[np.argmax(spectrum)])
        peaks.append(peak)
        spectrum[np.abs(freqs - peak) < 50] = 0
    return sorted(peaks)


def band_energy_fraction(samples: np.ndarray, centres_hz: tuple[float, ...], width_hz: float = 20.0) -> float:
    power = np.abs(np.fft.rfft(samples * np.hanning(len(samples)))) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)
    in_band = np.zeros_like(freqs, dtype=bool)
    for centre in centres_hz:
        in_band |= np.abs(freqs - centre) <= width_hz
    return float(power[in_band].sum() / power.sum())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[EDGE: n - EDGE], b[EDGE: n - EDGE]
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def best_lag_correlation(decoded: np.ndarray, reference: np.ndarray, max_lag: int = 200) -> float:
    """Correlation at the best alignment. Lossy files may start with encoder priming that the container does not
    mark for trimming (PyAV's m4a muxing writes an edit list with media_time 0, so AAC's 1024 priming samples
    stay in). The two-tone repeats every 25 ms (400 samples), so ±200 samples covers every alignment."""
    return max(correlation(decoded[lag:], reference) if lag >= 0 else correlation(decoded, reference[-lag:])
               for lag in range(-max_lag, max_lag + 1))


# ---------------------------------------------------------------------------------------------------------------
# Encoding with PyAV
# ---------------------------------------------------------------------------------------------------------------


def has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except Exception:  # UnknownCodecError, or a decoder-only build of the codec
        return False
    return True


def first_encoder(*names: str) -> str | None:
    return next((name for name in names if has_encoder(name)), None)


@dataclass(frozen=True)
class Format:
    id: str
    container: str  # FFmpeg muxer name
    codec: str | None  # None: no encoder in this PyAV build → the case is skipped
    sample_rate: int
    channels: int
    suffix: str
    lossless: bool = False
    options: tuple[tuple[str, str], ...] = ()
    split_channels: bool = True  # stereo: one tone per channel (see source_channels)


MP3 = first_encoder("libmp3lame", "mp3")
OPUS = first_encoder("libopus", "opus")
VORBIS = first_encoder("libvorbis", "vorbis")
AAC = first_encoder("aac", "libfdk_aac")
# FFmpeg's native vorbis encoder is "experimental" and stereo-only; libvorbis needs neither concession.
VORBIS_OPTIONS = (("strict", "experimental"),) if VORBIS == "vorbis" else ()

FORMATS = [
    Format("wav-44k-stereo", "wav", "pcm_s16le", 44_100, 2, "wav", lossless=True),
    Format("wav-22k-mono", "wav", "pcm_s16le", 22_050, 1, "wav", lossless=True),
    Format("flac-48k-stereo", "flac", "flac", 48_000, 2, "flac", lossless=True),
    Format("flac-22k-mono", "flac", "flac", 22_050, 1, "flac", lossless=True),
    Format("mp3-44k-stereo", "mp3", MP3, 44_100, 2, "mp3"),
    Format("mp3-22k-mono", "mp3", MP3, 22_050, 1, "mp3"),
    Format("ogg-opus-48k-stereo", "ogg", OPUS, 48_000, 2, "ogg"),  # Opus only codes 48 kHz (and submultiples)
    # FFmpeg's experimental native vorbis encoder mangles the right channel of decorrelated stereo (a 1 kHz tone
    # comes back at 990 Hz even when decoded without load_audio), so it gets the same mix in both channels.
    Format("ogg-vorbis-44k-stereo", "ogg", VORBIS, 44_100, 2, "ogg", options=VORBIS_OPTIONS,
           split_channels=VORBIS != "vorbis"),
    Format("webm-opus-48k-mono", "webm", OPUS, 48_000, 1, "webm"),
    Format("webm-opus-48k-stereo", "webm", OPUS, 48_000, 2, "webm"),  # what browsers' MediaRecorder sends
    Format("m4a-aac-44k-stereo", "ipod", AAC, 44_100, 2, "m4a"),  # "ipod" is FFmpeg's muxer for .m4a
    Format("m4a-aac-22k-mono", "ipod", AAC, 22_050, 1, "m4a"),
]


def encode_audio(samples: np.ndarray, sample_rate: int, container: str, codec: str,
                 options: tuple[tuple[str, str], ...] = ()) -> bytes:
    """Encode (channels, samples) float audio into an in-memory file. PyAV's codec context re-chunks and converts
    the one big float frame into whatever frame size and sample format the encoder wants."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=sample_rate, options=dict(options))
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32), format="fltp",
                                           layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):  # flush the encoder's lookahead
            output.mux(packet)
    return buffer.getvalue()


@cache
def encoded(fmt: Format) -> bytes:
    """Each format is encoded once per session, however many tests use it."""
    if fmt.codec is None:
        pytest.skip(f"this PyAV build has no encoder for {fmt.id}")
    samples = source_channels(fmt.sample_rate, fmt.channels, fmt.split_channels)
    return encode_audio(samples, fmt.sample_rate, fmt.container, fmt.codec, fmt.options)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A plain 16-bit WAV written by the standard library (independent of PyAV's muxer). samples: (ch, n)."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(samples.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.T.tobytes())  # interleaved
    return buffer.getvalue()


def video_only_file(container: str, codec: str) -> bytes:
    """A tiny, valid video file with no audio stream at all (3 frames of 32x32)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=10)
        stream.width, stream.height = 32, 32
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for index in range(3):
            image = np.full((32, 32, 3), 40 * index, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=stream.pix_fmt)
            frame.pts = index
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Decoding every supported format
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.id)
def test_decodes_format_to_16k_mono_float32(fmt: Format) -> None:
    decoded = load_audio(encoded(fmt))

    assert decoded.dtype == np.float32
    assert decoded.ndim == 1  # stereo is mixed down, not returned as (2, n) or interleaved (2n,)
    # Codec priming/padding (AAC adds a frame of 1024) may change the length a little, never by 0.1 s.
    assert abs(len(decoded) - DURATION_S * SAMPLE_RATE) <= 0.1 * SAMPLE_RATE, len(decoded)
    assert np.all(np.isfinite(decoded))
    # Content: the two tones dominate (both of them: for stereo files each sits in its own channel).
    peaks = dominant_frequencies(decoded, count=2)
    assert peaks == pytest.approx(list(TONES_HZ), abs=3.0), peaks
    assert band_energy_fraction(decoded, TONES_HZ) > 0.95


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.id)
def test_decoded_waveform_matches_reference(fmt: Format) -> None:
    decoded = load_audio(encoded(fmt)).astype(np.float64)
    reference = two_tone(SAMPLE_RATE)  # the ideal result: the same tones sampled directly at 16 kHz
    if fmt.lossless:
        # The waveform, not only its spectrum, must survive. The level of a stereo downmix is checked separately
        # (test_stereo_downmix_level_equals_mono), so correlation is scale-free here.
        assert correlation(decoded, reference) > 0.99999
    else:
        assert best_lag_correlation(decoded, reference) > 0.98


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.lossless and f.channels == 1], ids=lambda f: f.id)
def test_lossless_mono_decodes_to_exact_values(fmt: Format) -> None:
    """wav/flac store the int16 samples exactly; the only change should be the resampling to 16 kHz."""
    decoded = load_audio(encoded(fmt)).astype(np.float64)
    stored = quantise_s16(two_tone(fmt.sample_rate))
    # Same resampler applied directly to the stored samples: must be bit-for-bit what decoding gives.
    np.testing.assert_array_equal(decoded, resample(stored, fmt.sample_rate))
    # Against the analytic tones at 16 kHz: resampling error only (plus int16 quantisation), away from the edges.
    error = np.abs(decoded - two_tone(SAMPLE_RATE))[EDGE:-EDGE]
    assert error.max() < 2e-3, error.max()


LIST = b"LIST" + (16).to_bytes(4, "little") + b"INFOISFT" + (4).to_bytes(4, "little") + b"zasr"  # a chunk of metadata


def ffmpeg_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_audio with FFmpeg for WAV too: the path every other format takes."""
    monkeypatch.setattr(audio, "_pcm16_wav", lambda *_: None)


@pytest.mark.parametrize("reader", ["wave", "ffmpeg"])
def test_a_long_16k_mono_wav_decodes_to_its_samples_exactly(reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read by the standard library, or by FFmpeg in many of its demuxer's packets (WAV_PACKET_BYTES each); no
    resampling: the int16 samples / 32768, all of them, in order."""
    if reader == "ffmpeg":
        ffmpeg_only(monkeypatch)
    samples = tone(440.0, SAMPLE_RATE, duration_s=30.0)[None]
    pcm = np.round(np.clip(samples, -1, 1) * 32767)[0]
    np.testing.assert_array_equal(load_audio(wav_bytes(samples, SAMPLE_RATE)), (pcm / 32768.0).astype(np.float32))


@pytest.mark.parametrize(("channels", "sample_rate"), [(1, 16_000), (1, 22_050), (1, 44_100), (2, 16_000), (3, 16_000)])
def test_a_16_bit_wav_read_without_ffmpeg_gives_ffmpegs_samples(channels: int, sample_rate: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload of 16-bit PCM WAV skips FFmpeg's probing (speechllm.audio._pcm16_wav), and must not change a
    sample: exactly FFmpeg's, from a whole file, a stream's header, a file cut off, or one with a chunk after its
    data. (Several channels at another rate go to FFmpeg, which resamples each before they are averaged.)"""
    rng = np.random.default_rng(channels)
    data = wav_bytes(np.stack([two_tone(sample_rate) * rng.uniform(0.3, 1.0) for _ in range(channels)]), sample_rate)
    streamed = data[:40] + (0x7FFFF000).to_bytes(4, "little") + data[44:]  # espeak-ng's header: a size it never knew
    variants = {"whole": data, "streamed": streamed, "cut off": data[:-1001], "chunk after the data": data + LIST}
    assert all(audio._pcm16_wav(variant, SAMPLE_RATE, None) is not None for variant in variants.values())
    read = {name: load_audio(variant) for name, variant in variants.items()}
    ffmpeg_only(monkeypatch)
    for name, samples in read.items():
        expected = load_audio(variants[name])
        np.testing.assert_array_equal(samples, expected, err_msg=name)


def _with_field(data: bytes, offset: int, value: int, size: int = 4) -> bytes:
    return data[:offset] + value.to_bytes(size, "little") + data[offset + size:]


def _fmt_of_18_bytes(data: bytes) -> bytes:
    """The same file with WAVEFORMATEX's 18-byte fmt chunk (a cbSize of 0 after the 16 bytes), as some tools write."""
    return _with_field(data[:16] + (18).to_bytes(4, "little") + data[20:36] + bytes(2) + data[36:], 4, len(data) - 6)


def _hostile_wavs() -> dict[str, bytes]:
    mono = wav_bytes(two_tone(SAMPLE_RATE)[None, :], SAMPLE_RATE)
    stereo = wav_bytes(np.stack([two_tone(SAMPLE_RATE)] * 2), SAMPLE_RATE)
    return {
        "RIFF size odd and short": _with_field(mono, 4, 1001),
        "RIFF size even and short": _with_field(mono, 4, 1000),
        "stereo, RIFF size short": _with_field(stereo, 4, 1001),
        "fmt chunk of 18 bytes": _fmt_of_18_bytes(mono),
        "a chunk past the RIFF size": _with_field(mono[:36] + LIST + mono[36:], 4, 40),
        "rate 2**31 - 1": _with_field(mono, 24, 2**31 - 1),
        "rate 2**32 - 1": _with_field(mono, 24, 2**32 - 1),
        "100 channels": _with_field(_with_field(mono, 22, 100, 2), 32, 200, 2),
        "5 frames at 44.1 kHz": wav_bytes(np.zeros((1, 5)), 44_100),
        "1 Hz": wav_bytes(np.zeros((1, 4)), 1),
    }


@pytest.mark.parametrize("name", list(_hostile_wavs()))
def test_odd_and_hostile_wav_headers_decode_as_ffmpeg_decodes_them(name: str, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """Whatever the header says, a WAV upload gives FFmpeg's samples or FFmpeg's error (never another exception,
    which the server would answer with a 500): `wave` believes the RIFF size, FFmpeg does not; `wave` takes rates
    and channel counts that FFmpeg refuses; a few frames resample to none (EmptyAudioError, as FFmpeg's)."""
    data = _hostile_wavs()[name]

    def outcome() -> np.ndarray | type[Exception]:
        try:
            return load_audio(data, max_seconds=60)
        except (AudioDecodeError, AudioTooLong) as error:
            return type(error)

    ours = outcome()
    ffmpeg_only(monkeypatch)
    expected = outcome()
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(ours, expected)
    else:
        assert ours is expected


@pytest.mark.parametrize(("width", "channels", "sample_rate"), [(1, 1, 16_000), (3, 1, 16_000), (4, 1, 16_000),
                                                              (2, 2, 22_050)])
def test_other_wavs_are_left_to_ffmpeg(width: int, channels: int, sample_rate: int) -> None:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(sample_rate)
        out.writeframes(bytes(width * channels * sample_rate // 10))
    data = buffer.getvalue()
    assert audio._pcm16_wav(data, SAMPLE_RATE, None) is None
    assert load_audio(data).size == SAMPLE_RATE // 10


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.id)
def test_decoding_from_path_equals_decoding_bytes(fmt: Format, tmp_path: Path) -> None:
    data = encoded(fmt)
    path = tmp_path / f"clip.{fmt.suffix}"
    path.write_bytes(data)
    from_bytes = load_audio(data)
    # Same samples whichever way the file arrives: an upload's bytes, or a corpus file by path (str or Path).
    np.testing.assert_array_equal(load_audio(path), from_bytes)
    np.testing.assert_array_equal(load_audio(str(path)), from_bytes)


@pytest.mark.skipif(AAC is None, reason="this PyAV build has no AAC encoder")
@pytest.mark.parametrize("sample_rate", [16_000, 44_100])
def test_an_m4a_decodes_to_the_duration_it_records(sample_rate: int) -> None:
    """AAC codes whole frames of 1024 samples: the last one's padding is not audio. Frames with timestamps make
    PyAV's muxer record the real duration (and an edit list that trims the encoder's priming samples)."""
    samples = two_tone(sample_rate, duration_s=1.729).reshape(1, -1).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ipod") as output:
        stream = output.add_stream(AAC, rate=sample_rate)
        stream.layout = "mono"
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start: start + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    assert abs(len(load_audio(buffer.getvalue())) - 1.729 * SAMPLE_RATE) <= 16  # 1 ms; the padding was 64 ms


def test_decoding_at_another_sample_rate() -> None:
    decoded = load_audio(encoded(FORMATS[0]), sample_rate=8_000)
    assert len(decoded) == round(DURATION_S * 8_000)
    assert dominant_frequencies(decoded, count=2, sample_rate=8_000) == pytest.approx(list(TONES_HZ), abs=3.0)


def test_stereo_downmix_mixes_both_channels() -> None:
    """Left and right in antiphase cancel in any symmetric downmix; left-only keeps the tone at some level."""
    x = tone(440.0, SAMPLE_RATE)
    antiphase = load_audio(wav_bytes(np.stack([x, -x]), SAMPLE_RATE))
    left_only = load_audio(wav_bytes(np.stack([x, np.zeros_like(x)]), SAMPLE_RATE))
    assert np.abs(antiphase).max() < 1e-4
    assert correlation(left_only.astype(np.float64), x) > 0.99999


@pytest.mark.parametrize("reader", ["wave", "ffmpeg"])
@pytest.mark.parametrize("channels", [6, 8, 9, 16])
def test_many_channels_decode_to_their_mean(channels: int, reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7.1 (8 channels) or larger upload: PyAV's planar frames of 8 channels or more crashed the process, so a
    valid file took its audio worker down and was answered as corrupt. Each channel a constant: the mean is exact."""
    if reader == "ffmpeg":
        ffmpeg_only(monkeypatch)
    levels = np.linspace(-0.4, 0.6, channels)
    pcm = np.round(np.tile(levels[:, None], (1, 8000)) * 32767) / 32767  # what the 16-bit file holds
    samples = load_audio(wav_bytes(pcm, SAMPLE_RATE))
    assert samples.shape == (8000,)
    assert np.allclose(samples, pcm.mean(axis=0) * 32767 / 32768, atol=1e-6)


def test_stereo_downmix_level_equals_mono() -> None:
    """KNOWN BUG (fails against speechllm/audio.py as written): dual-mono stereo decodes 3 dB louder than mono.

    The same audio in a mono file and in a stereo file with identical channels should decode to the same samples
    (downmix = mean of the channels, which is what `ffmpeg -ac 1` to s16 — Whisper's loader — librosa and
    torchaudio give). load_audio instead returns 0.7071·(L+R) = 1.414·x: swresample's stereo→mono matrix is
    only normalised when the output or internal format is integer, and here both are float ("flt"). Because the
    frontend's log floor is fixed (absolute level matters), stereo uploads get features shifted by +0.075, and
    full-scale stereo decodes to samples beyond ±1.0 (e.g. 1.27 for a 0.9 square wave).
    """
    x = two_tone(SAMPLE_RATE)
    mono = load_audio(wav_bytes(x[None, :], SAMPLE_RATE))
    dual_mono = load_audio(wav_bytes(np.stack([x, x]), SAMPLE_RATE))
    gain = float(np.dot(dual_mono, mono) / np.dot(mono, mono))
    assert gain == pytest.approx(1.0, abs=1e-3), f"stereo downmix gain {gain:.4f} (≈√2 means L+R scaled by 1/√2)"
    np.testing.assert_allclose(dual_mono, mono, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def _short_wav() -> bytes:
    return wav_bytes(two_tone(SAMPLE_RATE, 0.1)[None, :], SAMPLE_RATE)


CORRUPT_INPUTS = {
    "random-bytes": lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "truncated-wav-header": lambda: _short_wav()[:20],  # cut inside the fmt chunk
    "text-file": lambda: b"This is not audio, just a text file.\n" * 20,
    "json": lambda: b'{"audio": "clip.wav", "text": "hello world"}',
    "video-only-webm": lambda: video_only_file("webm", "libvpx"),
    "video-only-mp4": lambda: video_only_file("mp4", "mpeg4"),
}
VIDEO_ENCODERS = {"video-only-webm": "libvpx", "video-only-mp4": "mpeg4"}


@pytest.mark.parametrize("name", CORRUPT_INPUTS)
def test_undecodable_input_raises_audio_decode_error(name: str, tmp_path: Path) -> None:
    if name in VIDEO_ENCODERS and not has_encoder(VIDEO_ENCODERS[name]):
        pytest.skip(f"no {VIDEO_ENCODERS[name]} encoder in this PyAV build to make a video-only file")
    data = CORRUPT_INPUTS[name]()
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(AudioDecodeError) as caught:
            load_audio(source)
        # Not "empty": the file has bytes, it just is not decodable audio.
        assert not isinstance(caught.value, EmptyAudioError)
        message = str(caught.value)
        assert message and ("could not decode audio" in message or "no audio stream" in message), message
        assert "\n" not in message  # one readable line, fit for an HTTP 400 body


CUT_OFF_FORMATS = [  # 20 s of a tone, long enough for the containers to hold it in many packets and pages
    ("wav", "wav", "pcm_s16le"), ("flac", "flac", "flac"), ("mp3", "mp3", MP3), ("ogg-opus", "ogg", OPUS),
    ("webm-opus", "webm", OPUS),
]


@pytest.mark.parametrize(("name", "container", "codec"), CUT_OFF_FORMATS, ids=[f[0] for f in CUT_OFF_FORMATS])
@pytest.mark.parametrize("kept", [0.5, 0.95])
def test_a_cut_off_file_decodes_to_the_audio_that_arrived(name: str, container: str, codec: str | None,
                                                          kept: float) -> None:
    # FFmpeg's decoder refuses a cut-off FLAC's last packet; the whole upload was refused for it.
    if codec is None:
        pytest.skip(f"this PyAV build has no encoder for {name}")
    rate, seconds = 48_000, 20.0
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate))[None].astype(np.float32)
    data = encode_audio(tone, rate, container, codec)
    decoded_seconds = load_audio(data[: int(len(data) * kept)]).size / SAMPLE_RATE
    assert kept * seconds - 1.0 < decoded_seconds < kept * seconds + 1.0


def test_a_cut_off_m4a_without_its_index_is_refused() -> None:
    # FFmpeg's MP4 muxer writes the index (moov) after the audio: a file cut short has none to read it by.
    if AAC is None:
        pytest.skip("this PyAV build has no AAC encoder")
    data = encoded(next(fmt for fmt in FORMATS if fmt.id == "m4a-aac-44k-stereo"))
    with pytest.raises(AudioDecodeError, match="could not decode audio"):
        load_audio(data[: len(data) // 2])


def test_video_only_file_message_names_the_problem() -> None:
    if not has_encoder("libvpx"):
        pytest.skip("no libvpx encoder in this PyAV build")
    with pytest.raises(AudioDecodeError, match="no audio stream"):
        load_audio(video_only_file("webm", "libvpx"))


def test_missing_file_raises_audio_decode_error(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="could not decode audio"):
        load_audio(tmp_path / "does-not-exist.wav")


def test_audio_errors_are_value_errors() -> None:
    # Callers (the HTTP layer) may catch ValueError to answer 400; EmptyAudioError must be caught by both.
    assert issubclass(AudioDecodeError, ValueError)
    assert issubclass(EmptyAudioError, AudioDecodeError)


def test_empty_bytes_raise_empty_audio_error() -> None:
    with pytest.raises(EmptyAudioError, match="empty"):
        load_audio(b"")


def test_wav_with_zero_samples_raises_empty_audio_error(tmp_path: Path) -> None:
    data = wav_bytes(np.zeros((1, 0)), SAMPLE_RATE)
    assert len(data) == 44  # a complete, valid header with an empty data chunk
    path = tmp_path / "empty.wav"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(EmptyAudioError, match="no samples") as caught:
            load_audio(source)
        assert isinstance(caught.value, AudioDecodeError)


def test_zero_byte_file_on_disk_raises_audio_decode_error(tmp_path: Path) -> None:
    # Documents current behaviour: unlike b"", an empty *file* is reported as undecodable, not as EmptyAudioError.
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(AudioDecodeError):
        load_audio(path)


# ---------------------------------------------------------------------------------------------------------------
# resample
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["wave", "ffmpeg"])
def test_audio_over_the_limit_stops_decoding_before_its_samples_are_made(reader: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 KB WAV whose header says 1 Hz is 10,000 s of audio: 160 million samples at 16 kHz, 1.2 GB at its peak
    when it was decoded first and measured afterwards. (The standard library reads the speech, FFmpeg the 1 Hz.)"""
    if reader == "ffmpeg":
        ffmpeg_only(monkeypatch)
    tracemalloc.start()
    try:
        with pytest.raises(AudioTooLong, match="limit of 60 s"):
            load_audio(wav_bytes(np.zeros((1, 10_000)), 1), max_seconds=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # at most the samples of the limit's duration are ever made (60 s: 3.8 MB)
    speech = wav_bytes(tone(440.0, 22_050, duration_s=2.0)[None], 22_050)
    assert load_audio(speech, max_seconds=2.5).size == 2 * SAMPLE_RATE  # under the limit: decoded as ever
    with pytest.raises(AudioTooLong):
        load_audio(speech, max_seconds=1.5)


def test_resample_22k_to_16k_keeps_frequency_and_length() -> None:
    source = tone(440.0, 22_050).astype(np.float32)
    out = resample(source, 22_050)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - len(source) * SAMPLE_RATE / 22_050) <= 1
    assert dominant_frequencies(out, count=1) == pytest.approx([440.0], abs=1.0)
    # Away from the filter edges the result is the same sine sampled at 16 kHz.
    error = np.abs(out - tone(440.0, SAMPLE_RATE)[: len(out)])[EDGE:-EDGE]
    assert error.max() < 2e-3, error.max()


def test_resample_8k_to_16k_upsamples() -> None:
    out = resample(tone(440.0, 8_000).astype(np.float32), 8_000)
    assert len(out) == round(DURATION_S * SAMPLE_RATE)
    assert dominant_frequencies(out, count=1) == pytest.approx([440.0], abs=1.0)


def test_resample_is_identity_at_equal_rates() -> None:
    samples = np.random.default_rng(0).uniform(-1, 1, 1234).astype(np.float32)
    np.testing.assert_array_equal(resample(samples, SAMPLE_RATE), samples)
    np.testing.assert_array_equal(resample(samples, 22_050, 22_050), samples)
    as_float64 = resample(samples.astype(np.float64), SAMPLE_RATE)
    assert as_float64.dtype == np.float32
    np.testing.assert_array_equal(as_float64, samples)


def test_resample_matches_load_audio_of_the_same_wav(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_audio reads a mono 16-bit WAV upload with the standard library and calls resample(pcm / 32768, rate),
    relying on this giving exactly the samples FFmpeg's own decoding would."""
    data = wav_bytes(two_tone(22_050)[None, :], 22_050)
    pcm = np.frombuffer(data[44:], dtype="<i2")
    ffmpeg_only(monkeypatch)
    np.testing.assert_array_equal(resample(pcm.astype(np.float32) / 32768.0, 22_050), load_audio(data))


def test_resample_of_empty_input_returns_empty() -> None:
    """KNOWN BUG (fails against speechllm/audio.py as written): resample(np.zeros(0), 22050) raises MemoryError
    ("Cannot allocate memory", from av.AudioFrame.from_ndarray on a (1, 0) array) instead of returning an empty
    float32 array. Raw PCM with no samples (an empty streaming chunk) would crash with a MemoryError."""
    out = resample(np.zeros(0, dtype=np.float32), 22_050)
    assert out.dtype == np.float32 and out.shape == (0,)


def _frames(channels: np.ndarray, sample_rate: int, pieces: int) -> list[av.AudioFrame]:
    """Planar float frames of (channels, samples), cut into `pieces`, as a decoder hands them out."""
    frames = []
    for piece in np.array_split(channels.astype(np.float32), pieces, axis=1):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp",
                                           layout="mono" if len(channels) == 1 else "stereo")
        frame.sample_rate = sample_rate
        frames.append(frame)
    return frames


def _interleaved(frames: list[av.AudioFrame]) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.float32)] + [frame.to_ndarray().reshape(-1) for frame in frames])


@pytest.mark.parametrize(("channels", "rate", "layout"), [(1, 22_050, "mono"), (1, 8_000, None), (2, 44_100, None),
                                                          (2, 48_000, "mono"), (1, SAMPLE_RATE, None)])
def test_the_resampler_gives_pyavs_samples(channels: int, rate: int, layout: str | None) -> None:
    """audio.Resampler runs PyAV's AudioResampler's filter graph on one thread: the same samples, frame after frame
    and from the flush."""
    frames = _frames(source_channels(rate, channels), rate, pieces=3)
    ours, pyavs = audio.Resampler(SAMPLE_RATE, layout), av.AudioResampler(format="flt", layout=layout, rate=SAMPLE_RATE)
    for frame in frames:
        np.testing.assert_array_equal(_interleaved(ours.resample(frame)), _interleaved(pyavs.resample(frame)))
    np.testing.assert_array_equal(_interleaved(ours.resample(None)), _interleaved(pyavs.resample(None)))


def test_the_resampler_passes_float_audio_at_its_rate_through() -> None:
    frame = av.AudioFrame.from_ndarray(tone(440.0, SAMPLE_RATE).astype(np.float32)[None, :], format="flt",
                                       layout="mono")
    frame.sample_rate = SAMPLE_RATE
    resampler = audio.Resampler(SAMPLE_RATE)
    assert resampler.resample(frame) == [frame] and resampler.resample(None) == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc")
def test_the_resampler_starts_no_threads() -> None:
    """FFmpeg would start a thread per core for each resampler's filter graph, and join them when it is freed."""
    threads = len(list(Path("/proc/self/task").iterdir()))
    resampler = audio.Resampler(SAMPLE_RATE)
    assert resampler.resample(_frames(source_channels(22_050, 2), 22_050, pieces=1)[0])
    assert len(list(Path("/proc/self/task").iterdir())) == threads


# ---------------------------------------------------------------------------------------------------------------
# write_wav
# ---------------------------------------------------------------------------------------------------------------


def test_write_wav_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = (two_tone(SAMPLE_RATE) + 0.05 * rng.standard_normal(round(DURATION_S * SAMPLE_RATE))).astype(np.float32)
    path = tmp_path / "clip.wav"
    write_wav(path, samples)

    with wave.open(str(path), "rb") as check:  # the corpus format: 16-bit mono at 16 kHz
        assert (check.getnchannels(), check.getsampwidth(), check.getframerate()) == (1, 2, SAMPLE_RATE)
        assert check.getnframes() == len(samples)
    loaded = load_audio(path)
    assert loaded.shape == samples.shape
    # int16 quantisation: write_wav truncates x·32767 and decoding divides by 32768, so < 2 LSB of error.
    np.testing.assert_allclose(loaded, samples, rtol=0, atol=2 / 32768)


def test_write_wav_clips_out_of_range_samples(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    write_wav(path, np.array([2.0, -2.0, 1.0, -1.0, 0.0], dtype=np.float32))
    with wave.open(str(path), "rb") as check:
        pcm = np.frombuffer(check.readframes(5), dtype="<i2")
    np.testing.assert_array_equal(pcm, [32767, -32767, 32767, -32767, 0])


def test_write_wav_honours_sample_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip22k.wav"
    write_wav(path, tone(440.0, 22_050).astype(np.float32), sample_rate=22_050)
    with wave.open(str(path), "rb") as check:
        assert check.getframerate() == 22_050
    loaded = load_audio(path)  # decoded back at 16 kHz
    assert abs(len(loaded) - DURATION_S * SAMPLE_RATE) <= 1
    assert dominant_frequencies(loaded, count=1) == pytest.approx([440.0], abs=1.0)
