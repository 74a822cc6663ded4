"""Realtime transcription accuracy on long recordings (issue 4): what streaming costs against the REST endpoint.

The long-audio benchmark's recordings (a split's utterances of one language joined with pauses of 0.3-0.9 s, about
a minute each; `benchmarks.long_audio`) are played to /v1/realtime at the pace of real time, several at once
(16 kHz PCM in 100 ms appends, server VAD, the language given). The turns' `completed` transcripts, joined, are
scored against the joined references (CER), beside the REST endpoint's answer for the same recordings and beside
what the REST endpoint answers for each turn's audio (`offline_transcript` where a turn was revised, else its
transcript). At `silence_duration_ms` 500 (OpenAI's default) a turn holds one or a few utterances; at 1000 the
pauses hardly end turns, and turns run for many seconds, as continuous speech does.

`--baseline DIR` runs a second checkout's server (another commit, say, from `git worktree add`) on the same
streams in the same run, the two servers one after the other for each setting, for a before and after.

    .venv/bin/python -m benchmarks.realtime_accuracy --split dev [--per-language 1] [--streams 6] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks import serving
from benchmarks.long_audio import Recording, make_recordings, score
from benchmarks.realtime import items, percentile, server_counters, stream_events
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.languages import BY_CODE

ROOT = Path(__file__).resolve().parent.parent
SILENCES_MS = (500, 1000)
# What the server did for the streams (server_counters, before and after each run): the decodes a realtime turn
# costs, and the engine's rows and decoding steps (summed over their rows) for them.
WORK_COUNTERS = ('zasr_realtime_early_finals_total{outcome="used"}',
                 'zasr_realtime_early_finals_total{outcome="discarded"}',
                 'zasr_realtime_partial_updates_total{result="decoded"}', "zasr_batch_size_rows_sum",
                 "zasr_decode_step_rows_sum")
LEAD_GAUGE = "zasr_realtime_early_final_lead_seconds"  # (since stop 29)
TRAILING_SILENCE_S = 1.5  # after the last utterance, so that the server VAD ends the last turn


def chosen_recordings(corpus: Path, split: str, per_language: int, workdir: Path) -> list[Recording]:
    """The first `per_language` recordings of each language, languages interleaved (so that the streams played
    together hold several languages)."""
    by_language: dict[str, list[Recording]] = {}
    for recording in make_recordings(corpus, split, 60.0, workdir):
        by_language.setdefault(recording.language, []).append(recording)
    return [rs[i] for i in range(per_language) for _, rs in sorted(by_language.items()) if i < len(rs)]


def pcm16(recording: Recording) -> bytes:
    samples = np.concatenate([load_audio(recording.path), np.zeros(int(TRAILING_SILENCE_S * SAMPLE_RATE), np.float32)])
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def rest_texts(url: str, recordings: list[Recording]) -> list[str]:
    texts = []
    for recording in recordings:
        response = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": recording.path.read_bytes()},
                              data={"model": "zipper-asr", "language": recording.language}, timeout=600)
        response.raise_for_status()
        texts.append(response.json()["text"])
    return texts


async def play_all(ws_url: str, recordings: list[Recording], streams: int, silence_ms: int
                   ) -> list[list[tuple[float, dict]]]:
    """Each recording's events (with when they came), `streams` recordings played at a time."""
    out: list[list[tuple[float, dict]]] = []
    for first in range(0, len(recordings), streams):
        group = recordings[first: first + streams]
        results = await asyncio.gather(*(stream_events(ws_url, r.language, pcm16(r), SAMPLE_RATE, None, silence_ms)
                                         for r in group))
        out += [received for received, _ in results]
    return out


def summarize(recordings: list[Recording], streams: list[list[tuple[float, dict]]]) -> dict:
    transcripts, offline, lengths, waits, failed = [], [], [], [], 0
    revised = sent_before = characters = count = 0
    for recording, received in zip(recordings, streams, strict=True):
        separator = "" if BY_CODE[recording.language].unspaced else " "
        done = [turn for turn in items(received) if "completed" in turn]
        completed = [t["completed"][1] for t in done if t["completed"][1]["type"].endswith("completed")]
        failed += len(done) - len(completed)
        transcripts.append(separator.join(c["transcript"] for c in completed if c["transcript"]))
        rest_answers = [c.get("offline_transcript") or c["transcript"] for c in completed]
        offline.append(separator.join(text for text in rest_answers if text))
        revised += sum(c.get("offline_transcript") is not None for c in completed)
        count += len(completed)
        lengths += [(t["end_ms"] - t["start_ms"]) / 1000 for t in done if "end_ms" in t and "start_ms" in t]
        waits += [t["completed"][0] - t["committed"] for t in done
                  if t["committed"] is not None and t["completed"][1]["type"].endswith("completed")]
        sent_before += sum(t["before_commit"] for t in done)
        characters += sum(len(c["transcript"]) for c in completed)
    return {"transcripts": score(recordings, transcripts), "rest_per_turn": score(recordings, offline),
            "turns": count, "failed_turns": failed, "revised_turns": revised,
            "turn_seconds_p50": percentile(lengths, 0.5), "turn_seconds_p90": percentile(lengths, 0.9),
            "committed_to_completed_s_p50": percentile(waits, 0.5),
            "committed_to_completed_s_p95": percentile(waits, 0.95),
            "text_sent_before_commit": round(sent_before / max(1, characters), 3)}


def run(servers: dict[str, Path], recordings: list[Recording], streams: int, silences: list[int], model: Path
        ) -> dict:
    """Each server's REST answers, then, for each silence setting, each server's streams, the servers one after
    the other."""
    started = {name: serving.serve({"ZASR_MODEL_DIR": str(model), "ZASR_THREADS": "1"}, cwd=code)
               for name, code in servers.items()}
    try:
        report: dict = {name: {"rest": score(recordings, rest_texts(url, recordings))}
                        for name, (_, url) in started.items()}
        for silence_ms in silences:
            for name, (_, url) in started.items():
                ws_url = url.replace("http://", "ws://") + "/v1/realtime"
                before = server_counters(url)
                row = summarize(recordings, asyncio.run(play_all(ws_url, recordings, streams, silence_ms)))
                after = server_counters(url)
                row["server_work"] = {counter: after[counter] - before.get(counter, 0.0)
                                      for counter in WORK_COUNTERS if counter in after}
                row["early_final_lead_s"] = after.get(LEAD_GAUGE)  # at the run's end
                report[name][str(silence_ms)] = row
                print(name, silence_ms, row["transcripts"]["mean_cer"], flush=True)
    finally:
        for process, _ in started.values():
            serving.stop(process)
    return report


def markdown(report: dict, args: argparse.Namespace) -> str:
    servers = [name for name in report if isinstance(report[name], dict) and "rest" in report[name]]
    lines = [f"# Realtime accuracy on long recordings ({args.split} split)", "",
             f"Machine: {report['machine']}; model: `{report['model']}`; {report['recordings']} recordings, "
             f"{report['audio_seconds']} s of audio, {args.streams} streams at a time at the pace of real time; the "
             "language given. Mean CER over the languages against the joined references.", "",
             "| server | silence_duration_ms | realtime transcripts | REST per turn | REST, whole recordings | "
             "realtime / REST | turns | revised | turn s p50 / p90 | text sent before commit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for silence_ms in args.silences:
        for name in servers:
            row, rest = report[name][str(silence_ms)], report[name]["rest"]["mean_cer"]
            lines.append(f"| {name} | {silence_ms} | {row['transcripts']['mean_cer']:.4f} | "
                         f"{row['rest_per_turn']['mean_cer']:.4f} | {rest:.4f} | "
                         f"{row['transcripts']['mean_cer'] / rest:.3f} | {row['turns']} | {row['revised_turns']} | "
                         f"{row['turn_seconds_p50']} / {row['turn_seconds_p90']} | {row['text_sent_before_commit']} |")
    lines += ["", "*REST per turn*: what the REST endpoint answers for each turn's audio (a turn's "
              "`offline_transcript` where it was revised, else its transcript). *Revised*: turns whose partial text "
              "already sent disagreed with that answer. Per-language CERs are in the JSON file.", "",
              "What the server did for the streams (its counters before and after each run):", "",
              "| server | silence_duration_ms | committed → completed p50 / p95 s | early final lead at the end, s | "
              "early finals used | early finals discarded | partial updates decoded | engine rows | decoding steps × "
              "rows |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for silence_ms in args.silences:
        for name in servers:
            row = report[name][str(silence_ms)]
            work = row.get("server_work", {})
            lines.append(f"| {name} | {silence_ms} | {row['committed_to_completed_s_p50']} / "
                         f"{row['committed_to_completed_s_p95']} | {_rounded(row.get('early_final_lead_s'))} | "
                         + " | ".join(
                             f"{work[counter]:.0f}" if counter in work else "" for counter in WORK_COUNTERS) + " |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--per-language", type=int, default=1, help="recordings of each language (about 1 min each)")
    parser.add_argument("--streams", type=int, default=6, help="recordings played at a time")
    parser.add_argument("--silences", type=int, nargs="+", default=list(SILENCES_MS))
    parser.add_argument("--baseline", type=Path, help="a checkout whose server runs the same streams, for comparison")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    servers = {"this checkout": ROOT} | ({f"baseline ({args.baseline.name})": args.baseline} if args.baseline else {})
    with tempfile.TemporaryDirectory(prefix="zasr-realtime-accuracy-") as workdir:
        recordings = chosen_recordings(args.corpus, args.split, args.per_language, Path(workdir))
        report = run(servers, recordings, args.streams, args.silences, args.model)
    report |= {"split": args.split, "recordings": len(recordings),
               "audio_seconds": round(sum(r.seconds for r in recordings), 1),
               "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
               "commits": {name: _commit(code) for name, code in servers.items()},
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "encoder_gemm_dtype": serving.served_encoder_gemm_dtype()}}
    stem = args.out / f"realtime_accuracy_{args.split}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, args))
    print(markdown(report, args))


def _commit(code: Path) -> str:
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
