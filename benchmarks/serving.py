"""Serving benchmark (issue: REST gateway). Everything is measured in one run, side by side, on
this machine, and reported as ratios:

1. throughput (audio seconds per wall second) at concurrency 16 vs 1, mixed 12-language traffic;
2. mixed 12-language vs single-language traffic at concurrency 16: the very same requests, once
   interleaved and once as twelve single-language runs one after the other (so that the ratio is
   the cost of mixing, not of one language needing more tokens per second of audio than another);
3. the cost a cold language adds (merging its adapter on demand) vs a warm cache hit;
4. our server vs a naive multi-adapter server that switches a PEFT adapter per request
   (benchmarks/naive_peft_server.py), same model, same mixed traffic, concurrency 16.

Each load also takes the server's CPU account (its process and its audio workers): CPU seconds per
audio second and cores kept busy. Throughput is exactly cores busy / CPU per audio second, so the
c16/c1 ratio splits into how many more cores concurrency 16 keeps busy and how much CPU batching
saves per audio second, and a machine's cores bound the first factor.

Both servers run from start to end, and every load runs once per round, back to back (`--rounds`, 3 by default):
each ratio is measured within a round, and the report gives the median of the rounds' ratios beside each one.
(On this shared 2-core machine one load's throughput moved by up to 20 % from one run to the next, the naive
server's as much as ours: a single round's ratio could land on either side of a goal.)

    .venv/bin/python -m benchmarks.serving [--model models/default] [--per-language 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import aiohttp
import httpx
import psutil
import torch
from prometheus_client.parser import text_string_to_metric_families

from adapters.export import export_peft
from server.engine import EmbeddedEngine
from server.metrics import Metrics
from server.settings import Settings, batch_wait_seconds, encoder_in_workers, resolve_device
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.cpu_linear import gemm_dtype_name, resolve_gemm_dtype
from speechllm.languages import LANGUAGE_CODES
from speechllm.model import SpeechLLM

ROOT = Path(__file__).resolve().parent.parent
PHRASES = ["one two three four five", "the weather is nice today", "please call me tomorrow morning",
           "where is the nearest station"]  # read by each language's voice: the words need not be theirs
VOICES = ("m5", "f4")
LONG_CLIP = "long.wav"  # save_clips' file of long_recording()


def clip_file(code: str, index: int) -> str:
    """save_clips' file of a language's PHRASES[index]."""
    return f"{code}-{index}.wav"


def served_encoder_gemm_dtype(settings: Settings | None = None) -> str:
    """The speech encoder's GEMM dtype of a server started now (ZASR_ENCODER_GEMM_DTYPE, `auto` resolved on this
    CPU): every benchmark's report says which it ran with, since it changes transcripts a little. The setting acts
    where the encoder runs on a CPU (the engine's device, or the audio workers); on a GPU the encoder's linear
    layers run float32 (its convolutions in TF32, cuDNN's default; a realtime stream's partials are encoded there
    even when the workers encode uploads). `settings`: the environment's (Settings()) unless given."""
    settings = settings or Settings()
    device = resolve_device(settings.device)
    if device != "cpu" and not encoder_in_workers(settings, device):
        return "float32"
    return gemm_dtype_name(resolve_gemm_dtype(settings.encoder_gemm_dtype))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def audio_pool(clips: Path | None = None) -> dict[str, list[tuple[bytes, float]]]:
    """Each language's clips and their seconds: PHRASES read by espeak-ng, or the WAV files `save_clips` wrote to
    `clips` (for a machine without espeak-ng, such as a GPU node)."""
    pool: dict[str, list[tuple[bytes, float]]] = {}
    for code in LANGUAGE_CODES:
        for i, text in enumerate(PHRASES):
            if clips is None:
                wav = subprocess.run(["espeak-ng", "-v", f"{code}+{VOICES[i % 2]}", "--stdout", "--", text],
                                     capture_output=True, check=True).stdout
            else:
                wav = (clips / clip_file(code, i)).read_bytes()
            pool.setdefault(code, []).append((wav, load_audio(wav).size / SAMPLE_RATE))
    return pool


def save_clips(clips: Path) -> None:
    """The benchmark's audio as WAV files, for `--clips` on a machine without espeak-ng."""
    clips.mkdir(parents=True, exist_ok=True)
    for code, recordings in audio_pool().items():
        for i, (wav, _) in enumerate(recordings):
            (clips / clip_file(code, i)).write_bytes(wav)
    (clips / LONG_CLIP).write_bytes(long_recording())


def start(command: list[str], env: dict, url: str, ready_within_s: float = 120, cwd: Path = ROOT) -> subprocess.Popen:
    """The server `command` started with `env` in a process group of its own, once its /ready answers 200. Its log
    goes to a file; when the server exits or is not ready in time, the error carries the log's end (a benchmark run
    in CI shows why)."""
    with tempfile.NamedTemporaryFile("w", prefix="zasr-bench-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, env=os.environ | env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log,
                                   start_new_session=True)
    print(f"{command[-1]}: server log in {log.name}", file=sys.stderr)
    deadline = time.monotonic() + ready_within_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    why = f"exited with {process.returncode}" if process.poll() is not None else f"not ready in {ready_within_s} s"
    _kill_group(process)
    raise RuntimeError(f"{command} {why}; the end of its log:\n{Path(log.name).read_text(errors='replace')[-3000:]}")


def serve(settings: dict[str, str], ready_within_s: float = 120, cwd: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """`zipper-asr serve` with these ZASR_* settings on a free port, once ready: the process and its URL. `cwd`: the
    checkout whose code runs (`python -m` imports from the working directory first)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "speechllm.cli", "serve"]
    return start(command, settings | {"ZASR_PORT": str(port)}, url, ready_within_s, cwd), url


def stop(process: subprocess.Popen) -> None:
    """Terminate a server; one that has not exited after 30 s (vLLM's engine process can hang on shutdown) is
    killed with every process of its group (its audio workers, vLLM's engine), so a finished benchmark neither
    fails on its way out nor leaves processes that would take the CPU from the next one."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        print(f"server {process.pid} ignored SIGTERM for 30 s; killed", file=sys.stderr)
        _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


EXITED_CHILDREN = -1  # cpu_seconds_by_process's entry for the children that have exited (a restarted pool's)


def cpu_seconds_by_process(pid: int) -> dict[int, float]:
    """CPU seconds used so far by a process and by each of its descendants, by pid."""
    root = psutil.Process(pid)
    times = root.cpu_times()
    used = {pid: times.user + times.system, EXITED_CHILDREN: times.children_user + times.children_system}
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            used[process.pid] = times.user + times.system
    return used


def cpu_used_since(pid: int, before: dict[int, float]) -> tuple[float, float]:
    """CPU seconds since `before` (cpu_seconds_by_process) of the process (the server: engine, event loop) and
    of its descendants (its audio workers: upload decoding, VAD, features and, on a CPU, the encoder). A
    descendant that exited meanwhile moved its seconds into EXITED_CHILDREN, so the descendants' sums compare."""
    after = cpu_seconds_by_process(pid)
    descendants = [sum(used for child, used in snapshot.items() if child != pid) for snapshot in (before, after)]
    return after[pid] - before[pid], descendants[1] - descendants[0]


# The histograms whose sums and counts a load records from the server's /metrics (none on the naive server): the
# rows of each decoding step; the time spent in each stage, per upload in the audio stage (waiting for the audio
# worker and in its call), per row (an audio window: one per request of this benchmark) waiting for a batch and
# decoding; and the uploads of each audio worker call.
STAGE_HISTOGRAMS = ("zasr_decode_step_rows", "zasr_audio_prepare_duration_seconds", "zasr_queue_wait_seconds",
                    "zasr_decode_duration_seconds", "zasr_audio_worker_call_uploads")


async def server_sums(client: aiohttp.ClientSession, url: str) -> Counter[str]:
    """The sums and counts of STAGE_HISTOGRAMS so far (over all their labels), from the server's Prometheus
    exposition (empty for a server without them: the naive baseline)."""
    sums: Counter[str] = Counter()
    async with client.get(f"{url}/metrics") as response:
        if response.status != 200:
            return sums
        exposition = await response.text()
    for family in text_string_to_metric_families(exposition):
        if family.name in STAGE_HISTOGRAMS:
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    sums[sample.name] += sample.value
    return sums


@dataclass
class Measured:
    """What one load took: wall time, latencies, CPU seconds (the server's process, its audio workers, this
    client) and the server's stage histograms (STAGE_HISTOGRAMS)."""

    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    process_cpu: float = 0.0
    workers_cpu: float = 0.0
    client_cpu: float = 0.0
    sums: Counter[str] = field(default_factory=Counter)  # of the server's STAGE_HISTOGRAMS over the load

    def __add__(self, other: Measured) -> Measured:
        return Measured(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def http_client(connections: int = 16) -> aiohttp.ClientSession:
    """The load generator's HTTP client. It shares this machine's two cores with the server, so it should take as
    little of them as it can: at concurrency 16 httpx kept 0.12-0.13 of a core busy, aiohttp 0.04-0.06, and the
    same server served 1.09-1.10x as many audio seconds per second (three rounds of four, alternating; the fourth
    came at a slow moment of the machine). The naive server, one request at a time, leaves a core idle either way."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def timed_transcription(client: aiohttp.ClientSession, url: str, wav: bytes, language: str) -> float:
    """Seconds one transcription request takes, answered with 200."""
    form = aiohttp.FormData()
    form.add_field("file", wav, filename="a.wav")
    form.add_field("model", "whisper-1")
    form.add_field("language", language)
    start = time.perf_counter()
    async with client.post(f"{url}/v1/audio/transcriptions", data=form) as response:
        response.raise_for_status()
        await response.read()
    return time.perf_counter() - start


async def drive(url: str, requests: list[tuple[str, bytes, float]], concurrency: int, server_pid: int) -> Measured:
    """`concurrency` clients, each sending its next request as soon as the last is answered."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    latencies: list[float] = []

    async def worker(client: aiohttp.ClientSession) -> None:
        while not queue.empty():
            language, wav, _ = queue.get_nowait()
            latencies.append(await timed_transcription(client, url, wav, language))

    async with http_client(concurrency) as client:
        await timed_transcription(client, url, requests[0][1], requests[0][0])  # warm-up
        sums_before = await server_sums(client, url)
        server_before, client_before = cpu_seconds_by_process(server_pid), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        process_cpu, workers_cpu = cpu_used_since(server_pid, server_before)
        client_cpu = time.process_time() - client_before
        sums = await server_sums(client, url)
    sums.subtract(sums_before)
    return Measured(wall=wall, latencies=latencies, process_cpu=process_cpu, workers_cpu=workers_cpu,
                    client_cpu=client_cpu, sums=sums)


def resident_mb(pid: int) -> dict[str, float]:
    """Resident memory of the server's process and of its descendants (the audio workers), in MiB: the pages of the
    libraries both map (torch's) count in each."""
    root = psutil.Process(pid)
    descendants = 0
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants += process.memory_info().rss
    return {"server_process_resident_mb": round(root.memory_info().rss / 2**20),
            "child_processes_resident_mb": round(descendants / 2**20)}


def load(url: str, requests: list[tuple[str, bytes, float]], concurrency: int, server_pid: int) -> dict:
    return summary(requests, concurrency, asyncio.run(drive(url, requests, concurrency, server_pid))) | resident_mb(
        server_pid)


def summary(requests: list[tuple[str, bytes, float]], concurrency: int, measured: Measured) -> dict:
    audio = sum(seconds for _, _, seconds in requests)
    latencies, wall = sorted(measured.latencies), measured.wall
    server_cpu = measured.process_cpu + measured.workers_cpu
    return {"concurrency": concurrency, "requests": len(requests), "audio_seconds": round(audio, 2),
            "wall_seconds": round(wall, 2), "throughput_audio_s_per_s": round(audio / wall, 2),
            "latency_p50_s": round(latencies[len(latencies) // 2], 3),
            "latency_p95_s": round(latencies[int(len(latencies) * 0.95) - 1], 3),
            "server_cpu_ms_per_audio_s": round(1000 * server_cpu / audio, 2),
            "server_cores_busy": round(server_cpu / wall, 2),
            "of_which_child_processes": round(measured.workers_cpu / wall, 2),
            "client_cores_busy": round(measured.client_cpu / wall, 2),
            "rows_per_step": _mean(measured.sums, "zasr_decode_step_rows"),
            # where the requests were, on average (Little's law: the seconds spent in a stage over the wall time)
            "requests_in_audio_stage": _average_in_stage(measured.sums, "zasr_audio_prepare_duration_seconds", wall),
            "rows_waiting_for_a_batch": _average_in_stage(measured.sums, "zasr_queue_wait_seconds", wall),
            "rows_decoding": _average_in_stage(measured.sums, "zasr_decode_duration_seconds", wall),
            "uploads_per_audio_worker_call": _mean(measured.sums, "zasr_audio_worker_call_uploads")}


def _mean(sums: Counter[str], histogram: str) -> float | None:
    count = sums[f"{histogram}_count"]
    return round(sums[f"{histogram}_sum"] / count, 2) if count else None


def _average_in_stage(sums: Counter[str], histogram: str, wall: float) -> float | None:
    """How many were in a stage at once, on average: the seconds they spent in it over the wall time."""
    return round(sums[f"{histogram}_sum"] / wall, 2) if sums[f"{histogram}_count"] else None


def load_one_language_at_a_time(url: str, requests: list[tuple[str, bytes, float]], concurrency: int,
                                server_pid: int) -> dict:
    """The same requests as single-language traffic: one run per language, back to back."""
    measured = Measured()
    for language in dict.fromkeys(code for code, _, _ in requests):
        measured += asyncio.run(drive(url, [item for item in requests if item[0] == language], concurrency,
                                      server_pid))
    return summary(requests, concurrency, measured) | resident_mb(server_pid)


async def short_behind_long(url: str, short: bytes, long: bytes, tries: int = 5) -> dict:
    """Latency of a short request alone; sent 0.25 s after a long one (a 20 s window decodes for about half a
    second), so that it joins the long one's decoding: how long a short request waits behind a long one
    (head-of-line blocking); and sent together with a long one while the audio worker is busy, so that the two
    are prepared in one worker call and reach the engine as one batch, as they do with the one audio worker the
    benchmark's server runs (before stop 19 the short one was answered only when the long one was)."""
    async with http_client() as client:
        await timed_transcription(client, url, long, "en")  # warm-up
        alone = [await timed_transcription(client, url, short, "en") for _ in range(tries)]
        long_alone = [await timed_transcription(client, url, long, "en") for _ in range(tries)]
        behind, batched = [], []
        for _ in range(tries):
            first = asyncio.create_task(timed_transcription(client, url, long, "en"))
            await asyncio.sleep(0.25)
            behind.append(await timed_transcription(client, url, short, "en"))
            await first
        for _ in range(tries):
            busy = asyncio.create_task(timed_transcription(client, url, long, "en"))  # holds the audio worker
            await asyncio.sleep(0.02)
            with_it = asyncio.create_task(timed_transcription(client, url, long, "en"))
            batched.append(await timed_transcription(client, url, short, "en"))
            await asyncio.gather(busy, with_it)
    return {"short_alone_p50_s": round(statistics.median(alone), 3),
            "long_alone_p50_s": round(statistics.median(long_alone), 3),
            "short_behind_long_p50_s": round(statistics.median(behind), 3),
            "short_batched_with_long_p50_s": round(statistics.median(batched), 3)}


def long_recording(clips: Path | None = None) -> bytes:
    """About 20 s of English speech: one window (up to 30 s), decoded for about half a second."""
    if clips is not None:
        return (clips / LONG_CLIP).read_bytes()
    text = " ".join(["remember to water the garden before the sun goes down because the roses are thirsty"] * 4)
    return subprocess.run(["espeak-ng", "-v", "en", "--stdout", "--", text], capture_output=True, check=True).stdout


def traffic(pool: dict, languages: list[str], per_language: int) -> list[tuple[str, bytes, float]]:
    """Round-robin over the languages, cycling through each language's clips."""
    return [(code, *pool[code][i % len(PHRASES)]) for i in range(per_language) for code in languages]


def adapter_merge_costs(model_dir: Path, device: str) -> dict:
    model = SpeechLLM.load(model_dir, device=device)
    engine = EmbeddedEngine(model, Metrics(), cache_bytes=1 << 30)

    def timed_get(key: str) -> float:  # a merge on a GPU waits for its kernels (EmbeddedEngine._merge)
        start = time.perf_counter()
        engine.cache.get(key)
        return time.perf_counter() - start

    cold, warm = [], []
    for _ in range(5):
        for code in LANGUAGE_CODES:
            key = engine.adapter_key(code)
            engine.cache._entries.pop(key, None)  # make it cold
            cold.append(timed_get(key))
            warm.append(timed_get(key))
    return {"cold_merge_ms_median": round(1000 * statistics.median(cold), 3),
            "warm_hit_ms_median": round(1000 * statistics.median(warm), 4),
            "cold_extra_ms": round(1000 * (statistics.median(cold) - statistics.median(warm)), 3),
            "adapter_variant": model.config.adapter.variant.value if model.config.adapter else None,
            "adapter_bytes": engine.cache.get(engine.adapter_key("en")).nbytes}


def export_language_adapters(model_dir: Path, out: Path) -> None:
    model = SpeechLLM.load(model_dir)
    for index, code in enumerate(model.config.languages):
        export_peft(model.llm, model.config.adapter, index, out / code)


SCENARIOS = ("ours_mixed_c1", "ours_mixed_c16", "ours_single_language_runs_c16", "naive_peft_mixed_c16")


def one_round(ours: tuple[subprocess.Popen, str], naive: tuple[subprocess.Popen, str],
              mixed: list[tuple[str, bytes, float]]) -> dict:
    """Every load once, back to back: the ratios of a round are measured side by side."""
    (ours_process, ours_url), (naive_process, naive_url) = ours, naive
    return {"ours_mixed_c1": load(ours_url, mixed[: 8 * len(LANGUAGE_CODES)], 1, ours_process.pid),  # 96 requests
            "ours_mixed_c16": load(ours_url, mixed, 16, ours_process.pid),
            "ours_single_language_runs_c16": load_one_language_at_a_time(ours_url, mixed, 16, ours_process.pid),
            "naive_peft_mixed_c16": load(naive_url, mixed, 16, naive_process.pid)}


def round_ratios(loads: dict) -> dict[str, float]:
    throughput = {name: loads[name]["throughput_audio_s_per_s"] for name in SCENARIOS}
    c1, c16 = loads["ours_mixed_c1"], loads["ours_mixed_c16"]
    return {"c16_over_c1 (goal >= 4)": throughput["ours_mixed_c16"] / throughput["ours_mixed_c1"],
            "mixed_over_single_c16 (goal >= 0.9)": (throughput["ours_mixed_c16"]
                                                    / throughput["ours_single_language_runs_c16"]),
            "ours_over_naive_peft_c16 (goal >= 5)": throughput["ours_mixed_c16"] / throughput["naive_peft_mixed_c16"],
            # c16_over_c1 = the first × the second
            "cores_busy_c16_over_c1": c16["server_cores_busy"] / c1["server_cores_busy"],
            "cpu_per_audio_s_c1_over_c16": c1["server_cpu_ms_per_audio_s"] / c16["server_cpu_ms_per_audio_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--per-language", type=int, default=32, help="requests per language at concurrency 16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every load; the ratios' medians are reported")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving")
    parser.add_argument("--clips", type=Path, help="the audio from WAV files that --save-clips wrote (no espeak-ng)")
    parser.add_argument("--save-clips", type=Path, help="write the benchmark's audio as WAV files here, and stop")
    args = parser.parse_args()
    if args.save_clips:
        save_clips(args.save_clips)
        return
    pool = audio_pool(args.clips)
    mixed = traffic(pool, list(LANGUAGE_CODES), args.per_language)
    settings = Settings()  # what a server started now from this environment runs with
    device = resolve_device(settings.device)
    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "device": device, "encoder_gemm_dtype": served_encoder_gemm_dtype(settings),
                                 "audio_workers": settings.audio_workers,
                                 "batch_wait_ms": 1000 * batch_wait_seconds(settings, device)},
                     "model": str(args.model), "rounds": args.rounds}
    if device.startswith("cuda"):
        results["machine"] |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}

    with tempfile.TemporaryDirectory() as adapters, contextlib.ExitStack() as servers:
        export_language_adapters(args.model, Path(adapters))
        ours = serve({"ZASR_MODEL_DIR": str(args.model), "ZASR_MAX_QUEUE": "4096"})
        servers.callback(stop, ours[0])
        port = free_port()
        naive_url = f"http://127.0.0.1:{port}"
        naive = start([sys.executable, "-m", "benchmarks.naive_peft_server", "--model", str(args.model),
                       "--adapters", adapters, "--port", str(port)], {}, naive_url)
        servers.callback(stop, naive)
        rounds = [one_round(ours, (naive, naive_url), mixed) for _ in range(args.rounds)]
        results["head_of_line"] = asyncio.run(short_behind_long(ours[1], pool["en"][2][0],
                                                                long_recording(args.clips)))

    for name in SCENARIOS:  # each load's figures from its round of median throughput
        by_throughput = sorted(rounds, key=lambda loads: loads[name]["throughput_audio_s_per_s"])
        results[name] = by_throughput[(len(rounds) - 1) // 2][name]
    results["adapter_merge"] = adapter_merge_costs(args.model, device)
    each_round = [round_ratios(loads) for loads in rounds]
    results["ratios_each_round"] = {key: [round(ratios[key], 2) for ratios in each_round] for key in each_round[0]}
    medians = {key: round(statistics.median(values), 2) for key, values in results["ratios_each_round"].items()}
    results["ratios"] = {key: value for key, value in medians.items() if "goal" in key}
    results["ratios"]["cold_language_extra_ms (goal <= 10)"] = results["adapter_merge"]["cold_extra_ms"]
    results["loads_each_round"] = rounds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Serving benchmark", "", f"Machine: {results['machine']}; model: `{args.model.name}`; "
             f"{args.rounds} rounds of every load, back to back.", "",
             "| scenario | round | concurrency | requests | audio s | wall s | audio s / s | p50 s | p95 s "
             "| server CPU ms / audio s | server cores busy | of which child processes (audio workers) "
             "| client cores busy | rows / decoding step | MiB resident after: server process + audio workers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SCENARIOS:
        for number, loads in enumerate(rounds, 1):
            r = loads[name]
            lines.append(f"| {name} | {number} | {r['concurrency']} | {r['requests']} | {r['audio_seconds']} | "
                         f"{r['wall_seconds']} | {r['throughput_audio_s_per_s']} | {r['latency_p50_s']} | "
                         f"{r['latency_p95_s']} | {r['server_cpu_ms_per_audio_s']} | {r['server_cores_busy']} | "
                         f"{r['of_which_child_processes']} | {r['client_cores_busy']} | "
                         f"{r['rows_per_step'] or '–'} | "
                         f"{r['server_process_resident_mb']} + {r['child_processes_resident_mb']} |")
    lines += ["", "Where our server's requests were during each load, on average (Little's law: the seconds they spent "
              "in a stage, from its /metrics, over the wall time), and the uploads of each audio worker call:", "",
              "| scenario | round | in the audio stage (waiting for the worker, or in its call) | waiting for a batch "
              "| decoding | uploads per audio worker call |", "|---|---:|---:|---:|---:|---:|"]
    for name in SCENARIOS:
        if not name.startswith("ours"):
            continue
        for number, loads in enumerate(rounds, 1):
            r = loads[name]
            cells = [r[key] for key in ("requests_in_audio_stage", "rows_waiting_for_a_batch", "rows_decoding",
                                        "uploads_per_audio_worker_call")]
            lines.append(f"| {name} | {number} | {' | '.join('–' if cell is None else str(cell) for cell in cells)} |")
    lines += ["", "Each ratio is measured within a round; the median of the rounds, and each round's:", "",
              "| ratio | median | each round |", "|---|---:|---|"]
    lines += [f"| {key} | {medians[key]} | {', '.join(map(str, values))} |"
              for key, values in results["ratios_each_round"].items()]
    lines += [f"| cold_language_extra_ms (goal <= 10) | {results['adapter_merge']['cold_extra_ms']} | |"]
    c1_busy, client_busy = results["ours_mixed_c1"]["server_cores_busy"], results["ours_mixed_c16"]["client_cores_busy"]
    lines += ["", f"c16_over_c1 = cores_busy_c16_over_c1 × cpu_per_audio_s_c1_over_c16 (in each round). With "
              f"{results['machine']['cpus']} cores, about {client_busy} of them taken by the benchmark's client at "
              f"c16, and c1 keeping about {c1_busy} busy, the first factor cannot pass "
              f"{round((results['machine']['cpus'] - client_busy) / c1_busy, 2)}."]
    lines += ["", f"Adapter merge: {results['adapter_merge']}",
              f"A short request alone and sent 0.25 s after a long one (head-of-line blocking): "
              f"{results['head_of_line']}.", ""]
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
