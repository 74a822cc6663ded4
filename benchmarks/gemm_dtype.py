"""bf16 GEMMs against float32 (speechllm/cpu_linear.py), on the dev split: what they cost in accuracy and what they
save in time, in one run. The same model transcribes every dev utterance four ways: all in float32; the speech
encoder's GEMMs in bf16; those and the decoder's GEMMs over more than 16 rows (its prompts; here, with batches of
32, the first steps of a batch too); every GEMM (encoder, LID head, projector, decoder) in bf16. Language given, as
the evaluation runs, and each row with its language's merged adapter, as the server decodes (`merged`: the decoder's
packed GEMMs, which carry the GEMM dtype; until stop 33 this benchmark decoded through the Zipper layers one by one,
in float32 whatever the configuration, so its "bf16 everywhere" had the decoder's projections in float32). Each bf16
configuration's difference in average CER from float32 comes with a 95 % interval from a paired bootstrap over
utterances (resampled within each language, as the average is a mean of the languages' CERs). The dev split is for
this decision; the test split is never read here.

    .venv/bin/python -m benchmarks.gemm_dtype [--model models/default] [--corpus data/corpus] [--rounds 3]

Needs the corpus (`zipper-asr corpus`, about 3.5 min) and a CPU with bf16 instructions to say anything about speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import jiwer
import torch

from adapters.evaluate import SplitTranscripts, scored_form, summarize, transcribe_split
from speechllm.cpu_linear import native_bf16, set_gemm_dtype
from speechllm.data import FeatureSet, load_features
from speechllm.decoder import LlamaDecoder
from speechllm.model import SpeechLLM

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP_SAMPLES = 2000


def character_errors(data: FeatureSet, hypotheses: dict[int, str]) -> list[tuple[int, int]]:
    """Each utterance's character edits and reference characters, as the CER counts them."""
    counts = []
    for index, entry in enumerate(data.entries):
        reference = scored_form(entry["text"], entry["language"])
        hypothesis = scored_form(hypotheses[index], entry["language"])
        edits = jiwer.process_characters(reference, hypothesis)
        counts.append((edits.substitutions + edits.deletions + edits.insertions,
                       edits.substitutions + edits.deletions + edits.hits))
    return counts


def average_cer(counts: list[tuple[int, int]], by_language: dict[str, list[int]]) -> float:
    return statistics.fmean(sum(counts[i][0] for i in rows) / sum(counts[i][1] for i in rows)
                            for rows in by_language.values())


def paired_interval(base: list[tuple[int, int]], other: list[tuple[int, int]], by_language: dict[str, list[int]],
                    seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of average CER (other − base), utterances resampled within each language."""
    rng = random.Random(seed)
    differences = []
    for _ in range(BOOTSTRAP_SAMPLES):
        sample = {code: rng.choices(rows, k=len(rows)) for code, rows in by_language.items()}
        differences.append(average_cer(other, sample) - average_cer(base, sample))
    differences.sort()
    return differences[int(0.025 * BOOTSTRAP_SAMPLES)], differences[int(0.975 * BOOTSTRAP_SAMPLES) - 1]


CONFIGURATIONS = ("float32", "bf16 encoder", "bf16 encoder and prompts", "bf16 everywhere")


def configure(model: SpeechLLM, decoder: LlamaDecoder, name: str) -> None:
    """The GEMM dtypes of configuration `name` (CONFIGURATIONS)."""
    float32, bf16 = torch.float32, torch.bfloat16
    set_gemm_dtype(model, bf16 if name == "bf16 everywhere" else float32)
    if name in ("bf16 encoder", "bf16 encoder and prompts"):
        set_gemm_dtype(model.encoder, bf16)
    decoder.set_gemm_dtype(bf16 if name == "bf16 everywhere" else float32,
                           wide=bf16 if name == "bf16 encoder and prompts" else None)


def run(model_dir: Path, corpus: Path, rounds: int) -> dict:
    torch.set_num_threads(1)  # as the server's engine and audio workers run (server/threads.py)
    model = SpeechLLM.load(model_dir)
    decoder = LlamaDecoder(model.llm)
    data = load_features(corpus, "dev")
    transcripts: dict[str, SplitTranscripts] = {}
    seconds: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    transcribe_split(model, data, decoder=decoder, merged=True)  # warm-up: first calls, allocations, page faults
    for round_index in range(rounds):  # alternating, each round in another order: drift falls on all of them
        order = CONFIGURATIONS[round_index % len(CONFIGURATIONS):] + CONFIGURATIONS[: round_index % len(CONFIGURATIONS)]
        for name in order:
            configure(model, decoder, name)
            start = time.perf_counter()
            transcripts[name] = transcribe_split(model, data, decoder=decoder, merged=True)
            seconds[name].append(time.perf_counter() - start)
    by_language = data.rows_by_language()
    counts = {name: character_errors(data, split.hypotheses) for name, split in transcripts.items()}
    reports = {name: summarize(data.entries, split.hypotheses, split.lid_correct, 2.0, split.looped)
               for name, split in transcripts.items()}
    for report in reports.values():
        report.pop("examples")
    base = transcripts["float32"].hypotheses
    return {
        "machine": platform.processor() or platform.machine(),
        "native_bf16": native_bf16(),
        "torch": torch.__version__,
        "utterances": len(data.entries),
        "reports": reports,
        "average_cer": {name: average_cer(c, by_language) for name, c in counts.items()},
        "average_cer_difference_interval": {name: paired_interval(counts["float32"], counts[name], by_language)
                                            for name in CONFIGURATIONS[1:]},
        "transcripts_changed": {name: sum(transcripts[name].hypotheses[i] != base[i] for i in base)
                                for name in CONFIGURATIONS[1:]},
        "seconds": seconds,
        "speedup": {name: statistics.median(seconds["float32"]) / statistics.median(seconds[name])
                    for name in CONFIGURATIONS[1:]},
    }


def markdown(result: dict) -> str:
    reports, names = result["reports"], CONFIGURATIONS
    base = reports["float32"]

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    def interval(name: str) -> str:
        low, high = result["average_cer_difference_interval"][name]
        difference = result["average_cer"][name] - result["average_cer"]["float32"]
        return f"{100 * difference:+.2f} ({100 * low:+.2f} … {100 * high:+.2f})"

    lines = [
        "# bf16 GEMMs against float32: the dev split",
        "",
        f"`python -m benchmarks.gemm_dtype`: {result['utterances']} dev utterances transcribed {len(names)} ways by "
        f"the same model (language given, merged adapters as served), torch {result['torch']}, one thread; the CPU's "
        "own bf16 instructions: "
        f"{'yes' if result['native_bf16'] else 'no'}. Differences from float32 in CER points, with the 95 % "
        "interval of a paired bootstrap over utterances.",
        "",
        row("", list(names)),
        "|---|" + "---:|" * len(names),
        row("average CER % (12 languages)", [f"{100 * result['average_cer'][n]:.2f}" for n in names]),
        row("difference from float32", ["–"] + [interval(n) for n in names[1:]]),
    ]
    for tier in base["tiers"]:
        lines.append(row(f"{tier} tier CER %", [f"{100 * reports[n]['tiers'][tier]['cer']:.2f}" for n in names]))
    lines += [
        row("LID accuracy %", [f"{100 * reports[n]['lid_accuracy']:.2f}" for n in names]),
        row("repetition loops stopped", [str(reports[n]["loops_stopped"]) for n in names]),
        row("transcripts unlike float32's", ["–"] + [str(result["transcripts_changed"][n]) for n in names[1:]]),
        row(f"wall seconds for the split (median of {len(result['seconds']['float32'])})",
            [f"{statistics.median(result['seconds'][n]):.1f}" for n in names]),
        row("speed against float32", ["1"] + [f"{result['speedup'][n]:.2f}×" for n in names[1:]]),
        "",
        row("language: CER %", list(names)),
        "|---|" + "---:|" * len(names),
    ]
    for code in base["languages"]:
        lines.append(row(code, [f"{100 * reports[n]['languages'][code]['cer']:.2f}" for n in names]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gemm_dtype")
    args = parser.parse_args()
    result = run(args.model, args.corpus, args.rounds)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
