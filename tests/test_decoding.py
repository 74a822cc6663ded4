import torch

from adapters.zipper import Variant, ZipperConfig
from speechllm.decoding import generate
from speechllm.inference import transcribe_features
from tests.conftest import tiny_speech_llm


def _prompts(dim: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(n, dim) for n in (7, 3, 12)]


def test_kv_cached_decode_equals_uncached(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    prompts = _prompts(model.llm.config.hidden_size)
    cached = generate(model.llm, prompts, eos_id=-1, max_new_tokens=15, use_cache=True)
    uncached = generate(model.llm, prompts, eos_id=-1, max_new_tokens=15, use_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in uncached]
    assert all(len(h.tokens) == 15 for h in cached)
    for a, b in zip(cached, uncached, strict=True):
        assert abs(a.sum_logprob - b.sum_logprob) < 1e-3


def test_batched_decode_equals_one_by_one(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    prompts = _prompts(model.llm.config.hidden_size)
    batched = generate(model.llm, prompts, eos_id=-1, max_new_tokens=10)
    alone = [generate(model.llm, [p], eos_id=-1, max_new_tokens=10)[0] for p in prompts]
    assert [h.tokens for h in batched] == [h.tokens for h in alone]


def test_decode_stops_at_eos_and_per_row_limits(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    prompts = _prompts(model.llm.config.hidden_size)
    free = generate(model.llm, prompts, eos_id=-1, max_new_tokens=8)
    eos = free[1].tokens[0]  # pretend row 1's first token is the end-of-text
    limits = [8, 8, 3]
    stopped = generate(model.llm, prompts, eos_id=eos, max_new_tokens=limits)
    for row, limit in enumerate(limits):
        expected = free[row].tokens[: free[row].tokens.index(eos)] if eos in free[row].tokens else free[row].tokens
        assert stopped[row].tokens == expected[:limit]
    assert stopped[1].tokens == []


def test_transcribe_mixed_languages_with_zipper_adapter(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # make every language's adapter do something
    features = torch.randn(3, 80, 120)
    lengths = torch.tensor([120, 100, 80])
    batch = transcribe_features(model, features, lengths, ["en", "ja", None])
    alone = [transcribe_features(model, features[i:i + 1, :, : int(lengths[i])], lengths[i:i + 1],
                                 [lang])[0] for i, lang in enumerate(["en", "ja", None])]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert batch[0].language == "en" and batch[0].detected_language is None
    assert batch[2].detected_language in model.config.languages
