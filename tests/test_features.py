"""speechllm.features: the 80-bin log-mel frontend, checked against a reference written here from scratch in numpy
(and cross-checked with transformers' Whisper feature code), plus the properties streaming relies on."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.features import HOP_LENGTH, N_FFT, N_MELS, log_mel_spectrogram, mel_filters, num_frames

N_FREQS = N_FFT // 2 + 1  # 201
FLOOR_VALUE = (-8.0 + 4.0) / 4.0  # the normalised value of anything at or below the fixed log10 floor
TOLERANCE = 1e-4  # max abs error against the float64 reference (the frontend runs in float32)


# ---------------------------------------------------------------------------------------------------------------
# Independent numpy reference (no code shared with speechllm.features)
# ---------------------------------------------------------------------------------------------------------------


def slaney_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney / librosa (htk=False): 3 mels per 200 Hz below 1 kHz, then 27 mels per factor 6.4 in frequency."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    logarithmic = 15.0 + 27.0 * np.log(np.maximum(hz, 1e-12) / 1000.0) / np.log(6.4)
    return np.where(hz < 1000.0, linear, logarithmic)


def slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * 6.4 ** ((mel - 15.0) / 27.0))


def reference_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangles equally spaced in Slaney mel from 0 Hz to Nyquist, each scaled to unit
    area in Hz (Slaney normalisation: height 2 / (upper - lower))."""
    fft_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges_hz = slaney_mel_to_hz(np.linspace(0.0, slaney_hz_to_mel(sample_rate / 2), n_mels + 2))
    bank = np.zeros((n_mels, len(fft_hz)))
    for m in range(n_mels):
        lower, centre, upper = edges_hz[m: m + 3]
        rising = (fft_hz - lower) / (centre - lower)
        falling = (upper - fft_hz) / (upper - centre)
        bank[m] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (upper - lower)
    return bank


def periodic_hann(length: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)  # periodic: denominator N, not N - 1


def reference_power_spectrogram(samples: np.ndarray) -> np.ndarray:
    """(n_fft // 2 + 1, T // hop): centred frames (reflect padding of n_fft / 2 on each side), periodic Hann,
    |rfft|², and Whisper's dropped last frame."""
    samples = np.asarray(samples, dtype=np.float64)
    padded = np.pad(samples, N_FFT // 2, mode="reflect")
    count = 1 + len(samples) // HOP_LENGTH
    index = HOP_LENGTH * np.arange(count)[:, None] + np.arange(N_FFT)[None, :]
    spectrum = np.fft.rfft(padded[index] * periodic_hann(N_FFT), axis=1)
    return (np.abs(spectrum) ** 2).T[:, :-1]


def normalise(log10_mel: np.ndarray) -> np.ndarray:
    """The frontend's deviation from Whisper: a fixed floor of -8 instead of max - 8; then Whisper's (x + 4) / 4."""
    return (np.maximum(log10_mel, -8.0) + 4.0) / 4.0


def reference_log_mel(samples: np.ndarray) -> np.ndarray:
    mel = reference_filterbank() @ reference_power_spectrogram(samples)
    return normalise(np.log10(np.maximum(mel, 1e-10)))


def transformers_log_mel(samples: np.ndarray) -> np.ndarray:
    """Second opinion: the building blocks of transformers' WhisperFeatureExtractor (numpy path), same floor."""
    audio_utils = pytest.importorskip("transformers.audio_utils")
    bank = audio_utils.mel_filter_bank(num_frequency_bins=N_FREQS, num_mel_filters=N_MELS, min_frequency=0.0,
                                       max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                                       mel_scale="slaney")
    window = audio_utils.window_function(N_FFT, "hann")  # periodic by default, like torch.hann_window
    log_spec = audio_utils.spectrogram(np.asarray(samples, dtype=np.float64), window, frame_length=N_FFT,
                                       hop_length=HOP_LENGTH, power=2.0, mel_filters=bank, mel_floor=1e-10,
                                       log_mel="log10", dtype=np.float64)
    return normalise(log_spec[:, :-1])


# ---------------------------------------------------------------------------------------------------------------
# Test signals
# ---------------------------------------------------------------------------------------------------------------


def realistic_signal(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Noise at about -40 dBFS, three tones, a chirp through the whole band, and a stretch of digital silence,
    so the comparison covers loud bins, quiet bins and bins on the floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    signal = 0.01 * rng.standard_normal(len(t))
    for freq, amplitude in ((220.0, 0.2), (1250.0, 0.1), (3500.0, 0.05)):
        signal += amplitude * np.sin(2 * np.pi * freq * t)
    signal += 0.05 * np.sin(2 * np.pi * (50.0 * t + 7950.0 / (2 * seconds) * t**2))  # chirp 50 Hz → 8 kHz
    signal[len(t) // 2: len(t) // 2 + 4000] = 0.0  # 0.25 s of silence mid-utterance
    return signal.astype(np.float32)  # what load_audio hands the frontend


def espeak_utterance(text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not on PATH")
    wav = subprocess.run(["espeak-ng", "--stdout", "--", text], capture_output=True, check=True, timeout=30).stdout
    return load_audio(wav)


def features(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    return log_mel_spectrogram(samples).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------------------------------------------


def test_reference_filterbank_agrees_with_transformers() -> None:
    # Validates the test's own reference before anything is compared against it.
    audio_utils = pytest.importorskip("transformers.audio_utils")
    theirs = audio_utils.mel_filter_bank(num_frequency_bins=N_FREQS, num_mel_filters=N_MELS, min_frequency=0.0,
                                         max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                                         mel_scale="slaney")
    np.testing.assert_allclose(reference_filterbank(), theirs.T, rtol=1e-9, atol=1e-12)


def test_filterbank_matches_reference() -> None:
    # atol 1e-7 against peaks of ~0.025: mel_filters() computes the top mel edge in float32, which moves the
    # triangle edges by ~1e-6 relative; weights are then stored as float32.
    np.testing.assert_allclose(mel_filters().numpy(), reference_filterbank(), rtol=1e-5, atol=1e-7)


def test_filterbank_shape_and_shape_properties() -> None:
    bank = mel_filters().numpy()
    assert bank.shape == (N_MELS, N_FREQS) == (80, 201)
    assert bank.dtype == np.float32
    assert np.all(bank >= 0)
    assert np.all(bank.sum(axis=1) > 0)  # no empty filter (n_fft = 400 is coarse at the low end)
    fft_hz = np.arange(N_FREQS) * SAMPLE_RATE / N_FFT
    # Peaks move up in frequency. Two of the narrow low filters can peak on the same 40 Hz bin, so the argmax is
    # non-decreasing and the centroid strictly increasing.
    assert np.all(np.diff(bank.argmax(axis=1)) >= 0)
    centroids = (bank * fft_hz).sum(axis=1) / bank.sum(axis=1)
    assert np.all(np.diff(centroids) > 0)
    assert centroids[0] < 100 and centroids[-1] > 7000  # spans the band 0 – 8 kHz
    assert bank[:, 0].max() == 0.0  # the first triangle starts at 0 Hz: nothing weighs DC


def test_log_mel_matches_numpy_reference_on_noise_and_tones() -> None:
    samples = realistic_signal()
    got = features(samples)
    expected = reference_log_mel(samples)
    assert got.shape == expected.shape == (N_MELS, len(samples) // HOP_LENGTH)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= TOLERANCE
    # The signal must actually exercise the range: well above the floor and on it.
    assert expected.max() > 0.5 and np.isclose(expected, FLOOR_VALUE).any()


def test_log_mel_matches_transformers_whisper_code() -> None:
    samples = realistic_signal(seed=1)
    expected = transformers_log_mel(samples)
    np.testing.assert_allclose(reference_log_mel(samples), expected, rtol=0, atol=1e-6)  # the two references agree
    assert np.abs(features(samples) - expected).max() <= TOLERANCE


def test_log_mel_matches_reference_on_espeak_speech() -> None:
    samples = espeak_utterance("hello world")
    assert len(samples) > SAMPLE_RATE // 2  # an actual utterance, not an error message
    got = features(samples)
    expected = reference_log_mel(samples)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got - transformers_log_mel(samples)).max() <= TOLERANCE


def test_float64_and_tensor_inputs_give_the_same_features() -> None:
    samples = realistic_signal(seconds=0.5)
    reference = features(samples)
    np.testing.assert_array_equal(features(samples.astype(np.float64)), reference)  # cast to float32 first
    np.testing.assert_array_equal(features(torch.from_numpy(samples)), reference)


# ---------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [201, 320, 479, 480, 16_000, 16_159, 16_160, 24_037])
def test_frame_count_is_samples_over_hop(length: int) -> None:
    out = log_mel_spectrogram(torch.from_numpy(realistic_signal(seconds=2.0)[:length]))
    assert out.shape == (N_MELS, length // HOP_LENGTH)
    assert num_frames(length) == length // HOP_LENGTH == out.shape[-1]


def test_batched_input_equals_per_row() -> None:
    batch = torch.from_numpy(np.stack([realistic_signal(1.0, seed=2), realistic_signal(1.0, seed=3)]))
    out = log_mel_spectrogram(batch)
    assert out.shape == (2, N_MELS, batch.shape[1] // HOP_LENGTH)
    for row in range(2):
        torch.testing.assert_close(out[row], log_mel_spectrogram(batch[row]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("length", [100, 160, 200])
def test_very_short_input_gives_documented_frame_count(length: int) -> None:
    """KNOWN BUG (fails against speechllm/features.py as written): fewer than 201 samples (12.5 ms) make
    torch.stft's reflect padding of n_fft // 2 = 200 raise RuntimeError ("Padding size should be less than the
    corresponding input dimension"), although the docstring and num_frames() promise T // 160 frames: (80, 0) for
    T < 160 and one frame for T = 160..200. A valid but tiny upload (load_audio accepts it) crashes the frontend
    with an untyped RuntimeError instead of giving 0–1 frames or a clear error."""
    out = log_mel_spectrogram(torch.full((length,), 0.1))
    assert out.shape == (N_MELS, num_frames(length))


# ---------------------------------------------------------------------------------------------------------------
# Streaming: a frame depends only on its own window
# ---------------------------------------------------------------------------------------------------------------


FRAME = 40  # a frame well inside the signal
# Frame i is centred on sample i·160 and sees samples [i·160 - 200, i·160 + 200).
WINDOW_START, WINDOW_END = FRAME * HOP_LENGTH - N_FFT // 2, FRAME * HOP_LENGTH + N_FFT // 2


def _perturbed(samples: np.ndarray, start: int, stop: int) -> np.ndarray:
    changed = samples.copy()
    changed[start:stop] = np.random.default_rng(99).uniform(-0.9, 0.9, stop - start)  # loud: no floor masking
    return changed


def test_frame_ignores_samples_after_its_window() -> None:
    samples = realistic_signal(seconds=1.0)
    base = features(samples)
    after = features(_perturbed(samples, WINDOW_END, len(samples)))
    # Frame FRAME and every earlier frame are unchanged; the fixed floor means no utterance-level maximum leaks in.
    np.testing.assert_array_equal(after[:, : FRAME + 1], base[:, : FRAME + 1])
    assert not np.allclose(after[:, FRAME + 1:], base[:, FRAME + 1:])


def test_frame_ignores_samples_before_its_window() -> None:
    samples = realistic_signal(seconds=1.0)
    base = features(samples)
    before = features(_perturbed(samples, 0, WINDOW_START))
    np.testing.assert_array_equal(before[:, FRAME:], base[:, FRAME:])


def test_window_edges_are_exact() -> None:
    """The outermost samples inside the window do change the frame (so the tests above can see a change). The
    periodic Hann window's first weight is exactly 0, so the first sample that counts is WINDOW_START + 1."""
    samples = realistic_signal(seconds=1.0)
    base = features(samples)
    np.testing.assert_array_equal(features(_perturbed(samples, WINDOW_START, WINDOW_START + 1))[:, FRAME],
                                  base[:, FRAME])
    for inside in (WINDOW_START + 1, WINDOW_END - 1):
        changed = features(_perturbed(samples, inside, inside + 1))
        assert not np.allclose(changed[:, FRAME], base[:, FRAME], rtol=0, atol=1e-6), inside


def test_prefix_features_equal_full_features_where_the_window_is_complete() -> None:
    """What a streaming caller gets from the audio received so far: every frame whose window lies inside the
    prefix is final (only the last ~1–2 frames see the prefix's reflect padding)."""
    samples = realistic_signal(seconds=2.0)
    full = features(samples)
    for prefix_len in (4_000, 4_321, 16_000):
        prefix = features(samples[:prefix_len])
        complete = (prefix_len - N_FFT // 2) // HOP_LENGTH + 1  # frames i with i·160 + 200 <= prefix_len
        np.testing.assert_allclose(prefix[:, :complete], full[:, :complete], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The fixed floor
# ---------------------------------------------------------------------------------------------------------------


def test_silence_maps_exactly_to_the_floor() -> None:
    out = features(np.zeros(SAMPLE_RATE, dtype=np.float32))
    assert FLOOR_VALUE == -1.0
    assert np.all(out == -1.0)


def test_sound_below_the_floor_maps_to_the_floor() -> None:
    # A -140 dBFS tone: mel power around 1e-12, under 10^-8, so exactly the floor as well.
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    assert np.all(features((1e-7 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)) == -1.0)


def test_floor_is_absolute_not_relative_to_the_loudest_frame() -> None:
    """Whisper floors at (utterance max - 8); here a quiet frame keeps its value however loud the rest gets."""
    samples = realistic_signal(seconds=1.0)
    louder_elsewhere = samples.copy()
    louder_elsewhere[8_000:] *= 50.0
    np.testing.assert_array_equal(features(louder_elsewhere)[:, :10], features(samples)[:, :10])


def test_gain_shifts_features_by_log10_of_power_gain() -> None:
    samples = realistic_signal(seconds=1.0)
    quiet, loud = features(samples), features(samples * 10.0)  # +20 dB: power ×100, log10 +2, feature +0.5
    above_floor = quiet > FLOOR_VALUE + 0.01
    assert above_floor.mean() > 0.5
    np.testing.assert_allclose(loud[above_floor] - quiet[above_floor], 0.5, rtol=0, atol=TOLERANCE)
    assert math.isclose(float(loud.max() - quiet.max()), 0.5, abs_tol=TOLERANCE)
