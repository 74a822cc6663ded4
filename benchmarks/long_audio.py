"""Long audio: how long a window the service should cut it into (issue 4, *Long audio*).

An upload longer than ZASR_MAX_WINDOW_SECONDS is cut at pauses into windows of at most that many seconds
(`server.vad.split_long_audio`, which merges the pieces of speech between pauses while they fit) and each window is
transcribed as one row. The shipped model was trained on clips of up to 5 s, so which window length it hears best
is for data to say. Recordings of about a minute are made by joining a split's utterances of one language with
pauses of 0.3-0.9 s, transcribed through the service's own path (the offline command's: audio worker, VAD,
batcher, embedded engine; the language given) at each window length, and scored (CER) against the joined
references; beside them, the same utterances transcribed one by one, as the model was trained. The dev split
chooses the default; the test split then reports the default chosen against the window lengths compared, once.

    .venv/bin/python -m benchmarks.long_audio --split dev [--windows 30 20 15 10 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.evaluate import error_rates
from benchmarks.serving import served_encoder_gemm_dtype
from server.offline import file_reader, started_runtime, transcribe_each
from server.service import untagged_rows
from server.settings import Settings
from speechllm.audio import load_audio, write_wav
from speechllm.languages import BY_CODE

ROOT = Path(__file__).resolve().parent.parent
PAUSES_S = (0.3, 0.9)


@dataclass
class Recording:
    language: str
    path: Path
    seconds: float
    reference: str
    clips: list[tuple[Path, str]]  # the utterances it joins: (audio, text)


def make_recordings(corpus: Path, split: str, seconds: float, out: Path, seed: int = 0) -> list[Recording]:
    """Each language's utterances of the split, in order, joined into recordings of about `seconds`."""
    rng = np.random.default_rng(seed)
    entries: dict[str, list[dict]] = {}
    for line in (corpus / f"{split}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entries.setdefault(entry["language"], []).append(entry)
    recordings = []
    for language, utterances in sorted(entries.items()):
        separator = "" if BY_CODE[language].unspaced else " "
        parts: list[np.ndarray] = []
        clips: list[tuple[Path, str]] = []
        for entry in utterances:
            clip = corpus / entry["audio"]
            parts += [load_audio(clip), np.zeros(int(rng.uniform(*PAUSES_S) * 16_000), np.float32)]
            clips.append((clip, entry["text"]))
            if sum(p.size for p in parts) >= seconds * 16_000 or entry is utterances[-1]:
                path = out / f"{language}-{len(recordings):03d}.wav"
                samples = np.concatenate(parts[:-1])  # no pause after the last utterance
                write_wav(path, samples)
                recordings.append(Recording(language, path, samples.size / 16_000,
                                            separator.join(text for _, text in clips), clips))
                parts, clips = [], []
    return recordings


async def transcribe(settings: Settings, uploads: list[Path], languages: list[str | None]) -> tuple[list, float]:
    """Each upload's result through the service's own runtime, and the wall time they took."""
    async with started_runtime(settings) as runtime:
        start = time.monotonic()
        results = await transcribe_each(runtime, [file_reader(path) for path in uploads], languages)
        return results, time.monotonic() - start


async def detect_languages(settings: Settings, recordings: list[Recording]) -> dict:
    """How many recordings' language the detection endpoint's rule finds (`SpeechEngine.detect_whole`: all the
    windows), against the first window's alone."""
    right = {"first_window": 0, "whole_recording": 0}
    async with started_runtime(settings) as runtime:
        for recording in recordings:
            prepared = await runtime.service.audio.prepare(recording.path.read_bytes())
            windows = untagged_rows(prepared)
            [first] = await runtime.batcher.run_exclusive(runtime.engine.detect, windows[:1])
            whole = await runtime.batcher.run_exclusive(runtime.engine.detect_whole, windows)
            right["first_window"] += first.language == recording.language
            right["whole_recording"] += whole.language == recording.language
    return {**right, "recordings": len(recordings), "window_seconds": settings.max_window_seconds}


def score(recordings: list[Recording], texts: list[str]) -> dict:
    by_language: dict[str, tuple[list[str], list[str]]] = {}
    for recording, text in zip(recordings, texts, strict=True):
        references, hypotheses = by_language.setdefault(recording.language, ([], []))
        references.append(recording.reference)
        hypotheses.append(text)
    cer = {language: round(error_rates(refs, hyps, language)["cer"], 4)
           for language, (refs, hyps) in sorted(by_language.items())}
    return {"mean_cer": round(statistics.mean(cer.values()), 4), "cer": cer}


def run(model: Path, corpus: Path, split: str, windows: list[float], seconds: float, workdir: Path,
        detect: bool = False) -> dict:
    """`detect`: no language given; each window's is detected (LID), as for an untagged request."""
    recordings = make_recordings(corpus, split, seconds, workdir)
    audio_seconds = sum(r.seconds for r in recordings)
    report: dict = {"split": split, "recordings": len(recordings), "audio_seconds": round(audio_seconds, 1),
                    "language": "detected" if detect else "given", "windows": {}}
    for window in windows:
        settings = Settings(model_dir=model, max_window_seconds=window)
        uploads = [r.path for r in recordings]
        languages = [None if detect else r.language for r in recordings]
        results, wall = asyncio.run(transcribe(settings, uploads, languages))
        failed = [str(r) for r in results if isinstance(r, Exception)]
        texts = ["" if isinstance(r, Exception) else r.text for r in results]
        rows = sum(len(r.segments) for r in results if not isinstance(r, Exception))
        report["windows"][str(window)] = {**score(recordings, texts), "failed": failed,
                                          "window_seconds_mean": round(audio_seconds / max(rows, 1), 2),
                                          "audio_s_per_s": round(audio_seconds / wall, 1)}
        print(window, report["windows"][str(window)]["mean_cer"], flush=True)
    # the same utterances one by one (the texts joined as the references are)
    clips = [clip for r in recordings for clip, _ in r.clips]
    languages = [None if detect else r.language for r in recordings for _ in r.clips]
    whole = Settings(model_dir=model, max_window_seconds=30.0)  # each utterance one window, however long
    results, wall = asyncio.run(transcribe(whole, clips, languages))
    texts = iter("" if isinstance(r, Exception) else r.text for r in results)
    joined = [("" if BY_CODE[r.language].unspaced else " ").join(next(texts) for _ in r.clips) for r in recordings]
    report["utterances_alone"] = {**score(recordings, joined), "audio_s_per_s": round(audio_seconds / wall, 1)}
    report["language_detection"] = asyncio.run(detect_languages(Settings(model_dir=model), recordings))
    return report


def markdown(report: dict, windows: list[float]) -> str:
    languages = list(report["utterances_alone"]["cer"])
    head = "| window (s) | mean CER | " + " | ".join(languages) + " | mean window (s) | audio s / s |"
    lines = [f"# Long audio ({report['split']} split, the language {report['language']})", "",
             f"Machine: {report['machine']}; model: `{report['model']}`; {report['recordings']} recordings, "
             f"{report['audio_seconds']} s of audio (a split's utterances joined with pauses of "
             f"{PAUSES_S[0]}-{PAUSES_S[1]} s, about {report['seconds']:.0f} s each); CER against the joined "
             f"references, the language {report['language']}.", "", head, "|" + "---|" * (len(languages) + 4)]
    for window in windows:
        row = report["windows"][str(window)]
        lines.append(f"| {window:g} | {row['mean_cer']:.4f} | " + " | ".join(f"{row['cer'][lang]:.3f}"
                                                                          for lang in languages)
                     + f" | {row['window_seconds_mean']} | {row['audio_s_per_s']} |")
    alone = report["utterances_alone"]
    lines.append("| each utterance alone | " + f"{alone['mean_cer']:.4f} | "
                 + " | ".join(f"{alone['cer'][lang]:.3f}" for lang in languages) + f" | – | {alone['audio_s_per_s']} |")
    detection = report["language_detection"]
    lines += ["", f"Language detection (`/v1/audio/language`'s rule, {detection['window_seconds']:g} s windows): "
                  f"{detection['whole_recording']} of {detection['recordings']} recordings right from all their "
                  f"windows, {detection['first_window']} from the first window alone."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--windows", type=float, nargs="+", default=[30, 20, 15, 10, 6])
    parser.add_argument("--seconds", type=float, default=60.0, help="about how long each recording is")
    parser.add_argument("--detect", action="store_true", help="give no language: each window's is detected")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zasr-long-audio-") as workdir:
        report = run(args.model, args.corpus, args.split, args.windows, args.seconds, Path(workdir), args.detect)
    report |= {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
               "seconds": args.seconds, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                    "torch": torch.__version__,
                                                    "encoder_gemm_dtype": served_encoder_gemm_dtype()}}
    stem = args.out / f"long_audio_{args.split}{'_detected' if args.detect else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, args.windows))
    print(markdown(report, args.windows))


if __name__ == "__main__":
    main()
