"""The LLM pretraining's reading task: layout of its rows, the misspelling noise and its labels."""

import random

import torch

from speechllm.pretrain import misspell, padded_batch, reading_row
from speechllm.prompt import TRANSCRIBE, language_token, spelled_ids, target_ids


def test_misspelling_at_rate_zero_is_the_text_and_at_a_high_rate_changes_it() -> None:
    rng = random.Random(0)
    assert misspell("hello world", "abc", rng, 0.0) == "hello world"
    noisy = [misspell("hello world", "xyz", rng, 0.5) for _ in range(20)]
    assert any(n != "hello world" for n in noisy)
    assert any(len(n) > 11 for n in noisy) and any(len(n) < 11 for n in noisy)  # doubles and drops


def test_reading_row_spells_where_the_audio_goes_and_trains_only_on_the_text(tiny_tokenizer) -> None:
    ids, given = reading_row(tiny_tokenizer, "hola mundo", "es", "hola mumdo")
    spelled = spelled_ids(tiny_tokenizer, "hola mumdo")
    assert len(spelled) >= len("hola mumdo")
    suffix = tiny_tokenizer.convert_tokens_to_ids([TRANSCRIBE, language_token("es")])
    assert ids[:given] == spelled + suffix
    assert ids[given:] == target_ids(tiny_tokenizer, "hola mundo")

    batch_ids, labels = padded_batch([(ids, given), ([5, 6, 7], 1)], pad=0)
    assert torch.equal(labels[0, given: len(ids)], torch.tensor(ids[given:]))
    assert (labels[0, :given] == -100).all() and (labels[0, len(ids):] == -100).all()
    assert labels[1, :3].tolist() == [-100, 6, 7] and batch_ids[1, 3:].eq(0).all()
