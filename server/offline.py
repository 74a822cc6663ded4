"""Offline transcription of many files through the very engine, batcher and service the HTTP server
uses (`zipper-asr transcribe`), with a progress bar."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tqdm import tqdm

from server.app import load_runtime, verbose_result
from server.batcher import TooManyRows
from server.formats import render
from server.metrics import Metrics
from server.protocol import ResponseFormat, check_language
from server.service import NoSpeech
from server.settings import Settings
from speechllm.audio import AudioDecodeError, AudioTooLong


async def transcribe_files(settings: Settings, files: list[Path], language: str | None,
                           response_format: str) -> list[tuple[Path, str | None, str | None]]:
    """(path, rendered transcript, None) per file, or (path, None, why) for a file that could not be transcribed
    (unreadable, undecodable, too long, no speech): one bad file does not stop the others."""
    language = check_language(language) if language else None
    runtime = await asyncio.to_thread(load_runtime, settings, Metrics())
    await runtime.batcher.start()
    bar = tqdm(total=len(files), desc="transcribe", unit="file", disable=len(files) < 2)
    # Enough files at once to fill the engine's batches; more would only hold their bytes and encoder states in
    # memory (thousands of files read at once) while they wait for room in the batcher's queue.
    in_flight = asyncio.Semaphore(2 * settings.max_batch_size)

    async def one(path: Path) -> tuple[Path, str | None, str | None]:
        try:
            async with in_flight:
                result = await runtime.service.transcribe(await asyncio.to_thread(path.read_bytes), language,
                                                          timed=ResponseFormat(response_format).timed, offline=True)
        except (OSError, AudioDecodeError, AudioTooLong, NoSpeech, TooManyRows) as error:
            return path, None, str(error) or type(error).__name__
        finally:
            bar.update()
        return path, render(response_format, verbose_result(result)), None

    try:
        return await asyncio.gather(*(one(path) for path in files))
    finally:
        bar.close()
        await runtime.batcher.stop()
        await runtime.engine.close()
        runtime.service.audio.close()
