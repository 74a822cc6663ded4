"""Request audio → the engine's rows: decoding an upload, the duration limit, windows cut at pauses (silero-vad),
their log-mel features and, in worker processes on a CPU server, the speech half of the model (encoder, LID, CTC
compression, projector): their LID posteriors and audio embeddings. The work runs in worker processes
(`ZASR_AUDIO_WORKERS`, default 1), or with 0 in threads of the gateway's process.

Why processes: this work is Python between short C calls (PyAV, onnxruntime, torch). In the gateway's process it
waits for the GIL, which the engine thread holds between its ops, so under load a 2 ms decode took 68 ms and rows
reached the batcher late, in small batches. In a worker it runs beside the engine: +20 % throughput at
concurrency 16 on this 2-core CPU (docs/serving.md, *Threads and processes*). A worker that crashes (say, FFmpeg
on a malicious file) takes no other request with it: the pool is started again, and each upload of the calls it
held runs once more in a process of its own; the one that crashes there too is answered as undecodable audio.

Why one call per several uploads (`AudioWorkers`): an upload is decoded, cut and encoded in one worker call, and
under load one call takes the uploads that waited for it (up to 4). That saves a round trip between the processes per
upload (the decoded samples no longer travel to the gateway and back), and the windows of a call are encoded
together. In an A/B at concurrency 16 (two runs each) the server's CPU per audio second fell from 17.3–17.8 to
14.5 ms and throughput rose from 95–98 to 104–113 audio s/s.

Why the encoder too (`ZASR_ENCODER_IN_WORKERS`, default on when the engine runs on a CPU): the engine thread is
the server's bottleneck, and the encoder was a third of its time. The decoder's ops are too small for torch to
spread over cores, so under load the engine kept one core busy and left the other mostly idle; a worker encodes
the next requests on that core while the engine decodes. The rest of the speech half (LID, the CTC compression and
the projector: `SpeechHalf.hear`) followed: the engine thread shares its process's GIL with the event loop, and
these are many small ops. On a GPU the speech half stays with the engine.
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

from server.allocator import keep_freed_memory
from server.metrics import Metrics
from server.threads import use_one_thread
from server.vad import SileroVAD, Span, split_long_audio
from speechllm.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from speechllm.features import log_mel_spectrogram
from speechllm.model import HeardWindow, SpeechHalf, load_speech_half
from speechllm.padding import encode_each

logger = logging.getLogger("zipper_asr.audio")
MIN_SAMPLES = SAMPLE_RATE // 10  # under 100 ms there is nothing to transcribe
PARENT_CHECK_S = 0.5  # how often a worker checks that its server still runs
# Uploads one worker call takes of those waiting. Fewer, smaller bursts of rows keep more of them decoding together:
# 4 instead of 8 raised the rows per decoding step from about 5 to 6.5 and the cores busy from 1.47 to 1.56 at
# concurrency 16 (docs/serving.md, *One worker call per upload*).
MAX_UPLOADS_PER_CALL = 4
RETRY_PROCESSES = 4  # after a crash, the uploads of the broken call run again alone, this many at a time
LONE_UPLOAD_BYTES = 2 << 20  # a larger upload (over a minute of 16-bit PCM) gets a worker call of its own


@dataclass
class Row:
    """One window for the engine: its log-mel features, or what a worker's speech half made of it."""

    features: torch.Tensor | None  # (n_mels, frames)
    heard: HeardWindow | None = None


@dataclass
class PreparedAudio:
    """A request's audio as the engine takes it: its windows (at pauses) and one row per window."""

    duration: float  # seconds
    spans: list[Span]  # each window's segment: where its speech is, when timed (speech_windows)
    rows: list[Row]


@dataclass(frozen=True)
class Window:
    heard: Span  # the samples the model hears
    speech: Span  # from the first start of speech in it to the last end: its segment


Audio = bytes | np.ndarray  # an upload in any container, or 16 kHz samples already decoded (realtime streams)


@dataclass(frozen=True)
class Upload:
    audio: Audio
    timed: bool = False  # its windows' speech is timed (speech_windows): for the formats with segments


# A window as it crosses the process boundary, as arrays: its features, or what the speech half made of it
# (HeardWindow: LID posteriors, audio embeddings, frames).
WindowArrays = np.ndarray | tuple[np.ndarray, np.ndarray, int]
# What a worker answers for one upload: the number of samples, the windows' speech and the windows; or the error
# that upload raised.
Prepared = tuple[int, list[Span], list[WindowArrays]] | Exception


# ---------------------------------------------------------------------------------------------------------------
# The work itself (plain functions: a worker process runs them as the gateway's threads do)
# ---------------------------------------------------------------------------------------------------------------


def speech_windows(samples: np.ndarray, vad: SileroVAD, max_window_seconds: float, timed: bool = False
                   ) -> list[Window]:
    """Long audio is cut at pauses into windows of speech (silero-vad); short audio with speech is one window, heard
    whole, as the model was trained (clips with their silences); audio without speech gives no window. `timed`: a
    short window's speech runs from its first start of speech to its last end, as a long recording's windows do
    (the VAD's whole pass, which an untimed window skips: has_speech stops at the first speech). Before stop 23 it
    ran from 0 to the end: 1.7 s of speech between 10 s silences made a subtitle of 21.7 s."""
    if samples.size < MIN_SAMPLES:
        return []
    if samples.size > max_window_seconds * SAMPLE_RATE:
        return [Window(span, span) for span in split_long_audio(samples, vad, max_window_seconds)]
    whole = Span(0, samples.size)
    if not timed:
        return [Window(whole, whole)] if vad.has_speech(samples) else []
    spans = vad.speech_spans(samples)
    return [Window(whole, Span(spans[0].start, spans[-1].end))] if spans else []


def prepare_all(uploads: list[Upload], vad: SileroVAD, max_audio_seconds: float, max_window_seconds: float,
                speech: SpeechHalf | None = None) -> list[Prepared]:
    """Each upload decoded, cut into windows and turned into features; with the speech half, the windows of all
    the uploads then go through it together (the encoder in groups of similar length: in a batch, a window costs
    the encoder about two thirds of what it costs alone). An upload that fails answers its own error, never the
    others'."""
    prepared: list[tuple[int, list[Span], list[torch.Tensor | HeardWindow]] | Exception] = []
    for upload in uploads:
        try:
            audio = upload.audio
            samples = load_audio(audio, max_seconds=max_audio_seconds) if isinstance(audio, bytes) else audio
            windows = speech_windows(samples, vad, max_window_seconds, upload.timed)
            prepared.append((samples.size, [window.speech for window in windows],
                             [log_mel_spectrogram(samples[w.heard.start: w.heard.end]) for w in windows]))
        except Exception as error:
            prepared.append(error)
    if speech is not None:
        prepared = _heard(prepared, speech)
    return [(item[0], item[1], [_as_arrays(window) for window in item[2]]) if isinstance(item, tuple) else item
            for item in prepared]


def _heard(prepared: list, speech: SpeechHalf) -> list:
    """The uploads' features replaced by what the speech half makes of them: all windows in one go, or, should that
    fail (out of memory on many long windows, say), upload by upload, so that a failure stays with its upload."""

    def hear(features: list[torch.Tensor]) -> list[HeardWindow]:
        return speech.hear(encode_each(speech.encoder, features)) if features else []

    try:
        heard = iter(hear([f for item in prepared if isinstance(item, tuple) for f in item[2]]))
        return [(item[0], item[1], [next(heard) for _ in item[2]]) if isinstance(item, tuple) else item
                for item in prepared]
    except Exception:
        logger.exception("hearing %d uploads together failed; hearing them one by one", len(prepared))
    alone = []
    for item in prepared:
        try:
            alone.append((item[0], item[1], hear(item[2])) if isinstance(item, tuple) else item)
        except Exception as error:
            alone.append(error)
    return alone


def _as_arrays(window: torch.Tensor | HeardWindow) -> WindowArrays:
    if isinstance(window, HeardWindow):
        return window.language_probabilities.numpy(), window.audio.numpy(), window.frames
    return window.numpy()


def _as_row(window: WindowArrays) -> Row:
    if isinstance(window, tuple):
        probabilities, audio, frames = window
        return Row(None, HeardWindow(torch.from_numpy(probabilities), torch.from_numpy(audio), frames))
    return Row(torch.from_numpy(window))


_worker_vad: SileroVAD | None = None  # a worker process's own
_worker_speech: SpeechHalf | None = None


def _start_worker(server_pid: int, model_dir: Path | None, gemm_dtype: torch.dtype) -> None:
    global _worker_vad, _worker_speech
    # A process group of its own: a signal to the server's group (Ctrl-C in a terminal, `timeout`, a shell's kill
    # of the job) would otherwise kill a worker at once, under the uploads it holds, while the server drains its
    # requests before stopping the workers itself. (Not SIG_IGN: the pool SIGTERMs the others when one dies.)
    os.setpgid(0, 0)
    use_one_thread()  # the engine's OpenMP threads keep the cores
    keep_freed_memory()
    _worker_vad = SileroVAD()
    _worker_speech = load_speech_half(model_dir, gemm_dtype) if model_dir is not None else None
    threading.Thread(target=_exit_with_server, args=(server_pid,), daemon=True).start()


def _exit_with_server(server_pid: int) -> None:
    """A worker outlives a server that was killed (SIGKILL, OOM): it waits on a queue whose writing end it holds
    itself, so it never sees the end of the stream. Once the server is gone, the worker is someone else's child."""
    while os.getppid() == server_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _worker_prepare_all(uploads: list[Upload], max_audio_seconds: float, max_window_seconds: float
                        ) -> list[Prepared]:
    return prepare_all(uploads, _worker_vad, max_audio_seconds, max_window_seconds, _worker_speech)


def _worker_pool(workers: int, model_dir: Path | None, gemm_dtype: torch.dtype) -> ProcessPoolExecutor:
    # spawn, not fork: the gateway has threads (and torch's OpenMP state) that a forked child must not inherit.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(os.getpid(), model_dir, gemm_dtype))


def _run_alone(model_dir: Path | None, gemm_dtype: torch.dtype, function: Any, *args: Any) -> Any:
    with _worker_pool(1, model_dir, gemm_dtype) as pool:
        return pool.submit(function, *args).result()


# ---------------------------------------------------------------------------------------------------------------
# Where it runs
# ---------------------------------------------------------------------------------------------------------------


class AudioWorkers:
    """Uploads wait while the workers are busy, and each worker call takes all that wait (up to
    MAX_UPLOADS_PER_CALL): under load, one call decodes several uploads and encodes their windows together, and
    one round trip between the processes serves them all. With no load, a call holds one upload and waits for
    nothing. A busy worker gets a second call queued behind its own only when that call is full (_may_start_call)."""

    def __init__(self, workers: int, vad: SileroVAD, max_audio_seconds: float, max_window_seconds: float,
                 speech_model_dir: Path | None = None, encoder_gemm_dtype: torch.dtype = torch.float32,
                 metrics: Metrics | None = None) -> None:
        """`speech_model_dir`: the workers also run the speech half of this model (ignored without workers), its
        encoder's GEMMs in `encoder_gemm_dtype` (speechllm.cpu_linear)."""
        self.workers = workers
        self.metrics = metrics or Metrics()
        self.vad = vad  # for threads (workers == 0)
        self.max_audio_seconds = max_audio_seconds
        self.max_window_seconds = max_window_seconds
        self.speech_model_dir = speech_model_dir if workers else None
        self.encoder_gemm_dtype = encoder_gemm_dtype
        self._pool: ProcessPoolExecutor | None = self._new_pool() if workers else None
        self._restarting = asyncio.Lock()
        self._waiting: list[tuple[Upload, asyncio.Future]] = []
        self._calls_in_flight = 0
        self.calls_made = 0  # worker calls so far
        self._calls: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks
        # read at scrape time: an upload whose request gave up while it waited no longer counts
        self.metrics.audio_uploads_waiting.set_function(
            lambda: sum(not future.done() for _, future in self._waiting))

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = _worker_pool(self.workers, self.speech_model_dir, self.encoder_gemm_dtype)
        try:
            for started in [pool.submit(int) for _ in range(self.workers)]:
                started.result()  # start them now (imports, VAD model), not on the first request
        except BaseException:  # a worker killed while starting: its queues closed, not leaked at exit
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return pool

    async def prepare(self, audio: Audio, timed: bool = False) -> PreparedAudio:
        """An upload (bytes of any container) or 16 kHz samples → its windows and their rows for the engine;
        `timed`: with its windows' speech timed (speech_windows). Raises AudioDecodeError (EmptyAudioError) and
        AudioTooLong."""
        upload = Upload(audio, timed)
        start = time.perf_counter()
        try:
            if self._pool is None:
                [prepared] = await asyncio.to_thread(prepare_all, [upload], self.vad, self.max_audio_seconds,
                                                     self.max_window_seconds)
            else:
                future = asyncio.get_running_loop().create_future()
                self._waiting.append((upload, future))
                self._start_calls()
                prepared = await future
        finally:  # a request that gave up (timed out, client gone) counts too: it is the slowest
            self.metrics.audio_prepare_seconds.observe(time.perf_counter() - start)
        if isinstance(prepared, Exception):
            raise prepared
        samples, spans, windows = prepared
        return PreparedAudio(samples / SAMPLE_RATE, spans, [_as_row(window) for window in windows])

    def _start_calls(self) -> None:
        while self._waiting and self._may_start_call():
            uploads = self._next_call()
            if not uploads:  # every upload it took had been given up by its request
                continue
            self._calls_in_flight += 1
            self.calls_made += 1
            call = asyncio.create_task(self._call(uploads))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    def _may_start_call(self) -> bool:
        """A free worker takes what waits. A busy one gets a second call queued behind its own when the uploads of
        a full call wait: it starts that call as soon as it is done, instead of waiting for its answer to travel
        through the event loop and the next call back (6–8 ms of a 35 ms call at concurrency 16, each thread on
        the way waiting for the GIL or a core). A second call of fewer would split the load into smaller calls,
        which cost more per upload. At concurrency 16 on a 2-core CPU with AVX-512 (stop 37, A/B, six rounds and six
        with the servers' roles swapped): +7 % and +8 % audio seconds per second, every round; on stop 34's slower
        CPU, where the engine set the pace, +0.8 % (docs/serving.md, *One worker call per upload*)."""
        if self._calls_in_flight < self.workers:
            return True
        return self._calls_in_flight < 2 * self.workers and len(self._waiting) >= MAX_UPLOADS_PER_CALL

    def _next_call(self) -> list[tuple[Upload, asyncio.Future]]:
        """The uploads of the next call, in arrival order: up to MAX_UPLOADS_PER_CALL, but a large upload (long
        audio) goes alone, so that short ones do not wait for it inside a call."""
        uploads: list[tuple[Upload, asyncio.Future]] = []
        while self._waiting and len(uploads) < MAX_UPLOADS_PER_CALL:
            upload, future = self._waiting[0]
            audio = upload.audio
            large = (len(audio) if isinstance(audio, bytes) else audio.nbytes) > LONE_UPLOAD_BYTES
            if uploads and large:
                break
            del self._waiting[0]
            if not future.done():  # its request was cancelled while it waited
                uploads.append((upload, future))
            if large:
                break
        return uploads

    async def _call(self, uploads: list[tuple[Upload, asyncio.Future]]) -> None:
        results: list[Prepared] | None = None
        try:
            try:
                results = await self._in_worker([upload for upload, _ in uploads])
            finally:  # the worker's slot is free before any retry: the restarted pool serves others meanwhile
                self._calls_in_flight -= 1
                self._start_calls()
            if results is None:  # the worker crashed: the call's uploads run again alone, off the pool
                results = await self._retry_alone(uploads)
        except Exception as error:  # the pool could not be started again, say: every upload of the call fails
            results = [error] * len(uploads)
        finally:
            for index, (_, future) in enumerate(uploads):
                if not future.done():  # its request was cancelled
                    future.set_result(results[index] if results else RuntimeError("the audio workers stopped"))

    async def _in_worker(self, uploads: list[Upload]) -> list[Prepared] | None:
        """The uploads prepared by a worker; None when the worker died (the pool is started again)."""
        pool = self._pool
        start = time.perf_counter()
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(
                pool, _worker_prepare_all, uploads, self.max_audio_seconds, self.max_window_seconds)
        except BrokenProcessPool:
            await self._restart(pool)
            return None
        self.metrics.audio_worker_call_seconds.observe(time.perf_counter() - start)
        self.metrics.audio_worker_call_uploads.observe(len(uploads))
        return prepared

    async def _retry_alone(self, uploads: list[tuple[Upload, asyncio.Future]]) -> list[Prepared]:
        """Which upload crashed the worker is unknown: each runs again in a process of its own, so that only that
        one fails (at the cost of process starts, after a crash only)."""
        alone = asyncio.Semaphore(RETRY_PROCESSES)

        async def retry(upload: Upload, future: asyncio.Future) -> Prepared:
            if future.done():  # cancelled meanwhile: not worth a process
                return AudioDecodeError("cancelled")
            async with alone:
                try:
                    [prepared] = await asyncio.to_thread(_run_alone, self.speech_model_dir, self.encoder_gemm_dtype,
                                                         _worker_prepare_all, [upload], self.max_audio_seconds,
                                                         self.max_window_seconds)
                    return prepared
                except BrokenProcessPool:
                    return AudioDecodeError("the audio crashed the decoder")

        return list(await asyncio.gather(*(retry(upload, future) for upload, future in uploads)))

    async def _restart(self, broken: ProcessPoolExecutor) -> None:
        async with self._restarting:
            if self._pool is broken:  # the first caller to see it breaking starts the new pool
                logger.error("an audio worker died; starting the pool again")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = await asyncio.to_thread(self._new_pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
