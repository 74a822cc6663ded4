"""The embedded engine (server/engine.py) and its adapter cache (server/adapter_cache.py), on tiny
random Speech-LLMs: the grouped serving path must give what the per-row reference path gives."""

from __future__ import annotations

import pytest
import torch

from adapters.zipper import (
    MergedAdapter,
    Variant,
    ZipperConfig,
    merge_language,
    use_languages,
    use_segments,
    zipper_layers,
)
from server.adapter_cache import SHARED_KEY
from server.engine import EmbeddedEngine, EngineInput, EngineOutput, TextStream
from server.metrics import Metrics
from speechllm.inference import LID_CONFIDENCE_THRESHOLD, transcribe_features
from speechllm.model import SpeechLLM
from speechllm.padding import encode_each, length_groups
from speechllm.tokenizer import INVALID
from tests.conftest import tiny_speech_llm

LANGUAGES: list[str | None] = ["ja", "en", "ja", "de", None]  # mixed, one repeated (non-adjacent), one untagged
FRAMES = [48, 64, 40, 56, 32]  # different lengths, so that padding is exercised too
BIG_CACHE = 1 << 30
ALWAYS_FALLBACK = 1.01  # no probability reaches it: an untagged row always takes the "fallback" path
ALWAYS_DETECT = 0.0  # every probability reaches it: an untagged row always takes the "detected" path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapted_model(tokenizer, variant: Variant) -> SpeechLLM:
    # static_shared_ranks < rank, or STATIC would share every rank and be SHARED in disguise.
    model = tiny_speech_llm(tokenizer, adapter=ZipperConfig(variant=variant, rank=4, static_shared_ranks=2))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.llm.named_parameters():
        # B starts at zero and the routers at a constant: randomise them so every language's adapter
        # (and, for HARD/SOFT, every language's gates) really changes what is decoded.
        if "lora_B" in name or ".router." in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module", params=list(Variant), ids=str)
def adapted(request, tiny_tokenizer) -> SpeechLLM:
    return _adapted_model(tiny_tokenizer, request.param)


@pytest.fixture(scope="module")
def soft_model(tiny_tokenizer) -> SpeechLLM:
    return _adapted_model(tiny_tokenizer, Variant.SOFT)


def _features(seed: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(80, frames, generator=generator) for frames in FRAMES]


def _padded(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[1] for f in features])
    batch = torch.zeros(len(features), features[0].shape[0], int(lengths.max()))
    for row, f in enumerate(features):
        batch[row, :, : f.shape[1]] = f
    return batch, lengths


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _language_index(model: SpeechLLM, language: str) -> int:
    return model.config.languages.index(language)


# ---- the mixed-language batch against the reference path ---------------------------------------------

@pytest.mark.parametrize("threshold, untagged_source", [(ALWAYS_FALLBACK, "fallback"), (ALWAYS_DETECT, "detected")])
def test_mixed_batch_matches_reference_and_rows_alone(adapted: SpeechLLM, threshold: float,
                                                      untagged_source: str) -> None:
    model = adapted
    variant = model.config.adapter.variant
    engine = EmbeddedEngine(model, Metrics(), BIG_CACHE, lid_threshold=threshold)
    features = _features()
    deltas: list[list[str]] = [[] for _ in features]
    items = [EngineInput(f, language, on_text=deltas[row].append)
             for row, (f, language) in enumerate(zip(features, LANGUAGES, strict=True))]
    outputs = engine.run(items)

    # Language choice and adapter per row.
    untagged = outputs[4]
    assert [o.language_source for o in outputs] == ["given"] * 4 + [untagged_source]
    assert [o.language for o in outputs[:4]] == LANGUAGES[:4]
    if untagged_source == "fallback":
        assert untagged.language is None and untagged.adapter == SHARED_KEY
    else:
        alone_guess = engine.detect([EngineInput(features[4], None)])[0]
        assert untagged.language == alone_guess.language
        assert untagged.language_probability == pytest.approx(alone_guess.probability, abs=1e-5)
    expected_adapters = [SHARED_KEY if variant == Variant.SHARED or o.language is None else o.language
                         for o in outputs]
    assert [o.adapter for o in outputs] == expected_adapters

    # The reference decodes the whole padded batch with per-row languages (use_languages), ungrouped.
    # It applies its own LID threshold to untagged rows, so hand it the language the engine chose; a
    # fallback row stays None there only if LID is below the reference's threshold too.
    if untagged_source == "fallback":
        assert untagged.language_probability < LID_CONFIDENCE_THRESHOLD
    batch, lengths = _padded(features)
    reference = transcribe_features(model, batch, lengths, [o.language for o in outputs])
    assert [o.text for o in outputs] == [r.text for r in reference]
    assert [r.language for r in reference] == [o.language for o in outputs]
    for output, ref in zip(outputs, reference, strict=True):
        assert output.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
        assert output.language_probability == pytest.approx(ref.language_probability, abs=1e-5)

    # Each row alone through the engine: batching (and the regrouping by adapter) changes nothing.
    alone = [engine.run([EngineInput(f, language)])[0] for f, language in zip(features, LANGUAGES, strict=True)]
    assert [a.text for a in alone] == [o.text for o in outputs]
    assert [(a.language, a.language_source, a.adapter) for a in alone] == \
        [(o.language, o.language_source, o.adapter) for o in outputs]

    # Rows that bring what the speech half made of them (an audio worker's: SpeechHalf.hear) skip it, and decode
    # as the rows that bring their features.
    with torch.no_grad():
        heard = [model.hear(encode_each(model.encoder, [f]))[0] for f in features]
    brought = engine.run([EngineInput(None, language, heard=h) for h, language in zip(heard, LANGUAGES, strict=True)])
    assert [(b.text, b.language, b.language_source, b.adapter) for b in brought] == \
        [(o.text, o.language, o.language_source, o.adapter) for o in outputs]

    # Streaming: the deltas of each row add up to its final text, and none of them is empty.
    for row, output in enumerate(outputs):
        assert "".join(deltas[row]) == output.text
        assert all(deltas[row]), f"row {row} got an empty delta: {deltas[row]!r}"


def test_a_recording_s_language_is_detected_from_all_its_windows(soft_model: SpeechLLM) -> None:
    """`detect_whole` (the detection endpoint's rule): the windows' log posteriors, weighted by their lengths,
    summed and normalised again."""
    engine = EmbeddedEngine(soft_model, Metrics(), BIG_CACHE)
    windows = [EngineInput(f, None) for f in _features()]
    with torch.no_grad():
        states = encode_each(soft_model.encoder, [window.features for window in windows])
        posteriors = torch.cat([soft_model.language_logits(s[None], torch.tensor([len(s)])).softmax(-1)
                                for s in states])
    lengths = torch.tensor([len(s) for s in states], dtype=torch.float32)
    expected = (posteriors.log() * (lengths / lengths.sum())[:, None]).sum(0).softmax(-1)
    whole = engine.detect_whole(windows)
    assert whole.language == soft_model.config.languages[int(expected.argmax())]
    assert whole.probability == pytest.approx(float(expected.max()), abs=1e-5)
    one, alone = engine.detect_whole(windows[:1]), engine.detect(windows[:1])[0]  # one window: its own guess
    assert one.language == alone.language and one.probability == pytest.approx(alone.probability, abs=1e-5)


def test_adapters_differ_by_language(adapted: SpeechLLM) -> None:
    """Guards the test above against vacuity: with randomised B/routers, languages get different B(l)
    (SHARED by construction gives one B to all)."""
    ja = merge_language(adapted.llm, _language_index(adapted, "ja"))
    en = merge_language(adapted.llm, _language_index(adapted, "en"))
    differs = any(not torch.equal(a, b) for a, b in zip(ja.b, en.b, strict=True))
    assert differs == (adapted.config.adapter.variant != Variant.SHARED)


def test_shared_variant_serves_every_row_with_the_shared_adapter(tiny_tokenizer) -> None:
    model = _adapted_model(tiny_tokenizer, Variant.SHARED)
    engine = EmbeddedEngine(model, Metrics(), BIG_CACHE, lid_threshold=ALWAYS_DETECT, pinned_languages=["en"])
    outputs = engine.run([EngineInput(f, language) for f, language in zip(_features(), LANGUAGES, strict=True)])
    assert {o.adapter for o in outputs} == {SHARED_KEY}
    assert engine.cache.cached() == [SHARED_KEY]
    assert engine.cache.pinned == {SHARED_KEY}  # pinning a language pins the one adapter that serves it


def test_streaming_deltas_over_many_rows(soft_model: SpeechLLM) -> None:
    """Random weights emit random byte tokens (broken UTF-8, control characters, stray spaces): a good
    stress for the delta logic, which must never retract text nor send an empty delta."""
    engine = EmbeddedEngine(soft_model, Metrics(), BIG_CACHE, lid_threshold=ALWAYS_DETECT)
    generator = torch.Generator().manual_seed(7)
    codes = list(soft_model.config.languages)
    features = [torch.randn(80, 24 + 8 * (row % 6), generator=generator) for row in range(16)]
    deltas: list[list[str]] = [[] for _ in features]
    items = [EngineInput(f, codes[row % len(codes)] if row % 4 else None, on_text=deltas[row].append)
             for row, f in enumerate(features)]
    outputs = engine.run(items)
    assert sum(len(o.text) for o in outputs) > 0
    for row, output in enumerate(outputs):
        assert "".join(deltas[row]) == output.text
        assert all(deltas[row])


# ---- the adapter cache, through the engine ------------------------------------------------------------

def _run_languages(engine: EmbeddedEngine, languages: list[str | None]) -> list[EngineOutput]:
    generator = torch.Generator().manual_seed(3)
    return engine.run([EngineInput(torch.randn(80, 32, generator=generator), language) for language in languages])


def test_second_run_of_the_same_languages_is_all_hits(soft_model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = EmbeddedEngine(soft_model, metrics, BIG_CACHE, lid_threshold=ALWAYS_FALLBACK)
    _run_languages(engine, LANGUAGES)
    keys = {"ja", "en", "de", SHARED_KEY}  # one merge per adapter, however many rows use it
    assert _sample(metrics, "zasr_adapter_cache_misses_total") == len(keys)
    assert _sample(metrics, "zasr_adapter_cache_hits_total") == 0
    assert _sample(metrics, "zasr_adapter_merge_duration_seconds_count") == len(keys)
    assert set(engine.cache.cached()) == keys

    _run_languages(engine, LANGUAGES)
    assert _sample(metrics, "zasr_adapter_cache_misses_total") == len(keys)
    assert _sample(metrics, "zasr_adapter_cache_hits_total") == len(keys)
    assert _sample(metrics, "zasr_adapter_cache_evictions_total") == 0
    assert _sample(metrics, "zasr_adapter_cache_entries") == len(keys)
    assert _sample(metrics, "zasr_adapter_cache_bytes") == engine.cache.bytes_used
    assert engine.cache.bytes_used == sum(engine.cache.get(key).nbytes for key in keys)
    # The batch histograms saw both batches: five rows, four adapters each.
    assert _sample(metrics, "zasr_batch_size_rows_sum") == 2 * len(LANGUAGES)
    assert _sample(metrics, "zasr_batch_languages_sum") == 2 * len(keys)


def test_lru_eviction_never_drops_a_pinned_language(soft_model: SpeechLLM) -> None:
    metrics = Metrics()
    one_adapter = merge_language(soft_model.llm, 0).nbytes  # every language's adapter is the same size
    engine = EmbeddedEngine(soft_model, metrics, one_adapter, pinned_languages=["ja"])

    _run_languages(engine, ["ja", "en"])
    # Over capacity, but the only candidates are the pinned one and the newest, which always stays.
    assert engine.cache.cached() == ["ja", "en"]
    assert _sample(metrics, "zasr_adapter_cache_evictions_total") == 0

    _run_languages(engine, ["de"])
    assert engine.cache.cached() == ["ja", "de"]  # "en" was the least recently used unpinned adapter
    _run_languages(engine, ["en", "en"])
    assert engine.cache.cached() == ["ja", "en"]
    assert _sample(metrics, "zasr_adapter_cache_evictions_total") == 2

    hits = _sample(metrics, "zasr_adapter_cache_hits_total")
    _run_languages(engine, ["ja"])  # pinned, so still there although it is the oldest entry
    assert _sample(metrics, "zasr_adapter_cache_hits_total") == hits + 1
    assert _sample(metrics, "zasr_adapter_cache_misses_total") == 4  # ja, en, de, en again


def test_cache_evicts_least_recently_used_not_first_inserted(soft_model: SpeechLLM) -> None:
    two_adapters = 2 * merge_language(soft_model.llm, 0).nbytes
    engine = EmbeddedEngine(soft_model, Metrics(), two_adapters)
    engine.cache.get("en")
    engine.cache.get("de")
    engine.cache.get("en")  # touch: "de" becomes the least recently used
    engine.cache.get("fr")
    assert engine.cache.cached() == ["en", "fr"]


def test_adapter_evicted_while_held_still_works(soft_model: SpeechLLM) -> None:
    model = soft_model
    one_adapter = merge_language(model.llm, 0).nbytes
    engine = EmbeddedEngine(model, Metrics(), one_adapter)
    held = engine.cache.get("ja")  # what an in-flight batch holds
    other = engine.cache.get("en")
    engine.cache.get("de")
    assert "ja" not in engine.cache.cached() and "en" not in engine.cache.cached()

    # Rows 0-1 Japanese with the held (evicted) adapter, row 2 English: against the ungrouped path.
    generator = torch.Generator().manual_seed(4)
    embeds = torch.randn(3, 6, model.llm.config.hidden_size, generator=generator)
    with torch.no_grad(), use_segments(model.llm, [(0, 2, held), (2, 3, other)]):
        grouped = model.llm(inputs_embeds=embeds).logits
    ja, en = _language_index(model, "ja"), _language_index(model, "en")
    with torch.no_grad(), use_languages(model.llm, torch.tensor([ja, ja, en])):
        reference = model.llm(inputs_embeds=embeds).logits
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-5)


# ---- merged adapter size ---------------------------------------------------------------------------------

@pytest.mark.parametrize("language", ["ja", None])
def test_merged_adapter_nbytes(adapted: SpeechLLM, language: str | None) -> None:
    index = None if language is None else _language_index(adapted, language)
    merged: MergedAdapter = merge_language(adapted.llm, index)
    tensors = (merged.a or []) + merged.b
    assert merged.nbytes > 0
    assert merged.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    # And independently of the tensors it holds: one B(l) (out × r) per layer, plus A_l (r × in) for the
    # independent baseline only (the others reuse the batch's shared A x).
    rank = adapted.config.adapter.rank
    independent = adapted.config.adapter.variant == Variant.INDEPENDENT
    expected = sum(4 * rank * (layer.base.out_features + (layer.base.in_features if independent else 0))
                   for _, layer in zipper_layers(adapted.llm))
    assert merged.nbytes == expected


def test_length_groups_put_an_outlier_apart_and_cover_every_row_once() -> None:
    lengths = [161, 170, 153, 208, 539, 166, 160]
    groups = length_groups(lengths, call_cost=100)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    assert [4] in groups  # the 5.4 s clip is encoded on its own
    assert length_groups([200] * 5, call_cost=100) == [[0, 1, 2, 3, 4]]  # equal lengths: one call
    assert length_groups([100, 3000], call_cost=0) == [[0], [1]]
    assert length_groups([], call_cost=100) == []


def test_text_stream_leaves_out_bytes_that_form_no_character(tiny_tokenizer) -> None:
    """A token the model writes that is a lone UTF-8 continuation byte decodes to U+FFFD: neither the deltas nor the
    final text carry it (a realtime turn sent one)."""
    stray = next(i for i in range(len(tiny_tokenizer)) if tiny_tokenizer.decode([i]) == INVALID)
    words = tiny_tokenizer.encode("hello é wörld", add_special_tokens=False)
    deltas: list[str] = []
    stream = TextStream(deltas.append, tiny_tokenizer)
    for token in [words[0], stray, *words[1:], stray]:
        stream.add(token)
    text = stream.finish()
    assert INVALID not in text and text == "".join(deltas) == "hello é wörld"


def test_the_engine_s_prompt_gemms_take_their_own_dtype(soft_model: SpeechLLM) -> None:
    """EmbeddedEngine's `prompt_gemm_dtype` (ZASR_DECODER_PROMPT_GEMM_DTYPE) reaches the decoder: its GEMMs of more
    than a step's rows in that dtype, the others in float32 (speechllm.cpu_linear.OneDNNLinear.wide_gemm_dtype)."""
    engine = EmbeddedEngine(soft_model, Metrics(), 1 << 30, prompt_gemm_dtype=torch.bfloat16)
    linears = [packed.linear for packed in engine.decoder.qkv + engine.decoder.down] + [engine.decoder.lm_head]
    assert all(linear.gemm_dtype is torch.float32 and linear.wide_gemm_dtype is torch.bfloat16 for linear in linears)
    assert EmbeddedEngine(soft_model, Metrics(), 1 << 30).decoder.lm_head.wide_gemm_dtype is torch.float32
