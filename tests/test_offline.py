"""`zipper-asr transcribe FILES…` (server/offline.py): many files through the service's own engine, with a file
that cannot be transcribed reported and the others transcribed all the same."""

from __future__ import annotations

import os
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


def test_files_wait_for_room_in_the_queue_and_a_file_that_never_fits_is_reported(tmp_path: Path) -> None:
    """The command hands the batcher its files as fast as the audio worker prepares them: when they outran the
    engine and filled ZASR_MAX_QUEUE, the batcher's QueueFull ended the whole command with a traceback and no
    transcript. Files now wait for room; one cut into more windows than the queue holds is reported."""
    def spoken(text: str, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(subprocess.run(["espeak-ng", "-v", "en", "--stdout", "--", text],
                                        capture_output=True, check=True).stdout)
        return path

    short = [spoken(f"one two three four {n}", f"short{n}.wav") for n in range(6)]
    long = spoken("one two three four five six seven eight nine ten. " * 3, "long.wav")  # ≈ 10 s: 2+ windows of 4 s
    env = {**os.environ, "ZASR_MAX_QUEUE": "1", "ZASR_MAX_WINDOW_SECONDS": "4"}
    done = subprocess.run([sys.executable, "-m", "speechllm.cli", "transcribe", *map(str, short), str(long),
                           "--language", "en", "--format", "text"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("==> ")] == [f"==> {p}" for p in short]
    assert f"{long}: the audio is cut into" in done.stderr and "Traceback" not in done.stderr
