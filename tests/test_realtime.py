"""Realtime transcription (/v1/realtime) end to end: a real uvicorn server on the shipped model, spoken to by the
official `openai` SDK's realtime client and by a plain WebSocket client, with espeak-ng speech played in real
time.

The shipped model is weak (see README), so transcripts are held to what the same server's REST endpoint answers
for the same audio, never to the words spoken. Policy under test (server/realtime.py): a turn's deltas always
concatenate to its `completed` transcript, which is the REST answer for the turn's audio, unless partial text
already sent disagreed with it; then the transcript is that text continued by the answer's words after it, and
`offline_transcript` carries the REST answer.

The session's turn logic is also driven event by event without a model or a server (a `RealtimeSession` around
fakes, at the end of this file).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import av
import httpx
import numpy as np
import pytest
from pydantic import TypeAdapter
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.batcher import QueueFull
from server.metrics import Metrics
from server.realtime import FinalDecodeTimes, RealtimeHub, RealtimeSession, continue_text, extends, is_unspaced
from server.realtime_protocol import ClientEventError, InputAudioBufferCommit, parse_client_event
from server.settings import Settings
from server.vad import WINDOW, SileroVAD, StreamingVAD, split_long_audio
from speechllm.audio import SAMPLE_RATE, load_audio, write_wav
from speechllm.streaming import PcmDecoder
from tests.conftest import pcm16_wav, running_server

openai = pytest.importorskip("openai")
from openai.types.realtime import RealtimeServerEvent  # noqa: E402 (after the importorskip)

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.environ.get("ZASR_TEST_MODEL_DIR", ROOT / "models" / "default"))
API_KEY = "test-key"
MAX_APPEND_BYTES = 64 * 1024
MAX_TURN_S = 4.0
IDLE_TIMEOUT_S = 4.0
MAX_SESSIONS = 4
SILENCE_MS = 500  # the sessions' silence_duration_ms (also the server's default)
SPEECH_PAD = SileroVAD().speech_pad  # what a server-VAD turn's transcribed audio keeps of its closing pause
PHRASES = {"en": ("the house is very small and the water is cold", "she said that they would come tomorrow morning"),
           "de": ("wir haben keine zeit", "das wasser ist sehr kalt")}


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(server_log: Path) -> Iterator[str]:
    settings = {"ZASR_MODEL_DIR": str(MODEL_DIR), "ZASR_API_KEYS": f'["{API_KEY}"]', "ZASR_THREADS": "1",
                "ZASR_REALTIME_MAX_APPEND_MB": str(MAX_APPEND_BYTES / 2**20),
                "ZASR_REALTIME_MAX_TURN_SECONDS": str(MAX_TURN_S),
                "ZASR_REALTIME_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
                "ZASR_REALTIME_MAX_SESSIONS": str(MAX_SESSIONS),
                # One turn at a time in transcription: makes backpressure observable (see its test).
                "ZASR_REALTIME_MAX_PENDING_TURNS": "1",
                # Early finals one speech pad into every pause, whatever the decodes took: the test of a pause
                # shorter than the silence needs one in a 300 ms pause (how late they start: a test without model).
                "ZASR_REALTIME_EARLY_FINAL_LEAD_MS": str(SILENCE_MS)}
    with running_server(settings, server_log) as url:
        yield url
    assert "Traceback" not in server_log.read_text(), "the server logged an exception"


def _ws_url(server: str, query: str = "intent=transcription") -> str:
    return server.replace("http://", "ws://") + "/v1/realtime" + (f"?{query}" if query else "")


AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------


def _speech(text: str, voice: str, rate: int) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", "--", text], capture_output=True, check=True).stdout
    return load_audio(wav, rate)


def _recording(language: str, rate: int) -> np.ndarray:
    """Speech, a pause, speech: two turns for server VAD (silence_duration_ms 500)."""
    first, second = (_speech(text, f"{language}+m5", rate) for text in PHRASES[language])
    return np.concatenate([np.zeros(rate // 4, np.float32), first, np.zeros(int(1.2 * rate), np.float32), second,
                           np.zeros(rate, np.float32)])


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _float_wav(samples: np.ndarray) -> bytes:
    """32-bit float WAV: the REST endpoint decodes it to exactly these samples."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as out:
        stream = out.add_stream("pcm_f32le", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


def _rest_text(server: str, samples: np.ndarray, language: str | None) -> str:
    """What POST /v1/audio/transcriptions answers for these 16 kHz samples ("" when it finds no speech)."""
    data = {"model": "whisper-1"} | ({"language": language} if language else {})
    response = httpx.post(f"{server}/v1/audio/transcriptions", headers=AUTH, timeout=60, data=data,
                          files={"file": ("turn.wav", _float_wav(samples))})
    if response.status_code == 400 and response.json()["error"]["code"] == "no_speech":
        return ""
    assert response.status_code == 200, response.text
    return response.json()["text"]


# ---------------------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------------------


def _appends(pcm: bytes, rate: int, chunk_ms: int = 100) -> list[dict]:
    step = rate * 2 * chunk_ms // 1000
    return [{"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i: i + step]).decode()}
            for i in range(0, len(pcm), step)]


async def _play(send, appends: list[dict], chunk_ms: int = 100) -> None:
    """Send the appends at the pace of real time, as a microphone would."""
    start = time.monotonic()
    for index, event in enumerate(appends):
        await asyncio.sleep(max(0.0, start + index * chunk_ms / 1000 - time.monotonic()))
        await send(event)


def _completed_count(events: list[dict]) -> int:
    return sum(e["type"].endswith("transcription.completed") for e in events)


async def _sdk_session(server: str, session: dict, appends: list[dict], turns: int) -> list[dict]:
    """Stream with the official SDK's realtime client; every event back as its JSON."""
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    events: list[dict] = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        await connection.session.update(session=session)

        async def read() -> None:
            async for event in connection:
                events.append(event.to_dict())
                if _completed_count(events) == turns:
                    return

        reader = asyncio.create_task(read())
        await _play(connection.send, appends)
        await asyncio.wait_for(reader, 60)
    return events


async def _ws_session(server: str, first: list[dict], appends: list[dict], turns: int) -> list[dict]:
    """The same with a plain WebSocket client."""
    events: list[dict] = []
    async with connect(_ws_url(server), additional_headers=AUTH) as ws:
        for event in first:
            await ws.send(json.dumps(event))

        async def read() -> None:
            async for message in ws:
                events.append(json.loads(message))
                if _completed_count(events) == turns:
                    return

        reader = asyncio.create_task(read())
        await _play(lambda event: ws.send(json.dumps(event)), appends)
        await asyncio.wait_for(reader, 60)
    return events


# ---------------------------------------------------------------------------------------------------------------
# Reading the events back as turns
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    item_id: str
    kinds: list[str] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    sent_before_commit: str = ""  # partial text: deltas that came before input_audio_buffer.committed
    start_ms: int | None = None
    end_ms: int | None = None
    completed: dict | None = None


def _turns(events: list[dict]) -> list[Turn]:
    turns: dict[str, Turn] = {}
    for event in events:
        item_id = event.get("item_id")
        if item_id is None:
            continue
        turn = turns.setdefault(item_id, Turn(item_id))
        kind = event["type"].rsplit(".", 1)[-1]
        turn.kinds.append(kind)
        if kind == "speech_started":
            turn.start_ms = event["audio_start_ms"]
        elif kind == "speech_stopped":
            turn.end_ms = event["audio_end_ms"]
        elif kind == "committed":
            turn.sent_before_commit = "".join(turn.deltas)
        elif kind == "delta":
            turn.deltas.append(event["delta"])
        elif kind == "completed":
            turn.completed = event
    return list(turns.values())


def _transcribed_end(end_ms: int, silence_ms: int = SILENCE_MS) -> int:
    """The sample where a server-VAD turn's transcribed audio ends: one speech pad into its closing pause (the
    pause began where the VAD's wait for silence_duration_ms, in whole windows, began)."""
    return end_ms * SAMPLE_RATE // 1000 - -(-silence_ms * SAMPLE_RATE // 1000 // WINDOW) * WINDOW + SPEECH_PAD


def _check_turn(server: str, turn: Turn, samples: np.ndarray, language: str | None) -> None:
    """The turn against the REST endpoint's answer for the turn's own audio."""
    assert turn.kinds[0] == "speech_started" and turn.kinds[-1] == "completed", turn.kinds
    assert turn.kinds.count("committed") == 1 and turn.kinds.index("speech_stopped") < turn.kinds.index("committed")
    completed = turn.completed
    assert "".join(turn.deltas) == completed["transcript"], "deltas add up to the transcript"
    assert completed["transcript"].startswith(turn.sent_before_commit)
    window = samples[turn.start_ms * SAMPLE_RATE // 1000: _transcribed_end(turn.end_ms)]
    offline = _rest_text(server, window, language)
    if "offline_transcript" not in completed:
        assert completed["transcript"] == offline
    else:  # the REST answer does not begin with the text already sent: the transcript continues that text with
        # the answer's words after it
        assert completed["offline_transcript"] == offline != completed["transcript"]
        unspaced = is_unspaced(language)
        assert turn.sent_before_commit and not extends(offline, turn.sent_before_commit, unspaced)
        assert completed["transcript"] == continue_text(turn.sent_before_commit, offline, unspaced)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_openai_sdk_client_two_turns_match_the_offline_transcription(server: str) -> None:
    recording = _recording("en", 24_000)
    pcm = _pcm16(recording)
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                           "silence_duration_ms": SILENCE_MS}}}}
    events = asyncio.run(_sdk_session(server, session, _appends(pcm, 24_000), turns=2))

    # Every event is one of the SDK's own server events, validated (not merely constructed) by its models.
    parsed = [TypeAdapter(RealtimeServerEvent).validate_python(event) for event in events]
    assert [type(e).__name__ for e in parsed[:2]] == ["SessionCreatedEvent", "SessionUpdatedEvent"]
    assert events[1]["session"]["audio"]["input"]["transcription"]["language"] == "en"
    turns = _turns(events)
    assert len(turns) == 2
    first, second = turns
    assert first.end_ms <= second.start_ms and second.end_ms <= len(recording) * 1000 // 24_000
    assert events[[e.get("item_id") for e in events].index(second.item_id)]["type"].endswith("speech_started")
    server_samples = PcmDecoder(24_000).feed(pcm)  # the 16 kHz audio the server made of the PCM
    for turn in turns:
        _check_turn(server, turn, server_samples, "en")
        assert turn.completed["languages"] == [{"code": "en"}]
        assert turn.completed["usage"]["type"] == "duration" and turn.completed["usage"]["seconds"] >= 1
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert committed[0]["previous_item_id"] is None and committed[1]["previous_item_id"] == first.item_id
    assert any(turn.sent_before_commit for turn in turns), "partial text arrives while the speaker speaks"


def test_plain_websocket_client_at_16khz_detects_the_language(server: str) -> None:
    recording = _recording("de", SAMPLE_RATE)
    pcm = _pcm16(recording)
    update = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}}}}}  # no language: detected per turn
    events = asyncio.run(_ws_session(server, [update], _appends(pcm, SAMPLE_RATE), turns=2))
    assert events[0]["type"] == "session.created" and events[1]["type"] == "session.updated"
    assert events[1]["session"]["audio"]["input"]["format"]["rate"] == 16000
    turns = _turns(events)
    assert len(turns) == 2
    server_samples = PcmDecoder(SAMPLE_RATE).feed(pcm)
    for turn in turns:
        languages = turn.completed["languages"]  # the language the turn was decoded in; [] if LID was unsure
        assert len(languages) <= 1
        _check_turn(server, turn, server_samples, languages[0]["code"] if languages else None)
    assert any(turn.completed["languages"] for turn in turns)
    assert any(turn.sent_before_commit for turn in turns), "partial text arrives while the speaker speaks"


def _counter(server: str, sample: str) -> float:
    lines = httpx.get(f"{server}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(sample + " "))


def test_a_pause_shorter_than_the_silence_drops_the_early_final_and_the_turn_goes_on(server: str) -> None:
    """The final decode starts one speech pad into every pause (an early final: this server's lead is the whole
    silence duration, so it starts at the pad; by default it starts later, as late as the decode allows, see
    test_an_early_final_starts_as_late_as_the_decode_allows). Here the two phrases are one
    turn (3.3 s, under the test server's longest turn): espeak ends the first with 300 ms of silence, under
    silence_duration_ms. The early final started in
    that pause is dropped when speech resumes; the one started in the closing pause gives the transcript, which
    is still the REST answer for the turn's audio."""
    speech = [_speech(text, "de+m5", 24_000) for text in PHRASES["de"]]
    recording = np.concatenate([np.zeros(6000, np.float32), *speech, np.zeros(24_000, np.float32)])
    pcm = _pcm16(recording)
    update = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"language": "de"}}}}}
    used, discarded = (f'zasr_realtime_early_finals_total{{outcome="{outcome}"}}' for outcome in ("used", "discarded"))
    before = _counter(server, used), _counter(server, discarded)
    turns = _turns(asyncio.run(_ws_session(server, [update], _appends(pcm, 24_000), turns=1)))
    assert len(turns) == 1
    _check_turn(server, turns[0], PcmDecoder(24_000).feed(pcm), "de")
    assert _counter(server, used) - before[0] == 1
    assert _counter(server, discarded) - before[1] >= 1


def test_manual_commits_without_partial_text_equal_the_rest_answer(server: str) -> None:
    async def session() -> tuple[list[dict], bytes]:
        speech = np.concatenate([_speech(PHRASES["en"][0], "en+f3", 24_000), np.zeros(4800, np.float32)])
        pcm = _pcm16(speech)
        async with connect(_ws_url(server), additional_headers=AUTH) as ws:
            created = json.loads(await ws.recv())
            # The older beta shape, with our delay extension: text only once the turn's audio is complete.
            await ws.send(json.dumps({"type": "transcription_session.update", "session": {
                "input_audio_format": "pcm16", "turn_detection": None,
                "input_audio_transcription": {"model": "whisper-1", "language": "en", "delay": "xhigh"}}}))
            updated = json.loads(await ws.recv())
            for event in _appends(pcm, 24_000, chunk_ms=500):
                await ws.send(json.dumps(event))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"}))
            events = [created, updated]
            while not events[-1]["type"].endswith("completed"):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c2"}))  # nothing left
            events.append(json.loads(await ws.recv()))
            for event in _appends(pcm, 24_000, chunk_ms=500):
                await ws.send(json.dumps(event))
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            events.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c3"}))  # cleared: empty
            events.append(json.loads(await ws.recv()))
        return events, pcm

    events, pcm = asyncio.run(session())
    assert events[1]["type"] == "transcription_session.updated"
    assert events[1]["session"]["turn_detection"] is None and events[1]["session"]["input_audio_format"] == "pcm16"
    kinds = [e["type"].rsplit(".", 1)[-1] for e in events[2:]]
    assert kinds[0] == "committed" and kinds[-4] == "completed"
    assert "speech_started" not in kinds and all(k == "delta" for k in kinds[1:-4])  # no VAD, no partial text
    completed = events[-4]
    offline = _rest_text(server, PcmDecoder(24_000).feed(pcm), "en")
    assert completed["transcript"] == offline == "".join(e["delta"] for e in events if "delta" in e)
    assert "offline_transcript" not in completed
    assert events[-3]["type"] == "error" and events[-3]["error"]["code"] == "input_audio_buffer_commit_empty"
    assert events[-3]["error"]["event_id"] == "c2"
    assert events[-2]["type"] == "input_audio_buffer.cleared"
    assert events[-1]["error"]["code"] == "input_audio_buffer_commit_empty"


@pytest.mark.parametrize(("message", "code", "param"), [
    ("this is not json", "invalid_json", None),
    ("[1, 2, 3]", "invalid_json", None),
    ({"event_id": "e1"}, "missing_required_parameter", "type"),
    ({"type": "response.create", "event_id": "e2"}, "invalid_value", "type"),
    ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_base64", "audio"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(MAX_APPEND_BYTES + 2)).decode()},
     "audio_too_large", "audio"),
    ({"type": "input_audio_buffer.append"}, "missing_required_parameter", "audio"),
    ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 44100}}}}}, "invalid_value", "session.audio.input.format.rate"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 0}}}}}, "invalid_value", "session.audio.input.format.rate"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": "24000"}}}}}, "invalid_type", "session.audio.input.format.rate"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"silence_duration_ms": 300}}}}}, "missing_required_parameter",
     "session.audio.input.turn_detection.type"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "threshold": "0.5"}}}}}, "invalid_type",
     "session.audio.input.turn_detection.threshold"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"}}}}}, "unsupported_value", "session.audio.input.format.type"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"language": "xx"}}}}}, "unsupported_language", "session.audio.input.transcription.language"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"model": "no-such-model"}}}}}, "model_not_found", "session.audio.input.transcription.model"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad"}}}}}, "unsupported_value", "session.audio.input.turn_detection.type"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "threshold": 2}}}}}, "invalid_value",
     "session.audio.input.turn_detection.threshold"),
    (b"\x00\x01binary", "invalid_json", None),
    # unpaired UTF-16 surrogate escapes: valid JSON, not text; echoed back they broke the connection
    ('{"type": "\\ud800x"}', "invalid_json", None),
    ('{"type": "input_audio_buffer.commit", "event_id": "\\udc00"}', "invalid_json", None),
    ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"transcription": '
     '{"prompt": "a \\udbff b"}}}}}', "invalid_json", None),
])
def test_bad_client_events_get_an_error_and_the_connection_stays_usable(server: str, message, code: str,
                                                                        param: str | None) -> None:
    async def session() -> list[dict]:
        async with connect(_ws_url(server), additional_headers=AUTH) as ws:
            events = [json.loads(await ws.recv())]
            await ws.send(message if isinstance(message, str | bytes) else json.dumps(message))
            events.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
                "input": {"transcription": {"language": "de"}}}}}))
            events.append(json.loads(await ws.recv()))
        return events

    created, error, updated = asyncio.run(session())
    assert error["type"] == "error" and error["error"]["code"] == code and error["error"]["param"] == param
    assert error["error"]["message"] and error["error"]["type"] == "invalid_request_error"
    if isinstance(message, dict) and "event_id" in message:
        assert error["error"]["event_id"] == message["event_id"]
    assert updated["type"] == "session.updated"  # still usable, and the bad event changed nothing else
    assert updated["session"]["audio"]["input"] | {"transcription": None} == (
        created["session"]["audio"]["input"] | {"transcription": None})
    assert updated["session"]["audio"]["input"]["transcription"]["language"] == "de"


def test_a_text_frame_that_is_not_utf8_closes_the_connection_with_1007(server: str, server_log: Path) -> None:
    """RFC 6455 fails such a connection with 1007; uvicorn does, and logged it with a traceback as if the server had
    failed. One warning line says what happened; the server goes on."""
    async def session() -> int | None:
        async with connect(_ws_url(server), additional_headers=AUTH) as ws:
            await ws.recv()
            await ws.send(b'{"type": "\xff\xfe"}', text=True)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(session()) == 1007
    log = server_log.read_text()
    assert "not UTF-8" in log and "Traceback" not in log
    assert asyncio.run(_ws_session(server, [], [], turns=0))[0]["type"] == "session.created"


def _gauges(server: str) -> dict[str, float]:
    names = ("zasr_realtime_sessions", "zasr_realtime_buffered_audio_seconds", "zasr_realtime_tasks",
             "zasr_queue_depth_rows")
    lines = httpx.get(f"{server}/metrics").text.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith(names)}


def _wait_for_idle(server: str, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = _gauges(server)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


def test_abrupt_disconnects_free_everything(server: str) -> None:
    pcm = _pcm16(_recording("en", 24_000))
    appends = _appends(pcm, 24_000)

    async def connections() -> dict[str, float]:
        sockets = []
        for stop_at in (12, 20, 34):  # inside the first turn, further in, inside the second: decodes in flight
            ws = await connect(_ws_url(server), additional_headers=AUTH)
            await ws.recv()
            for event in appends[:stop_at]:
                await ws.send(json.dumps(event))
            sockets.append(ws)
        await asyncio.sleep(0.3)
        held = _gauges(server)
        for ws in sockets:
            ws.transport.abort()  # no close frame: the TCP connection just drops
        return held

    assert _wait_for_idle(server)["zasr_realtime_sessions"] == 0
    held = asyncio.run(connections())
    assert held["zasr_realtime_sessions"] == 3 and held["zasr_realtime_buffered_audio_seconds"] > 1
    assert not any(_wait_for_idle(server).values()), "sessions, audio, decodes and queued rows all freed"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'zasr_realtime_turns_total{outcome="abandoned"}' in metrics
    # And the server still serves both APIs.
    assert isinstance(_rest_text(server, PcmDecoder(24_000).feed(pcm)[: 3 * SAMPLE_RATE], "en"), str)
    assert asyncio.run(_ws_session(server, [], [], turns=0))[0]["type"] == "session.created"


def test_long_speech_is_cut_into_turns_of_the_longest_allowed(server: str) -> None:
    text = ("the house is very small and the water is very cold but she said that they would come tomorrow "
            "morning with their friends and we would all go down to the river together")
    speech = np.concatenate([_speech(text, "en+m5", 24_000), np.zeros(24_000, np.float32)])
    assert len(speech) / 24_000 > 2 * MAX_TURN_S
    update = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"language": "en", "delay": "xhigh"}}}}}

    async def stream() -> list[dict]:  # faster than real time: appends are only cut by the server
        events: list[dict] = []
        async with connect(_ws_url(server), additional_headers=AUTH) as ws:
            await ws.send(json.dumps(update))
            for event in _appends(_pcm16(speech), 24_000, chunk_ms=250):
                await ws.send(json.dumps(event))
            while not any(e["type"].endswith("speech_stopped") for e in events) or (
                    _completed_count(events) < sum(e["type"].endswith("speech_started") for e in events)):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        return events

    turns = _turns(asyncio.run(stream()))
    assert len(turns) >= 3
    starts = [t.start_ms for t in turns]
    assert all(b - a == MAX_TURN_S * 1000 for a, b in zip(starts, starts[1:], strict=False))
    assert all("speech_stopped" not in t.kinds for t in turns[:-1]) and "speech_stopped" in turns[-1].kinds
    assert all(t.completed["usage"]["seconds"] <= MAX_TURN_S for t in turns)


def test_backpressure_one_turn_in_transcription_at_a_time(server: str) -> None:
    """With ZASR_REALTIME_MAX_PENDING_TURNS=1 the server reads nothing more from a connection while one of its
    committed turns waits for its transcript, so even when a client sends three turns at once, the second turn
    is committed only after the first is completed (the client's messages wait in the socket buffers)."""
    pcm = _pcm16(np.concatenate([_speech(PHRASES["en"][1], "en+m5", 24_000), np.zeros(2400, np.float32)]))
    update = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": None, "transcription": {"language": "en"}}}}}

    async def burst() -> list[dict]:
        async with connect(_ws_url(server), additional_headers=AUTH) as ws:
            messages = [update] + ([*_appends(pcm, 24_000, chunk_ms=500), {"type": "input_audio_buffer.commit"}] * 3)
            for event in messages:
                await ws.send(json.dumps(event))
            events = []
            while _completed_count(events) < 3:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return events

    kinds = [e["type"].rsplit(".", 1)[-1] for e in asyncio.run(burst()) if e["type"] != "session.created"]
    milestones = [k for k in kinds if k in ("committed", "completed")]
    assert milestones == ["committed", "completed"] * 3


def test_limits_idle_timeout_and_authentication(server: str) -> None:
    assert _wait_for_idle(server)["zasr_realtime_sessions"] == 0

    async def scenario() -> tuple[dict, int, dict, dict]:
        held = [await connect(_ws_url(server), additional_headers=AUTH) for _ in range(MAX_SESSIONS)]
        for ws in held:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(_ws_url(server), additional_headers=AUTH) as extra:
            refused = json.loads(await extra.recv())
            with pytest.raises(ConnectionClosed):
                await extra.recv()
            refused_code = extra.close_code
        for ws in held:
            await ws.close()
        await asyncio.sleep(0.2)
        async with connect(_ws_url(server, "intent=conversation"), additional_headers=AUTH) as wrong:
            intent_error = json.loads(await wrong.recv())
        async with connect(_ws_url(server), additional_headers=AUTH) as idle:
            assert json.loads(await idle.recv())["type"] == "session.created"
            started = time.monotonic()
            timeout_error = json.loads(await asyncio.wait_for(idle.recv(), IDLE_TIMEOUT_S + 5))
            assert time.monotonic() - started >= IDLE_TIMEOUT_S - 0.5
            with pytest.raises(ConnectionClosed):
                await idle.recv()
        return refused, refused_code, intent_error, timeout_error

    refused, refused_code, intent_error, timeout_error = asyncio.run(scenario())
    assert refused["error"]["code"] == "session_limit" and refused_code == 1013
    assert intent_error["error"]["param"] == "intent"
    assert timeout_error["error"]["code"] == "idle_timeout"

    async def unauthorized(headers: dict) -> None:
        async with connect(_ws_url(server), additional_headers=headers):
            pass

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refusal:
            asyncio.run(unauthorized(headers))
        assert refusal.value.response.status_code == 403


def test_stream_command_prints_the_turns(server: str, tmp_path: Path) -> None:
    path = tmp_path / "two.wav"
    write_wav(path, _recording("en", SAMPLE_RATE))
    done = subprocess.run([sys.executable, "-m", "speechllm.cli", "stream", str(path), "--url", _ws_url(server, ""),
                           "--api-key", API_KEY, "--language", "en", "--speed", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, done.stdout


# ---------------------------------------------------------------------------------------------------------------
# The session's logic without a model: a RealtimeSession around fakes, fed client events one by one
# ---------------------------------------------------------------------------------------------------------------


class _FakeService:
    """Stands in for TranscriptionService: a turn's transcript says how many samples it got."""

    audio = SimpleNamespace(vad=SileroVAD())

    async def transcribe(self, samples: np.ndarray, language: str | None) -> SimpleNamespace:
        return SimpleNamespace(text=f"{samples.size} samples", language=language)


class _ScriptedVAD:
    """Stands in for StreamingVAD: reports the events and the state the test sets, whatever the audio."""

    silence_duration = SILENCE_MS * SAMPLE_RATE // 1000
    prefix_padding = 300 * SAMPLE_RATE // 1000

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.in_speech = False
        self.silence_from: int | None = None

    def feed(self, samples: np.ndarray) -> list[tuple[str, int]]:
        events, self.events = self.events, []
        return events


def _runtime() -> SimpleNamespace:
    model = SimpleNamespace(config=SimpleNamespace(encoder=SimpleNamespace(chunk_size=16)), encoder=None)
    return SimpleNamespace(engine=SimpleNamespace(model=model), service=_FakeService(), batcher=None)


def _session(websocket: _FakeWebSocket | None = None, **settings) -> RealtimeSession:
    return RealtimeSession(websocket, _runtime(), Settings(realtime_max_turn_seconds=MAX_TURN_S, **settings),
                           Metrics())


class _FakeWebSocket:
    """Stands in for Starlette's WebSocket: hands over `messages`, then waits forever for the next one; its client
    reads what is sent (`sent`), or, `reading` False, never does, so that every send waits for buffers that never
    drain."""

    def __init__(self, messages: Sequence[str] = (), reading: bool = True) -> None:
        self.query_params: dict[str, str] = {}
        self.messages = list(messages)
        self.reading = reading
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        if self.messages:
            return {"type": "websocket.receive", "text": self.messages.pop(0)}
        await asyncio.Event().wait()

    async def send_text(self, text: str) -> None:
        if not self.reading:
            await asyncio.Event().wait()
        self.sent.append(text)

    async def close(self, code: int, reason: str) -> None:
        if not self.reading:
            await asyncio.Event().wait()
        self.closed = (code, reason)


def _update(**audio_input) -> str:
    return json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_input}}})


def _append(pcm: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


def _silence(seconds: float, rate: int = 24_000) -> bytes:
    return bytes(round(seconds * rate) * 2)


async def _sent(session: RealtimeSession) -> list:
    """The events sent so far, once the committed turns' transcripts are out."""
    if session.finals:
        await asyncio.wait(session.finals)
    events = []
    while not session.outbox.empty():
        events.append(session.outbox.get_nowait())
    return events


def _kinds(events: list) -> list[str]:
    """The events' kinds, deltas left out."""
    return [kind for event in events if (kind := event.type.rsplit(".", 1)[-1]) != "delta"]


def test_numbers_are_taken_as_json_types_them() -> None:
    """Strings and booleans for numbers are refused (pydantic's lax mode took "24000"); a whole float is an integer
    still (a client's `0.5 * 1000`)."""
    def update(**turn_detection) -> str:
        audio_input = {"format": {"type": "audio/pcm", "rate": 24000.0},
                       "turn_detection": {"type": "server_vad", **turn_detection}}
        session = {"type": "transcription", "audio": {"input": audio_input}}
        return json.dumps({"type": "session.update", "session": session})

    accepted = parse_client_event(update(silence_duration_ms=500.0, prefix_padding_ms=300, threshold=1))
    assert accepted.session.audio.input.turn_detection.silence_duration_ms == 500
    for bad in ({"silence_duration_ms": "500"}, {"threshold": "0.5"}, {"prefix_padding_ms": True}):
        with pytest.raises(ClientEventError) as refused:
            parse_client_event(update(**bad))
        assert refused.value.error.code == "invalid_type"


def test_a_message_nested_too_deeply_is_an_error_not_a_crash() -> None:
    """Nested about 1000 deep, JSON that json.loads accepts can be too deep for json.dumps (the check for unpaired
    surrogates)."""
    for depth in range(800, 1100):
        text = '{"type": "input_audio_buffer.commit", "x": ' + "[" * depth + '"\\u0041"' + "]" * depth + "}"
        try:
            assert isinstance(parse_client_event(text), InputAudioBufferCommit)
        except ClientEventError as error:
            assert error.error.code == "invalid_json" and error.error.message == "The message is nested too deeply."


def test_a_bug_in_handling_an_event_is_a_server_error_and_the_session_goes_on(monkeypatch) -> None:
    async def scenario() -> list:
        session = _session()
        monkeypatch.setattr(session, "_clear", lambda: 1 / 0)
        await session.handle(json.dumps({"type": "input_audio_buffer.clear", "event_id": "e1"}))
        await session.handle(_update(transcription={"language": "de"}))
        return await _sent(session)

    error, updated = asyncio.run(scenario())
    assert error.type == "error" and error.error.type == "server_error" and error.error.event_id == "e1"
    assert updated.type == "session.updated"


@pytest.mark.parametrize("failure", ["timeout", "queue_full"])
def test_a_turn_that_fails_is_told_in_words_for_a_turn(monkeypatch, failure: str) -> None:
    """A turn cannot be sent again: its `failed` event gives no REST advice (send a shorter file, retry later)."""
    async def failing(samples: np.ndarray, language: str | None) -> None:
        raise TimeoutError if failure == "timeout" else QueueFull(retry_after_s=1)

    async def scenario() -> list:
        session = _session(request_timeout_s=0.3)
        monkeypatch.setattr(session.runtime.service, "transcribe", failing)
        await session.handle(_update(turn_detection=None, transcription={"delay": "xhigh"}))
        await session.handle(_append(_silence(0.5)))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        return await _sent(session)

    events = asyncio.run(scenario())
    [failed] = [event for event in events if event.type.endswith(".failed")]
    code = {"timeout": "timeout", "queue_full": "overloaded"}[failure]
    assert failed.error.code == code and "this turn" in failed.error.message
    assert "shorter audio file" not in failed.error.message and "retry" not in failed.error.message.lower()


def test_manual_commits_the_first_append_of_a_turn_is_held_to_the_longest_turn() -> None:
    async def scenario() -> tuple[list, int]:
        session = _session()
        await session.handle(_update(turn_detection=None, format={"type": "audio/pcm", "rate": 16000},
                                     transcription={"delay": "xhigh"}))
        await session.handle(_append(_silence(MAX_TURN_S + 1, SAMPLE_RATE)))  # refused, though no turn is open yet
        await session.handle(_append(_silence(MAX_TURN_S - 1, SAMPLE_RATE)))
        await session.handle(_append(_silence(1.5, SAMPLE_RATE)))  # refused: the turn would run past the limit
        return await _sent(session), session.buffer.end - session.turn.start

    events, held = asyncio.run(scenario())
    assert [getattr(e, "error", None) and e.error.code for e in events[1:]] == [
        "input_audio_buffer_full", "input_audio_buffer_full"]
    assert held == (MAX_TURN_S - 1) * SAMPLE_RATE


@pytest.mark.parametrize("first", ["manual", "server_vad"])
def test_turn_detection_switched_on_with_a_turn_open_ends_that_turn(first: str) -> None:
    """The turn open when server VAD is switched on (from manual commits, or off and on again) is ended by the
    new VAD; here, with no speech coming, at the longest turn, after which silence opens no turn."""
    async def scenario() -> tuple[RealtimeSession, list]:
        session = _session()
        if first == "manual":
            await session.handle(_update(turn_detection=None, transcription={"delay": "xhigh"}))
        else:
            await session.handle(_update(transcription={"delay": "xhigh"}))
            session.vad = vad = _ScriptedVAD()
            vad.events, vad.in_speech = [("speech_started", 0)], True
        await session.handle(_append(_silence(0.5)))
        if first == "server_vad":
            await session.handle(_update(turn_detection=None))
        await session.handle(_update(turn_detection={"type": "server_vad"}))
        assert session.turn is not None and isinstance(session.vad, StreamingVAD)
        for _ in range(10):
            await session.handle(_append(_silence(1)))
        return session, await _sent(session)

    session, events = asyncio.run(scenario())
    kinds = [kind for kind in _kinds(events) if kind != "updated"]
    assert kinds == ["speech_started"] * (first == "server_vad") + ["committed", "completed"], kinds
    assert events[-1].transcript == f"{int(MAX_TURN_S * SAMPLE_RATE)} samples" and session.turn is None


def test_speech_in_a_manual_turn_after_server_vad_is_switched_on_is_announced_before_it_stops() -> None:
    """The manual turn open when server VAD is switched on gets the VAD's speech_started (for its own item, from its
    own start), so that the speech_stopped that ends it pairs with one."""
    async def scenario() -> tuple[str, list]:
        session = _session()
        await session.handle(_update(turn_detection=None, transcription={"delay": "xhigh"}))
        await session.handle(_append(_silence(0.5)))
        item_id = session.turn.item_id
        await session.handle(_update(turn_detection={"type": "server_vad"}))
        session.vad = vad = _ScriptedVAD()
        vad.events = [("speech_started", int(0.2 * SAMPLE_RATE)), ("speech_stopped", int(0.8 * SAMPLE_RATE))]
        await session.handle(_append(_silence(2)))
        return item_id, await _sent(session)

    item_id, events = asyncio.run(scenario())
    events = [event for event in events if not event.type.endswith("updated")]
    assert _kinds(events) == ["speech_started", "speech_stopped", "committed", "completed"]
    assert {event.item_id for event in events} == {item_id}
    assert events[0].audio_start_ms == 0 and events[1].audio_end_ms > 1300


@pytest.mark.parametrize("pause_s", [3.5, 4.1])
def test_a_turn_cut_at_the_longest_in_its_closing_pause_opens_no_turn_of_silence(pause_s: float) -> None:
    """Speech that pauses before the cut at the longest turn: the next turn opens when speech resumes (the VAD
    starts afresh), not at the cut. Speech going on at the cut goes on in a new turn there."""
    async def scenario() -> tuple[RealtimeSession, list]:
        session = _session()
        await session.handle(_update(transcription={"delay": "xhigh"}))
        session.vad = vad = _ScriptedVAD()
        vad.events, vad.in_speech = [("speech_started", 0)], True
        await session.handle(_append(_silence(3)))
        vad.silence_from = int(pause_s * SAMPLE_RATE)
        await session.handle(_append(_silence(1.25)))
        return session, await _sent(session)

    session, events = asyncio.run(scenario())
    cut = int(MAX_TURN_S * SAMPLE_RATE)
    if pause_s < MAX_TURN_S:
        assert _kinds(events[1:]) == ["speech_started", "committed", "completed"]
        assert session.turn is None and isinstance(session.vad, StreamingVAD)
    else:
        assert _kinds(events[1:]) == ["speech_started", "committed", "speech_started", "completed"]
        assert events[3].audio_start_ms == MAX_TURN_S * 1000 and session.turn.start == cut
    assert events[-1].transcript == f"{cut} samples"


@pytest.mark.parametrize(("lead_ms", "timed_s", "starts_at_ms"), [
    (0, None, 100),  # nothing timed yet: one speech pad into the pause
    (150, None, 300),  # a lead set: by 500 - 150 ms into the pause, at the last append before (the next would be
    # too late)
    (0, 0.1, 200),  # learnt: 1.5 x 0.1 s + two VAD windows (64 ms) = 214 ms before the 500 ms are out: by 286 ms
    (0, 0.5, 100),  # decodes as slow as the silence: never before the pad
])
def test_an_early_final_starts_as_late_as_the_decode_allows(lead_ms: float, timed_s: float | None,
                                                            starts_at_ms: int) -> None:
    """A pause that speech interrupts throws its early final away; so the early final starts as late as still leaves
    it its lead before silence_duration_ms (500 ms here) ends the turn, and no earlier than one speech pad (100 ms)
    into the pause, when the turn's audio is complete. Audio arrives in 100 ms appends: the early final starts at
    the last append before that point (the next may come 100 ms later)."""
    async def scenario() -> list[int | None]:
        session = _session(realtime_early_final_lead_ms=lead_ms)
        for _ in range(FinalDecodeTimes.MEASURED_AFTER if timed_s is not None else 0):
            session.decode_times.record(timed_s)
        await session.handle(_update(format={"type": "audio/pcm", "rate": 16000}, transcription={"delay": "xhigh"}))
        session.vad = vad = _ScriptedVAD()
        vad.events, vad.in_speech = [("speech_started", 0)], True
        await session.handle(_append(_silence(1, SAMPLE_RATE)))
        vad.silence_from = SAMPLE_RATE  # the pause began at 1 s
        started = []
        for _ in range(5):
            await session.handle(_append(_silence(0.1, SAMPLE_RATE)))
            early = session.turn.early_final
            started.append(None if early is None else early.end)
        return started

    started = asyncio.run(scenario())
    pad_end = SAMPLE_RATE + SAMPLE_RATE // 10  # what the early final transcribes: up to one pad into the pause
    assert started == [None] * (starts_at_ms // 100 - 1) + [pad_end] * (6 - starts_at_ms // 100)


def test_a_turn_detection_update_changes_only_the_fields_it_gives() -> None:
    async def scenario() -> list:
        session = _session()
        await session.handle(_update(turn_detection={"type": "server_vad", "threshold": 0.8, "prefix_padding_ms": 100,
                                                     "silence_duration_ms": 700}))
        await session.handle(_update(turn_detection={"type": "server_vad", "silence_duration_ms": 300}))
        await session.handle(_update(turn_detection=None))
        await session.handle(_update(turn_detection={"type": "server_vad", "threshold": 0.6}))
        return await _sent(session)

    detections = [event.session.audio.input.turn_detection for event in asyncio.run(scenario())]
    assert [(d.threshold, d.prefix_padding_ms, d.silence_duration_ms) if d else None for d in detections] == [
        (0.8, 100, 700), (0.8, 100, 300), None, (0.6, 300, 500)]  # from manual commits: the defaults


@pytest.mark.parametrize("append_mb", [0.5, 4, 15])
def test_uvicorns_message_limit_fits_the_largest_append(append_mb: float) -> None:
    """An append within ZASR_REALTIME_MAX_APPEND_MB reaches the server (which answers a larger one with an error
    event) instead of being closed with 1009 by uvicorn, whose own limit is 16 MiB."""
    limit = Settings(realtime_max_append_mb=append_mb).websocket_max_message_bytes
    largest = _append(bytes(int(append_mb * 2**20)))
    assert limit >= max(16 * 2**20, len(largest.encode()) + 1000)


def test_no_partial_text_once_delay_is_xhigh() -> None:
    async def scenario() -> list:
        session = _session()
        turn = session.turn = session._open_turn(0)
        turn.window.hypotheses = ["hello world foo"]
        await session.handle(_update(transcription={"delay": "xhigh"}))
        output = SimpleNamespace(text="hello world bar", language="en", language_source="given")
        await session._agree(turn, turn.window, output, 3 * SAMPLE_RATE)  # the update in flight at the change ends
        return await _sent(session)

    assert [event.type for event in asyncio.run(scenario())] == ["session.updated"]


def _long_turn() -> tuple[bytes, np.ndarray, list]:
    """A turn of about 18 s, phrases 0.45 s apart; its PCM at 16 kHz, its samples, and the REST windows of them."""
    phrases = [_speech(text, "en+m5", SAMPLE_RATE) for texts in PHRASES.values() for text in texts]
    gap = np.zeros(int(0.45 * SAMPLE_RATE), np.float32)
    pcm = _pcm16(np.concatenate([part for phrase in phrases * 2 for part in (phrase, gap)]))
    samples = PcmDecoder(SAMPLE_RATE).feed(pcm)
    windows = split_long_audio(samples, SileroVAD(), Settings().max_window_seconds)
    assert len(windows) >= 4
    return pcm, samples, windows


async def _play_long_turn(pcm: bytes, chunk_ms: int, sent_before: Callable[[RealtimeSession], None] | None = None
                          ) -> tuple[list, list]:
    """Appends of `chunk_ms`, manual commits, no partial text; `sent_before` runs once the turn is open. → the events
    before the commit (once the settled windows' text is out) and after it."""
    session = RealtimeSession(None, _runtime(), Settings(), Metrics())  # turns of up to 30 s
    await session.handle(_update(turn_detection=None, format={"type": "audio/pcm", "rate": SAMPLE_RATE},
                                 transcription={"delay": "xhigh"}))
    for event in _appends(pcm, SAMPLE_RATE, chunk_ms):
        await session.handle(json.dumps(event))
        if sent_before is not None:
            sent_before(session)
            sent_before = None
    await asyncio.wait(session.turn.window_sends)
    before_commit = await _sent(session)
    await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
    return before_commit, await _sent(session)


def _deltas(events: list) -> list[str]:
    return [event.delta for event in events if event.type.endswith("delta")]


@pytest.mark.parametrize("chunk_ms", [100, 5000])
def test_a_long_turn_is_transcribed_and_sent_window_by_window(chunk_ms: int) -> None:
    """A turn longer than a window (ZASR_MAX_WINDOW_SECONDS, 3 s) is cut as the REST endpoint cuts long audio: each
    window the rule settles is transcribed (the fake service answers how many samples it got) and its text sent while
    the turn goes on; the transcript joins the windows' answers. Before, the partial updates and the decode that
    continued their text read the whole turn as one row, longer than any clip the model was trained on. Appends of
    5 s settle several windows at once."""
    pcm, samples, windows = _long_turn()
    before_commit, after = asyncio.run(_play_long_turn(pcm, chunk_ms))
    sent = _deltas(before_commit)
    settled = [f"{window.end - window.start} samples" for window in windows[:len(sent)]]
    assert len(sent) >= len(windows) - 3 and sent == [settled[0]] + [" " + text for text in settled[1:]]
    [completed] = [event for event in after if event.type.endswith("completed")]
    rest = samples.size - windows[len(sent)].start  # the open window: from its start to the end of the turn
    assert completed.transcript == "".join(sent) + f" {rest} samples" and completed.offline_transcript is None
    assert "".join(sent + _deltas(after)) == completed.transcript


def test_text_sent_past_a_windows_cut_goes_on_in_the_next_window() -> None:
    """Partial updates decode the open window up to the end of the audio so far, so text can be sent for audio that
    the window, once settled, leaves to the next one. That text is the next window's beginning, not sent twice:
    here the first window's answer ends before the word "late" sent for it, and the next answer reads
    "late"'s audio as its first word (the fake's "<n>")."""
    pcm, _, windows = _long_turn()
    first = f"{windows[0].end - windows[0].start} samples"

    def partial_text_sent(session: RealtimeSession) -> None:
        turn = session.turn
        turn.emitted = turn.window.emitted = first + " late"

    before_commit, after = asyncio.run(_play_long_turn(pcm, 100, partial_text_sent))
    [completed] = [event for event in after if event.type.endswith("completed")]
    # the second window's answer "<n> samples" continues "late" (read as "<n>"): "late samples"
    assert completed.transcript.startswith(f"{first} late samples {windows[2].end - windows[2].start} samples")
    assert completed.transcript.count("late") == 1
    assert first + " late" + "".join(_deltas(before_commit) + _deltas(after)) == completed.transcript
    assert completed.offline_transcript is not None  # revised: the text sent is not the first answer


@pytest.mark.parametrize("rate", [16_000, 24_000])
def test_clear_drops_the_pcm_decoders_state(rate: int) -> None:
    """An odd byte and the resampler's delay line are audio from before the clear: the audio after it decodes
    as it would in a new session."""
    pcm = _pcm16(np.sin(np.arange(rate) / 7).astype(np.float32) / 2)

    async def scenario() -> np.ndarray:
        session = _session()
        await session.handle(_update(turn_detection=None, format={"type": "audio/pcm", "rate": rate},
                                     transcription={"delay": "xhigh"}))
        await session.handle(_append(pcm[:3201]))
        await session.handle(json.dumps({"type": "input_audio_buffer.clear"}))
        await session.handle(_append(pcm))
        return session.buffer.slice(session.turn.start, session.buffer.end)

    assert np.array_equal(asyncio.run(scenario()), PcmDecoder(rate).feed(pcm))


def test_server_vad_a_client_commit_takes_the_audio_held_speech_or_not() -> None:
    """As OpenAI: a commit takes the audio since the last turn even where the VAD found no speech; one of less
    than 100 ms is refused, naming what the buffer holds."""
    async def scenario() -> list:
        session = _session()
        await session.handle(_update(format={"type": "audio/pcm", "rate": 16000}, transcription={"delay": "xhigh"}))
        for _ in range(20):
            await session.handle(_append(_silence(0.1, SAMPLE_RATE)))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"}))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c2"}))
        await session.handle(_append(_silence(0.05, SAMPLE_RATE)))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c3"}))
        return await _sent(session)

    events = asyncio.run(scenario())
    assert sorted(_kinds(events[1:])) == ["committed", "completed", "error", "error"]
    completed = next(event for event in events if event.type.endswith("completed"))
    assert completed.transcript == f"{2 * SAMPLE_RATE} samples" and completed.usage.seconds == 2
    errors = [event.error for event in events if event.type == "error"]
    assert [(e.code, e.event_id) for e in errors] == [("input_audio_buffer_commit_empty", "c2"),
                                                      ("input_audio_buffer_commit_empty", "c3")]
    assert "only has 0.00ms" in errors[0].message and "only has 50.00ms" in errors[1].message


def test_server_vad_a_client_commit_takes_at_most_the_longest_turn() -> None:
    """The buffer keeps whole appends: one append of three longest turns of silence, then a commit."""
    async def scenario() -> list:
        session = _session()
        await session.handle(_update(format={"type": "audio/pcm", "rate": 16000}, transcription={"delay": "xhigh"}))
        await session.handle(_append(_silence(3 * MAX_TURN_S, SAMPLE_RATE)))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        return await _sent(session)

    completed = next(event for event in asyncio.run(scenario()) if event.type.endswith("completed"))
    assert completed.transcript == f"{int(MAX_TURN_S * SAMPLE_RATE)} samples" and completed.usage.seconds == MAX_TURN_S


def test_speech_after_the_cut_of_a_manual_turn_opens_the_next_turn_not_the_cut() -> None:
    """A manual turn of 3.9 s, server VAD switched on (quiet from there), then one append whose speech starts 1.7 s
    in: the manual turn is cut at the longest turn, and the next turn opens at the speech, not at the cut."""
    async def scenario() -> tuple[RealtimeSession, list]:
        session = _session()
        await session.handle(_update(turn_detection=None, format={"type": "audio/pcm", "rate": 16000},
                                     transcription={"delay": "xhigh"}))
        await session.handle(_append(_silence(3.9, SAMPLE_RATE)))
        await session.handle(_update(turn_detection={"type": "server_vad"}))
        session.vad = vad = _ScriptedVAD()
        vad.events, vad.in_speech = [("speech_started", int(1.7 * SAMPLE_RATE))], True
        await session.handle(_append(_silence(3, SAMPLE_RATE)))
        return session, await _sent(session)

    session, events = asyncio.run(scenario())
    speech = int(5.6 * SAMPLE_RATE)
    assert _kinds(events[2:]) == ["committed", "speech_started", "completed"]
    assert events[3].audio_start_ms == 5600 and session.turn.start == speech
    assert events[-1].transcript == f"{int(MAX_TURN_S * SAMPLE_RATE)} samples"


def test_manual_commits_at_24_khz_each_take_all_their_audio_and_no_more() -> None:
    """Each commit flushes the resampler's delay line into its turn: the same audio, committed three times, gives
    each turn a file's worth of samples; before, every turn after the first began with the ~1 ms the one before
    held back, and an empty commit was said to hold 1 ms."""
    pcm = _pcm16(np.sin(np.arange(24_000) / 7).astype(np.float32) / 2)

    async def scenario() -> list:
        session = _session()
        await session.handle(_update(turn_detection=None, transcription={"delay": "xhigh"}))
        for _ in range(3):
            await session.handle(_append(pcm))
            await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        return await _sent(session)

    events = asyncio.run(scenario())
    file_samples = load_audio(pcm16_wav(pcm, 24_000)).size
    assert [e.transcript for e in events if e.type.endswith("completed")] == [f"{file_samples} samples"] * 3
    assert [e.error.code for e in events if e.type == "error"] == ["input_audio_buffer_commit_empty"]
    assert "only has 0.00ms" in next(e for e in events if e.type == "error").error.message


def test_a_manual_turn_at_24_khz_with_its_flushed_samples_stays_within_the_longest_turn() -> None:
    """Appends that the limit lets through (it counts what came out of the resampler) up to the longest turn: the
    samples the commit flushes do not take the turn past it (a turn is one REST window, never more)."""
    longest = int(MAX_TURN_S * 24_000)

    async def scenario() -> list:
        session = _session()
        await session.handle(_update(turn_detection=None, transcription={"delay": "xhigh"}))
        for samples in (longest - 24, 24, 24):
            await session.handle(_append(bytes(2 * samples)))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        return await _sent(session)

    (completed,) = [e for e in asyncio.run(scenario()) if e.type.endswith("completed")]
    assert completed.transcript == f"{int(MAX_TURN_S * SAMPLE_RATE)} samples"


def test_a_commit_of_exactly_100_ms_at_24_khz_is_taken() -> None:
    """The resampler holds about 1 ms back: what the client sent counts (it was refused as 99 ms)."""
    async def scenario() -> list:
        session = _session()
        await session.handle(_update(turn_detection=None, transcription={"delay": "xhigh"}))
        await session.handle(_append(_silence(0.1)))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        return await _sent(session)

    assert _kinds(asyncio.run(scenario())[1:]) == ["committed", "completed"]


def test_a_client_that_stops_reading_is_gone_after_the_send_timeout() -> None:
    """A send waits while the connection's buffers are full, and neither uvicorn's pings nor the idle timeout end such
    a connection: without a time limit on sends, the session held its audio and decodes for as long as the client
    kept the connection open (a helper's probe: 3 MB unread, the gauges frozen for 90 s)."""
    appends = [_append(_silence(0.5)) for _ in range(6)]
    websocket = _FakeWebSocket([_update(turn_detection=None), *appends], reading=False)

    async def scenario() -> tuple[RealtimeSession, float]:
        session = _session(websocket, realtime_send_timeout_s=0.3)
        start = time.monotonic()
        await asyncio.wait_for(session.run(), 10)
        return session, time.monotonic() - start

    session, took = asyncio.run(scenario())
    assert session.client_gone and took < 3
    assert session.held_seconds == 0 and not session.tasks and not websocket.sent


async def _slow_to_cancel(delay: float = 0.2) -> None:
    """As a decode whose rows take a moment to leave the engine."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(delay)
        raise


def test_server_shutdown_waits_for_the_sessions_to_end() -> None:
    """RealtimeHub.close ends each session and waits until it has freed what it holds (its decodes' rows leave the
    batcher, which stops next); a session already ending (its client left) is not cancelled again, which cut its
    teardown short: no close frame, its sender left running, an error logged."""

    async def scenario(already_ending: bool) -> tuple[_FakeWebSocket, asyncio.Task, RealtimeSession]:
        hub = RealtimeHub(Settings(realtime_max_turn_seconds=MAX_TURN_S), Metrics())
        websocket = _FakeWebSocket()
        serving = asyncio.create_task(hub.serve(websocket, _runtime()))
        await asyncio.sleep(0.05)
        [session] = hub.sessions
        decode = session._spawn(_slow_to_cancel())
        if already_ending:
            session.stop()
            await asyncio.sleep(0.05)  # its teardown waits for the decode to leave
        await hub.close()
        assert decode.done() and not session.tasks
        return websocket, serving, session

    for already_ending in (False, True):
        websocket, serving, session = asyncio.run(scenario(already_ending))
        assert serving.done() and serving.exception() is None
        assert websocket.closed == (1001, "server shutting down"), already_ending
        assert json.loads(websocket.sent[0])["type"] == "session.created"


class _UvicornLikeWebSocket(_FakeWebSocket):
    """As uvicorn's websockets-sansio protocol: a send waits until the connection is writable; when the connection is
    lost, the disconnect is queued first, then the waiting send fails."""

    def __init__(self) -> None:
        super().__init__()
        self.received: asyncio.Queue[dict] = asyncio.Queue()
        self.writable = asyncio.Event()

    async def receive(self) -> dict:
        return await self.received.get()

    async def send_text(self, text: str) -> None:
        await self.writable.wait()
        raise RuntimeError("the client is gone")

    def lose_connection(self) -> None:
        self.received.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self.writable.set()


def test_a_client_that_drops_while_a_send_waits_ends_its_session_cleanly() -> None:
    """`run` reads the disconnect and begins its teardown; the waiting send then fails, and the sender must not cancel
    `run` in the middle of it (a reviewer's probe under uvicorn: "Exception in ASGI application ... CancelledError")."""
    async def scenario() -> tuple[asyncio.Task, asyncio.Task, RealtimeSession]:
        websocket = _UvicornLikeWebSocket()
        session = _session(websocket)
        running = asyncio.create_task(session.run())
        await asyncio.sleep(0.05)  # session.created waits for the connection to be writable
        decode = session._spawn(_slow_to_cancel())
        websocket.lose_connection()
        await asyncio.wait([running], timeout=5)
        return running, decode, session

    running, decode, session = asyncio.run(scenario())
    assert running.done() and not running.cancelled() and running.exception() is None
    assert decode.done() and not session.tasks and session.client_gone
