"""server.protocol, server.errors and server.formats: OpenAI's wire format, checked against the official SDK.

A tiny FastAPI app stands in for the service. The SDK tests send the `openai` client's real requests into it
through a mock transport, so both directions are checked: what the SDK sends, and that it parses what we answer.
"""

from __future__ import annotations

import asyncio
import importlib
import json

import pytest
from fastapi import FastAPI, Form, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from fastapi.testclient import TestClient
from starlette.datastructures import FormData

from server import errors
from server.errors import APIError, install_error_handlers
from server.formats import media_type, render, render_srt, render_text, render_vtt, timestamp
from server.protocol import (
    SSE_DONE,
    LanguageCandidate,
    LanguageDetection,
    LanguageInfo,
    LanguageList,
    ModelCard,
    ModelList,
    ResponseFormat,
    Transcription,
    TranscriptionRequest,
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptTextDeltaEvent,
    TranscriptTextDoneEvent,
    UsageTokens,
    check_language,
    sse,
    sse_error,
)
from speechllm.languages import BY_CODE, LANGUAGE_CODES

SEGMENTS = [
    TranscriptionSegment(id=0, start=0.0, end=2.5, text=" Hello there."),
    TranscriptionSegment(id=1, start=2.5, end=61.04, text=" How are you?"),
    TranscriptionSegment(id=2, start=3725.5, end=3727.0, text=" Goodbye."),
]


def verbose_result() -> TranscriptionVerbose:
    return TranscriptionVerbose.build(
        text="Hello there. How are you? Goodbye.",
        segments=SEGMENTS,
        duration=3727.2,
        language_code="en",
        language_source="detected",
        language_probability=0.97,
        adapter="en@v1",
    )


# ---------------------------------------------------------------------------------------------------------------
# Languages
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "code"),
    [("en", "en"), ("EN", "en"), ("en-US", "en"), ("en_us", "en"), (" pt-BR ", "pt"), ("English", "en")],
)
def test_language_is_normalised(given: str, code: str) -> None:
    assert check_language(given) == code
    assert TranscriptionRequest.from_form({"model": "m", "language": given}).language == code


@pytest.mark.parametrize("given", ["", "auto", "AUTO"])
def test_language_left_to_detection(given: str) -> None:
    assert TranscriptionRequest.from_form({"model": "m", "language": given}).language is None


def test_unsupported_language_lists_supported_codes() -> None:
    with pytest.raises(APIError) as caught:
        TranscriptionRequest.from_form({"model": "m", "language": "zh"})
    err = caught.value
    assert (err.status_code, err.param, err.code) == (400, "language", "unsupported_language")
    assert all(code in err.message for code in LANGUAGE_CODES)


@pytest.mark.parametrize("given", ["eng", "e1", "-en", "日本"])
def test_malformed_language_is_rejected(given: str) -> None:
    with pytest.raises(APIError) as caught:
        check_language(given)
    err = caught.value
    assert (err.status_code, err.param, err.code) == (400, "language", "invalid_language_format")
    assert err.message == f"Invalid language '{given}'. Language parameter must be specified in ISO-639-1 format."


def test_errors_quote_a_client_s_value_cut_short() -> None:
    """A 500 KB `language` or a 100 KB `model` was quoted in full in its error message."""
    huge = "x" * 500_000
    for raise_it in (lambda: check_language(huge), lambda: TranscriptionRequest.from_form({"model": "m",
                                                                                          "language": huge})):
        with pytest.raises(APIError) as caught:
            raise_it()
        assert caught.value.code == "invalid_language_format" and len(caught.value.message) < 300
    assert len(errors.model_not_found(huge).message) < 300 and "x" * 100 + "…" in errors.model_not_found(huge).message


def test_check_language_takes_a_narrower_set() -> None:
    assert check_language("de", supported=["de"]) == "de"
    with pytest.raises(APIError):
        check_language("en", supported=["de"])


# ---------------------------------------------------------------------------------------------------------------
# The request's form
# ---------------------------------------------------------------------------------------------------------------


def test_form_defaults() -> None:
    request = TranscriptionRequest.from_form({"model": "zipper-asr"})
    assert request.response_format is ResponseFormat.JSON
    assert (request.temperature, request.stream, request.timestamp_granularities) == (0.0, False, ["segment"])
    assert request.language is None and request.prompt is None


def test_form_as_the_sdk_sends_it() -> None:
    # A multi-dict like Starlette's, with the SDK's `name[]` spelling for lists and unknown fields it may add.
    form = FormData(
        [("model", "zipper-asr"), ("language", "fr"), ("prompt", "Bonjour"), ("response_format", "json"),
         ("temperature", "0.4"), ("stream", "true"), ("timestamp_granularities[]", "segment"),
         ("include[]", "logprobs")]
    )
    request = TranscriptionRequest.from_form(form)
    assert request.model_dump() == {
        "model": "zipper-asr", "language": "fr", "prompt": "Bonjour", "response_format": ResponseFormat.JSON,
        "temperature": 0.4, "timestamp_granularities": ["segment"], "stream": True,
    }


GRANULARITIES = "timestamp_granularities"


@pytest.mark.parametrize(
    ("form", "param", "code"),
    [
        ({}, "model", "missing_required_parameter"),
        ({"model": ""}, "model", "missing_required_parameter"),
        ({"model": "m", "temperature": "1.5"}, "temperature", "invalid_value"),
        ({"model": "m", "temperature": "-0.1"}, "temperature", "invalid_value"),
        ({"model": "m", "temperature": "nan"}, "temperature", "invalid_value"),
        ({"model": "m", "temperature": "hot"}, "temperature", "invalid_type"),
        ({"model": "m", "stream": "maybe"}, "stream", "invalid_type"),
        ({"model": "m", "response_format": "diarized_json"}, "response_format", "invalid_value"),
        ({"model": "m", "timestamp_granularities[]": ["segment", "word"]}, GRANULARITIES, "unsupported_value"),
        ({"model": "m", "timestamp_granularities": "word"}, GRANULARITIES, "unsupported_value"),
        *(({"model": "m", "stream": "true", "response_format": f}, "response_format", "unsupported_value")
          for f in ("text", "srt", "vtt", "verbose_json")),
    ],
)
def test_form_errors_name_the_param(form: dict, param: str, code: str) -> None:
    with pytest.raises(APIError) as caught:
        TranscriptionRequest.from_form(form)
    err = caught.value
    assert (err.status_code, err.type, err.param, err.code) == (400, "invalid_request_error", param, code)
    assert param in err.message


def test_word_granularity_error_says_what_is_supported() -> None:
    with pytest.raises(APIError) as caught:
        TranscriptionRequest.from_form({"model": "m", "timestamp_granularities[]": "word"})
    assert "Word-level timestamps are not supported" in caught.value.message


# ---------------------------------------------------------------------------------------------------------------
# Errors through FastAPI
# ---------------------------------------------------------------------------------------------------------------

HELPERS = {
    "invalid": lambda: errors.invalid_request("Bad prompt.", "prompt", "invalid_value"),
    "audio": errors.unsupported_audio,
    "large": lambda: errors.too_large(26_214_400, 26_214_850),
    "auth": errors.unauthorized,
    "busy": lambda: errors.overloaded(2.2),
    "slow": lambda: errors.timeout(300),
    "model": lambda: errors.model_not_found("whisper-9"),
}


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    def raise_helper(name: str) -> None:
        raise HELPERS[name]()

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("secret internals at /srv/model.bin")

    @app.get("/typed")
    def typed(n: int) -> dict:
        return {"n": n}

    @app.post("/form")
    def form(model: str = Form(...)) -> dict:
        return {"model": model}

    @app.get("/done")
    def done() -> TranscriptTextDoneEvent:
        return TranscriptTextDoneEvent(text="hi")

    # Starlette re-raises unhandled errors after the 500 handler ran; the client must not re-raise them here.
    return TestClient(app, raise_server_exceptions=False)


def error_of(response) -> dict:
    body = response.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    return body["error"]


@pytest.mark.parametrize(
    ("name", "status", "kind", "param", "code"),
    [
        ("invalid", 400, "invalid_request_error", "prompt", "invalid_value"),
        ("audio", 400, "invalid_request_error", "file", "invalid_value"),
        ("large", 413, "invalid_request_error", "file", "request_too_large"),
        ("auth", 401, "invalid_request_error", None, "invalid_api_key"),
        ("busy", 503, "server_error", None, "overloaded"),
        ("slow", 504, "server_error", None, "timeout"),
        ("model", 404, "invalid_request_error", "model", "model_not_found"),
    ],
)
def test_error_helpers_render_openai_json(app_client, name, status, kind, param, code) -> None:
    response = app_client.get(f"/raise/{name}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == (kind, param, code)
    assert error["message"] == HELPERS[name]().message


def test_error_headers(app_client) -> None:
    assert app_client.get("/raise/auth").headers["www-authenticate"] == "Bearer"
    assert app_client.get("/raise/busy").headers["retry-after"] == "3"
    assert app_client.get("/raise/slow").headers["x-should-retry"] == "false"
    assert "26214400" in app_client.get("/raise/large").json()["error"]["message"]


def test_unexpected_exception_is_a_bare_500(app_client, caplog) -> None:
    with caplog.at_level("ERROR", logger="server.errors"):
        response = app_client.get("/crash")
    assert response.status_code == 500
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, None)
    assert "secret" not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text
    # ... while the log keeps the whole traceback.
    assert any(record.exc_info and "secret internals" in str(record.exc_info[1]) for record in caplog.records)


def test_unknown_route_and_method(app_client) -> None:
    response = app_client.get("/v1/nope")
    assert response.status_code == 404
    assert error_of(response) == {"message": "Invalid URL (GET /v1/nope)", "type": "invalid_request_error",
                                  "param": None, "code": None}
    response = app_client.delete("/crash")
    assert response.status_code == 405
    assert error_of(response)["type"] == "invalid_request_error"


def test_fastapi_validation_errors_are_400_naming_the_param(app_client) -> None:
    error = error_of(response := app_client.get("/typed", params={"n": "many"}))
    assert response.status_code == 400
    assert (error["param"], error["code"]) == ("n", "invalid_type")
    error = error_of(response := app_client.post("/form", data={}))
    assert response.status_code == 400
    assert (error["param"], error["code"]) == ("model", "missing_required_parameter")


def test_fastapi_serialisation_omits_unset_optionals(app_client) -> None:
    assert app_client.get("/done").json() == {"type": "transcript.text.done", "text": "hi"}


def test_openapi_describes_response_bodies(app_client) -> None:
    schema = app_client.app.openapi()["components"]["schemas"]["TranscriptTextDoneEvent"]
    assert {"type", "text", "usage"} <= set(schema["properties"])


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


def test_timestamps() -> None:
    assert timestamp(0, ",") == "00:00:00,000"
    assert timestamp(61.04, ",") == "00:01:01,040"
    assert timestamp(3725.5, ".") == "01:02:05.500"
    assert timestamp(59.9996, ".") == "00:01:00.000"  # rounds into the next second cleanly
    assert timestamp(100 * 3600, ",") == "100:00:00,000"


def test_srt() -> None:
    assert render_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n00:00:02,500 --> 00:01:01,040\nHow are you?\n\n"
        "3\n01:02:05,500 --> 01:02:07,000\nGoodbye.\n\n"
    )


def test_vtt() -> None:
    assert render_vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
        "00:00:02.500 --> 00:01:01.040\nHow are you?\n\n"
        "01:02:05.500 --> 01:02:07.000\nGoodbye.\n\n"
    )


def test_text() -> None:
    assert render_text(" Hello there. How are you? ") == "Hello there. How are you?\n"


def test_empty_and_awkward_segments() -> None:
    assert render_srt([]) == ""
    assert render_vtt([]) == "WEBVTT\n\n"
    awkward = [
        TranscriptionSegment(id=0, start=0, end=1, text="  "),
        TranscriptionSegment(id=1, start=1, end=2, text="a --> b\n\n\nc"),
    ]
    # Empty cues are dropped (numbering stays consecutive); nothing in a cue can end it or read as a timing line.
    assert render_srt(awkward) == "1\n00:00:01,000 --> 00:00:02,000\na -> b\nc\n\n"


def test_segment_must_not_end_before_it_starts() -> None:
    with pytest.raises(ValueError):
        TranscriptionSegment(id=0, start=2, end=1, text="x")


def test_render_and_media_types() -> None:
    result = verbose_result()
    assert json.loads(render("json", result)) == {
        "text": result.text, "languages": [{"code": "en"}], "usage": {"type": "duration", "seconds": 3728}
    }
    verbose = json.loads(render(ResponseFormat.VERBOSE_JSON, result))
    assert (verbose["language"], verbose["language_code"], verbose["adapter"]) == ("english", "en", "en@v1")
    assert render("srt", result) == render_srt(SEGMENTS)
    assert render("text", result) == result.text + "\n"
    assert media_type("json") == media_type("verbose_json") == "application/json"
    assert media_type("text").startswith("text/plain") and media_type(ResponseFormat.VTT).startswith("text/vtt")


def test_verbose_language_is_the_lower_case_english_name() -> None:
    for code, language in BY_CODE.items():
        kwargs = {"text": "", "segments": [], "duration": 1.0, "language_source": "given"}
        assert TranscriptionVerbose.build(language_code=code, **kwargs).language == language.name.lower()


# ---------------------------------------------------------------------------------------------------------------
# Server-sent events
# ---------------------------------------------------------------------------------------------------------------


def parse_sse(stream: str) -> list[str]:
    """The data of each event, split as the SSE spec (and the openai SDK) splits it."""
    assert stream.endswith("\n\n")
    events = []
    for block in stream.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines)
        events.append("\n".join(line[len("data: "):] for line in lines))
    return events


def test_sse_round_trips() -> None:
    delta = TranscriptTextDeltaEvent(delta="line one\nlíne two")
    done = TranscriptTextDoneEvent(text="line one\nlíne two", usage=UsageTokens(input_tokens=5, output_tokens=3,
                                                                                total_tokens=8))
    data = parse_sse(sse(delta) + sse(done) + SSE_DONE)
    assert TranscriptTextDeltaEvent.model_validate_json(data[0]) == delta
    assert TranscriptTextDoneEvent.model_validate_json(data[1]) == done
    assert data[2] == "[DONE]"
    assert json.loads(data[0]) == {"type": "transcript.text.delta", "delta": "line one\nlíne two"}


def test_sse_error() -> None:
    (data,) = parse_sse(sse_error(errors.timeout()))
    assert json.loads(data)["error"]["code"] == "timeout"


# ---------------------------------------------------------------------------------------------------------------
# The official SDK
# ---------------------------------------------------------------------------------------------------------------


def test_bodies_validate_with_the_sdk_types() -> None:
    openai = pytest.importorskip("openai")
    from openai.types.audio import (
        TranscriptionTextDeltaEvent,
        TranscriptionTextDoneEvent,
    )

    result = verbose_result()
    parsed = openai.types.audio.TranscriptionVerbose.model_validate(result.model_dump(mode="json"))
    assert parsed.language == "english" and parsed.segments[2].end == 3727.0 and parsed.usage.seconds == 3728
    assert parsed.language_code == "en"  # our extensions survive as extra attributes
    plain = openai.types.audio.Transcription.model_validate(result.to_json_format().model_dump(mode="json"))
    assert plain.usage.type == "duration"
    tokens = Transcription(text="x", usage=UsageTokens(input_tokens=1, output_tokens=2, total_tokens=3))
    assert openai.types.audio.Transcription.model_validate(tokens.model_dump(mode="json")).usage.type == "tokens"
    TranscriptionTextDeltaEvent.model_validate(TranscriptTextDeltaEvent(delta="a").model_dump(mode="json"))
    done = TranscriptTextDoneEvent(text="a", usage=UsageTokens(input_tokens=1, output_tokens=1, total_tokens=2))
    TranscriptionTextDoneEvent.model_validate(done.model_dump(mode="json"))
    models = ModelList(data=[ModelCard(id="zipper-asr", created=1_700_000_000)])
    assert openai.types.Model.model_validate(models.model_dump(mode="json")["data"][0]).owned_by == "zipper-asr"


def test_our_own_bodies_serialise() -> None:
    languages = LanguageList(data=[LanguageInfo.of(BY_CODE["th"], cached=True, pinned=False)])
    assert languages.model_dump(mode="json") == {"object": "list", "data": [
        {"code": "th", "name": "Thai", "tier": "mid", "adapter_cached": True, "adapter_pinned": False}]}
    detection = LanguageDetection(language="de", probability=0.9,
                                  candidates=[LanguageCandidate(language="de", probability=0.9)])
    assert detection.model_dump(mode="json")["candidates"] == [{"language": "de", "probability": 0.9}]


@pytest.fixture(scope="module")
def sdk():
    """An `openai.OpenAI` client whose requests reach a tiny app built on our protocol, in process."""
    openai = pytest.importorskip("openai")
    # The SDK's own HTTP library: httpx in older releases, httpx2 in newer ones; both have MockTransport.
    client_class = next(c for c in openai.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    http = importlib.import_module(client_class.__module__.split(".")[0])

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/audio/transcriptions")
    async def transcribe(request: Request) -> Response:
        form = await request.form()
        params = TranscriptionRequest.from_form(form)
        if (await form["file"].read()) != b"RIFF":
            raise errors.unsupported_audio()
        result = verbose_result()
        if params.stream:
            events = [sse(TranscriptTextDeltaEvent(delta=s.text)) for s in SEGMENTS]
            if params.prompt == "fail":
                events.append(sse_error(errors.timeout()))
            events.append(sse(TranscriptTextDoneEvent(text=result.text)))
            return StreamingResponse(iter(events), media_type="text/event-stream")
        fmt = params.response_format
        return Response(render(fmt, result), media_type=media_type(fmt))

    local = TestClient(app, raise_server_exceptions=False)

    def forward(request):
        answer = local.request(request.method, request.url.path, headers=dict(request.headers), content=request.read())
        return http.Response(answer.status_code, headers=answer.headers.multi_items(), content=answer.content)

    transport = http.MockTransport(forward)
    client = http.Client(transport=transport)
    return openai.OpenAI(api_key="sk-test", base_url="http://zipper.test/v1", http_client=client, max_retries=0)


AUDIO = ("clip.wav", b"RIFF", "audio/wav")


def test_sdk_json_and_verbose(sdk) -> None:
    plain = sdk.audio.transcriptions.create(model="zipper-asr", file=AUDIO, language="en")
    assert plain.text == "Hello there. How are you? Goodbye." and plain.usage.seconds == 3728
    verbose = sdk.audio.transcriptions.create(
        model="zipper-asr", file=AUDIO, response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert verbose.language == "english" and [s.id for s in verbose.segments] == [0, 1, 2]
    assert verbose.model_extra["language_source"] == "detected"


def test_sdk_subtitles(sdk) -> None:
    srt = sdk.audio.transcriptions.create(model="zipper-asr", file=AUDIO, response_format="srt")
    assert srt == render_srt(SEGMENTS)
    vtt = sdk.audio.transcriptions.create(model="zipper-asr", file=AUDIO, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")


def test_sdk_stream(sdk) -> None:
    events = list(sdk.audio.transcriptions.create(model="zipper-asr", file=AUDIO, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == " Hello there. How are you? Goodbye."


def test_sdk_errors(sdk) -> None:
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.audio.transcriptions.create(model="zipper-asr", file=AUDIO, timestamp_granularities=["word"])
    assert (caught.value.param, caught.value.code) == ("timestamp_granularities", "unsupported_value")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.audio.transcriptions.create(model="zipper-asr", file=("x.wav", b"junk", "audio/wav"))
    # The SDK prefixes its exception's message ("Error code: 400 - ..."); the body is ours as sent.
    assert caught.value.body["message"] == errors.NOT_AUDIO and caught.value.param == "file"
    with pytest.raises(openai.APIError, match="timed out"):
        list(sdk.audio.transcriptions.create(model="zipper-asr", file=AUDIO, stream=True, prompt="fail"))


def test_request_metrics_count_answers_errors_and_pass_websockets_through() -> None:
    from server.app import RequestMetrics
    from server.metrics import Metrics

    metrics = Metrics()
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=metrics, max_upload_bytes=10)

    @app.get("/ok/{name}")
    def ok(name: str, request: Request) -> dict:
        request.state.language = "fr"
        return {"name": name}

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("boom")

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/ok/a").status_code == 200 and client.get("/ok/b").status_code == 200
    assert client.get("/crash").status_code == 500
    assert client.get("/nope").status_code == 404
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("hi")
        assert websocket.receive_text() == "hi"

    def counted(endpoint: str, status: str, language: str) -> float | None:
        return metrics.registry.get_sample_value("zasr_requests_total", {"endpoint": endpoint, "status": status,
                                                                         "language": language})

    assert counted("/ok/{name}", "200", "fr") == 2
    assert counted("/crash", "500", "none") == 1
    assert counted("unmatched", "404", "none") == 1
    assert metrics.registry.get_sample_value("zasr_request_duration_seconds_count",
                                             {"endpoint": "/ok/{name}", "language": "fr"}) == 2
    assert sum(sample.value for family in metrics.registry.collect() if family.name == "zasr_requests"
               for sample in family.samples if sample.name == "zasr_requests_total") == 4  # not the websocket


def test_a_streamed_transcription_abandons_its_rows_when_its_client_leaves_before_the_first_event() -> None:
    """The client is gone before the stream starts: its event generator never runs (so no code of its own could
    cancel anything), and the response cancels the rows not answered yet, which abandons them (Batcher)."""
    from server.app import StreamedTranscription

    started = []

    async def events():
        started.append(True)
        yield "data: never\n\n"

    async def scenario() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        waiting, answered = loop.create_future(), loop.create_future()
        answered.set_result("text")

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await asyncio.sleep(0.05)  # the disconnect is seen first

        response = StreamedTranscription(events(), [waiting, answered])
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        return waiting.cancelled(), answered.cancelled()

    assert asyncio.run(scenario()) == (True, False) and not started
