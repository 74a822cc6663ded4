"""Checkpoint round trips, and loading production-style parts from local Hugging Face directories."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperModel,
)

from adapters.zipper import Variant, ZipperConfig
from speechllm.inference import transcribe_features
from speechllm.model import SpeechLLM, SpeechLLMConfig, load_speech_half
from speechllm.prompt import SPECIAL_TOKENS
from tests.conftest import SAMPLE_TEXTS, tiny_speech_llm


def _randomize_adapter(model: SpeechLLM) -> None:
    torch.manual_seed(3)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)


def _outputs(model: SpeechLLM) -> tuple[torch.Tensor, list[str]]:
    torch.manual_seed(5)
    features, lengths = torch.randn(2, 80, 96), torch.tensor([96, 64])
    with torch.no_grad():
        states, state_lengths = model.encode(features, lengths)
        audio, _ = model.audio_embeddings(states, state_lengths)
        lid = model.language_logits(states, state_lengths)
    texts = [r.text for r in transcribe_features(model, features, lengths, ["en", None])]
    return torch.cat([audio.flatten(), lid.flatten()]), texts


@pytest.mark.parametrize("variant", [Variant.SHARED, Variant.SOFT])
def test_save_load_round_trip(tiny_tokenizer, tmp_path: Path, variant: Variant) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=variant, rank=4))
    _randomize_adapter(model)
    model.save(tmp_path / "m", dtype=torch.float32)
    loaded = SpeechLLM.load(tmp_path / "m")
    before, texts_before = _outputs(model)
    after, texts_after = _outputs(loaded)
    assert torch.equal(before, after)
    assert texts_before == texts_after
    assert loaded.config.adapter.variant == variant


def test_llm_directory_is_a_plain_hf_checkpoint(tiny_tokenizer, tmp_path: Path) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(rank=4))
    model.save(tmp_path / "m")
    names = load_file(tmp_path / "m" / "llm" / "model.safetensors").keys()
    assert not any("lora" in n or ".base." in n for n in names)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "llm")
    assert type(plain).__name__ == "Qwen2ForCausalLM"
    assert (tmp_path / "m" / "llm" / "tokenizer.json").exists()
    assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in (tmp_path / "m").rglob("*"))


def test_half_precision_checkpoint_is_close(tiny_tokenizer, tmp_path: Path) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(rank=4))
    model.save(tmp_path / "m")  # float16 on disk, as shipped
    before, _ = _outputs(model)
    after, _ = _outputs(SpeechLLM.load(tmp_path / "m"))
    assert torch.allclose(before, after, atol=2e-2, rtol=1e-2)


def _foreign_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that knows none of our special tokens, like a production LLM's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SAMPLE_TEXTS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


def test_production_parts_from_local_hf_directories(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whisper = WhisperModel(WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                         num_mel_bins=80, max_source_positions=64, vocab_size=100,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         decoder_start_token_id=1))
    whisper.save_pretrained(tmp_path / "whisper")
    tokenizer = _foreign_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")

    config = SpeechLLMConfig(encoder_kind="hf-whisper", adapter=ZipperConfig(variant=Variant.STATIC, rank=4))
    model = SpeechLLM.assemble(config, tmp_path / "llama", tmp_path / "whisper").eval()
    assert all(t in model.tokenizer.get_vocab() for t in SPECIAL_TOKENS)  # added, embeddings grown
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)
    encoder_weight = model.encoder.whisper.layers[0].fc1.weight
    assert torch.equal(encoder_weight, whisper.encoder.layers[0].fc1.weight)

    before, texts = _outputs(model)
    model.save(tmp_path / "speechllm", dtype=torch.float32)
    loaded = SpeechLLM.load(tmp_path / "speechllm")
    after, texts_after = _outputs(loaded)
    assert torch.equal(before, after) and texts == texts_after
    assert type(loaded.llm).__name__ == "LlamaForCausalLM"
    _assert_the_speech_half_alone_hears_as_the_model(tmp_path / "speechllm", model)


def test_ctc_compression_keeps_one_frame_per_labelled_run() -> None:
    from speechllm.model import ctc_compress

    states = torch.arange(12, dtype=torch.float).reshape(2, 6, 1)
    labels = torch.tensor([[0, 3, 3, 0, 3, 5], [0, 0, 0, 0, 0, 0]])
    out, lengths = ctc_compress(states, torch.tensor([6, 4]), labels)
    assert lengths.tolist() == [3, 1]
    assert out[0, :, 0].tolist() == [1.5, 4.0, 5.0]  # "3 3" averaged; the blank splits the second 3
    assert out[1, 0, 0].item() == 7.5  # nothing labelled: the mean of the real frames, not of padding


def test_ctc_compressed_model_round_trip(tiny_tokenizer, tmp_path: Path) -> None:
    from speechllm.encoder import EncoderConfig
    from speechllm.llm import LLMDims, new_qwen2

    torch.manual_seed(0)
    llm = new_qwen2(tiny_tokenizer, LLMDims(hidden_size=64, num_hidden_layers=2, intermediate_size=128))
    config = SpeechLLMConfig(encoder=EncoderConfig(d_model=64, n_layers=2, dropout=0.0), ctc_symbols=20,
                             soft_spelling=True,
                             adapter=ZipperConfig(rank=4))
    model = SpeechLLM(config, llm, tiny_tokenizer).eval()
    model.save(tmp_path / "m", dtype=torch.float32)
    before, texts = _outputs(model)
    after, texts_after = _outputs(SpeechLLM.load(tmp_path / "m"))
    assert torch.equal(before, after) and texts == texts_after
    _assert_the_speech_half_alone_hears_as_the_model(tmp_path / "m", model)


def _assert_the_speech_half_alone_hears_as_the_model(directory: Path, model: SpeechLLM) -> None:
    """`load_speech_half` (an audio worker's): the same encoder states, LID posteriors and audio embeddings as the
    whole model's, without its LLM."""
    half = load_speech_half(directory)
    assert not hasattr(half, "llm")
    generator = torch.Generator().manual_seed(0)
    features, lengths = torch.randn(2, 80, 40, generator=generator), torch.tensor([40, 23])
    with torch.no_grad():
        (states, state_lengths), (expected, _) = half.encode(features, lengths), model.encode(features, lengths)
    assert torch.equal(states, expected)
    rows = [states[row, : state_lengths[row]] for row in range(2)]
    for alone, whole in zip(half.hear(rows), model.hear(rows), strict=True):
        assert torch.equal(alone.audio, whole.audio) and alone.frames == whole.frames
        assert torch.equal(alone.language_probabilities, whole.language_probabilities)


def test_projector_starting_from_spelling_emits_the_symbols_embedding() -> None:
    from speechllm.model import Projector

    torch.manual_seed(0)
    table = torch.randn(5, 8)
    projector = Projector(encoder_dim=6, llm_dim=8, stack=1, n_symbols=5)
    projector.start_from_spelling(table)
    states = torch.randn(1, 3, 6)
    confident = torch.full((1, 3, 5), -30.0)
    confident[0, torch.arange(3), torch.tensor([2, 4, 1])] = 30.0  # one sure symbol per frame
    out, lengths = projector(states, torch.tensor([3]), confident)
    assert lengths.tolist() == [3]
    assert torch.allclose(out[0], table[[2, 4, 1]], atol=1e-6)
    uncertain, _ = projector(states, torch.tensor([3]), torch.zeros(1, 3, 5))
    assert torch.allclose(uncertain[0], table.mean(0).expand(3, 8), atol=1e-6)  # uniform posteriors
