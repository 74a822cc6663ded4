"""The prompt format, in one place.

    [audio embeddings] <|transcribe|> <|xx|>   →   text tokens  <|endoftext|>

The LLM is pretrained on text as `<|xx|> text <|endoftext|>`, so after the language token it
already knows how that language is spelt; the audio embeddings in front tell it what was said.
Its pretraining also has a reading task in the same format with the text spelt out one character
at a time where the audio goes (`spelled_ids`): a real LLM can read spelt-out text and copy from
its context, a tiny one learns it only if shown, and the CTC-compressed audio prompt is close to
a spelling (one position per character).
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from speechllm.languages import LANGUAGE_CODES

END_OF_TEXT = "<|endoftext|>"
TRANSCRIBE = "<|transcribe|>"
UNKNOWN_LANGUAGE = "<|unknown|>"  # used when no language is given and LID is not trusted


def language_token(code: str | None) -> str:
    return f"<|{code}|>" if code else UNKNOWN_LANGUAGE


SPECIAL_TOKENS: list[str] = [END_OF_TEXT, TRANSCRIBE, UNKNOWN_LANGUAGE] + [language_token(c) for c in LANGUAGE_CODES]


def prompt_suffix_ids(tokenizer: PreTrainedTokenizerBase, language: str | None) -> list[int]:
    """Token ids that follow the audio embeddings in an ASR prompt."""
    return tokenizer.convert_tokens_to_ids([TRANSCRIBE, language_token(language)])


def lm_prefix_ids(tokenizer: PreTrainedTokenizerBase, language: str) -> list[int]:
    """Token ids in front of a text-only pretraining sequence."""
    return tokenizer.convert_tokens_to_ids([language_token(language)])


def target_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """What the model should emit for a transcript: its tokens, then end-of-text."""
    return tokenizer.encode(text, add_special_tokens=False) + [eos_id(tokenizer)]


def character_ids(tokenizer: PreTrainedTokenizerBase, character: str) -> list[int]:
    """The tokens of one character on its own (one for almost every character of our languages)."""
    return tokenizer.encode(character, add_special_tokens=False)


def spelled_ids(tokenizer: PreTrainedTokenizerBase, characters: str) -> list[int]:
    """A text spelt one character at a time: what the reading task puts where the audio goes."""
    return [i for c in characters for i in character_ids(tokenizer, c)]


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.convert_tokens_to_ids(END_OF_TEXT)


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel | None = None) -> None:
    """Add our special tokens to a foreign tokenizer (a production LLM's) and grow its embeddings."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if llm is not None:
            llm.resize_token_embeddings(len(tokenizer))
