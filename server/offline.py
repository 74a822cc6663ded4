"""Offline transcription of many files through the very engine, batcher and service the HTTP server
uses (`zipper-asr transcribe`), with a progress bar."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tqdm import tqdm

from server.app import load_runtime, verbose_result
from server.formats import render
from server.metrics import Metrics
from server.protocol import check_language
from server.settings import Settings


async def transcribe_files(settings: Settings, files: list[Path], language: str | None,
                           response_format: str) -> list[tuple[Path, str]]:
    language = check_language(language) if language else None
    runtime = await asyncio.to_thread(load_runtime, settings, Metrics())
    await runtime.batcher.start()
    bar = tqdm(total=len(files), desc="transcribe", unit="file", disable=len(files) < 2)

    async def one(path: Path) -> tuple[Path, str]:
        result = await runtime.service.transcribe(await asyncio.to_thread(path.read_bytes), language)
        bar.update()
        return path, render(response_format, verbose_result(result))

    try:
        return await asyncio.gather(*(one(path) for path in files))
    finally:
        bar.close()
        await runtime.batcher.stop()
        await runtime.engine.close()
        runtime.service.audio.close()
