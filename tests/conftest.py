"""Shared fixtures: tiny random models built offline, so tests never need the trained weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from speechllm.encoder import EncoderConfig
from speechllm.llm import LLMDims, new_qwen2
from speechllm.model import SpeechLLM, SpeechLLMConfig
from speechllm.tokenizer import train_tokenizer

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"

SAMPLE_TEXTS = ["hello world", "guten tag", "привет мир", "こんにちは ありがとう", "สวัสดีครับ", "안녕하세요",
                "xin chào", "مرحبا بكم", "olá mundo", "bonjour", "hola amigo", "ciao bella"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads but synchronisation; on a busy machine (a
    training job on the other core) their spin-waits made engine tests over ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide, the engine's own thread included
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(SAMPLE_TEXTS * 10, vocab_size=400)


def tiny_speech_llm(tokenizer, adapter=None, chunked: bool = False) -> SpeechLLM:
    torch.manual_seed(0)
    llm = new_qwen2(tokenizer, LLMDims(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128))
    config = SpeechLLMConfig(encoder=EncoderConfig(d_model=64, n_layers=2, n_heads=4, dropout=0.0, chunked=chunked,
                                                   chunk_size=4), adapter=adapter)
    return SpeechLLM(config, llm, tokenizer).eval()


def cer_bound(language: str, margin: float = 0.2) -> float:
    """The shipped model's test-split CER for `language` (models/default/eval/test.json) plus `margin`:
    end-to-end tests hold the model to what its committed report says."""
    report = json.loads((SHIPPED_MODEL / "eval" / "test.json").read_text())
    return min(report["languages"][language]["cer"] + margin, 1.0)
