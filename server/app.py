"""The HTTP gateway: FastAPI routes speaking OpenAI's audio API, in front of the batcher and engine.

Routes: POST /v1/audio/transcriptions (json, text, srt, vtt, verbose_json; stream=true → SSE),
POST /v1/audio/language (language detection only), GET /v1/models[/{model}], GET /v1/languages,
GET /health (live), GET /ready (model loaded), GET /metrics (Prometheus exposition),
WebSocket /v1/realtime (OpenAI Realtime transcription sessions: server/realtime.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import errors
from server.allocator import keep_freed_memory
from server.audio_workers import AudioWorkers
from server.batcher import Batcher, QueueFull, TooManyRows
from server.engine import EmbeddedEngine, LanguageGuess, SpeechEngine
from server.formats import media_type, render
from server.metrics import Metrics, language_label
from server.protocol import (
    SSE_DONE,
    LanguageCandidate,
    LanguageDetection,
    LanguageInfo,
    LanguageList,
    ModelCard,
    ModelList,
    ResponseFormat,
    TranscriptionLanguage,
    TranscriptionRequest,
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptTextDeltaEvent,
    TranscriptTextDoneEvent,
    sse,
    sse_error,
)
from server.realtime import RealtimeHub
from server.service import (
    AudioTooShort,
    NoSpeech,
    TranscriptionResult,
    TranscriptionService,
    cancel_unanswered,
    require_speech,
    untagged_rows,
)
from server.settings import Settings, batch_wait_seconds, encoder_in_workers, resolve_device
from server.threads import DEFAULT_ENGINE_THREADS, use_one_thread
from server.vad import SileroVAD
from speechllm.audio import AudioDecodeError, AudioTooLong, EmptyAudioError
from speechllm.cpu_linear import EXACT_ROWS, Linear, gemm_dtype_name, resolve_gemm_dtype
from speechllm.decoder import LlamaDecoder
from speechllm.languages import BY_CODE
from speechllm.model import SpeechLLM

logger = logging.getLogger("zipper_asr")
T = TypeVar("T")
STARTED = int(time.time())


class InvalidUtf8Frame(logging.Filter):
    """uvicorn fails a WebSocket whose text frame is not UTF-8 with close code 1007, as RFC 6455 asks, and logs it
    with a traceback, as if the server had failed: the client sent a bad frame, which one warning line says."""

    UVICORN_MESSAGE = "Invalid UTF-8 sequence received from client."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.UVICORN_MESSAGE:
            record.msg, record.args = "A WebSocket client sent a text frame that is not UTF-8: closed with 1007.", ()
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info = record.exc_text = None
        return True


def quiet_invalid_utf8_frames() -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, InvalidUtf8Frame) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(InvalidUtf8Frame())


@dataclass
class Runtime:
    """What the routes use once the model is loaded."""

    engine: SpeechEngine
    batcher: Batcher
    service: TranscriptionService

    async def close(self) -> None:
        """Answer every accepted row, then release the engine and the audio workers."""
        await self.batcher.stop()
        await self.engine.close()
        self.service.audio.close()


class UploadTooLarge(Exception):
    pass


class UploadStalled(Exception):
    pass


class BodyLimits:
    """Stops reading a request body past the upload limit, Content-Length or not (chunked uploads), and when no
    part of it arrives for `idle_timeout_s` (an upload that stalls would hold its connection and its request's
    place for as long as the client likes: uvicorn has no body timeout; nginx's client_body_timeout does this).
    Once the body is complete, nothing is timed: the disconnect watch (`unless_client_leaves`) waits on. Of a
    multipart body it notes whether the closing delimiter came (`multipart_closed` in the request's state), for
    `unterminated_multipart`."""

    def __init__(self, app: ASGIApp, limit_bytes: int, idle_timeout_s: float) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0
        body_complete = False
        # the first Content-Type, as Starlette's form parser reads it
        closing = closing_delimiter(next((value for name, value in scope["headers"] if name == b"content-type"), b""))
        closed = False
        seen = b"\r\n"  # the body's last bytes, shorter than `closing` (which may arrive split over two reads); a
        # body may begin with its delimiter, which elsewhere follows a line break

        async def limited_receive() -> Message:
            nonlocal received, body_complete, closed, seen
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                raise UploadStalled from None
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if closing and not closed:
                    seen += body
                    closed = closing in seen
                    seen = seen[-(len(closing) - 1):]
                body_complete = not message.get("more_body", False)
                if body_complete and closing:
                    scope.setdefault("state", {})["multipart_closed"] = closed
            if received > self.limit_bytes:
                raise UploadTooLarge
            return message

        await self.app(scope, limited_receive, send)


def closing_delimiter(content_type: bytes) -> bytes | None:
    """What ends a multipart body (anything after it is an epilogue, which parsers ignore), for its Content-Type:
    the boundary after a line break (RFC 2046), as python-multipart finds it (a part's bytes may hold it otherwise)."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    return b"\r\n--" + boundary + b"--" if kind == b"multipart/form-data" and boundary else None


def unterminated_multipart(request: Request) -> bool:
    """Whether a multipart body (read through BodyLimits) ended without its closing delimiter: the upload was cut
    short. python-multipart does not tell: the fields parsed so far come back as if that were all, and the field
    whose part had not ended is missing (the file, or a `response_format` after it)."""
    return getattr(request.state, "multipart_closed", True) is False


class RequestMetrics:
    """Counts every HTTP request by endpoint, status and language, and times it to its last byte; answers an upload
    past the size limit (BodyLimits, inside it) with 413. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware, which this was, passes each response through a task group and memory streams, and that was
    a quarter of the event loop's time at concurrency 16 (py-spy), time in which the engine thread waits for the
    GIL between its ops."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_upload_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status: int | None = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except UploadTooLarge:  # from a route that reads the body itself (the upload routes answer it themselves)
            if status is not None:
                raise
            await errors.too_large(self.max_upload_bytes).to_response()(scope, receive, send_noting_status)
        except Exception:
            status = status or 500  # what Starlette's outermost middleware answers
            raise
        finally:  # a request cancelled before any answer (its client left) is not counted
            if status is not None:
                route = scope.get("route")
                endpoint = route.path if route is not None else "unmatched"
                language = scope.get("state", {}).get("language") or "none"
                self.metrics.requests.labels(endpoint, str(status), language).inc()
                self.metrics.request_seconds.labels(endpoint, language).observe(time.monotonic() - start)


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work` for a request whose body has been read (a transcription, a language detection), cancelled if its
    client goes away first (errors.ClientLeft, answered 499): a transcription nobody waits for any more then leaves
    the batcher and the engine (TranscriptionService: abandoned rows) instead of decoding to its end, as vLLM's
    OpenAI server does for its requests."""
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not left.cancel() and not left.cancelled():
            left.exception()  # a receive that failed (the connection broke) is a client gone too: seen, not logged
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise errors.ClientLeft
    return task.result()


async def _client_left(request: Request) -> None:
    # Once the body is read, the server's next message is the disconnect (or comes when the response is sent).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class StreamedTranscription(StreamingResponse):
    """Server-sent events of a transcription whose rows are abandoned if the response ends without them: its
    client went away while it streamed (Starlette then stops sending) or even before the first event."""

    def __init__(self, content: AsyncIterator[str], rows: list[asyncio.Future]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.rows = rows

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel_unanswered(self.rows)


def load_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    device = resolve_device(settings.device)
    encoder_gemm_dtype = resolve_gemm_dtype(settings.encoder_gemm_dtype)
    model = SpeechLLM.load(settings.model_dir, device=device, encoder_gemm_dtype=encoder_gemm_dtype)
    if device == "cpu":  # `auto` decides by the CPU: say what it chose, since transcripts differ slightly with it
        logger.info("speech encoder GEMMs in %s (ZASR_ENCODER_GEMM_DTYPE=%s)", gemm_dtype_name(encoder_gemm_dtype),
                    settings.encoder_gemm_dtype)
    if settings.encoder_gemm_dtype == "bfloat16":
        if device != "cpu":
            logger.warning("ZASR_ENCODER_GEMM_DTYPE=bfloat16 has no effect on %s (only on oneDNN, on a CPU)", device)
        elif not any(isinstance(m, Linear) for m in model.encoder.modules()):
            logger.warning("ZASR_ENCODER_GEMM_DTYPE=bfloat16 has no effect: this encoder's linear layers are not ours")
    engine: SpeechEngine
    if settings.backend == "vllm":
        from server.vllm_engine import VLLMEngine, VLLMOptions

        options = VLLMOptions(settings.vllm_tensor_parallel_size, settings.vllm_max_loras,
                              settings.vllm_max_cpu_loras, settings.vllm_max_lora_rank,
                              settings.vllm_gpu_memory_utilization, settings.vllm_dtype)
        engine = VLLMEngine(model, settings.model_dir, metrics, options, settings.lid_threshold)
        if settings.decoder_prompt_gemm_dtype != "float32":
            logger.warning("ZASR_DECODER_PROMPT_GEMM_DTYPE is the embedded decoder's: vLLM computes in ZASR_VLLM_DTYPE")
    else:
        prompt_gemm_dtype = resolve_gemm_dtype(settings.decoder_prompt_gemm_dtype)
        engine = EmbeddedEngine(model, metrics, int(settings.adapter_cache_mb * 2**20), settings.lid_threshold,
                                settings.pinned_languages, settings.max_batch_size, prompt_gemm_dtype)
        if gemm_dtype_name(prompt_gemm_dtype) != "float32":
            if device != "cpu" or not isinstance(engine.decoder, LlamaDecoder):  # (F.linear there: oneDNN's only)
                logger.warning("ZASR_DECODER_PROMPT_GEMM_DTYPE=%s has no effect on this %s decoder on %s",
                               settings.decoder_prompt_gemm_dtype, type(engine.decoder).__name__, device)
            else:
                logger.info("decoder GEMMs over more than %d rows in %s (ZASR_DECODER_PROMPT_GEMM_DTYPE=%s)",
                            EXACT_ROWS, gemm_dtype_name(prompt_gemm_dtype), settings.decoder_prompt_gemm_dtype)
        engine.preload(settings.preload_languages)
    batcher = Batcher(engine, metrics, settings.max_batch_size, batch_wait_seconds(settings, device),
                      settings.max_queue, settings.threads or DEFAULT_ENGINE_THREADS)
    try:
        audio = AudioWorkers(settings.audio_workers, SileroVAD(), settings.max_audio_seconds,
                             settings.max_window_seconds,
                             settings.model_dir if encoder_in_workers(settings, device) else None,
                             encoder_gemm_dtype, metrics)
    except BaseException:  # (a worker killed while starting, say) vLLM's processes are not left behind
        asyncio.run(engine.close())
        raise
    service = TranscriptionService(settings, batcher, audio, metrics)
    return Runtime(engine, batcher, service)


def verbose_result(result: TranscriptionResult) -> TranscriptionVerbose:
    segments = [TranscriptionSegment(id=i, start=round(s.start, 3), end=round(s.end, 3), text=s.text,
                                     avg_logprob=s.avg_logprob) for i, s in enumerate(result.segments)]
    return TranscriptionVerbose.build(
        text=result.text, segments=segments, duration=round(result.duration, 3),
        language_code=result.reported_language, language_source=result.language_source,
        language_probability=round(result.language_probability, 4), adapter=result.adapter)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keep_freed_memory()
    use_one_thread()  # until the engine sets the process's count (ZASR_THREADS: server/threads.py)
    quiet_invalid_utf8_frames()
    metrics = Metrics()
    holder: dict[str, Runtime] = {}
    realtime_hub = RealtimeHub(settings, metrics)  # WebSocket sessions (/v1/realtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                runtime = await run_in_threadpool(load_runtime, settings, metrics)
            except Exception:
                logger.exception("the model failed to load from %s", settings.model_dir)
                raise
            await runtime.batcher.start()
            holder["runtime"] = runtime
            logger.info("model loaded from %s", settings.model_dir)

        loading = asyncio.create_task(load())
        app.state.loading = loading
        yield
        await realtime_hub.close()
        if not loading.done():
            # Stopped while loading: the loading thread cannot be interrupted, and what it starts (the audio workers'
            # processes, vLLM's) would outlive the shutdown unclosed ("leaked semaphore objects" at exit). A load
            # that hangs gets as long as the requests in flight do.
            logger.info("stopping once the model has finished loading (at most %g s)", settings.shutdown_timeout_s)
            try:
                await asyncio.wait_for(asyncio.shield(loading), settings.shutdown_timeout_s)
            except TimeoutError:
                logger.warning("the model is still loading after %g s; stopping without it",
                               settings.shutdown_timeout_s)
            except Exception:
                pass  # logged by load()
        if "runtime" in holder:
            await holder["runtime"].close()

    app = FastAPI(title="zipper-asr", version="0.1.0", lifespan=lifespan)
    errors.install_error_handlers(app)
    app.add_middleware(BodyLimits, limit_bytes=settings.max_upload_bytes + 64 * 1024,  # + multipart framing
                       idle_timeout_s=settings.upload_idle_timeout_s)
    app.add_middleware(RequestMetrics, metrics=metrics, max_upload_bytes=settings.max_upload_bytes)  # outside it

    def runtime() -> Runtime:
        if "runtime" not in holder:
            loading = getattr(app.state, "loading", None)
            if loading is not None and loading.done() and loading.exception():
                raise errors.APIError(503, "The model failed to load; see the server log.", type="server_error")
            raise errors.overloaded(5, "The model is still loading. Please retry after a brief wait.")
        return holder["runtime"]

    def authorize(request: HTTPConnection) -> None:
        if not settings.api_keys:
            return  # no keys configured: the API is open (documented in the README)
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in settings.api_keys:
            raise errors.unauthorized()

    async def read_upload(request: Request) -> tuple[dict, bytes]:
        """The form fields and the uploaded file's bytes, within the size limit."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
            metrics.rejected.labels("too_large").inc()
            raise errors.too_large(settings.max_upload_bytes, declared_bytes=int(length))
        try:
            form = await request.form(max_part_size=1024 * 1024)
        except UploadTooLarge:
            metrics.rejected.labels("too_large").inc()
            raise errors.too_large(settings.max_upload_bytes) from None
        except UploadStalled:
            metrics.rejected.labels("upload_stalled").inc()
            raise errors.upload_stalled(settings.upload_idle_timeout_s) from None
        if unterminated_multipart(request):  # a field cut short would be missing, or the file itself
            raise errors.invalid_request("The multipart body ends before its closing boundary: the upload is "
                                         "incomplete.", param="file", code="incomplete_upload")
        if len(form.getlist("file")) > 1:
            raise errors.invalid_request("Send one 'file' per request.", param="file", code="invalid_value")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise errors.invalid_request("Missing required parameter: 'file'.", param="file",
                                         code="missing_required_parameter")
        data = await upload.read()
        if len(data) > settings.max_upload_bytes:
            raise errors.too_large(settings.max_upload_bytes, len(data))
        return form, data

    def check_model(model: str) -> None:
        if model not in {settings.model_name, *settings.model_aliases}:
            raise errors.model_not_found(model)

    @contextmanager
    def bad_audio_as_errors() -> Iterator[None]:
        try:
            yield
        except EmptyAudioError:
            raise errors.unsupported_audio("The audio file is empty.") from None
        except AudioDecodeError:
            raise errors.unsupported_audio() from None
        except AudioTooLong as error:
            raise errors.invalid_request(str(error), param="file", code="audio_too_long") from None
        except AudioTooShort as error:
            raise errors.invalid_request(f"{error}.", param="file", code="audio_too_short") from None
        except NoSpeech as error:
            raise errors.invalid_request(f"{error}.", param="file", code="no_speech") from None

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        authorize(request)
        form, data = await read_upload(request)
        params = TranscriptionRequest.from_form(form)
        check_model(params.model)
        request.state.language = params.language
        service = runtime().service
        try:
            with service.batcher.expecting_rows() as expected, bad_audio_as_errors():  # its rows are on their way
                if params.stream:
                    return stream_response(request, *await service.stream(data, params.language,
                                                                          params.temperature, expected))
                result = await unless_client_leaves(request, service.transcribe(
                    data, params.language, params.temperature, expected, params.response_format.timed))
        except QueueFull as full:
            metrics.rejected.labels("queue_full").inc()
            raise errors.overloaded(full.retry_after_s) from None
        except TooManyRows as error:  # refused for good: 503's Retry-After would have the client retry forever
            raise errors.invalid_request(f"The audio is too long for this server: {error}.", param="file",
                                         code="audio_too_long") from None
        except TimeoutError:
            raise errors.timeout(settings.request_timeout_s) from None
        request.state.language = language_label(result.language)
        verbose = verbose_result(result)
        return Response(render(params.response_format, verbose), media_type=media_type(params.response_format))

    def stream_response(request: Request, events: AsyncIterator[str | TranscriptionResult],
                        rows: list[asyncio.Future]) -> Response:
        async def body() -> AsyncIterator[str]:
            try:
                async for item in events:
                    if isinstance(item, TranscriptionResult):
                        request.state.language = language_label(item.language)  # counted once the stream ends
                        # No usage: the SDK's type for it counts tokens, which this engine does not report.
                        yield sse(TranscriptTextDoneEvent(
                            text=item.text, languages=[TranscriptionLanguage(code=item.reported_language)]))
                        yield SSE_DONE
                        return
                    yield sse(TranscriptTextDeltaEvent(delta=item))
            except TimeoutError:
                yield sse_error(errors.timeout(settings.request_timeout_s))
            except Exception:
                logger.exception("streaming transcription failed")
                yield sse_error(errors.internal_error())

        return StreamedTranscription(body(), rows)

    async def recording_language(data: bytes) -> LanguageGuess:
        rt = runtime()
        with bad_audio_as_errors():
            prepared = await rt.service.audio.prepare(data)
            require_speech(prepared)
        return await rt.batcher.run_exclusive(rt.engine.detect_whole, untagged_rows(prepared))

    @app.post("/v1/audio/language")
    async def detect_language(request: Request) -> LanguageDetection:
        authorize(request)
        _, data = await read_upload(request)
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                guess = await unless_client_leaves(request, recording_language(data))
        except TimeoutError:
            raise errors.timeout(settings.request_timeout_s) from None
        request.state.language = guess.language
        return LanguageDetection(language=guess.language, probability=round(guess.probability, 4),
                                 candidates=[LanguageCandidate(language=c, probability=round(p, 4))
                                             for c, p in guess.candidates])

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        authorize(request)
        return ModelList(data=[ModelCard(id=name, created=STARTED)
                               for name in [settings.model_name, *settings.model_aliases]])

    @app.get("/v1/models/{model:path}")  # `path`: a served name may hold a slash ("org/model")
    async def model(request: Request, model: str) -> ModelCard | ModelList:
        if not model:  # "/v1/models/": the list, as Starlette's redirect gave it before this route
            return await models(request)
        authorize(request)
        check_model(model)
        return ModelCard(id=model, created=STARTED)

    @app.get("/v1/languages")
    async def languages(request: Request) -> LanguageList:
        authorize(request)
        rt = runtime()
        cached = set(rt.engine.cached_adapters())
        pinned = set(rt.engine.pinned_adapters())
        infos = []
        for code in rt.engine.languages:
            key = rt.engine.adapter_key(code)
            infos.append(LanguageInfo.of(BY_CODE[code], cached=key in cached, pinned=key in pinned))
        return LanguageList(data=infos)

    # ---- realtime transcription over a WebSocket (server/realtime.py) ----
    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        try:
            authorize(websocket)  # the same Bearer keys as the REST routes
        except errors.APIError:
            await websocket.close(code=1008)  # before accepting: the handshake is refused (HTTP 403)
            return
        await realtime_hub.serve(websocket, holder.get("runtime"))

    @app.get("/v1/realtime", include_in_schema=False)
    async def realtime_over_http() -> None:
        raise errors.APIError(426, "The realtime API is a WebSocket: connect with an Upgrade to /v1/realtime.",
                              code="websocket_required", headers={"Upgrade": "websocket", "Connection": "Upgrade"})

    # HEAD too: load balancers' health checks often use it
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict:
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready() -> JSONResponse:
        if "runtime" not in holder:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": str(settings.model_dir),
                             "queue_depth_rows": holder["runtime"].batcher.depth})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["create_app", "ResponseFormat"]
