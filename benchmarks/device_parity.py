"""The model on a GPU against the CPU, on the dev split: whether it writes the same transcripts, and at what speed.
The same model transcribes the same utterances (language given) through the evaluation's path
(adapters.evaluate.transcribe_split: encoder, LID, projector, the decoder with each row's adapter) once on the CPU,
as trained and as docs/model.md measures it (float32), and once on the GPU. The report gives the utterances whose
text differs, whether LID found the same language for each, each device's average CER with the difference's 95 %
interval (paired bootstrap, benchmarks/gemm_dtype.py) and each pass's utterances per second. The serving engine's
own path on a GPU (merged adapters, continuous batching) is what tests/test_cuda.py checks. The dev split is for
this; the test split is never read here.

    python -m benchmarks.device_parity [--model models/default] [--corpus data/corpus] [--per-language 12]

Needs a CUDA device and the corpus's dev features (`zipper-asr corpus`; `--save-subset DIR` writes the first
`--per-language` utterances of each language as a corpus of their own, features only, for a GPU node without it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from adapters.evaluate import SplitTranscripts, transcribe_split
from benchmarks.gemm_dtype import average_cer, character_errors, paired_interval
from speechllm.data import FeatureSet, load_features
from speechllm.model import SpeechLLM

ROOT = Path(__file__).resolve().parent.parent


def first_of_each_language(data: FeatureSet, per_language: int) -> FeatureSet:
    return data.subset(sorted(i for rows in data.rows_by_language().values() for i in rows[:per_language]))


def timed_pass(model_dir: Path, device: str, data: FeatureSet) -> tuple[SplitTranscripts, float]:
    model = SpeechLLM.load(model_dir, device=device)
    transcribe_split(model, data.subset(list(range(min(32, len(data))))))  # warm-up: kernels, allocator
    start = time.perf_counter()
    transcripts = transcribe_split(model, data)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return transcripts, time.perf_counter() - start


def run(model_dir: Path, data: FeatureSet, device: str) -> dict:
    passes = {name: timed_pass(model_dir, name, data) for name in ("cpu", device)}
    (cpu, cpu_seconds), (gpu, gpu_seconds) = passes["cpu"], passes[device]
    cpu_errors, gpu_errors = character_errors(data, cpu.hypotheses), character_errors(data, gpu.hypotheses)
    differing = [i for i in range(len(data)) if cpu.hypotheses[i] != gpu.hypotheses[i]]
    by_language = data.rows_by_language()
    low, high = paired_interval(cpu_errors, gpu_errors, by_language)
    return {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "cpu_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(device)},
        "model": str(model_dir), "device": device, "utterances": len(data),
        "cpu_average_cer": round(average_cer(cpu_errors, by_language), 4),
        "gpu_average_cer": round(average_cer(gpu_errors, by_language), 4),
        "gpu_minus_cpu_cer_95_interval": [round(low, 4), round(high, 4)],
        "transcripts_differing": len(differing),
        "lid_language_identical": sum(cpu.lid_language[i] == gpu.lid_language[i] for i in range(len(data))),
        "cpu_utterances_per_s": round(len(data) / cpu_seconds, 1),
        "gpu_utterances_per_s": round(len(data) / gpu_seconds, 1),
        "differing": [{"id": data.entries[i]["id"], "reference": data.entries[i]["text"],
                       "cpu": cpu.hypotheses[i], "gpu": gpu.hypotheses[i]} for i in differing],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--per-language", type=int, default=12, help="dev utterances of each language")
    parser.add_argument("--device", default="cuda", help="the GPU to compare with the CPU")
    parser.add_argument("--save-subset", type=Path, help="write the utterances as a corpus here, and stop")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "device_parity")
    args = parser.parse_args()
    if not args.save_subset and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device}: a CUDA device, to compare with the CPU")
    data = first_of_each_language(load_features(args.corpus, "dev"), args.per_language)
    if args.save_subset:
        data.save(args.save_subset, "dev")
        return
    result = run(args.model, data, args.device) | {"per_language": args.per_language}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "differing"}, indent=2))


if __name__ == "__main__":
    main()
