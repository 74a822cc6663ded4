"""Decoder benchmark: our decoding loop (speechllm/decoder.py: LlamaDecoder) against Hugging Face's forward
(HFDecoder) on the same prompts, in one run, as the engine runs them: real speech prompts (espeak-ng clips of
the 12 languages through the shipped model's encoder and projector), rows grouped by language with their merged
adapters (adapters.zipper.use_segments), greedy, until every row's end of text. Our loop runs twice: as it
ships, its linear layers through oneDNN (speechllm/cpu_linear.py), and with torch's F.linear (MKL's sgemm on a
CPU) instead. Each configuration alternates the three and reports the median wall time per batch, and checks that
all decoded the same tokens.

    .venv/bin/python -m benchmarks.decoder [--model models/default] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.serving import audio_pool
from server.engine import EmbeddedEngine, EngineInput
from server.metrics import Metrics
from speechllm import cpu_linear
from speechllm.audio import load_audio
from speechllm.decoder import Decoder, HFDecoder, LlamaDecoder
from speechllm.decoding import Hypothesis
from speechllm.features import log_mel_spectrogram
from speechllm.languages import LANGUAGE_CODES
from speechllm.model import SpeechLLM

ROOT = Path(__file__).resolve().parent.parent


def batches(engine: EmbeddedEngine) -> dict[str, list[EngineInput]]:
    """One clip of one language, and 16 clips of mixed languages (every language at least once)."""
    pool = audio_pool()
    inputs = {code: [EngineInput(log_mel_spectrogram(load_audio(wav)), code) for wav, _ in clips]
              for code, clips in pool.items()}
    mixed = [inputs[code][i % len(inputs[code])] for i, code in
             enumerate((LANGUAGE_CODES * 2)[:16])]
    return {"1 row": inputs["en"][:1], "16 rows, 12 languages": mixed}


def decode(engine: EmbeddedEngine, decoder: Decoder, batch: list[EngineInput], onednn: bool = True
           ) -> tuple[float, list[Hypothesis]]:
    """The engine's decoding of `batch` with `decoder` in place of its own, timed (the speech half is not);
    `onednn` False: linear layers through F.linear."""
    prepared = engine.prepare(batch)
    own_decoder, engine.decoder = engine.decoder, decoder
    uses_onednn, cpu_linear.ONEDNN = cpu_linear.ONEDNN, cpu_linear.ONEDNN and onednn
    try:
        start = time.perf_counter()
        hypotheses = engine.decode(prepared)
        return time.perf_counter() - start, hypotheses
    finally:
        engine.decoder = own_decoder
        cpu_linear.ONEDNN = uses_onednn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server runs 1: ZASR_THREADS)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SpeechLLM.load(args.model)
    engine = EmbeddedEngine(model, Metrics(), cache_bytes=256 << 20)
    ours = LlamaDecoder(model.llm)
    decoders = {"hugging_face": (HFDecoder(model.llm), True), "ours_f_linear": (ours, False), "ours": (ours, True)}
    results = {}
    with torch.no_grad():
        for name, batch in batches(engine).items():
            times: dict[str, list[float]] = {key: [] for key in decoders}
            tokens: dict[str, list[list[int]]] = {}
            for _ in range(args.repeats + 1):  # the first round warms up and is not counted
                for key, (decoder, onednn) in decoders.items():
                    seconds, hypotheses = decode(engine, decoder, batch, onednn)
                    times[key].append(seconds)
                    tokens[key] = [h.tokens for h in hypotheses]
            median = {key: statistics.median(t[1:]) for key, t in times.items()}
            results[name] = {"rows": len(batch), "tokens": sum(len(t) for t in tokens["ours"]),
                             "same_tokens": tokens["ours"] == tokens["hugging_face"] == tokens["ours_f_linear"],
                             "seconds": {key: {"min": min(t[1:]), "median": median[key], "max": max(t[1:])}
                                         for key, t in times.items()},
                             "hugging_face_over_ours": median["hugging_face"] / median["ours"],
                             "f_linear_over_onednn": median["ours_f_linear"] / median["ours"]}
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "repeats": args.repeats,
              "batches": results}
    lines = ["# Decoder: our loop vs Hugging Face's forward", "",
             "`python -m benchmarks.decoder`: the shipped model, real speech prompts, adapters as the engine sets "
             f"them, greedy to the end of text, {args.threads} torch thread(s); median (min–max) of {args.repeats} "
             "alternating runs.", "",
             "| batch | tokens | Hugging Face | ours, F.linear | ours | Hugging Face / ours | ours: F.linear / oneDNN "
             "| same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        cells = [f"{1000 * r['seconds'][k]['median']:.1f} ms ({1000 * r['seconds'][k]['min']:.1f}–"
                 f"{1000 * r['seconds'][k]['max']:.1f})" for k in ("hugging_face", "ours_f_linear", "ours")]
        lines.append(f"| {name} | {r['tokens']} | {' | '.join(cells)} | {r['hugging_face_over_ours']:.2f}× | "
                     f"{r['f_linear_over_onednn']:.2f}× | {'yes' if r['same_tokens'] else 'NO'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "decoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
