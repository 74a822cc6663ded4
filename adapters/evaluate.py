"""Evaluation: per-language WER (space-delimited languages) and CER (all; the primary metric for
ja, ko, th), tier averages, and LID accuracy. Written as JSON and a markdown table.

Normalisation uses whisper-normalizer's BasicTextNormalizer (lower-case, symbols and punctuation
removed) except for Thai: that normaliser turns every combining mark into a space, and Thai vowel
and tone marks are combining marks, so Thai gets the same steps with marks kept.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import torch
from tqdm import tqdm
from whisper_normalizer.basic import BasicTextNormalizer

from speechllm.data import FeatureSet
from speechllm.decoder import Decoder, decoder_for
from speechllm.inference import transcribe_features
from speechllm.languages import BY_CODE, Tier
from speechllm.model import SpeechLLM

CER_PRIMARY = {"ja", "ko", "th"}
_basic = BasicTextNormalizer()


def normalize(text: str, language: str) -> str:
    if language == "th":
        text = unicodedata.normalize("NFKC", text.lower())
        text = "".join(" " if unicodedata.category(c)[0] in "SP" else c for c in text)
        return re.sub(r"\s+", " ", text).strip()
    return _basic(text).strip()


def scored_form(text: str, language: str) -> str:
    """A text as the error rates compare it."""
    text = normalize(text, language)
    return text.replace(" ", "") if BY_CODE[language].unspaced else text  # unspaced: characters are the only units


def error_rates(references: list[str], hypotheses: list[str], language: str) -> dict[str, float]:
    refs = [scored_form(r, language) for r in references]
    hyps = [scored_form(h, language) for h in hypotheses]
    cer = jiwer.cer(refs, hyps)
    wer = jiwer.wer(refs, hyps) if language not in CER_PRIMARY else None
    return {"cer": cer, "wer": wer, "primary": cer if language in CER_PRIMARY else wer}


def evaluate_features(model: SpeechLLM, data: FeatureSet, chunk_size: int | None = None, batch_size: int = 32,
                      min_lid_seconds: float = 2.0, progress: bool = False) -> dict:
    split = transcribe_split(model, data, chunk_size, batch_size, progress)
    return summarize(data.entries, split.hypotheses, split.lid_correct, min_lid_seconds, split.looped)


@dataclass
class SplitTranscripts:
    """A split's transcripts by utterance index, the language LID found for each and whether it was right, and which
    loops stopped."""

    hypotheses: dict[int, str]
    lid_correct: dict[int, bool]
    looped: set[int]
    lid_language: dict[int, str] = field(default_factory=dict)


@torch.no_grad()
def transcribe_split(model: SpeechLLM, data: FeatureSet, chunk_size: int | None = None, batch_size: int = 32,
                     progress: bool = False, decoder: Decoder | None = None, merged: bool = False) -> SplitTranscripts:
    """`decoder`: the model's decoder (speechllm.decoder.decoder_for), when the caller keeps one. `merged`: with
    merged adapters, as the server decodes (speechllm.inference.transcribe_features)."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: int(data.lengths()[i]))
    out = SplitTranscripts({}, {}, set())
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    decoder = decoder if decoder is not None else decoder_for(model.llm)
    for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        features, lengths = data.batch(batch)
        given = [data.entries[i]["language"] for i in batch]
        results = transcribe_features(model, features, lengths, given, chunk_size, decoder, merged)
        for index, result in zip(batch, results, strict=True):
            out.hypotheses[index] = result.text
            out.lid_language[index] = result.lid_language
            out.lid_correct[index] = result.lid_language == data.entries[index]["language"]
            if result.looped:
                out.looped.add(index)
    return out


def summarize(entries: list[dict], hypotheses: dict[int, str], lid_correct: dict[int, bool],
              min_lid_seconds: float, looped: set[int] | None = None) -> dict:
    looped = looped or set()
    per_language: dict[str, dict] = {}
    for code in sorted({e["language"] for e in entries}, key=list(BY_CODE).index):
        rows = [i for i, e in enumerate(entries) if e["language"] == code]
        rates = error_rates([entries[i]["text"] for i in rows], [hypotheses[i] for i in rows], code)
        long_rows = [i for i in rows if entries[i]["duration"] >= min_lid_seconds]
        rates["lid_accuracy"] = sum(lid_correct[i] for i in rows) / len(rows)
        rates["lid_accuracy_long"] = sum(lid_correct[i] for i in long_rows) / len(long_rows) if long_rows else None
        rates["utterances"] = len(rows)
        rates["loops_stopped"] = sum(i in looped for i in rows)
        rates["tier"] = BY_CODE[code].tier.value
        per_language[code] = rates
    tiers = {}
    for tier in Tier:
        rows = [r for r in per_language.values() if r["tier"] == tier.value]
        if rows:
            tiers[tier.value] = {"cer": _mean(r["cer"] for r in rows), "primary": _mean(r["primary"] for r in rows)}
    long_ids = [i for i, e in enumerate(entries) if e["duration"] >= min_lid_seconds]
    return {
        "languages": per_language,
        "tiers": tiers,
        "average": {"cer": _mean(r["cer"] for r in per_language.values()),
                    "primary": _mean(r["primary"] for r in per_language.values())},
        "lid_accuracy": sum(lid_correct.values()) / len(lid_correct),
        "lid_accuracy_long": sum(lid_correct[i] for i in long_ids) / len(long_ids) if long_ids else None,
        "lid_min_seconds": min_lid_seconds,
        "loops_stopped": len(looped),
        "examples": [{"language": entries[i]["language"], "reference": entries[i]["text"], "hypothesis": hypotheses[i]}
                     for i in range(0, len(entries), max(len(entries) // 24, 1))],
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def markdown_table(report: dict, title: str) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    lines = [f"# {title}", "", "| language | tier | WER % | CER % | LID % (all) | LID % (≥ 2 s) | utterances |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for code, r in report["languages"].items():
        lines.append(f"| {code} | {r['tier']} | {pct(r['wer'])} | {pct(r['cer'])} | {pct(r['lid_accuracy'])} | "
                     f"{pct(r['lid_accuracy_long'])} | {r['utterances']} |")
    lines += ["", "| tier | average CER % | average primary % (WER; CER for ja/ko/th) |", "|---|---:|---:|"]
    for tier, r in report["tiers"].items():
        lines.append(f"| {tier} | {pct(r['cer'])} | {pct(r['primary'])} |")
    lines += ["", f"LID accuracy: {pct(report['lid_accuracy'])} % on all clips, "
                  f"{pct(report['lid_accuracy_long'])} % on clips of {report['lid_min_seconds']:g} s or more."]
    if "loops_stopped" in report:
        lines += ["", f"Repetition loops stopped in decoding: {report['loops_stopped']} of "
                      f"{sum(r['utterances'] for r in report['languages'].values())} utterances."]
    return "\n".join(lines) + "\n"


def evaluate_model_dir(model_dir: Path, corpus_dir: Path, split: str, out_prefix: Path,
                       chunk_size: int | None = None, encoder_gemm_dtype: str = "float32") -> dict:
    from speechllm.cpu_linear import gemm_dtype_name, resolve_gemm_dtype
    from speechllm.data import load_features

    gemm_dtype = resolve_gemm_dtype(encoder_gemm_dtype)
    model = SpeechLLM.load(model_dir, encoder_gemm_dtype=gemm_dtype)
    report = evaluate_features(model, load_features(corpus_dir, split), chunk_size, progress=True)
    report["split"] = split
    report["model"] = str(model_dir)
    report["chunk_size"] = chunk_size
    report["encoder_gemm_dtype"] = gemm_dtype_name(gemm_dtype)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out_prefix}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    Path(f"{out_prefix}.md").write_text(markdown_table(report, f"{model_dir.name}: {split} split"))
    return report
