"""The response formats a transcription can be rendered in: text, SRT and WebVTT, and each one's media type.

The layouts follow whisper's writers, which OpenAI's whisper-1 output matches: SRT cues numbered from 1 with
`HH:MM:SS,mmm`, WebVTT cues after a `WEBVTT` header with `HH:MM:SS.mmm` (hours always written), a blank line
after every cue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from server.protocol import ResponseFormat, TranscriptionSegment, TranscriptionVerbose

MEDIA_TYPES: dict[ResponseFormat, str] = {
    ResponseFormat.JSON: "application/json",
    ResponseFormat.VERBOSE_JSON: "application/json",
    ResponseFormat.TEXT: "text/plain; charset=utf-8",
    # OpenAI sends subtitles as text/plain and the SDK reads any body as a string, so SRT stays text/plain:
    # browsers and curl show it rather than download it. WebVTT has a registered type of its own.
    ResponseFormat.SRT: "text/plain; charset=utf-8",
    ResponseFormat.VTT: "text/vtt; charset=utf-8",
}

_BLANK_LINES = re.compile(r"\n\s*\n")


def media_type(response_format: ResponseFormat | str) -> str:
    return MEDIA_TYPES[ResponseFormat(response_format)]


def timestamp(seconds: float, decimal_marker: str) -> str:
    """3725.5 -> "01:02:05,500" (SRT) or "01:02:05.500" (VTT). Hours grow past 99 rather than wrap."""
    total_ms = round(max(seconds, 0.0) * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line would end the cue early and "-->" would read as a timing line; whisper's writers do the same.
    return _BLANK_LINES.sub("\n", text.strip()).replace("-->", "->")


def _cues(segments: Iterable[TranscriptionSegment]) -> list[tuple[float, float, str]]:
    """(start, end, text) of each segment that has text: an empty cue is invalid in both formats."""
    cues = [(seg.start, seg.end, _cue_text(seg.text)) for seg in segments]
    return [cue for cue in cues if cue[2]]


def render_text(text: str) -> str:
    """The `text` format: the transcript and a newline, as OpenAI sends it.

    Takes the transcript rather than segments: joining segments needs the language (no spaces in Japanese or Thai),
    which the transcript already got right.
    """
    return text.strip() + "\n"


def render_srt(segments: Iterable[TranscriptionSegment]) -> str:
    blocks = [
        f"{number}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n\n"
        for number, (start, end, text) in enumerate(_cues(segments), start=1)
    ]
    return "".join(blocks)


def render_vtt(segments: Iterable[TranscriptionSegment]) -> str:
    blocks = [f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n\n" for start, end, text in _cues(segments)]
    return "WEBVTT\n\n" + "".join(blocks)


def render(response_format: ResponseFormat | str, result: TranscriptionVerbose) -> str:
    """The response body for any format, from the verbose result the server builds in every case."""
    match ResponseFormat(response_format):
        case ResponseFormat.JSON:
            return result.to_json_format().model_dump_json()
        case ResponseFormat.VERBOSE_JSON:
            return result.model_dump_json()
        case ResponseFormat.TEXT:
            return render_text(result.text)
        case ResponseFormat.SRT:
            return render_srt(result.segments)
        case ResponseFormat.VTT:
            return render_vtt(result.segments)
