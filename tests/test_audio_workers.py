"""The audio workers (server/audio_workers.py): the same rows in a worker process as in a thread, uploads that
wait together answered in one call, errors that cross the process boundary intact, and a worker that dies taking
no other request with it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.audio_workers import MAX_UPLOADS_PER_CALL, AudioWorkers
from server.vad import SileroVAD
from speechllm.audio import AudioDecodeError, AudioTooLong, EmptyAudioError, load_audio
from speechllm.cpu_linear import native_bf16
from speechllm.model import HeardWindow, SpeechLLM
from speechllm.padding import encode_each


def _wav() -> bytes:
    return subprocess.run(["espeak-ng", "-v", "en", "--stdout", "--", "the house is very small and the water is cold"],
                          capture_output=True, check=True).stdout


class _KillsTheWorker(bytes):
    """An upload that ends the worker process that unpacks it, as a segfault in FFmpeg would."""

    def __reduce__(self) -> tuple:
        return os._exit, (3,)


@pytest.fixture(scope="module")
def workers() -> Iterator[AudioWorkers]:
    pool = AudioWorkers(1, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0)
    yield pool
    pool.close()


def test_a_worker_gives_the_rows_a_thread_gives(workers: AudioWorkers) -> None:
    threads = AudioWorkers(0, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0)

    async def both() -> tuple:
        return await workers.prepare(_wav()), await threads.prepare(_wav())

    prepared, in_thread = asyncio.run(both())
    assert prepared.duration == in_thread.duration > 2.0
    assert len(prepared.spans) >= 2 and prepared.spans == in_thread.spans  # 2 s windows: cut at a pause
    assert all(torch.equal(a.features, b.features) for a, b in zip(prepared.rows, in_thread.rows, strict=True))
    assert all(row.heard is None for row in prepared.rows + in_thread.rows)


def test_uploads_that_wait_together_are_answered_in_one_call(workers: AudioWorkers) -> None:
    wav = _wav()

    async def scenario() -> list:
        # The first upload's call takes it alone; the other six wait and go in calls of up to MAX_UPLOADS_PER_CALL.
        return await asyncio.gather(*(workers.prepare(wav) for _ in range(6)), workers.prepare(b""),
                                    return_exceptions=True)

    def samples() -> dict[str, float]:
        return {name: workers.metrics.registry.get_sample_value(name) or 0.0 for name in (
            "zasr_audio_worker_call_uploads_count", "zasr_audio_worker_call_uploads_sum",
            "zasr_audio_prepare_duration_seconds_count", "zasr_audio_uploads_waiting")}

    calls_before, before = workers.calls_made, samples()
    *results, empty = asyncio.run(scenario())
    assert workers.calls_made - calls_before <= 1 + -(-6 // MAX_UPLOADS_PER_CALL) < 7  # 7 uploads
    # the audio stage in the metrics: each call with its uploads, each upload's time in the stage, none left waiting
    after = samples()
    assert {name: after[name] - before[name] for name in before} == {
        "zasr_audio_worker_call_uploads_count": workers.calls_made - calls_before,
        "zasr_audio_worker_call_uploads_sum": 7, "zasr_audio_prepare_duration_seconds_count": 7,
        "zasr_audio_uploads_waiting": 0}
    assert after["zasr_audio_uploads_waiting"] == 0
    assert isinstance(empty, EmptyAudioError)  # an upload in a shared call answers its own error, no one else's
    first = results[0]
    for prepared in results:
        assert prepared.spans == first.spans
        assert all(torch.equal(a.features, b.features) for a, b in zip(prepared.rows, first.rows, strict=True))


def test_a_busy_worker_gets_a_full_call_queued_behind_its_own(workers: AudioWorkers) -> None:
    wav = _wav()

    async def scenario() -> tuple[int, int, list]:
        before = workers.calls_made
        uploads = [asyncio.create_task(workers.prepare(wav)) for _ in range(MAX_UPLOADS_PER_CALL)]
        await asyncio.sleep(0)  # each upload is handed over: the first takes the free worker, the others wait
        with_a_partial_call_waiting = workers.calls_made - before
        uploads.append(asyncio.create_task(workers.prepare(wav)))
        await asyncio.sleep(0)
        with_a_full_call_waiting = workers.calls_made - before
        return with_a_partial_call_waiting, with_a_full_call_waiting, await asyncio.gather(*uploads)

    partial, full, results = asyncio.run(scenario())
    assert (partial, full) == (1, 2)
    assert all(prepared.spans == results[0].spans and len(prepared.rows) >= 2 for prepared in results)


@pytest.mark.parametrize("gemm_dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not native_bf16(), reason="this CPU has no bf16 instructions"))])
def test_workers_with_the_speech_half_hear_what_the_engine_would(gemm_dtype: torch.dtype) -> None:
    """Each window's LID posteriors and audio embeddings, as the gateway's model would compute them from its
    features, in the encoder's GEMM dtype (ZASR_ENCODER_GEMM_DTYPE) that model was loaded with."""
    model_dir = Path(__file__).resolve().parent.parent / "models" / "default"
    hearing = AudioWorkers(1, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0, speech_model_dir=model_dir,
                           encoder_gemm_dtype=gemm_dtype)
    threads = AudioWorkers(0, SileroVAD(), max_audio_seconds=60, max_window_seconds=2.0)

    async def both() -> tuple:
        samples = load_audio(_wav())  # decoded samples, as realtime streams hand them over
        return await asyncio.gather(hearing.prepare(samples), hearing.prepare(_wav()), threads.prepare(samples))

    try:
        prepared, from_upload, in_thread = asyncio.run(both())
    finally:
        hearing.close()
    assert len(prepared.spans) >= 2 and prepared.spans == in_thread.spans == from_upload.spans
    model = SpeechLLM.load(model_dir, encoder_gemm_dtype=gemm_dtype)
    in_float32 = SpeechLLM.load(model_dir)  # to tell that the dtype reached the worker

    def heard(by: SpeechLLM) -> list[HeardWindow]:  # the upload's windows encoded together, as in its worker call
        return by.hear(encode_each(by.encoder, [row.features for row in in_thread.rows]))

    for row, upload_row, expected, in_32 in zip(prepared.rows, from_upload.rows, heard(model), heard(in_float32),
                                                strict=True):
        assert row.features is None
        assert torch.allclose(row.heard.audio, upload_row.heard.audio, atol=1e-5)
        assert row.heard.frames == expected.frames and row.heard.audio.shape == expected.audio.shape
        assert torch.allclose(row.heard.language_probabilities, expected.language_probabilities, atol=1e-4)
        assert torch.allclose(row.heard.audio, expected.audio, atol=1e-4)
        if gemm_dtype is torch.bfloat16:
            assert in_32.audio.shape != row.heard.audio.shape or not torch.allclose(row.heard.audio, in_32.audio,
                                                                                      atol=1e-4)


def test_errors_cross_the_process_boundary(workers: AudioWorkers) -> None:
    short = AudioWorkers(0, SileroVAD(), max_audio_seconds=0.5, max_window_seconds=30)
    with pytest.raises(EmptyAudioError):
        asyncio.run(workers.prepare(b""))
    with pytest.raises(AudioDecodeError):
        asyncio.run(workers.prepare(b"RIFF\x00\x00\x00\x00WAVEnot really"))
    with pytest.raises(AudioTooLong):
        asyncio.run(short.prepare(_wav()))


def test_a_dying_worker_takes_no_other_request_with_it(workers: AudioWorkers) -> None:
    wav = _wav()

    async def scenario() -> list:
        # The crash and three uploads in flight together, two of them in the crash's call: the pool breaks under
        # all four.
        return await asyncio.gather(workers.prepare(wav), workers.prepare(_KillsTheWorker()), workers.prepare(wav),
                                    workers.prepare(wav), return_exceptions=True)

    first, crashed, *others = asyncio.run(scenario())
    assert isinstance(crashed, AudioDecodeError)  # retried alone on a fresh process, where it crashed again
    for prepared in [*others, asyncio.run(workers.prepare(wav))]:  # and the pool goes on serving
        assert prepared.spans == first.spans


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
