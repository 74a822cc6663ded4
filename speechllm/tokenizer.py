"""A byte-level BPE tokenizer for all 12 languages, trained with 🤗 tokenizers and saved as the
`tokenizer.json` of the LLM's Hugging Face directory (so vLLM detokenises with the very same file)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from speechllm.prompt import END_OF_TEXT, SPECIAL_TOKENS

INVALID = "\ufffd"  # what decoding makes of bytes that are not (yet) UTF-8


def decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """Tokens as text, special tokens left out; bytes that are not UTF-8 (yet) as INVALID."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


def transcript_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """A transcript's text: bytes that form no character (a stray UTF-8 continuation byte the model wrote, or a
    sequence it left unfinished) are left out rather than shown as U+FFFD."""
    return readable(decode(tokenizer, tokens))


def readable(decoded: str) -> str:
    """Decoded text without the bytes that form no character, and without surrounding spaces."""
    return decoded.replace(INVALID, "").strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
