"""`zipper-asr transcribe FILES…` (server/offline.py): many files through the service's own engine, with a file
that cannot be transcribed reported and the others transcribed all the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transcribe_reports_a_bad_file_and_transcribes_the_others(tmp_path: Path) -> None:
    speech = tmp_path / "speech.wav"
    speech.write_bytes(subprocess.run(["espeak-ng", "-v", "en", "--stdout", "--", "one two three four five"],
                                      capture_output=True, check=True).stdout)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    missing = tmp_path / "missing.wav"
    done = subprocess.run([sys.executable, "-m", "speechllm.cli", "transcribe", str(speech), str(broken),
                           str(missing), str(speech), "--language", "en", "--format", "json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1  # some files failed
    blocks = [line for line in done.stdout.splitlines() if line.startswith("==> ")]
    assert blocks == [f"==> {speech}", f"==> {speech}"]  # both copies of the good file, in order
    assert done.stdout.count('"text"') == 2
    assert f"{broken}: could not decode audio" in done.stderr
    assert f"{missing}: " in done.stderr and "No such file" in done.stderr


def test_the_cli_offers_every_response_format_the_api_does() -> None:
    """The CLI keeps its imports lazy (its --help starts fast), so its --format choices are a list of their own."""
    from server.protocol import ResponseFormat
    from speechllm.cli import build_parser

    transcribe = build_parser()._subparsers._group_actions[0].choices["transcribe"]
    [format_option] = [action for action in transcribe._actions if action.dest == "format"]
    assert format_option.choices == [choice.value for choice in ResponseFormat]
