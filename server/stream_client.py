"""`zipper-asr stream FILE`: play an audio file to a running server's /v1/realtime as if it were spoken into a
microphone, and print the transcript as it arrives: one line per turn, growing with each delta.

It is also a minimal example of the protocol with nothing but the `websockets` package: connect with
`?intent=transcription`, wait for `session.created`, send a `session.update`, then base64 PCM16 in
`input_audio_buffer.append` events at the pace of real time; the server's VAD cuts the turns and answers with
`...transcription.delta` events and one `...transcription.completed` per turn. (The official `openai` SDK works
the same way: `AsyncOpenAI(base_url=...).realtime.connect(extra_query={"intent": "transcription"})`.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from websockets.asyncio.client import connect

from speechllm.audio import load_audio

RATE = 24_000  # what OpenAI's clients send
TRAILING_SILENCE_S = 1.5  # after the file: lets the server's VAD see the end of the last turn


@dataclass
class StreamResult:
    transcripts: list[str] = field(default_factory=list)  # one per turn, in order of completion
    events: list[dict] = field(default_factory=list)


def pcm16(path: Path, rate: int = RATE) -> bytes:
    """The file's audio as little-endian 16-bit mono PCM at `rate`, followed by a little silence."""
    samples = np.concatenate([load_audio(path, rate), np.zeros(int(TRAILING_SILENCE_S * rate), np.float32)])
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


async def stream_file(path: Path, url: str = "ws://127.0.0.1:8000/v1/realtime", language: str | None = None,
                      api_key: str | None = None, speed: float = 1.0, chunk_ms: int = 100, show_events: bool = False,
                      out: TextIO = sys.stdout, timeout_s: float = 60.0) -> StreamResult:
    audio = pcm16(path)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = StreamResult()
    separator = "&" if "?" in url else "?"
    async with connect(f"{url}{separator}intent=transcription", additional_headers=headers, max_size=None) as ws:
        first = json.loads(await ws.recv())
        if first["type"] != "session.created":
            raise RuntimeError(f"the server refused the session: {first}")
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": RATE}, "transcription": {"language": language}}}}}))
        open_items: set[str] = set()  # turns begun and still waiting for their transcript
        reader = asyncio.create_task(_print_events(ws, result, open_items, show_events, out))
        await _play(ws, audio, speed, chunk_ms)
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(0.2)  # the events of the last appends are still on their way
        while open_items and time.monotonic() < deadline and not reader.done():
            await asyncio.sleep(0.05)
        reader.cancel()
    return result


async def _play(ws, audio: bytes, speed: float, chunk_ms: int) -> None:
    """Send the PCM in chunks of `chunk_ms`, each when its audio would have been spoken (faster with speed > 1)."""
    step = RATE * 2 * chunk_ms // 1000
    start = time.monotonic()
    for index, offset in enumerate(range(0, len(audio), step)):
        await asyncio.sleep(max(0.0, start + index * chunk_ms / 1000 / speed - time.monotonic()))
        chunk = base64.b64encode(audio[offset: offset + step]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))


async def _print_events(ws, result: StreamResult, open_items: set[str], show_events: bool, out: TextIO) -> None:
    line_open = False
    async for message in ws:
        event = json.loads(message)
        result.events.append(event)
        kind = event["type"]
        if show_events:
            print(message, file=out, flush=True)
        if kind in ("input_audio_buffer.speech_started", "input_audio_buffer.committed"):
            open_items.add(event["item_id"])
        elif kind == "conversation.item.input_audio_transcription.delta" and not show_events:
            out.write(event["delta"])
            out.flush()
            line_open = True
        elif kind == "conversation.item.input_audio_transcription.completed":
            open_items.discard(event["item_id"])
            result.transcripts.append(event["transcript"])
            if not show_events and (line_open or event["transcript"]):
                out.write("\n")
                out.flush()
            line_open = False
        elif kind in ("conversation.item.input_audio_transcription.failed", "error"):
            open_items.discard(event.get("item_id", ""))
            print(f"[{kind}] {event['error']['message']}", file=sys.stderr, flush=True)
