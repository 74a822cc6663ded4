"""The audio workers (server/audio_workers.py): the same rows in a worker process as in a thread, errors that
cross the process boundary intact, and a worker that dies taking no other request with it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from server.audio_workers import AudioTooLong, AudioWorkers
from server.vad import SileroVAD
from speechllm.audio import AudioDecodeError, EmptyAudioError
from speechllm.model import SpeechLLM


def _wav() -> bytes:
    return subprocess.run(["espeak-ng", "-v", "en", "--stdout", "--", "the house is very small and the water is cold"],
                          capture_output=True, check=True).stdout


def _die(_: object) -> None:
    os._exit(3)  # as a segfault in FFmpeg would end the worker


@pytest.fixture(scope="module")
def workers() -> Iterator[AudioWorkers]:
    pool = AudioWorkers(1, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0)
    yield pool
    pool.close()


def test_a_worker_gives_the_rows_a_thread_gives(workers: AudioWorkers) -> None:
    threads = AudioWorkers(0, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0)

    async def both() -> tuple:
        samples = await workers.decode(_wav())
        assert np.array_equal(samples, await threads.decode(_wav()))
        return await workers.rows(samples), await threads.rows(samples)

    (spans, features), (thread_spans, thread_features) = asyncio.run(both())
    assert len(spans) >= 2 and spans == thread_spans  # 2 s windows: the 2.8 s phrase is cut at a pause
    assert all(torch.equal(a.features, b.features) for a, b in zip(features, thread_features, strict=True))
    assert all(row.states is None for row in features + thread_features)


def test_workers_with_the_encoder_give_the_states_the_engine_would_compute() -> None:
    model_dir = Path(__file__).resolve().parent.parent / "models" / "default"
    encoding = AudioWorkers(1, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0, encoder_model_dir=model_dir)
    threads = AudioWorkers(0, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0)

    async def both() -> tuple:
        samples = await threads.decode(_wav())
        return await encoding.rows(samples), await threads.rows(samples)

    try:
        (spans, rows), (thread_spans, thread_rows) = asyncio.run(both())
    finally:
        encoding.close()
    assert len(spans) >= 2 and spans == thread_spans
    model = SpeechLLM.load(model_dir)
    for row, thread_row in zip(rows, thread_rows, strict=True):
        assert row.features is None
        with torch.no_grad():
            states, _ = model.encode(thread_row.features[None], torch.tensor([thread_row.features.shape[-1]]),
                                     chunk_size=0)
        assert row.states.shape == states[0].shape
        assert torch.allclose(row.states, states[0], atol=1e-5)


def test_errors_cross_the_process_boundary(workers: AudioWorkers) -> None:
    short = AudioWorkers(0, SileroVAD(), max_audio_seconds=0.5, max_window_seconds=30)
    with pytest.raises(EmptyAudioError):
        asyncio.run(workers.decode(b""))
    with pytest.raises(AudioDecodeError):
        asyncio.run(workers.decode(b"RIFF\x00\x00\x00\x00WAVEnot really"))
    with pytest.raises(AudioTooLong):
        asyncio.run(short.decode(_wav()))


def test_a_dying_worker_takes_no_other_request_with_it(workers: AudioWorkers) -> None:
    wav = _wav()

    async def scenario() -> tuple:
        # The crash and two decodes in flight together: the pool breaks under all three.
        return await asyncio.gather(workers._run(_die, None), workers.decode(wav), workers.decode(wav),
                                    return_exceptions=True)

    crashed, first, second = asyncio.run(scenario())
    assert isinstance(crashed, AudioDecodeError)  # retried once on a fresh pool, where it crashed again
    assert isinstance(first, np.ndarray) and np.array_equal(first, second)
    assert np.array_equal(asyncio.run(workers.decode(wav)), first)  # and the pool goes on serving


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_exit_when_their_server_is_killed() -> None:
    server = ("import multiprocessing, time\n"
              "from server.audio_workers import AudioWorkers\n"
              "from server.vad import SileroVAD\n"
              "workers = AudioWorkers(1, SileroVAD(), 60, 30)\n"
              "print(*[child.pid for child in multiprocessing.active_children()], flush=True)\n"
              "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    pids = [int(pid) for pid in process.stdout.readline().split()]
    assert pids and all(_alive(pid) for pid in pids)
    process.kill()  # no shutdown at all: as SIGKILL or the OOM killer would end it
    process.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "the workers outlived their server"
