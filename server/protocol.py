"""OpenAI's audio transcription API as pydantic models: the request's form fields and every response body.

Field names and types follow the official `openai` SDK's `openai.types.audio` (checked against openai 3.57), so its
clients parse our responses into their own types. Fields of ours beyond OpenAI's (`language_code`, `adapter`, ...)
are extras the SDK keeps as attributes. Serving logic lives elsewhere, as in vLLM's layout.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import APIError, field_error, from_validation_error, invalid_request, shown
from speechllm.languages import BY_CODE, LANGUAGE_CODES, Language

LanguageSource = Literal["given", "detected", "fallback"]
Granularity = Literal["segment", "word"]

_ISO_639_1_FORMAT = "Invalid language '{language}'. Language parameter must be specified in ISO-639-1 format."
# English names we accept in place of codes ("english" is what verbose_json answers, so clients echo it back).
_CODE_BY_NAME = {lang.name.lower(): lang.code for lang in BY_CODE.values()}


class ResponseFormat(StrEnum):
    JSON = "json"
    TEXT = "text"
    SRT = "srt"
    VTT = "vtt"
    VERBOSE_JSON = "verbose_json"

    @property
    def timed(self) -> bool:
        """Whether it shows segments' timestamps (server.audio_workers.speech_windows: `timed`)."""
        return self in (ResponseFormat.SRT, ResponseFormat.VTT, ResponseFormat.VERBOSE_JSON)


def _is_none(value: Any) -> bool:
    return value is None


def omitted() -> Any:
    """Default of an optional response field: None, and then left out of the JSON rather than sent as null, as
    OpenAI does (whisper-1's verbose_json has no "words" key unless asked). Holds for FastAPI's serialisation too."""
    return Field(None, exclude_if=_is_none)


# ---------------------------------------------------------------------------------------------------------------
# Languages
# ---------------------------------------------------------------------------------------------------------------


def normalize_language(value: str) -> str:
    """"EN", "en-US", "en_us", "English" -> "en". Raises a pydantic error unless the result is ISO-639-1 shaped.

    Only the shape is checked here; whether we serve the language is `check_language`'s question.
    """
    text = value.strip().lower()
    code = _CODE_BY_NAME.get(text) or text.replace("_", "-").split("-")[0]
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        raise field_error("invalid_language_format", _ISO_639_1_FORMAT, language=shown(value))
    return code


def check_language(code: str, supported: Collection[str] = LANGUAGE_CODES) -> str:
    """The normalised code if we serve it, else a 400 naming `language` and listing what we do serve."""
    try:
        code = normalize_language(code)
    except ValueError:
        raise invalid_request(_ISO_639_1_FORMAT.format(language=shown(code)), "language",
                              "invalid_language_format") from None
    if code not in supported:
        raise invalid_request(
            f"Unsupported language '{code}'. Supported languages (ISO-639-1): {', '.join(supported)}.",
            "language",
            "unsupported_language",
        )
    return code


def language_name(code: str) -> str:
    """What verbose_json's `language` holds: the English name in lower case ("english"), as whisper-1 answers."""
    return BY_CODE[code].name.lower()


# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------


class TranscriptionRequest(BaseModel):
    """The multipart form fields of POST /v1/audio/transcriptions, other than `file`.

    Unknown fields (`include[]`, `chunking_strategy`, ...) are ignored, as OpenAI ignores fields it does not know.
    """

    model_config = ConfigDict(extra="ignore")

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: ResponseFormat = ResponseFormat.JSON
    temperature: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    timestamp_granularities: list[Granularity] = Field(default_factory=lambda: ["segment"])
    stream: bool = False

    @field_validator("language", mode="before")
    @classmethod
    def _normalize_language(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        # "auto" is what many clients send to mean "detect it"; OpenAI's way is to leave the field out.
        if value.strip().lower() in ("", "auto"):
            return None
        return normalize_language(value)

    @field_validator("timestamp_granularities")
    @classmethod
    def _segments_only(cls, value: list[str]) -> list[str]:
        if "word" in value:
            raise field_error(
                "unsupported_value",
                "Word-level timestamps are not supported: timestamp_granularities may only contain 'segment'.",
            )
        return ["segment"]

    @classmethod
    def from_form(cls, form: Mapping[str, Any], supported: Collection[str] = LANGUAGE_CODES) -> Self:
        """Build from the parsed multipart form (`await request.form()`, or a plain dict); 400 `APIError` if invalid.

        Takes list fields under both names the wire uses: the openai SDK sends `timestamp_granularities[]=segment`,
        curl users often write `timestamp_granularities=segment`. Empty values count as absent.
        """
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            found = _form_values(form, name)
            if found:
                values[name] = found if name == "timestamp_granularities" else found[-1]
        try:
            request = cls.model_validate(values)
        except ValidationError as exc:
            raise from_validation_error(exc.errors()[0]) from None
        if request.language is not None:
            request.language = check_language(request.language, supported)
        if request.stream and request.response_format is not ResponseFormat.JSON:
            # A stream is transcript.text events whatever the format asked; OpenAI's streaming models take json only.
            raise invalid_request(
                f"response_format '{request.response_format}' cannot be streamed: with stream=true the transcript "
                "comes as transcript.text.delta and transcript.text.done events; leave response_format out or "
                "set it to 'json'.", "response_format", "unsupported_value")
        return request


def _form_values(form: Mapping[str, Any], name: str) -> list[Any]:
    """Every non-empty value under `name` and `name[]`, whether `form` is a multi-dict or a plain dict."""
    found: list[Any] = []
    for key in (name, f"{name}[]"):
        getlist = getattr(form, "getlist", None)
        raw = getlist(key) if getlist else form.get(key)
        if raw is None:
            continue
        for value in raw if isinstance(raw, list | tuple) else [raw]:
            if value != "":
                found.append(value)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Transcription responses
# ---------------------------------------------------------------------------------------------------------------


class UsageDuration(BaseModel):
    """Usage of a model billed by audio duration, as whisper-1 reports it."""

    type: Literal["duration"] = "duration"
    # int first so whole seconds stay integers on the wire, as OpenAI sends them; the SDK's type is float.
    seconds: int | float

    @classmethod
    def of(cls, duration_s: float) -> Self:
        # OpenAI bills whole seconds, rounded up, and reports that number ("seconds": 4 for 3.2 s of audio).
        return cls(seconds=math.ceil(duration_s))


class InputTokenDetails(BaseModel):
    audio_tokens: int | None = omitted()
    text_tokens: int | None = omitted()


class UsageTokens(BaseModel):
    """Usage of a model billed by tokens, as gpt-4o-transcribe reports it; the only kind a stream's done event
    carries in the SDK's types."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: InputTokenDetails | None = omitted()


Usage = Annotated[UsageDuration | UsageTokens, Field(discriminator="type")]


class Logprob(BaseModel):
    token: str | None = omitted()
    bytes: list[int] | None = omitted()
    logprob: float | None = omitted()


class TranscriptionLanguage(BaseModel):
    """An entry of `languages`: what gpt-transcribe reports as the languages detected in the audio."""

    code: str


class Transcription(BaseModel):
    """The `json` response format."""

    text: str
    languages: list[TranscriptionLanguage] | None = omitted()
    logprobs: list[Logprob] | None = omitted()
    usage: Usage | None = omitted()


class TranscriptionSegment(BaseModel):
    """A segment of verbose_json, with whisper's fields. The quality fields default to neutral values for a
    decoder that does not compute them; the SDK requires every one of them to be present."""

    id: int
    seek: int = 0
    start: float = Field(ge=0.0)
    end: float = Field(ge=0.0)
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 1.0
    no_speech_prob: float = 0.0

    @model_validator(mode="after")
    def _ends_after_start(self) -> Self:
        if self.end < self.start:
            raise ValueError(f"segment {self.id} ends ({self.end}) before it starts ({self.start})")
        return self


class TranscriptionVerbose(BaseModel):
    """The `verbose_json` response format, plus our extension fields."""

    task: Literal["transcribe"] = "transcribe"
    # OpenAI's field holds the language's English name in lower case ("english"), not a code.
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] = Field(default_factory=list)
    usage: UsageDuration | None = omitted()
    # Extensions: the ISO code, how we came by it, and which adapter transcribed.
    language_code: str
    language_probability: float | None = omitted()
    language_source: LanguageSource
    adapter: str | None = omitted()

    @classmethod
    def build(
        cls,
        *,
        text: str,
        segments: list[TranscriptionSegment],
        duration: float,
        language_code: str,
        language_source: LanguageSource,
        language_probability: float | None = None,
        adapter: str | None = None,
    ) -> Self:
        """Fills `language` and `usage` from the code and duration, so the two spellings cannot disagree."""
        return cls(
            language=language_name(language_code),
            duration=duration,
            text=text,
            segments=segments,
            usage=UsageDuration.of(duration),
            language_code=language_code,
            language_probability=language_probability,
            language_source=language_source,
            adapter=adapter,
        )

    def to_json_format(self) -> Transcription:
        """The same result as the plain `json` response format gives it."""
        return Transcription(
            text=self.text, languages=[TranscriptionLanguage(code=self.language_code)], usage=self.usage
        )


# ---------------------------------------------------------------------------------------------------------------
# Streaming (stream=true): server-sent events
# ---------------------------------------------------------------------------------------------------------------


class TranscriptTextDeltaEvent(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    logprobs: list[Logprob] | None = omitted()


class TranscriptTextDoneEvent(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    languages: list[TranscriptionLanguage] | None = omitted()
    logprobs: list[Logprob] | None = omitted()
    usage: UsageTokens | None = omitted()


TranscriptStreamEvent = TranscriptTextDeltaEvent | TranscriptTextDoneEvent

# The openai SDK stops at a `[DONE]` data line but does not need one: the stream may also just end after the done
# event. Send it for clients written against chat completions, which wait for it.
SSE_DONE = "data: [DONE]\n\n"


def sse(event: BaseModel) -> str:
    """One event in the form the openai SDK's stream parser reads: a `data:` line holding the JSON, then a blank
    line. No `event:` line is needed; the SDK picks the type from the JSON's `type`. The JSON is compact and
    escapes newlines inside strings, so it always fits on one line."""
    return f"data: {event.model_dump_json()}\n\n"


def sse_error(error: APIError) -> str:
    """An error after the stream has started (the 200 is already sent): the SDK raises `openai.APIError` with this
    message when a data line holds an `error` object."""
    return f"data: {error.body().model_dump_json()}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# Models and languages
# ---------------------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zipper-asr"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LanguageInfo(BaseModel):
    code: str
    name: str
    tier: str
    adapter_cached: bool
    adapter_pinned: bool

    @classmethod
    def of(cls, language: Language, *, cached: bool, pinned: bool) -> Self:
        return cls(code=language.code, name=language.name, tier=str(language.tier), adapter_cached=cached,
                   adapter_pinned=pinned)


class LanguageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LanguageInfo]


class LanguageCandidate(BaseModel):
    language: str
    probability: float = Field(ge=0.0, le=1.0)


class LanguageDetection(BaseModel):
    """The language-detection endpoint's answer: the best guess and the runners-up, most probable first."""

    language: str
    probability: float = Field(ge=0.0, le=1.0)
    candidates: list[LanguageCandidate] = Field(default_factory=list)
