"""Offline transcription of many files through the very engine, batcher and service the HTTP server
uses (`zipper-asr transcribe`), with a progress bar."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from tqdm import tqdm

from server.app import Runtime, load_runtime, verbose_result
from server.batcher import TooManyRows
from server.formats import render
from server.metrics import Metrics
from server.protocol import ResponseFormat, check_language
from server.service import NoSpeech, TranscriptionResult
from server.settings import Settings
from speechllm.audio import AudioDecodeError, AudioTooLong

# What makes one file fail without stopping the others.
FILE_ERRORS = (OSError, AudioDecodeError, AudioTooLong, NoSpeech, TooManyRows)


@asynccontextmanager
async def started_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """The server's runtime (engine, batcher, audio workers) in this process, stopped on leaving."""
    runtime = await asyncio.to_thread(load_runtime, settings, Metrics())
    await runtime.batcher.start()
    try:
        yield runtime
    finally:
        await runtime.close()


async def transcribe_each(runtime: Runtime, audio: list[Callable[[], Awaitable[bytes]]], language: list[str | None],
                          timed: bool = False, done: Callable[[], None] = lambda: None
                          ) -> list[TranscriptionResult | Exception]:
    """Each upload's transcript, or the error (FILE_ERRORS) that kept it from one. Enough uploads at once to fill
    the engine's batches; more would only hold their bytes and what the speech half made of them in memory
    (thousands of files read at once) while they wait for room in the batcher's queue. `audio`: reads an upload
    when its turn comes."""
    in_flight = asyncio.Semaphore(2 * runtime.batcher.max_batch_size)

    async def one(read: Callable[[], Awaitable[bytes]], code: str | None) -> TranscriptionResult | Exception:
        try:
            async with in_flight:
                return await runtime.service.transcribe(await read(), code, timed=timed, offline=True)
        except FILE_ERRORS as error:
            return error
        finally:
            done()

    return await asyncio.gather(*(one(read, code) for read, code in zip(audio, language, strict=True)))


async def transcribe_files(settings: Settings, files: list[Path], language: str | None,
                           response_format: str) -> list[tuple[Path, str | None, str | None]]:
    """(path, rendered transcript, None) per file, or (path, None, why) for a file that could not be transcribed
    (unreadable, undecodable, too long, no speech): one bad file does not stop the others."""
    language = check_language(language) if language else None
    async with started_runtime(settings) as runtime:
        with tqdm(total=len(files), desc="transcribe", unit="file", disable=len(files) < 2) as bar:
            results = await transcribe_each(runtime, [file_reader(path) for path in files], [language] * len(files),
                                            ResponseFormat(response_format).timed, bar.update)
    return [(path, None, str(result) or type(result).__name__) if isinstance(result, Exception)
            else (path, render(response_format, verbose_result(result)), None)
            for path, result in zip(files, results, strict=True)]


def file_reader(path: Path) -> Callable[[], Awaitable[bytes]]:
    """Reads a file's bytes off the event loop, when called (transcribe_each's `audio`)."""
    return lambda: asyncio.to_thread(path.read_bytes)
