"""Realtime transcription benchmark (issue: streaming WebSocket transcription), on this machine.

1. Latency with 1 and with 8 concurrent real-time streams: each stream plays a multi-turn recording (espeak-ng
   speech, 1 s pauses) to /v1/realtime at the pace of real time, as a microphone would, and measures per turn
   - commit → completed: from the moment the client had sent the audio up to `audio_end_ms` (the point where
     the server's VAD could decide that the turn was over) to the `completed` event;
   - speech end → completed: the same from the end of the speech, so including the VAD's wait for
     `silence_duration_ms` of silence (OpenAI's default 500 ms, and 200 ms as a voice interface would set it);
   - the interval between consecutive partial deltas of a turn while it is spoken;
   - how often the full decode disagreed with partial text already sent (`offline_transcript` present);
   - the single-stream runs again on a server without early finals (ZASR_REALTIME_EARLY_FINAL=false), for the
     ratio of what starting the final decode inside the closing pause saves.
2. How the agreement setting (`transcription.delay`: 2, 3 or 4 hypotheses) trades early text for revisions.
3. Encoder work per partial update with and without incremental encoding, in this process on the same model:
   encoder frames computed and wall time per update, over turns of several lengths, updates every 640 ms.

    .venv/bin/python -m benchmarks.realtime [--model models/default] [--streams 8] [--recordings 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from websockets.asyncio.client import connect

from benchmarks import serving
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.features import log_mel_spectrogram
from speechllm.model import SpeechLLM
from speechllm.streaming import FRAME_LOOKAHEAD, IncrementalEncoder, StreamingFeatures

ROOT = Path(__file__).resolve().parent.parent
RATE = 24_000
CHUNK_MS = 100
PAUSE_S = 1.0
SILENCE_MS = 500  # the session's silence_duration_ms (OpenAI's default)
SHORT_SILENCE_MS = 200  # what a voice interface that must answer quickly sets (the pauses here are 1 s)
PHRASES = {
    "en": ["the house is very small and the water is cold", "she said that they would come tomorrow morning",
           "please call me when you get home", "where is the nearest station"],
    "de": ["wir haben heute keine zeit für das spiel", "das wasser ist sehr kalt", "ich gehe morgen in die stadt",
           "wo ist der nächste bahnhof"],
    "es": ["la casa es muy pequeña y el agua está fría", "ella dijo que vendrían mañana",
           "llámame cuando llegues a casa", "dónde está la estación más cercana"],
    "fr": ["la maison est très petite et l'eau est froide", "elle a dit qu'ils viendraient demain",
           "appelle moi quand tu rentres", "où est la gare la plus proche"],
}


def _speech(text: str, voice: str, rate: int = RATE) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", "--", text], capture_output=True, check=True).stdout
    return load_audio(wav, rate)


def recordings(count: int) -> list[tuple[str, bytes]]:
    """`count` recordings of three turns each (speech, 1 s pause, ...), languages and phrases rotating."""
    languages = list(PHRASES)
    out = []
    for index in range(count):
        language = languages[index % len(languages)]
        parts = [np.zeros(RATE // 4, np.float32)]
        for turn in range(3):
            parts += [_speech(PHRASES[language][(index + turn) % 4], f"{language}+m{3 + index % 4}"),
                      np.zeros(int(PAUSE_S * RATE), np.float32)]
        samples = np.concatenate(parts)
        out.append((language, (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Streams against a server
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TurnTiming:
    end_ms: int
    commit_to_completed: float
    speech_end_to_completed: float
    delta_intervals: list[float]
    revised: bool
    chars_before_commit: int
    chars: int


@dataclass
class StreamResult:
    turns: list[TurnTiming] = field(default_factory=list)


async def play(url: str, language: str, pcm: bytes, delay: str | None, silence_ms: int = SILENCE_MS) -> StreamResult:
    received, sent_at = await stream_events(url, language, pcm, RATE, delay, silence_ms)
    return StreamResult(turns_of(received, sent_at, silence_ms))


async def stream_events(url: str, language: str | None, pcm: bytes, rate: int, delay: str | None = None,
                        silence_ms: int = SILENCE_MS) -> tuple[list[tuple[float, dict]], list[float]]:
    """Play 16-bit PCM at `rate` to a server's /v1/realtime at the pace of real time, in CHUNK_MS appends, with server
    VAD; → the events received (with when), once every turn opened is completed or failed, and when each append was
    sent."""
    step = rate * 2 * CHUNK_MS // 1000
    chunks = [pcm[i: i + step] for i in range(0, len(pcm), step)]
    sent_at: list[float] = []
    received: list[tuple[float, dict]] = []
    transcription = ({"language": language} if language else {}) | ({"delay": delay} if delay else {})
    async with connect(f"{url}?intent=transcription", max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": rate}, "transcription": transcription,
            "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}}))

        async def read() -> None:
            async for message in ws:
                received.append((time.monotonic(), json.loads(message)))

        reader = asyncio.create_task(read())
        start = time.monotonic()
        for index, chunk in enumerate(chunks):
            await asyncio.sleep(max(0.0, start + index * CHUNK_MS / 1000 - time.monotonic()))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))
            sent_at.append(time.monotonic())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            events = [event for _, event in received]
            started = sum(e["type"] == "input_audio_buffer.speech_started" for e in events)
            done = sum(e["type"].endswith(("transcription.completed", "transcription.failed")) for e in events)
            if started and done == started:
                break
            await asyncio.sleep(0.05)
        reader.cancel()
    return received, sent_at


def items(received: list[tuple[float, dict]]) -> list[dict]:
    """A stream's turns (items) in order, from the events received (with when): for each, its deltas (when, text),
    when it was committed and how many characters had been sent by then, `start_ms` and `end_ms` from the VAD's
    events, and its `completed` or `failed` event (when, event)."""
    turns: dict[str, dict] = {}
    for at, event in received:
        item = event.get("item_id")
        if item is None:
            continue
        turn = turns.setdefault(item, {"deltas": [], "committed": None, "before_commit": 0})
        kind = event["type"]
        if kind.endswith("speech_started"):
            turn["start_ms"] = event["audio_start_ms"]
        elif kind.endswith("speech_stopped"):
            turn["end_ms"] = event["audio_end_ms"]
        elif kind.endswith("committed"):
            turn["committed"] = at
            turn["before_commit"] = sum(len(d) for _, d in turn["deltas"])
        elif kind.endswith("transcription.delta"):
            turn["deltas"].append((at, event["delta"]))
        elif kind.endswith(("transcription.completed", "transcription.failed")):
            turn["completed"] = (at, event)
    return list(turns.values())


def turns_of(received: list[tuple[float, dict]], sent_at: list[float], silence_ms: int) -> list[TurnTiming]:
    def sent(ms: int) -> float:  # when the client had sent the audio up to `ms`
        return sent_at[min(len(sent_at) - 1, max(0, math.ceil(ms / CHUNK_MS) - 1))]

    out = []
    for turn in items(received):
        if "completed" not in turn or "end_ms" not in turn or turn["completed"][1]["type"].endswith("failed"):
            continue  # a turn cut at the longest allowed has no speech end
        at, completed = turn["completed"]
        partial = [t for t, _ in turn["deltas"] if t < turn["committed"]]
        out.append(TurnTiming(turn["end_ms"], at - sent(turn["end_ms"]), at - sent(turn["end_ms"] - silence_ms),
                              [b - a for a, b in zip(partial, partial[1:], strict=False)],
                              "offline_transcript" in completed, turn["before_commit"],
                              len(completed["transcript"])))
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)


def summarize(results: list[StreamResult], wall: float, silence_ms: int) -> dict:
    turns = [t for r in results for t in r.turns]
    intervals = [i for t in turns for i in t.delta_intervals]
    commit = [t.commit_to_completed for t in turns]
    speech = [t.speech_end_to_completed for t in turns]
    return {"streams": len(results), "turns": len(turns), "silence_duration_ms": silence_ms,
            "wall_seconds": round(wall, 1),
            "commit_to_completed_p50_s": percentile(commit, 0.5), "commit_to_completed_p95_s": percentile(commit, 0.95),
            "speech_end_to_completed_p50_s": percentile(speech, 0.5),
            "speech_end_to_completed_p95_s": percentile(speech, 0.95),
            "delta_interval_p50_s": percentile(intervals, 0.5), "delta_interval_p95_s": percentile(intervals, 0.95),
            "delta_intervals": len(intervals),
            "revised_turns": sum(t.revised for t in turns),
            "text_sent_before_commit": round(sum(t.chars_before_commit for t in turns)
                                             / max(1, sum(t.chars for t in turns)), 3)}


async def concurrent(url: str, items: list[tuple[str, bytes]], delay: str | None = None,
                     silence_ms: int = SILENCE_MS) -> dict:
    start = time.monotonic()
    results = await asyncio.gather(*(play(url, language, pcm, delay, silence_ms) for language, pcm in items))
    return summarize(results, time.monotonic() - start, silence_ms)


async def sequential(url: str, items: list[tuple[str, bytes]], delay: str | None = None,
                     silence_ms: int = SILENCE_MS) -> dict:
    start = time.monotonic()
    results = [await play(url, language, pcm, delay, silence_ms) for language, pcm in items]
    return summarize(results, time.monotonic() - start, silence_ms)


def start_server(model: Path, threads: int, early_final: bool = True) -> tuple[subprocess.Popen, str]:
    return serving.serve({"ZASR_MODEL_DIR": str(model), "ZASR_THREADS": str(threads),
                          "ZASR_REALTIME_EARLY_FINAL": str(early_final).lower()})


def server_counters(url: str) -> dict:
    """The server's realtime counters, and the engine's work: rows decoded (`zasr_batch_size_rows_sum`) and
    decoding steps summed over their rows (`zasr_decode_step_rows_sum`)."""
    names = ("zasr_realtime_encoder_frames_total", "zasr_realtime_partial_updates_total",
             "zasr_realtime_revised_turns_total", "zasr_realtime_turns_total", "zasr_realtime_early_finals_total",
             "zasr_batch_size_rows_sum", "zasr_decode_step_rows_sum", "zasr_realtime_early_final_lead_seconds")
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith(names)}


# ---------------------------------------------------------------------------------------------------------------
# Encoder work per update, in this process
# ---------------------------------------------------------------------------------------------------------------


def encoder_work(model_dir: Path, turn_seconds: list[float], update_ms: float = 640.0) -> list[dict]:
    model = SpeechLLM.load(model_dir)
    chunk = model.config.encoder.chunk_size
    speech = np.concatenate([_speech(text, "en+m5", SAMPLE_RATE) for texts in PHRASES.values() for text in texts])
    step = int(update_ms * SAMPLE_RATE / 1000)
    for incremental in (True, False):  # warm-up: the first calls of each shape set up their kernels
        IncrementalEncoder(model.encoder, chunk, incremental).update(StreamingFeatures().update(speech[: 3 * step]))
    rows = []
    for seconds in turn_seconds:
        samples = np.resize(speech, int(seconds * SAMPLE_RATE))
        row = {"turn_seconds": seconds, "updates": 0}
        for mode, incremental in (("incremental", True), ("recompute", False)):
            encoder = IncrementalEncoder(model.encoder, chunk, incremental)
            features = StreamingFeatures()
            times = []
            for end in range(step + FRAME_LOOKAHEAD, samples.size + 1, step):  # as the server schedules updates
                frames = features.update(samples[:end])
                started = time.perf_counter()
                encoder.update(frames)
                times.append(time.perf_counter() - started)
            row["updates"] = len(times)
            row[f"{mode}_frames_per_update"] = round(encoder.frames_encoded / len(times), 1)
            row[f"{mode}_ms_per_update"] = round(1000 * statistics.mean(times), 2)
        row["frames_ratio"] = round(row["recompute_frames_per_update"] / row["incremental_frames_per_update"], 2)
        row["time_ratio"] = round(row["recompute_ms_per_update"] / row["incremental_ms_per_update"], 2)
        full = log_mel_spectrogram(samples)
        started = time.perf_counter()
        with torch.no_grad():
            model.encode(full[None], torch.tensor([full.shape[1]]), chunk_size=0)
        row["full_attention_once_ms"] = round(1000 * (time.perf_counter() - started), 2)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--recordings", type=int, default=4, help="recordings (3 turns each) per single-stream run")
    parser.add_argument("--threads", type=int, default=1, help="ZASR_THREADS of the server (1: its default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "realtime")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the in-process encoder measurement; the server has its own threads
    load = os.getloadavg()
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load],
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "server_threads": args.threads or "torch default",
                                 "encoder_gemm_dtype": serving.served_encoder_gemm_dtype()},
                     "model": str(args.model), "chunk_ms": CHUNK_MS, "silence_duration_ms": SILENCE_MS}
    items = recordings(max(args.streams, args.recordings))
    process, url = start_server(args.model, args.threads)
    ws_url = url.replace("http://", "ws://") + "/v1/realtime"
    try:
        asyncio.run(play(ws_url, *items[0], None))  # warm-up
        results["one_stream"] = asyncio.run(sequential(ws_url, items[: args.recordings]))
        results[f"{args.streams}_streams"] = asyncio.run(concurrent(ws_url, items[: args.streams]))
        results[f"one_stream_silence_{SHORT_SILENCE_MS}ms"] = asyncio.run(
            sequential(ws_url, items[: args.recordings], silence_ms=SHORT_SILENCE_MS))
        results[f"{args.streams}_streams_silence_{SHORT_SILENCE_MS}ms"] = asyncio.run(
            concurrent(ws_url, items[: args.streams], silence_ms=SHORT_SILENCE_MS))
        for delay, hypotheses in (("medium", 3), ("high", 4)):
            results[f"one_stream_agreement_{hypotheses}"] = asyncio.run(
                sequential(ws_url, items[: args.recordings], delay))
        results["server_counters"] = server_counters(url)
    finally:
        serving.stop(process)
    # The same single-stream runs on a server that starts no early finals, for the ratio.
    process, url = start_server(args.model, args.threads, early_final=False)
    ws_url = url.replace("http://", "ws://") + "/v1/realtime"
    try:
        asyncio.run(play(ws_url, *items[0], None))
        for silence_ms in (SILENCE_MS, SHORT_SILENCE_MS):
            results[f"one_stream_silence_{silence_ms}ms_no_early_final"] = asyncio.run(
                sequential(ws_url, items[: args.recordings], silence_ms=silence_ms))
    finally:
        serving.stop(process)
    results["encoder_work"] = encoder_work(args.model, [2.56, 5.12, 10.24, 20.48])
    write(results, args)


def write(results: dict, args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Realtime benchmark", "", f"Machine: {results['machine']}; model: `{args.model.name}`; audio sent in "
             f"{CHUNK_MS} ms chunks at the pace of real time; server VAD.", "",
             "| scenario | streams | turns | silence_duration_ms | commit → completed p50 / p95 s | "
             "speech end → completed p50 / p95 s | delta interval p50 / p95 s | revised turns | "
             "text sent before commit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if isinstance(r, dict) and "turns" in r and "streams" in r:
            lines.append(f"| {name} | {r['streams']} | {r['turns']} | {r['silence_duration_ms']} | "
                         f"{r['commit_to_completed_p50_s']} / "
                         f"{r['commit_to_completed_p95_s']} | {r['speech_end_to_completed_p50_s']} / "
                         f"{r['speech_end_to_completed_p95_s']} | {r['delta_interval_p50_s']} / "
                         f"{r['delta_interval_p95_s']} | {r['revised_turns']} | {r['text_sent_before_commit']} |")
    lines += ["", "Early finals, one stream, speech end → completed p50 / p95 s, side by side in this run:", "",
              "| silence_duration_ms | early finals | none | p50 ratio none / early |", "|---:|---:|---:|---:|"]
    short = f"one_stream_silence_{SHORT_SILENCE_MS}ms"
    for silence_ms, name in ((SILENCE_MS, "one_stream"), (SHORT_SILENCE_MS, short)):
        early, none = results[name], results[f"one_stream_silence_{silence_ms}ms_no_early_final"]
        ratio = round(none["speech_end_to_completed_p50_s"] / early["speech_end_to_completed_p50_s"], 2)
        lines.append(f"| {silence_ms} | {early['speech_end_to_completed_p50_s']} / "
                     f"{early['speech_end_to_completed_p95_s']} | {none['speech_end_to_completed_p50_s']} / "
                     f"{none['speech_end_to_completed_p95_s']} | {ratio} |")
    lines += ["", "Encoder work per partial update (updates every 640 ms of audio, chunk 16 frames = 640 ms):", "",
              "| turn s | updates | frames/update incremental | frames/update recompute | frames ratio | "
              "ms/update incremental | ms/update recompute | time ratio | full-attention encode once, ms |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["encoder_work"]:
        lines.append(f"| {r['turn_seconds']} | {r['updates']} | {r['incremental_frames_per_update']} | "
                     f"{r['recompute_frames_per_update']} | {r['frames_ratio']} | {r['incremental_ms_per_update']} | "
                     f"{r['recompute_ms_per_update']} | {r['time_ratio']} | {r['full_attention_once_ms']} |")
    lines += ["", f"Server counters after the runs: {results.get('server_counters')}", "",
              "How to read it: *commit → completed* starts when the client has sent the audio up to the turn's "
              "`audio_end_ms`, the moment the server's VAD can close the turn; *speech end → completed* adds the "
              "VAD's wait for `silence_duration_ms` of silence (the session's setting: OpenAI's default 500 ms, or "
              f"{SHORT_SILENCE_MS} ms). *Delta interval* is the time between partial deltas of a "
              "turn while it is spoken. *Revised turns*: the full decode of the turn did not begin with the partial "
              "text already sent, so the transcript continues that text and `offline_transcript` carries the REST "
              "answer (docs/serving.md). *Text sent before commit*: share of the transcripts' characters that "
              "arrived as partial deltas while the turn was open. The agreement rows use `transcription.delay` "
              "medium (3 hypotheses) and high (4). Encoder work: *incremental* encodes each 640 ms chunk once with "
              "its left context cached; *recompute* re-encodes the whole turn under the same chunked mask at every "
              "update (identical states); the last column is one full-attention encode of the whole turn (what the "
              "final decode does once per turn). *Early finals*: the final decode starts during each pause, on the "
              "turn's audio up to one speech pad (100 ms) into it, while the VAD waits out `silence_duration_ms`: as "
              "late as leaves it the time recent final decodes took, and no earlier than the pad; the server "
              "counters show how many were used (the turn ended there) and discarded (speech went on).", ""]
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
