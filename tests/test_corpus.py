"""The synthetic corpus builder, run for real: espeak-ng, PyAV and multiprocessing, no mocks."""

from __future__ import annotations

import hashlib
import json
import unicodedata
import wave
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapters.corpus import (
    CorpusConfig,
    _is_word,
    _spelled_words,
    build_corpus,
    normalize_transcript,
    usable_variants,
)
from benchmarks.device_parity import first_of_each_language
from speechllm.audio import SAMPLE_RATE, load_audio
from speechllm.data import load_features, read_manifest
from speechllm.languages import BY_CODE, LANGUAGE_CODES, LANGUAGES, Tier

SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(CorpusConfig.tiny(out, seed=7, workers=2))
    return out


def manifests(root: Path) -> dict[str, list[dict]]:
    return {split: read_manifest(root / f"{split}.jsonl") for split in SPLITS}


def texts(rows: list[dict], language: str) -> set[str]:
    return {row["text"] for row in rows if row["language"] == language}


def variant(voice: str) -> str:
    return voice.split("+", 1)[1]


def test_every_split_has_all_twelve_languages(corpus: Path) -> None:
    summary = json.loads((corpus / "corpus.json").read_text())
    for split, rows in manifests(corpus).items():
        assert {row["language"] for row in rows} == set(LANGUAGE_CODES)
        assert all(row["split"] == split for row in rows)
        assert len({row["id"] for row in rows}) == len(rows)
        expected = {lang.code: CorpusConfig.tiny(corpus).count(split, lang) for lang in LANGUAGES}
        assert summary["counts"][split] == expected
    lm_languages = Counter(row["language"] for row in read_manifest(corpus / "lm_text.jsonl"))
    assert lm_languages == dict.fromkeys(LANGUAGE_CODES, 40)  # every language equally


def test_default_config_has_the_papers_tier_ratio() -> None:
    config = CorpusConfig()
    train = {lang.code: config.count("train", lang) for lang in LANGUAGES}
    high = [train[lang.code] for lang in LANGUAGES if lang.tier == Tier.HIGH]
    low = [train[lang.code] for lang in LANGUAGES if lang.tier == Tier.LOW]
    mid = [train[lang.code] for lang in LANGUAGES if lang.tier == Tier.MID]
    assert sorted(code for code, lang in BY_CODE.items() if lang.tier == Tier.LOW) == ["ar", "ja", "ko", "pt"]
    assert max(low) <= 0.011 * min(high)
    assert max(low) < min(mid) < min(high)
    assert sum(train.values()) == 4 * 8000 + 4 * 2000 + 4 * 80


def test_audio_is_16khz_mono_16bit_and_durations_match(corpus: Path) -> None:
    for rows in manifests(corpus).values():
        for row in rows:
            path = corpus / row["audio"]
            assert path.name == f"{row['id']}.wav"
            with wave.open(str(path)) as wav:
                assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (SAMPLE_RATE, 1, 2)
                assert wav.getnframes() / SAMPLE_RATE == pytest.approx(row["duration"], abs=1e-9)
            samples = load_audio(path)
            assert abs(samples.size / SAMPLE_RATE - row["duration"]) < 0.01
            assert 0.3 < row["duration"] < 8.0
            assert samples.std() > 0.003  # speech, not silence


def test_dev_and_test_voices_never_train(corpus: Path) -> None:
    rows = manifests(corpus)
    used = {split: {variant(row["voice"]) for row in rows[split]} for split in SPLITS}
    assert not used["train"] & (used["dev"] | used["test"])
    assert not used["dev"] & used["test"]
    planned = json.loads((corpus / "corpus.json").read_text())["variants"]
    assert all(used[split] <= set(planned[split]) for split in SPLITS)
    assert len(planned["test"]) == 12 and len(planned["dev"]) == 8
    for row in rows["train"]:
        assert row["voice"].split("+")[0] == BY_CODE[row["language"]].espeak_voice


def test_dev_and_test_phrases_are_unseen(corpus: Path) -> None:
    rows = manifests(corpus)
    lm = read_manifest(corpus / "lm_text.jsonl")
    for code in LANGUAGE_CODES:
        train, dev, test = (texts(rows[split], code) for split in SPLITS)
        lm_texts = {r["text"] for r in lm if r["language"] == code}
        assert not (dev | test) & (train | lm_texts)
        assert not dev & test


def test_held_out_words_appear_only_outside_train(corpus: Path) -> None:
    summary = json.loads((corpus / "corpus.json").read_text())
    rows = manifests(corpus)
    for code, held_out in summary["held_out_words"].items():
        assert len(held_out) == round(0.1 * summary["vocabulary_sizes"][code])
        if not BY_CODE[code].unspaced:  # unspaced transcripts cannot be split back into words
            assert not {w for text in texts(rows["train"], code) for w in text.split()} & set(held_out)
    assert 0 < summary["held_out_word_rate"]["test"] < 0.5


def test_transcripts_are_normalized_and_japanese_is_kana_only(corpus: Path) -> None:
    for rows in manifests(corpus).values():
        for row in rows:
            assert normalize_transcript(row["text"], row["language"]) == row["text"]
            if BY_CODE[row["language"]].unspaced:
                assert " " not in row["text"]
            if row["language"] == "ja":
                assert all(unicodedata.name(c).startswith(("HIRAGANA", "KATAKANA")) for c in row["text"])


def test_same_seed_gives_the_same_corpus_for_any_worker_count(corpus: Path, tmp_path: Path) -> None:
    build_corpus(CorpusConfig.tiny(tmp_path, seed=7, workers=1))
    assert manifests(tmp_path) == manifests(corpus)
    assert (tmp_path / "lm_text.jsonl").read_bytes() == (corpus / "lm_text.jsonl").read_bytes()
    for row in manifests(corpus)["test"] + manifests(corpus)["train"][::5]:
        digest = [hashlib.sha256((root / row["audio"]).read_bytes()).digest() for root in (corpus, tmp_path)]
        assert digest[0] == digest[1]


def test_a_subset_saved_as_a_corpus_loads_without_the_audio(corpus: Path, tmp_path: Path) -> None:
    dev = load_features(corpus, "dev")
    subset = first_of_each_language(dev, 1)
    assert set(subset.rows_by_language()) == set(LANGUAGE_CODES)
    assert all(len(rows) == 1 for rows in subset.rows_by_language().values())
    subset.save(tmp_path / "subset", "dev")
    loaded = load_features(tmp_path / "subset", "dev")  # no audio there: only the saved features can answer
    assert loaded.entries == subset.entries
    assert torch.equal(loaded.features, subset.features) and torch.equal(loaded.offsets, subset.offsets)


def test_word_filters_drop_what_espeak_would_not_read_as_a_word() -> None:
    assert _is_word("house", "en") and _is_word("a", "en") and _is_word("и", "ru")
    assert not _is_word("dvd", "en") and not _is_word("км", "ru") and not _is_word("x2", "en")
    assert _is_word("ありがとう", "ja") and _is_word("テレビ", "ja")
    assert not _is_word("日本", "ja") and not _is_word("ー", "ja")
    assert _is_word("ที่", "th") and not _is_word("ๆ", "th")
    assert _is_word("người", "vi") and not _is_word("google", "vi")
    assert _spelled_words(("en", ["usa", "house", "xiv", "a"])) == [True, False, True, False]


def test_voice_variants_are_distinct_and_fast_test_is_dropped() -> None:
    variants, dropped = usable_variants()
    assert "fast" in dropped and "fast" not in variants
    assert len({"caleb", "klatt", "klatt6"} & set(variants)) == 1  # three names, one voice
    assert {"m3", "f2", "whisper", "whisperf"} <= set(variants)
    assert len(variants) >= 12 + 8 + 40


def test_normalize_transcript() -> None:
    assert normalize_transcript("  Hello,   World! ", "en") == "hello world"
    assert normalize_transcript("Don't STOP", "en") == "dont stop"
    assert normalize_transcript("こんにちは 、ありがとう。", "ja") == "こんにちはありがとう"
    assert normalize_transcript("Привет, мир", "ru") == "привет мир"
