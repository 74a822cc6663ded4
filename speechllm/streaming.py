"""Audio that arrives a little at a time: raw PCM in, log-mel frames out, and the chunked encoder run over a
growing signal without encoding the same audio twice.

Used by the realtime WebSocket server (server/realtime.py) and measured by benchmarks/realtime.py.

- `PcmDecoder`: little-endian 16-bit mono PCM at 16 or 24 kHz → float32 samples at 16 kHz. The resampler
  keeps its filter state between calls, so the output does not depend on how the bytes were split.
- `StreamingFeatures`: the log-mel frames of a growing signal, each computed once, as soon as its 25 ms
  window has fully arrived; they equal `log_mel_spectrogram`'s frames of the whole signal.
- `IncrementalEncoder`: the encoder under its chunked attention mask over a growing turn. Whole chunks are
  encoded once, their keys and values cached (`SpeechEncoder.stream`); the unfinished last chunk is encoded
  on every update and dropped. The states equal `SpeechEncoder.forward(..., chunk_size)` over all frames so far.
"""

from __future__ import annotations

import av
import numpy as np
import torch

from speechllm.audio import SAMPLE_RATE, Resampler
from speechllm.encoder import SUBSAMPLING, SpeechEncoder, StreamingState
from speechllm.features import HOP_LENGTH, N_FFT, N_MELS, log_mel_spectrogram

INPUT_RATES = (24_000, 16_000)  # OpenAI's realtime PCM rate, and ours
# Samples a frame's window reaches beyond its centre: the frames up to time t are final once t + this has arrived.
FRAME_LOOKAHEAD = N_FFT // 2


class PcmDecoder:
    """PCM16 (little-endian, mono) bytes at `rate` → float32 samples at 16 kHz, in [-1, 1)."""

    def __init__(self, rate: int) -> None:
        if rate not in INPUT_RATES:
            raise ValueError(f"unsupported PCM rate {rate}; expected one of {INPUT_RATES}")
        self.rate = rate
        self._odd_byte = b""  # a sample split across two messages waits for its second byte
        self._resampler = self._new_resampler()
        self._samples_in = self._samples_out = 0

    def _new_resampler(self) -> Resampler | None:
        return None if self.rate == SAMPLE_RATE else Resampler(SAMPLE_RATE, "mono")

    @property
    def held(self) -> int:
        """Samples (at 16 kHz) fed but not out yet: the resampler's delay line, about 1 ms."""
        return round(self._samples_in * SAMPLE_RATE / self.rate) - self._samples_out

    def flush(self) -> np.ndarray:
        """The samples still held (the resampler's delay line), as a file's decoding ends with them; the resampler
        then starts afresh, as for a new file. A half sample waiting for its second byte stays: a client may split
        a sample across two appends, a commit between them included."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        held = _samples(self._resampler.resample(None))
        self._resampler = self._new_resampler()
        self._samples_in = self._samples_out = 0
        return held

    def feed(self, data: bytes) -> np.ndarray:
        data = self._odd_byte + data
        whole = len(data) - len(data) % 2
        self._odd_byte = data[whole:]
        # / 32768 exactly as FFmpeg converts s16 to float, so the same PCM uploaded as a WAV file decodes to
        # the very same samples (the REST endpoint's path).
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
        self._samples_in += samples.size
        if self._resampler is not None and samples.size:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.rate
            # No flush: the filter's delay line (a few ms) stays inside until more audio pushes it out (`held`).
            samples = _samples(self._resampler.resample(frame))
        self._samples_out += samples.size
        return samples


def _samples(frames: list[av.AudioFrame]) -> np.ndarray:
    """A mono resampler's output frames as one float32 array."""
    out = [frame.to_ndarray().reshape(-1) for frame in frames]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


class StreamingFeatures:
    """Log-mel frames of a growing signal. Frame i is centred on sample i * HOP_LENGTH and final once samples up
    to i * HOP_LENGTH + N_FFT / 2 have arrived; `update` returns the frames that became final since last time."""

    def __init__(self) -> None:
        self.frames_done = 0

    def update(self, samples: np.ndarray) -> torch.Tensor:
        """`samples`: the whole signal so far (it only ever grows) → (n_mels, new frames)."""
        last = (samples.size - FRAME_LOOKAHEAD) // HOP_LENGTH  # the last frame whose window lies inside the signal
        first = self.frames_done
        if last < first:
            return torch.zeros(N_MELS, 0)
        # Start two hops before the first new frame: the slice's own edge frames are computed from reflected
        # padding and dropped; from the third on they see the same samples as in the whole signal.
        skip = min(first, 2)
        start = (first - skip) * HOP_LENGTH
        frames = log_mel_spectrogram(samples[start:])[:, skip: skip + last - first + 1]
        self.frames_done = last + 1
        return frames


class IncrementalEncoder:
    """The encoder over one growing turn under a chunked attention mask of `chunk_size` encoder frames.

    `update(new_frames)` returns the states of every frame so far. With `incremental=False` it re-encodes all
    frames at every update instead (the same states, computed from scratch: the baseline the benchmark and the
    `ZASR_REALTIME_INCREMENTAL_ENCODING=false` setting use). `frames_encoded` counts the encoder frames computed.
    """

    def __init__(self, encoder: SpeechEncoder, chunk_size: int, incremental: bool = True) -> None:
        self.encoder = encoder
        self.chunk_frames = chunk_size * SUBSAMPLING  # feature frames per chunk
        self.chunk_size = chunk_size
        self.incremental = incremental
        self.state = StreamingState()
        self.features: list[torch.Tensor] = []  # feature frames not yet part of an encoded whole chunk
        self.all_features: list[torch.Tensor] = []  # every frame (only kept when not incremental)
        self.done: list[torch.Tensor] = []  # states of whole chunks, encoded once
        self.frames_encoded = 0

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def update(self, new_frames: torch.Tensor) -> torch.Tensor:
        """new_frames (n_mels, k) → states (frames so far / 4, d_model)."""
        new_frames = new_frames.to(self.device)
        if not self.incremental:
            return self._recompute(new_frames)
        self.features.append(new_frames)
        pending = torch.cat(self.features, dim=1)
        while pending.shape[1] >= self.chunk_frames:  # whole chunks: encode once, keep their context
            chunk, pending = pending[:, : self.chunk_frames], pending[:, self.chunk_frames:]
            states, self.state = self.encoder.stream(chunk[None], self.state)
            self.done.append(states[0])
            self.frames_encoded += states.shape[1]
        self.features = [pending]
        tail = pending[:, : pending.shape[1] - pending.shape[1] % SUBSAMPLING]
        parts = list(self.done)
        if tail.shape[1]:  # the unfinished chunk: encoded against the cached context, then forgotten
            states, _ = self.encoder.stream(tail[None], self.state)
            parts.append(states[0])
            self.frames_encoded += states.shape[1]
        return torch.cat(parts) if parts else new_frames.new_zeros(0, self.encoder.output_dim)

    def _recompute(self, new_frames: torch.Tensor) -> torch.Tensor:
        self.all_features.append(new_frames)
        features = torch.cat(self.all_features, dim=1)
        usable = features.shape[1] - features.shape[1] % SUBSAMPLING  # as the incremental path sees them
        if usable == 0:
            return new_frames.new_zeros(0, self.encoder.output_dim)
        states, _ = self.encoder(features[None, :, :usable], torch.tensor([usable], device=self.device),
                                 chunk_size=self.chunk_size)
        self.frames_encoded += states.shape[1]
        return states[0]
