"""OpenAI's Realtime API for transcription sessions, as pydantic models: the events clients send and the events
we answer with. The serving logic is in server/realtime.py.

Shapes follow the official `openai` SDK (checked against openai 3.57): `openai.types.realtime` for the current
(GA) protocol, whose `session.update` carries `{"type": "transcription", "audio": {"input": {...}}}`, and
`openai.types.beta.realtime` for the older `transcription_session.update` shape, which is accepted too. Unknown
fields are ignored, as OpenAI ignores them. Fields of ours beyond OpenAI's are marked as extensions.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from server.errors import APIError, from_validation_error, invalid_request, shown
from server.protocol import TranscriptionLanguage, UsageDuration, omitted


def new_id(prefix: str) -> str:
    """OpenAI-style ids: `event_…`, `item_…`, `sess_…`."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


Delay = Literal["minimal", "low", "medium", "high", "xhigh"]


# ---------------------------------------------------------------------------------------------------------------
# Client events
# ---------------------------------------------------------------------------------------------------------------


class ClientModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _as_json_types_it(kind: Literal["int", "float"], noun: str) -> BeforeValidator:
    """A number as JSON types it: a rate of "24000" or a threshold of "0.5" (or true) is the client's bug to hear
    of, not something to coerce. (A whole float, 500.0, still counts as an integer: `0.5 * 1000` is a number.)"""
    def check(value: Any) -> Any:
        if isinstance(value, str | bool):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {noun}")
        return value

    return BeforeValidator(check)


JsonInt = Annotated[int, _as_json_types_it("int", "integer")]
JsonFloat = Annotated[float, _as_json_types_it("float", "number")]


class AudioFormat(ClientModel):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: JsonInt | None = None  # OpenAI: always 24000; 16000 is our extension


class TranscriptionOptions(ClientModel):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None  # accepted, not used by this model (as on the REST endpoint)
    # How long text may wait for confirmation (OpenAI's field): here, how many consecutive partial hypotheses
    # must agree before text is sent; "xhigh" sends text only once the turn's audio is complete.
    delay: Delay | None = None


class TurnDetectionOptions(ClientModel):
    type: Literal["server_vad", "semantic_vad"]  # required, as in OpenAI's API
    threshold: JsonFloat | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: JsonInt | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: JsonInt | None = Field(None, ge=1, le=10_000)


class AudioInputOptions(ClientModel):
    format: AudioFormat | None = None
    transcription: TranscriptionOptions | None = None
    turn_detection: TurnDetectionOptions | None = None  # present and null: the client commits turns itself
    noise_reduction: dict[str, Any] | None = None  # accepted, not applied


class AudioOptions(ClientModel):
    input: AudioInputOptions | None = None


class SessionOptions(ClientModel):
    type: Literal["transcription", "realtime"]
    audio: AudioOptions | None = None
    include: list[str] | None = None


class SessionUpdate(ClientModel):
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionOptions


class BetaSessionOptions(ClientModel):
    """The older shape: `transcription_session.update`'s session (openai.types.beta.realtime)."""

    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None  # pcm16: 24 kHz
    input_audio_transcription: TranscriptionOptions | None = None
    turn_detection: TurnDetectionOptions | None = None
    input_audio_noise_reduction: dict[str, Any] | None = None
    include: list[str] | None = None


class BetaSessionUpdate(ClientModel):
    type: Literal["transcription_session.update"]
    event_id: str | None = None
    session: BetaSessionOptions


class InputAudioBufferAppend(ClientModel):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str  # base64 of the PCM bytes


class InputAudioBufferCommit(ClientModel):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class InputAudioBufferClear(ClientModel):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


ClientEvent = (SessionUpdate | BetaSessionUpdate | InputAudioBufferAppend | InputAudioBufferCommit
               | InputAudioBufferClear)
CLIENT_EVENTS: dict[str, type[ClientModel]] = {
    "session.update": SessionUpdate,
    "transcription_session.update": BetaSessionUpdate,
    "input_audio_buffer.append": InputAudioBufferAppend,
    "input_audio_buffer.commit": InputAudioBufferCommit,
    "input_audio_buffer.clear": InputAudioBufferClear,
}


class ClientEventError(Exception):
    """A client event we cannot act on: answered with an `error` event naming the event, the connection stays."""

    def __init__(self, error: APIError, event_id: str | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.event_id = event_id


def parse_client_event(text: str) -> ClientEvent:
    """One WebSocket text message → a client event, or ClientEventError saying what is wrong with it."""
    try:
        data = json.loads(text)
        # JSON's \ud800-style escapes; base64 audio has no backslash
        lone_surrogate = "\\u" in text and _has_lone_surrogate(data)
    except ValueError:
        raise ClientEventError(invalid_request("The message is not valid JSON.", code="invalid_json")) from None
    except RecursionError:  # json.loads, or json.dumps in the check, on arrays or objects nested ~1000 deep
        raise ClientEventError(invalid_request("The message is nested too deeply.", code="invalid_json")) from None
    if not isinstance(data, dict):
        raise ClientEventError(invalid_request("A client event must be a JSON object.", code="invalid_json"))
    if lone_surrogate:
        raise ClientEventError(invalid_request("The message contains an unpaired UTF-16 surrogate escape "
                                               "(\\ud800-\\udfff), which is not text.", code="invalid_json"))
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ClientEventError(invalid_request("Missing required parameter: 'type'.", "type",
                                               "missing_required_parameter"), event_id)
    model = CLIENT_EVENTS.get(kind)
    if model is None:
        supported = ", ".join(f"'{name}'" for name in CLIENT_EVENTS)
        raise ClientEventError(invalid_request(
            f"Invalid value: '{shown(kind)}'. Supported values in a transcription session are: {supported}.",
            "type", "invalid_value"), event_id)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ClientEventError(from_validation_error(error.errors()[0]), event_id) from None


def _has_lone_surrogate(data: object) -> bool:
    """Whether a parsed JSON value holds a string that is not valid Unicode text: such a string could be neither
    echoed back (event_id, language, prompt) nor written into any reply."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# The session as the server reports it (session.created / session.updated)
# ---------------------------------------------------------------------------------------------------------------


class PcmFormat(BaseModel):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: int = 24_000


class SessionTranscription(BaseModel):
    model: str
    language: str | None = None
    prompt: str = ""
    delay: Delay | None = omitted()


class ServerVad(BaseModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


class SessionAudioInput(BaseModel):
    format: PcmFormat = Field(default_factory=PcmFormat)
    transcription: SessionTranscription
    turn_detection: ServerVad | None = Field(default_factory=ServerVad)  # None: manual commits
    noise_reduction: None = None


class SessionAudio(BaseModel):
    input: SessionAudioInput


class TranscriptionSession(BaseModel):
    """A transcription session's effective configuration (the SDK's RealtimeTranscriptionSessionCreateResponse)."""

    id: str = Field(default_factory=lambda: new_id("sess"))
    object: Literal["realtime.transcription_session"] = "realtime.transcription_session"
    type: Literal["transcription"] = "transcription"
    audio: SessionAudio
    include: list[str] | None = None

    @property
    def input(self) -> SessionAudioInput:
        return self.audio.input


class BetaTranscriptionSession(BaseModel):
    """The same configuration in the older shape, for clients that sent `transcription_session.update`."""

    id: str
    object: Literal["realtime.transcription_session"] = "realtime.transcription_session"
    input_audio_format: str  # "pcm16" (24 kHz); "pcm16_16000" is our 16 kHz extension
    input_audio_transcription: SessionTranscription
    turn_detection: ServerVad | None
    input_audio_noise_reduction: None = None
    include: list[str] | None = None
    modalities: list[str] = Field(default_factory=lambda: ["text"])
    client_secret: None = None

    @classmethod
    def of(cls, session: TranscriptionSession) -> BetaTranscriptionSession:
        rate = session.input.format.rate
        return cls(id=session.id, input_audio_format="pcm16" if rate == 24_000 else f"pcm16_{rate}",
                   input_audio_transcription=session.input.transcription,
                   turn_detection=session.input.turn_detection, include=session.include)


# ---------------------------------------------------------------------------------------------------------------
# Server events
# ---------------------------------------------------------------------------------------------------------------


class ServerEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: new_id("event"))


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: TranscriptionSession


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: TranscriptionSession


class BetaSessionUpdated(ServerEvent):
    type: Literal["transcription_session.updated"] = "transcription_session.updated"
    session: BetaTranscriptionSession


class SpeechStarted(ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int  # from the session's first sample; includes prefix_padding_ms
    item_id: str


class SpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int  # from the session's first sample; includes silence_duration_ms
    item_id: str


class Committed(ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class Cleared(ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class TranscriptionDelta(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta")
    item_id: str
    content_index: int = 0
    delta: str


class TranscriptionCompleted(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed")
    item_id: str
    content_index: int = 0
    transcript: str  # always the concatenation of the item's deltas
    usage: UsageDuration
    languages: list[TranscriptionLanguage] = Field(default_factory=list)  # empty: no language was sure enough
    # Extension: present only when partial text already sent could not be extended by the full decode of the
    # turn; this is what POST /v1/audio/transcriptions answers for the turn's audio (see docs/serving.md).
    offline_transcript: str | None = omitted()


class FailureDetail(BaseModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None


class TranscriptionFailed(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed")
    item_id: str
    content_index: int = 0
    error: FailureDetail

    @classmethod
    def of(cls, item_id: str, error: APIError) -> TranscriptionFailed:
        return cls(item_id=item_id, error=FailureDetail(type=error.type, code=error.code, message=error.message,
                                                        param=error.param))


class ErrorDetail(BaseModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event that caused it, when it had an id


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail

    @classmethod
    def of(cls, error: APIError, event_id: str | None = None) -> ErrorEvent:
        return cls(error=ErrorDetail(type=error.type, code=error.code, message=error.message, param=error.param,
                                     event_id=event_id))
