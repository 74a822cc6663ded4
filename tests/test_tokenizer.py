"""The shipped tokenizer round-trips text of all 12 languages, and the prompt tokens are atomic."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer
from wordfreq import top_n_list

from speechllm.languages import LANGUAGE_CODES
from speechllm.prompt import SPECIAL_TOKENS, lm_prefix_ids, prompt_suffix_ids, target_ids

SHIPPED_LLM = Path(__file__).resolve().parent.parent / "models" / "default" / "llm"
THAI = ["สวัสดีครับ", "ภาษาไทย", "ขอบคุณมาก", "โรงเรียน"]
JAPANESE_KANA = ["こんにちは", "ありがとう", "カタカナ", "ですます"]


@pytest.fixture(scope="module")
def tokenizer():
    if not SHIPPED_LLM.exists():
        pytest.skip("no shipped model in models/default")
    return AutoTokenizer.from_pretrained(SHIPPED_LLM)


def _sample_texts(code: str) -> list[str]:
    if code == "th":
        return THAI + ["".join(THAI)]
    if code == "ja":
        return JAPANESE_KANA + ["".join(JAPANESE_KANA)]
    words = top_n_list(code, 400)
    return [" ".join(words[i: i + 5]) for i in range(0, 400, 50)]


@pytest.mark.parametrize("code", LANGUAGE_CODES)
def test_round_trip(tokenizer, code: str) -> None:
    for text in _sample_texts(code):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("code", LANGUAGE_CODES)
def test_common_words_are_compact(tokenizer, code: str) -> None:
    """The BPE learned each language: its text costs well under one token per UTF-8 byte."""
    text = " ".join(_sample_texts(code))
    assert len(tokenizer.encode(text, add_special_tokens=False)) < 0.6 * len(text.encode())


def test_prompt_tokens_are_single_tokens(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in SPECIAL_TOKENS)
    for code in LANGUAGE_CODES:
        assert len(prompt_suffix_ids(tokenizer, code)) == 2
        assert len(lm_prefix_ids(tokenizer, code)) == 1
    assert target_ids(tokenizer, "hello")[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target_ids(tokenizer, "hello"), skip_special_tokens=True) == "hello"
