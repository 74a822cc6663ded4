"""The language table: the one place that says which languages exist and how each is handled.

Tiers mirror the Zipper-LoRA paper's mixed-resource setting: a high-resource tier, a mid tier,
and an extremely low-resource tier (ar, ja, ko, pt) with about 1% of a high-resource language's
training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Tier(StrEnum):
    HIGH = "high"
    MID = "mid"
    LOW = "low"


@dataclass(frozen=True)
class Language:
    code: str  # ISO-639-1
    name: str
    tier: Tier
    espeak_voice: str
    # Written without spaces between words: scored by CER, and transcripts are joined without spaces.
    unspaced: bool = False
    # Where the word list comes from (wordfreq has no Thai list; PyThaiNLP ships the TNC counts).
    text_source: str = "wordfreq"


LANGUAGES: tuple[Language, ...] = (
    Language("en", "English", Tier.HIGH, "en"),
    Language("de", "German", Tier.HIGH, "de"),
    Language("fr", "French", Tier.HIGH, "fr"),
    Language("es", "Spanish", Tier.HIGH, "es"),
    Language("it", "Italian", Tier.MID, "it"),
    Language("ru", "Russian", Tier.MID, "ru"),
    Language("vi", "Vietnamese", Tier.MID, "vi"),
    Language("th", "Thai", Tier.MID, "th", unspaced=True, text_source="pythainlp-tnc"),
    Language("ar", "Arabic", Tier.LOW, "ar"),
    Language("ja", "Japanese", Tier.LOW, "ja", unspaced=True),
    Language("ko", "Korean", Tier.LOW, "ko"),
    Language("pt", "Portuguese", Tier.LOW, "pt"),
)

LANGUAGE_CODES: tuple[str, ...] = tuple(lang.code for lang in LANGUAGES)
BY_CODE: dict[str, Language] = {lang.code: lang for lang in LANGUAGES}


def language_index(code: str) -> int:
    """Position of a language in the table: the index used by LID logits and adapter tables."""
    try:
        return LANGUAGE_CODES.index(code)
    except ValueError:
        raise UnknownLanguageError(code) from None


def codes_in_tier(tier: Tier) -> list[str]:
    return [lang.code for lang in LANGUAGES if lang.tier == tier]


class UnknownLanguageError(ValueError):
    def __init__(self, code: str) -> None:
        super().__init__(f"unsupported language {code!r}; supported: {', '.join(LANGUAGE_CODES)}")
        self.code = code
