"""Request audio → the engine's rows: decoding an upload, the duration limit, windows cut at pauses (silero-vad),
their log-mel features and, in worker processes on a CPU server, their encoder states. The work runs in worker
processes (`ZASR_AUDIO_WORKERS`, default 1), or with 0 in threads of the gateway's process.

Why processes: this work is Python between short C calls (PyAV, onnxruntime, torch). In the gateway's process it
waits for the GIL, which the engine thread holds between its ops, so under load a 2 ms decode took 68 ms and rows
reached the batcher late, in small batches. In a worker it runs beside the engine: +20 % throughput at
concurrency 16 on this 2-core CPU (docs/serving.md, *Threads and processes*). A worker that crashes (say, FFmpeg
on a malicious file) takes no other request with it: the pool is started again, and each call it held runs once
more in a process of its own; the one that crashes there too is answered as undecodable audio.

Why the encoder too (`ZASR_ENCODER_IN_WORKERS`, default on when the engine runs on a CPU): the engine thread is
the server's bottleneck, and the encoder was a third of its time. The decoder's ops are too small for torch to
spread over cores, so under load the engine kept one core busy and left the other mostly idle; a worker encodes
the next requests on that core while the engine decodes. On a GPU the encoder stays with the engine.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.threads import use_one_thread
from server.vad import SileroVAD, Span, split_long_audio
from speechllm.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from speechllm.features import log_mel_spectrogram
from speechllm.model import load_encoder

logger = logging.getLogger("zipper_asr.audio")
MIN_SAMPLES = SAMPLE_RATE // 10  # under 100 ms there is nothing to transcribe
PARENT_CHECK_S = 0.5  # how often a worker checks that its server still runs


class AudioTooLong(ValueError):
    pass


@dataclass
class Row:
    """One window for the engine: its log-mel features, or its encoder states when a worker encoded it."""

    features: torch.Tensor | None  # (n_mels, frames)
    states: torch.Tensor | None = None  # (frames, d_model)


# ---------------------------------------------------------------------------------------------------------------
# The work itself (plain functions: a worker process runs them as the gateway's threads do)
# ---------------------------------------------------------------------------------------------------------------


def decode_upload(audio: bytes, max_audio_seconds: float) -> np.ndarray:
    """Bytes of any container → 16 kHz samples; raises AudioDecodeError (EmptyAudioError), AudioTooLong."""
    samples = load_audio(audio)
    duration = samples.size / SAMPLE_RATE
    if duration > max_audio_seconds:
        raise AudioTooLong(f"the audio is {duration:.0f} s long; the limit is {max_audio_seconds:.0f} s")
    return samples


def speech_windows(samples: np.ndarray, vad: SileroVAD, max_window_seconds: float) -> list[Span]:
    """Short audio with speech is one window, untrimmed; long audio is cut at pauses (silero-vad); audio without
    speech gives no window."""
    if samples.size < MIN_SAMPLES:
        return []
    if samples.size <= max_window_seconds * SAMPLE_RATE:
        return [Span(0, samples.size)] if vad.speech_spans(samples) else []
    return split_long_audio(samples, vad, max_window_seconds)


def window_rows(samples: np.ndarray, vad: SileroVAD, max_window_seconds: float,
                encoder: torch.nn.Module | None = None) -> tuple[list[Span], list[np.ndarray]]:
    """The windows to transcribe and their log-mel features, or with an encoder their encoder states (as arrays:
    they cross a process boundary)."""
    spans = speech_windows(samples, vad, max_window_seconds)
    features = [log_mel_spectrogram(samples[span.start: span.end]) for span in spans]
    if encoder is None:
        return spans, [f.numpy() for f in features]
    with torch.no_grad():  # one window at a time: a window's states do not depend on the others
        return spans, [encoder(f[None], torch.tensor([f.shape[-1]]), chunk_size=0)[0][0].numpy() for f in features]


_worker_vad: SileroVAD | None = None  # a worker process's own
_worker_encoder: torch.nn.Module | None = None


def _start_worker(server_pid: int, model_dir: Path | None) -> None:
    global _worker_vad, _worker_encoder
    use_one_thread()  # the engine's OpenMP threads keep the cores
    _worker_vad = SileroVAD()
    _worker_encoder = load_encoder(model_dir) if model_dir is not None else None
    threading.Thread(target=_exit_with_server, args=(server_pid,), daemon=True).start()


def _exit_with_server(server_pid: int) -> None:
    """A worker outlives a server that was killed (SIGKILL, OOM): it waits on a queue whose writing end it holds
    itself, so it never sees the end of the stream. Once the server is gone, the worker is someone else's child."""
    while os.getppid() == server_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _worker_rows(samples: np.ndarray, max_window_seconds: float) -> tuple[list[Span], list[np.ndarray]]:
    return window_rows(samples, _worker_vad, max_window_seconds, _worker_encoder)


def _worker_pool(workers: int, model_dir: Path | None) -> ProcessPoolExecutor:
    # spawn, not fork: the gateway has threads (and torch's OpenMP state) that a forked child must not inherit.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(os.getpid(), model_dir))


def _run_alone(model_dir: Path | None, function: Any, *args: Any) -> Any:
    with _worker_pool(1, model_dir) as pool:
        return pool.submit(function, *args).result()


# ---------------------------------------------------------------------------------------------------------------
# Where it runs
# ---------------------------------------------------------------------------------------------------------------


class AudioWorkers:
    def __init__(self, workers: int, vad: SileroVAD, max_audio_seconds: float, max_window_seconds: float,
                 encoder_model_dir: Path | None = None) -> None:
        """`encoder_model_dir`: the workers also run the speech encoder of this model (ignored without workers)."""
        self.workers = workers
        self.vad = vad  # for threads (workers == 0)
        self.max_audio_seconds = max_audio_seconds
        self.max_window_seconds = max_window_seconds
        self.encoder_model_dir = encoder_model_dir if workers else None
        self._pool: ProcessPoolExecutor | None = self._new_pool() if workers else None
        self._restarting = asyncio.Lock()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = _worker_pool(self.workers, self.encoder_model_dir)
        for started in [pool.submit(int) for _ in range(self.workers)]:
            started.result()  # start them now (imports, VAD model), not on the first request
        return pool

    async def decode(self, audio: bytes) -> np.ndarray:
        """Bytes of any container → 16 kHz samples; raises AudioDecodeError (EmptyAudioError), AudioTooLong."""
        return await self._run(decode_upload, audio, self.max_audio_seconds)

    async def rows(self, samples: np.ndarray) -> tuple[list[Span], list[Row]]:
        """The windows of `samples` to transcribe, and their rows for the engine."""
        if self._pool is None:
            spans, arrays = await asyncio.to_thread(window_rows, samples, self.vad, self.max_window_seconds)
        else:
            spans, arrays = await self._run(_worker_rows, samples, self.max_window_seconds)
        if self.encoder_model_dir is not None:
            return spans, [Row(None, torch.from_numpy(states)) for states in arrays]
        return spans, [Row(torch.from_numpy(features)) for features in arrays]

    async def _run(self, function: Any, *args: Any) -> Any:
        if self._pool is None:
            return await asyncio.to_thread(function, *args)
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, function, *args)
        except BrokenProcessPool:
            await self._restart(pool)
        # Which of the calls the worker held crashed it is unknown: each runs again in a process of its own, so
        # that only that one fails (at the cost of a process start, after a crash only).
        try:
            return await asyncio.to_thread(_run_alone, self.encoder_model_dir, function, *args)
        except BrokenProcessPool:
            raise AudioDecodeError("the audio crashed the decoder") from None

    async def _restart(self, broken: ProcessPoolExecutor) -> None:
        async with self._restarting:
            if self._pool is broken:  # the first caller to see it breaking starts the new pool
                logger.error("an audio worker died; starting the pool again")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = await asyncio.to_thread(self._new_pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
