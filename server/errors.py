"""Errors as OpenAI's API sends them: `{"error": {"message", "type", "param", "code"}}` with the matching status.

Every failure the service reports goes through `APIError`, so clients built on the official `openai` SDK get its
typed exceptions (`BadRequestError`, `AuthenticationError`, `NotFoundError`, ...) with a readable message.
`install_error_handlers` makes FastAPI's own errors (validation, unknown routes, crashes) take the same shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

# The error types OpenAI uses. It puts most 4xx, 401 included, under "invalid_request_error".
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# OpenAI's own words for these cases, so messages match what clients already handle.
NOT_AUDIO = "Audio file might be corrupted or unsupported"
INTERNAL = "The server had an error while processing your request. Sorry about that!"

# Pydantic error types that mean "wrong type" rather than "wrong value"; OpenAI codes them "invalid_type".
_TYPE_ERRORS = ("_type", "_parsing")
# Where FastAPI says a field came from; not part of the parameter's name.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    # Always present, null when not applicable: OpenAI sends both keys every time.
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error to send to the client, with the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"APIError({self.status_code}, {self.message!r}, param={self.param!r}, code={self.code!r})"

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status_code, headers=self.headers)


# ---------------------------------------------------------------------------------------------------------------
# The common cases
# ---------------------------------------------------------------------------------------------------------------


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported_audio(message: str = NOT_AUDIO, *, code: str = "invalid_value") -> APIError:
    """The upload is not audio we can decode. OpenAI answers exactly this for junk bytes under a valid name.

    Keep decoder output (ffmpeg/PyAV messages) out of `message`: it is logged, not sent.
    """
    return APIError(400, message, param="file", code=code)


def too_large(limit_bytes: int, received_bytes: int | None = None, declared_bytes: int | None = None) -> APIError:
    """`received_bytes`: what was read of the body; `declared_bytes`: its Content-Length, refused before reading."""
    # OpenAI's 413 reads "Maximum content size limit (26214400) exceeded (26214850 bytes read)".
    message = f"Maximum content size limit ({limit_bytes}) exceeded"
    if received_bytes is not None:
        message += f" ({received_bytes} bytes read)"
    elif declared_bytes is not None:
        message += f" (Content-Length: {declared_bytes})"
    return APIError(413, message + ".", param="file", code="request_too_large")


def upload_stalled(idle_timeout_s: float) -> APIError:
    return APIError(408, f"The upload stalled: no part of it arrived for {idle_timeout_s:g} s.", param="file",
                    code="upload_timeout")


def unauthorized(message: str = "Incorrect API key provided.", *, code: str | None = "invalid_api_key") -> APIError:
    # OpenAI types a bad key as invalid_request_error with code invalid_api_key; the header is RFC 6750's.
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def overloaded(retry_after_s: float, message: str = "The server is currently overloaded with other requests. "
                                                   "Please retry after a brief wait.") -> APIError:
    # Retry-After takes whole seconds; round up so a client never comes back early. The openai SDK honours it
    # (up to 60 s) on its automatic retries.
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(
        503,
        message,
        type=SERVER_ERROR,
        code="overloaded",
        headers={"Retry-After": str(seconds)},
    )


def timeout(limit_s: float | None = None, what: str = "The transcription",
            advice: str | None = "Try a shorter audio file.") -> APIError:
    message = f"{what} timed out"
    if limit_s is not None:
        message += f" after {limit_s:g} s"
    # The openai SDK retries every 5xx twice by default; the same audio would only time out again, so say not to.
    return APIError(
        504,
        message + "." + (f" {advice}" if advice else ""),
        type=SERVER_ERROR,
        code="timeout",
        headers={"x-should-retry": "false"},
    )


def shown(value: str, limit: int = 100) -> str:
    """A client's value as an error message quotes it: cut short, since it can be anything up to the upload limit."""
    return value if len(value) <= limit else value[:limit] + "…"


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{shown(model)}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def internal_error() -> APIError:
    return APIError(500, INTERNAL, type=SERVER_ERROR)


# ---------------------------------------------------------------------------------------------------------------
# Validation errors: pydantic's and FastAPI's, named by parameter
# ---------------------------------------------------------------------------------------------------------------


def param_name(loc: Sequence[str | int]) -> str | None:
    """("body", "items", 0, "x") -> "items[0].x"; None when the error is about the whole body."""
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def field_error(code: str, template: str, **values: Any) -> PydanticCustomError:
    """For a pydantic validator to raise: the message is final (OpenAI's wording) and `code` becomes the error code.

    User input goes in `values` and is referenced as `{name}` in `template`, so braces in it are never expanded.
    """
    return PydanticCustomError(code, template, {**values, "verbatim": True})


def from_validation_error(error: Mapping[str, Any]) -> APIError:
    """One pydantic error dict (from `.errors()`) as a 400 naming the parameter.

    Custom errors raised by our validators carry OpenAI's wording already; pydantic's own get OpenAI's phrasing
    around pydantic's message. The offending input is never echoed: it may be a whole uploaded file.
    """
    kind = str(error.get("type", ""))
    param = param_name(error.get("loc", ()))
    if kind == "json_invalid":
        return invalid_request("We could not parse the JSON body of your request.", code="invalid_json")
    if kind == "missing":
        return invalid_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if error.get("ctx", {}).get("verbatim"):
        return invalid_request(str(error["msg"]), param, kind)
    code = "invalid_type" if kind.endswith(_TYPE_ERRORS) else "invalid_value"
    return invalid_request(f"Invalid '{param}': {error['msg']}.", param, code)


# ---------------------------------------------------------------------------------------------------------------
# FastAPI handlers
# ---------------------------------------------------------------------------------------------------------------


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return invalid_request("The request is invalid.").to_response()
    # OpenAI reports one problem at a time; the first is the one a client fixes first.
    return from_validation_error(errors[0]).to_response()


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=headers)
    if exc.status_code == 404:
        # OpenAI's answer for a path it does not serve.
        message = f"Invalid URL ({request.method} {request.url.path})"
    else:
        message = str(exc.detail)
    kind = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    return APIError(exc.status_code, message, type=kind, headers=headers).to_response()


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log only; the client gets OpenAI's generic message. (Starlette re-raises after
    # this handler so the server may log it too.)
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().to_response()


class ClientLeft(Exception):
    """The client of a request went away before its answer (server.app.unless_client_leaves)."""


# nginx's status for a request whose client went away before its answer: counted in the metrics, sent to no one
CLIENT_CLOSED_REQUEST = 499


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    # Also a client that hangs up while its upload is being read (Starlette's ClientDisconnect): its own doing, not
    # a server error, so no 500 in the metrics (the 5xx alerts) and no traceback in the log.
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app sends look like OpenAI's."""
    app.add_exception_handler(ClientLeft, _on_client_gone)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    # Starlette's class, not FastAPI's subclass, so routing's own 404/405 are caught too.
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
