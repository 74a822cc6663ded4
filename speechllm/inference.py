"""From features to text: encoder, LID (when no language is given), prompt, greedy decoding."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache

import torch

from adapters.zipper import (
    MergedAdapter,
    keep_rows,
    language_runs,
    merge_language,
    use_languages,
    use_segments,
)
from speechllm.decoder import Decoder, decoder_for
from speechllm.decoding import generate
from speechllm.model import SpeechLLM
from speechllm.prompt import eos_id
from speechllm.tokenizer import transcript_text

MAX_TOKENS_PER_AUDIO_EMBEDDING = 2  # 80 ms of speech never needs more than two BPE tokens
LID_CONFIDENCE_THRESHOLD = 0.5  # below it, an untagged request is decoded with <|unknown|>


@dataclass
class Transcription:
    text: str
    language: str | None  # the language the decoder was prompted with (None: unknown)
    detected_language: str | None  # LID's best guess (None when the language was given)
    language_probability: float
    avg_logprob: float
    lid_language: str  # LID's best guess, given language or not (what evaluation scores)
    looped: bool  # decoding stopped a repetition loop (speechllm.decoding.RowTokens)


def choose_language(given: str | None, probabilities: torch.Tensor, languages: tuple[str, ...] | list[str],
                    threshold: float = LID_CONFIDENCE_THRESHOLD) -> tuple[str | None, str]:
    """The language to prompt with and where it came from: "given", "detected" (LID at or above the
    threshold) or "fallback" (None: decode with <|unknown|> and the shared subspace alone)."""
    if given is not None:
        return given, "given"
    if float(probabilities.max()) >= threshold:
        return languages[int(probabilities.argmax())], "detected"
    return None, "fallback"


def token_limits(audio_lengths: Iterable[int] | torch.Tensor) -> list[int]:
    return [int(n) * MAX_TOKENS_PER_AUDIO_EMBEDDING + 4 for n in audio_lengths]


@torch.no_grad()
def transcribe_features(model: SpeechLLM, features: torch.Tensor, lengths: torch.Tensor,
                        languages: list[str | None], chunk_size: int | None = None,
                        decoder: Decoder | None = None, merged: bool = False) -> list[Transcription]:
    """`decoder`: the model's decoder (speechllm.decoder.decoder_for), when the caller keeps one for many calls.
    `merged`: decode as the server's engine does, each row with its language's merged adapter (merge_language), so
    that a LlamaDecoder runs its packed GEMMs (speechllm.decoder.PackedLinear), in their GEMM dtype; otherwise the
    Zipper layers compute each row's update from its language index, layer by layer, in float32."""
    device = next(model.parameters()).device
    states, state_lengths = model.encode(features.to(device), lengths.to(device), chunk_size)
    probabilities = model.language_logits(states, state_lengths).float().softmax(-1).cpu()
    codes = model.config.languages
    detected = [codes[int(p.argmax())] for p in probabilities]
    chosen = [choose_language(language, p, codes)[0] for language, p in zip(languages, probabilities, strict=True)]
    audio, audio_lengths = model.audio_embeddings(states, state_lengths)
    prompts = model.prompt_embeddings(audio, audio_lengths, chosen)
    limits = token_limits(audio_lengths)
    with _adapters(model, chosen, merged):
        hypotheses = generate(decoder or decoder_for(model.llm), prompts, eos_id(model.tokenizer), limits,
                              on_rows_kept=lambda keep: keep_rows(model.llm, keep))
    results = []
    for row, hypothesis in enumerate(hypotheses):
        given = languages[row] is not None
        probability = float(probabilities[row, codes.index(chosen[row])]) if chosen[row] else float(
            probabilities[row].max())
        results.append(Transcription(transcript_text(model.tokenizer, hypothesis.tokens),
                                     chosen[row], None if given else detected[row], probability,
                                     hypothesis.avg_logprob, detected[row], hypothesis.looped))
    return results


def _adapters(model: SpeechLLM, languages: list[str | None], merged: bool) -> AbstractContextManager[None]:
    """The Zipper layers set for a batch of rows in `languages`: by language index, or with merged adapters."""
    if not merged:
        return use_languages(model.llm, model.language_indices(languages).to(next(model.parameters()).device))
    if model.config.adapter is None:
        return nullcontext()
    codes = model.config.languages

    @cache
    def adapter_of(code: str | None) -> MergedAdapter:
        return merge_language(model.llm, None if code is None else codes.index(code))

    return use_segments(model.llm, language_runs(languages, adapter_of))
