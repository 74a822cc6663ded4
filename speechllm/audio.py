"""Audio in: any container/codec a client sends, decoded and resampled to 16 kHz mono with PyAV."""

from __future__ import annotations

import io
import logging
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from av.filter import Graph

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
# FFmpeg reads up to 5 MB of an input to work out its streams, decoding as it goes: 4 ms of a 2 s request's
# 8 ms here, and far more on big uploads. The headers of every audio container we accept fit in a few KiB.
PROBE_BYTES = 8192
# The WAV demuxer hands out packets of 4 KiB (128 ms of 16 kHz mono), each one a trip through the decoder, the
# resampler and numpy: 16 KiB packets give the same samples faster (a 30 s 16 kHz mono WAV 11.1 → 2.5 ms, the
# serving benchmark's 2.2 s clips at 22.05 kHz 2.0 → 1.7 ms); 64 KiB ones slow the resampler down. Other
# demuxers ignore the option.
WAV_PACKET_BYTES = 16384


class Resampler:
    """FFmpeg's resampling as `av.AudioResampler` runs it (the same filter graph: abuffer → aformat → abuffersink,
    with FFmpeg's aresample between), to interleaved float samples, on the calling thread. PyAV leaves the graph's
    thread count to FFmpeg, which starts one thread per core for each resampler (for slice threading, which these
    filters do not use) and joins them when it is freed: a resampler per upload, so under load each upload's threads
    waited for a core. At concurrency 16 the audio worker took 1.7 ms to decode an upload, 0.6 ms alone; with one
    thread, the same samples in 0.6 ms there too (docs/serving.md, *Stop 37*)."""

    def __init__(self, rate: int, layout: str | None = None) -> None:
        """To `rate` Hz in `layout` (None: the input's)."""
        self.rate = rate
        self.layout = layout
        self._graph: Graph | None = None
        self._passthrough = False

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """The frames that `frame` completes; None flushes the filter's delay line. Every frame has the first
        frame's rate, format and layout."""
        if self._graph is None and not self._passthrough:
            if frame is None:
                return []
            self._passthrough = (frame.format.name == "flt" and frame.sample_rate == self.rate
                                 and self.layout in (None, frame.layout.name))
            if not self._passthrough:
                self._graph = self._new_graph(frame)
        if self._passthrough:
            return [frame] if frame is not None else []
        self._graph.push(frame)
        frames = []
        while True:
            try:
                frames.append(self._graph.pull())
            except (av.error.BlockingIOError, av.error.EOFError):  # it needs more input, or it is flushed
                return frames

    def _new_graph(self, frame: av.AudioFrame) -> Graph:
        graph = Graph()
        graph.threads = 1  # before its first filter
        time_base = {"time_base": str(frame.time_base)} if frame.time_base is not None else {}
        source = graph.add("abuffer", sample_rate=str(frame.sample_rate), sample_fmt=frame.format.name,
                           channel_layout=frame.layout.name, **time_base)
        conversion = graph.add("aformat", sample_rates=str(self.rate), sample_fmts="flt",
                               channel_layouts=self.layout or frame.layout.name)
        sink = graph.add("abuffersink")
        source.link_to(conversion)
        conversion.link_to(sink)
        graph.configure()
        return graph


class AudioDecodeError(ValueError):
    """The input could not be decoded as audio (corrupt, empty, or not an audio format)."""


class EmptyAudioError(AudioDecodeError):
    """The input decoded to no samples at all."""


class AudioTooLong(ValueError):
    """The input is longer than the caller accepts (found while decoding, before the rest is decoded)."""


def load_audio(source: str | Path | bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
               ) -> np.ndarray:
    """Decode a file path or in-memory file of any container PyAV knows into float32 mono samples. Audio longer than
    `max_seconds` raises AudioTooLong as soon as decoding gets there: a small file can claim hours (a WAV header
    saying 1 Hz makes 20 KB of samples 5 hours of audio, 300 million samples at 16 kHz)."""
    samples = None
    if isinstance(source, bytes):
        if not source:
            raise EmptyAudioError("the audio file is empty (0 bytes)")
        samples = _pcm16_wav(source, sample_rate, max_seconds)
        file: str | io.BytesIO = io.BytesIO(source)
    else:
        file = str(source)
        if Path(file).is_file() and Path(file).stat().st_size == 0:
            raise EmptyAudioError("the audio file is empty (0 bytes)")
    if samples is None:
        samples = _decode(file, sample_rate, max_seconds)
    if samples.size == 0:
        raise EmptyAudioError("the audio file contains no samples")
    return samples


def _decode(file: str | io.BytesIO, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    """FFmpeg's decoding of any container and codec it knows."""
    try:
        with av.open(file, mode="r", options={"probesize": str(PROBE_BYTES), "max_size": str(WAV_PACKET_BYTES)}
                     ) as container:
            if not container.streams.audio:
                raise AudioDecodeError("the file has no audio stream")
            return _decode_stream(container, sample_rate, max_seconds)
    except (AudioDecodeError, AudioTooLong):
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as error:
        raise AudioDecodeError(f"could not decode audio: {error}") from error


# The WAV uploads _pcm16_wav reads; others go to FFmpeg (which, for one, refuses hundreds of channels).
WAV_MAX_CHANNELS = 16
WAV_RATES = (1_000, 384_000)  # Hz, inclusive


def _pcm16_wav(data: bytes, sample_rate: int, max_seconds: float | None) -> np.ndarray | None:
    """An upload of 16-bit PCM WAV (the usual upload of a speech client) read with the standard library: the same
    samples as FFmpeg gives (int16 / 32768; the channels averaged, or mono resampled by the same FFmpeg resampler),
    without FFmpeg's container (0.45 ms to open, probing for streams) and frames. A 2.2 s 16 kHz WAV took 1.06 ms to
    decode, 0.02 ms this way; the serving benchmark's 22.05 kHz clips 1.55 → 1.0 ms, now the resampler's. As FFmpeg
    does, a data chunk that claims more than the file holds (a stream's header, as espeak-ng writes, or a file cut
    off) gives the whole frames that are there, and the RIFF header's own size is not believed. None for anything
    else, including any header `wave` cannot read: FFmpeg decodes those, or says why not."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    file = io.BytesIO(data)
    try:
        with wave.open(file, "rb") as wav:  # it stops where the data chunk's samples begin
            channels, width, rate, frames = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
        start = file.tell()
    except Exception:  # wave.Error, EOFError, RuntimeError (a chunk past the RIFF size), struct.error, ...
        return None
    if (width != 2 or not 1 <= channels <= WAV_MAX_CHANNELS or not WAV_RATES[0] <= rate <= WAV_RATES[1]
            or (channels > 1 and rate != sample_rate)):  # (FFmpeg resamples each channel before averaging them)
        return None
    frames = min(frames, (len(data) - start) // (channels * width))
    if frames <= 0:
        return None
    if max_seconds is not None and frames / rate > max_seconds:
        raise AudioTooLong(f"the audio is longer than the limit of {max_seconds:.0f} s")
    pcm = np.frombuffer(data, dtype="<i2", count=frames * channels, offset=start).astype(np.float32) / 32768.0
    return resample(pcm, rate, sample_rate) if channels == 1 else pcm.reshape(-1, channels).mean(axis=1)


def _decode_stream(container: av.container.InputContainer, sample_rate: int, max_seconds: float | None
                   ) -> np.ndarray:
    stream = container.streams.audio[0]
    # Resample in the source layout and average the channels ourselves: FFmpeg's float down-mix
    # sums stereo at 0.707 per channel, which would make stereo uploads 3 dB louder than mono. Interleaved, not
    # planar: PyAV's to_ndarray of a planar frame of 8 channels or more crashes the process (it reads 8 planes).
    resampler = Resampler(sample_rate)
    chunks: list[np.ndarray] = []
    seconds = 0.0
    for frame in _decodable_frames(container, stream):
        seconds += frame.samples / frame.sample_rate  # checked before resampling: one frame can be hours
        if max_seconds is not None and seconds > max_seconds:
            raise AudioTooLong(f"the audio is longer than the limit of {max_seconds:.0f} s")
        chunks += [_mono(f) for f in resampler.resample(frame)]
    chunks += [_mono(f) for f in resampler.resample(None)]  # flush the delay line
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    return samples[: _recorded_length(container, stream, sample_rate)]


def _decodable_frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    """The stream's frames, as FFmpeg's own command line decodes a damaged file: a packet the decoder refuses
    (the last one of a cut-off FLAC, say) is skipped, and a file that ends in the middle of a page (Ogg) ends
    there. A file cut short thus gives the audio that arrived, whatever its format (WAV, MP3 and WebM always
    did); one from which nothing decodes raises its first error."""
    first_error: av.error.FFmpegError | None = None
    decoded = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as error:  # the file ends inside a packet: stop at what was read
            first_error = first_error or error
            break
        try:
            for frame in packet.decode():
                decoded += 1
                yield frame
        except av.error.InvalidDataError as error:
            first_error = first_error or error
    if first_error is None:
        return
    if not decoded:
        raise first_error
    # a packet skipped inside the file shortens it by that packet: the later timestamps move up by as much
    logger.warning("decoded %d frames of a damaged or cut-off file; skipped what failed: %s", decoded, first_error)
    try:
        yield from stream.decode(None)  # what the decoder still holds: the demuxer's flush packet never came
    except av.error.FFmpegError:
        pass


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """An interleaved float frame's channels averaged; a mono frame as it is (numpy's mean over one channel, frame
    after frame, was a sixth of decoding a short WAV upload: docs/serving.md, *Measured throughput*)."""
    channels = len(frame.layout.channels)
    samples = frame.to_ndarray().reshape(-1)
    return samples if channels == 1 else samples.reshape(-1, channels).mean(axis=1)


def _recorded_length(container: av.container.InputContainer, stream: av.AudioStream, sample_rate: int) -> int | None:
    """The sample count an MP4 file records for its audio, where decoding gives more (None: no limit). AAC codes
    whole frames of 1024 samples; FFmpeg drops the encoder's priming samples at the start, as the file's edit list
    says, but keeps the padding of the last frame: up to 64 ms more at 16 kHz, in `duration` and in the billed
    seconds. Other containers' durations are estimates (an MP3's from its bit rate), or their decoders trim."""
    if "mp4" not in container.format.name.split(",") or not stream.duration or stream.time_base is None:
        return None
    return round(float(stream.duration * stream.time_base) * sample_rate)


def resample(samples: np.ndarray, orig_rate: int, new_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample float32 mono samples (used for raw PCM that arrives without a container)."""
    if orig_rate == new_rate:
        return samples.astype(np.float32, copy=False)
    if samples.size == 0:
        return np.zeros(0, dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(samples.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = orig_rate
    resampler = Resampler(new_rate, "mono")
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float32 mono samples as 16-bit PCM WAV (the corpus's storage format)."""
    import wave

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
