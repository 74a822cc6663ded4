"""The benchmarks (benchmarks/) end to end at their smallest size: real servers, real traffic, every report
written. Nothing here judges speed (that is what the benchmarks are for); it catches a benchmark that no longer
runs (one broke silently when a function it shares with another changed) or that reports nonsense."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serving import PHRASES
from speechllm.languages import LANGUAGE_CODES

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, out: Path, *args: str) -> None:
    # on the CPU, as CI runs them, also on a machine with a GPU
    finished = subprocess.run([sys.executable, "-m", module, "--out", str(out), *args], cwd=ROOT,
                              env=os.environ | {"ZASR_DEVICE": "cpu"}, capture_output=True, text=True,
                              errors="replace", timeout=600)
    if finished.returncode != 0:
        pytest.fail(f"{module} exited with {finished.returncode}:\n{finished.stderr[-4000:]}")


def _check_load(load: dict) -> None:
    """A load's figures are measured, not left at zero: the server answered every request and used CPU."""
    assert load["requests"] > 0 and load["throughput_audio_s_per_s"] > 0
    assert 0 < load["latency_p50_s"] <= load["latency_p95_s"]
    assert load["server_cpu_ms_per_audio_s"] > 0 and load["server_cores_busy"] > 0


def test_serving_benchmark(tmp_path: Path) -> None:
    # its audio saved first and read back, as on a machine without espeak-ng (a GPU node)
    _run("benchmarks.serving", tmp_path / "unused", "--save-clips", str(tmp_path / "clips"))
    assert len(list((tmp_path / "clips").glob("*.wav"))) == len(LANGUAGE_CODES) * len(PHRASES) + 1  # + the long one
    _run("benchmarks.serving", tmp_path / "serving", "--per-language", "1", "--rounds", "2",
         "--clips", str(tmp_path / "clips"))
    results = json.loads((tmp_path / "serving.json").read_text())
    assert results["machine"]["device"] == "cpu"
    assert len(results["loads_each_round"]) == 2
    assert all(len(values) == 2 for values in results["ratios_each_round"].values())
    for name in ("ours_mixed_c1", "ours_mixed_c16", "ours_single_language_runs_c16", "naive_peft_mixed_c16"):
        _check_load(results[name])
    c16 = results["ours_mixed_c16"]
    assert c16["rows_per_step"] >= 1 and c16["uploads_per_audio_worker_call"] >= 1
    # Little's law: every request was in the audio stage and its row decoding for part of the load, and never more
    # than the clients had in flight at once (one row a request: the benchmark's clips are one window each)
    assert 0 < c16["requests_in_audio_stage"] <= 16 and 0 < c16["rows_decoding"] <= 16
    assert results["naive_peft_mixed_c16"]["requests_in_audio_stage"] is None  # the naive server has no /metrics
    # the model and torch are resident in the server, and its audio worker holds the encoder
    assert results["ours_mixed_c16"]["server_process_resident_mb"] > 100
    assert results["ours_mixed_c16"]["child_processes_resident_mb"] > 100
    assert all(seconds > 0 for seconds in results["head_of_line"].values())
    assert all(math.isfinite(value) and value > 0 for value in results["ratios"].values())
    assert (tmp_path / "serving.md").read_text().startswith("# Serving benchmark")


def test_decoder_benchmark_decodes_what_hugging_face_decodes(tmp_path: Path) -> None:
    _run("benchmarks.decoder", tmp_path, "--repeats", "1")
    batches = json.loads((tmp_path / "decoder.json").read_text())["batches"]
    assert batches and all(batch["same_tokens"] and batch["tokens"] > 0 for batch in batches.values())


@pytest.mark.vllm
def test_backends_benchmark(tmp_path: Path) -> None:
    _run("benchmarks.backends", tmp_path / "backends", "--per-language", "1")
    results = json.loads((tmp_path / "backends.json").read_text())
    for backend in ("embedded", "vllm"):
        for load in results[backend].values():
            _check_load(load)
    assert all(value > 0 for value in results["ratios_vllm_over_embedded"].values())


def _tiny_corpus(tmp_path: Path) -> Path:
    """A dev split of a few espeak-ng utterances in the layout `zipper-asr corpus` writes (the real corpus is not
    built in CI)."""
    corpus = tmp_path / "corpus"
    entries = []
    for language, voice, texts in (("en", "en", ["one two three", "where is the water", "the house is small"]),
                                   ("ja", "ja", ["こんにちは", "ありがとう", "さようなら"])):
        for index, text in enumerate(texts):
            audio = corpus / "audio" / "dev" / language / f"{index}.wav"
            audio.parent.mkdir(parents=True, exist_ok=True)
            audio.write_bytes(subprocess.run(["espeak-ng", "-v", voice, "--stdout", "--", text],
                                             capture_output=True, check=True).stdout)
            entries.append({"audio": str(audio.relative_to(corpus)), "text": text, "language": language})
    (corpus / "dev.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return corpus


def test_long_audio_benchmark(tmp_path: Path) -> None:
    corpus = _tiny_corpus(tmp_path)
    _run("benchmarks.long_audio", tmp_path, "--corpus", str(corpus), "--split", "dev", "--windows", "6", "3",
         "--seconds", "3")
    report = json.loads((tmp_path / "long_audio_dev.json").read_text())
    assert report["recordings"] >= 2 and report["audio_seconds"] > 3
    for row in [*report["windows"].values(), report["utterances_alone"]]:
        assert set(row["cer"]) == {"en", "ja"} and all(math.isfinite(cer) for cer in row["cer"].values())
        assert row["audio_s_per_s"] > 0
    assert not any(row["failed"] for row in report["windows"].values())
    detection = report["language_detection"]
    assert detection["recordings"] == report["recordings"]
    assert 0 <= detection["first_window"] <= detection["recordings"]
    assert 0 <= detection["whole_recording"] <= detection["recordings"]
    assert (tmp_path / "long_audio_dev.md").read_text().startswith("# Long audio (dev split, the language given)")


def test_realtime_accuracy_benchmark(tmp_path: Path) -> None:
    _run("benchmarks.realtime_accuracy", tmp_path, "--corpus", str(_tiny_corpus(tmp_path)), "--split", "dev",
         "--silences", "500")
    report = json.loads((tmp_path / "realtime_accuracy_dev.json").read_text())
    assert report["recordings"] == 2
    [server] = [name for name in report if isinstance(report[name], dict) and "rest" in report[name]]
    row = report[server]["500"]
    assert row["turns"] >= 2 and row["failed_turns"] == 0
    for scores in (report[server]["rest"], row["transcripts"], row["rest_per_turn"]):
        assert set(scores["cer"]) == {"en", "ja"} and all(math.isfinite(cer) for cer in scores["cer"].values())
    assert (tmp_path / "realtime_accuracy_dev.md").read_text().startswith("# Realtime accuracy on long recordings")
