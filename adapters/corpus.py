"""Deterministic synthetic speech corpus: espeak-ng reading word-list phrases in the 12 languages.

No recorded speech can be downloaded here (DESIGN.md section 4), so speech is synthesized. The
test and dev splits use voice variants and phrases that training never sees, and a fixed 10% of
each language's words never occur in training either, so dev/test also measure spelling of words
the ASR model never heard. Every random choice derives from the seed and the utterance's
(split, language, index), so the output is identical for any worker count.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speechllm.audio import SAMPLE_RATE, load_audio, write_wav
from speechllm.data import write_manifest
from speechllm.languages import BY_CODE, LANGUAGE_CODES, LANGUAGES, Language, Tier

SPLITS = ("train", "dev", "test")
HELD_OUT_FRACTION = 0.1
PROTECTED_TOP_WORDS = 100  # the commonest (function) words are never held out of train
VARIANTS_PER_SPLIT = {"test": 12, "dev": 8}
CLEAN_FRACTION = 0.2
# Phrase shape: (min words, max words, min chars, max chars of the synthesis text). Words are added
# below the char minimum and dropped above the maximum, which keeps clips at roughly 1-4 s.
# Vietnamese words are single syllables; Thai characters include vowel and tone marks.
DEFAULT_SHAPE = (2, 6, 12, 40)
SHAPES = {"vi": (3, 8, 12, 40), "th": (2, 6, 10, 30)}

# Explicit alphabets keep loanwords with foreign letters out of the Latin and Cyrillic lists.
_AZ = "abcdefghijklmnopqrstuvwxyz"
_VI_VOWELS = "aeiouyàáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵ"
ALPHABETS = {"en": _AZ, "de": _AZ + "äöüß", "fr": _AZ + "àâæçéèêëîïôœùûüÿ", "es": _AZ + "áéíóúüñ",
             "it": _AZ + "àèéìíîòóùú", "pt": _AZ + "áâãàçéêíóôõú", "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
             "vi": "bcdđghklmnpqrstvx" + _VI_VOWELS}  # Vietnamese has no f, j, w, z
VOWELS = "aeiouyæœаеёиоуыэюя"  # compared after stripping accents
# One Vietnamese syllable: keeps the English words of wordfreq's Vietnamese list ("play") out.
VI_SYLLABLE = re.compile(f"(?:b|ch?|d|đ|gh?|gi|h|kh?|l|m|ngh?|nh?|ph?|qu|r|s|th?|tr|v|x)?[{_VI_VOWELS}]+"
                         "(?:ch?|m|ng?|nh|p|t)?")
# The other scripts, by Unicode character-name prefix. Kanji are left out: espeak-ng says
# "Chinese letter" for each of them.
SCRIPTS = {"ar": ("ARABIC",), "ko": ("HANGUL SYLLABLE",), "th": ("THAI CHARACTER",),
           "ja": ("HIRAGANA", "KATAKANA")}
NOT_LETTERS = set("ـๆฯゝゞヽヾ")  # tatweel, Thai repetition/abbreviation marks, kana iteration marks
JA_FRAGMENT_START = set("ーっッんンゃゅょャュョぁぃぅぇぉァィゥェォ")  # morpheme pieces, not words

# In espeak-ng's -X trace a spelled word shows single-letter lookups, an abbreviation flag, or a
# Roman-numeral lookup ("xiv" is read "fourteen").
_SPELLED = re.compile(r"^Found: '_?[^\W\d_]' |\$abbrev|^Found: '_roman'", re.M)
_SENTINEL = re.compile(r"^Found: '_0' .*$", re.M)  # the "0." between words in one trace


@dataclass
class CorpusConfig:
    out_dir: Path = Path("data/corpus")
    seed: int = 0
    high_per_language: int = 8000  # train utterances per high-tier language
    mid_per_language: int = 2000  # mid tier
    low_per_language: int = 80  # extremely low tier (ar, ja, ko, pt): 1% of high
    dev_per_language: int = 100
    test_per_language: int = 200
    lm_phrases_per_language: int = 20000  # text-only phrases for LM pretraining
    vocabulary_size: int = 3000  # top-N words per language
    workers: int = 2

    @classmethod
    def tiny(cls, out_dir: Path, seed: int = 0, workers: int = 2) -> CorpusConfig:
        """A corpus that builds in seconds, for tests."""
        return cls(Path(out_dir), seed, high_per_language=6, mid_per_language=4, low_per_language=2,
                   dev_per_language=2, test_per_language=2, lm_phrases_per_language=40,
                   vocabulary_size=150, workers=workers)

    def count(self, split: str, language: Language) -> int:
        """Utterances of `language` in `split`."""
        if split != "train":
            return self.dev_per_language if split == "dev" else self.test_per_language
        return {Tier.HIGH: self.high_per_language, Tier.MID: self.mid_per_language,
                Tier.LOW: self.low_per_language}[language.tier]


@dataclass
class _Text:
    """One language's words and phrases; phrases[split or "lm"] holds (synthesis, transcript) pairs."""

    words: list[str]
    held_out: set[str]
    phrases: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def normalize_transcript(text: str, language: str) -> str:
    """Lower-case, punctuation and symbols removed, spaces collapsed (removed for unspaced languages)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("'", "").replace("’", "")
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return ("" if BY_CODE[language].unspaced else " ").join(text.split())


def _raw_words(language: Language) -> list[str]:
    if language.text_source == "pythainlp-tnc":
        from pythainlp.corpus import tnc

        return [word for word, _ in sorted(tnc.word_freqs(), key=lambda pair: -pair[1])]
    import wordfreq

    return wordfreq.top_n_list(language.code, 100_000)


def _is_word(word: str, code: str) -> bool:
    """Only letters of the language's script; 1-letter words only for vowels of alphabetic scripts."""
    # Not str.isalpha(): Thai vowel and tone marks are combining marks, which it rejects.
    if not word or unicodedata.category(word[0])[0] != "L":
        return False
    if any(unicodedata.category(c)[0] not in "LM" or c in NOT_LETTERS for c in word):
        return False
    if (code == "vi" and not VI_SYLLABLE.fullmatch(word)) or \
            (code == "ja" and (word[0] in JA_FRAGMENT_START or word[-1] in "っッ")):
        return False
    if code in ALPHABETS:  # without a vowel ("dvd", "км") espeak-ng spells a word letter by letter
        vowel = any(c in VOWELS for c in unicodedata.normalize("NFD", word))
        return vowel and set(word) <= set(ALPHABETS[code])
    return len(word) >= 2 and all(unicodedata.name(c, "").startswith(SCRIPTS[code]) for c in word)


def _spelled_words(job: tuple[str, list[str]]) -> list[bool]:
    """Which words espeak-ng would spell out (or read as a number), from one -X trace of them all."""
    voice, words = job
    text = "".join(f"0.\n{word}.\n" for word in words) + "0.\n"
    trace = subprocess.run(["espeak-ng", "-q", "-X", "-b", "1", "-v", voice], input=text.encode(),
                           capture_output=True, check=True).stdout.decode("utf-8", "replace")
    chunks = _SENTINEL.split(trace)[1:-1]
    if len(chunks) != len(words):
        raise RuntimeError(f"espeak-ng's trace for {voice} did not split into {len(words)} words")
    return [len(word) > 1 and bool(_SPELLED.search(chunk)) for word, chunk in zip(words, chunks, strict=True)]


def _vocabularies(config: CorpusConfig, pool) -> dict[str, list[str]]:
    candidates, jobs = [], []
    for language in LANGUAGES:
        words = list(dict.fromkeys(w for w in _raw_words(language) if _is_word(w, language.code)))
        candidates.append(words[: int(config.vocabulary_size * 1.3) + 50])  # room for spelled ones
        jobs.append((language.espeak_voice, candidates[-1]))
    flags = pool.map(_spelled_words, jobs)
    return {lang.code: [w for w, bad in zip(words, spelled, strict=True) if not bad][: config.vocabulary_size]
            for lang, words, spelled in zip(LANGUAGES, candidates, flags, strict=True)}


def _held_out(words: list[str], seed: int, lang_index: int) -> set[str]:
    rng = np.random.default_rng([seed, 1, lang_index])
    protected = min(PROTECTED_TOP_WORDS, len(words) // 10)
    picks = rng.choice(np.arange(protected, len(words)), round(HELD_OUT_FRACTION * len(words)), replace=False)
    return {words[i] for i in picks}


def _sample_phrases(rng: np.random.Generator, words: list[str], weights: np.ndarray, count: int,
                    language: Language, forbidden: set[str]) -> list[tuple[str, str]]:
    """`count` distinct (synthesis text, transcript) pairs, no transcript in `forbidden`."""
    min_words, max_words, min_chars, max_chars = SHAPES.get(language.code, DEFAULT_SHAPE)
    taken, phrases = set(forbidden), []
    for _ in range(1000):
        n = 2 * (count - len(phrases)) + 16
        draws = rng.choice(len(words), size=(n, max_words), p=weights / weights.sum())
        for row, length in zip(draws, rng.integers(min_words, max_words + 1, size=n), strict=True):
            chosen = [words[i] for i in row]
            while length < max_words and len(" ".join(chosen[:length])) < min_chars:
                length += 1
            while length > min_words and len(" ".join(chosen[:length])) > max_chars:
                length -= 1
            transcript = ("" if language.unspaced else " ").join(chosen[:length])
            if transcript not in taken:
                taken.add(transcript)
                phrases.append((" ".join(chosen[:length]), transcript))
            if len(phrases) == count:
                return phrases
    raise RuntimeError(f"could not draw {count} distinct {language.code} phrases from {len(words)} words")


def _language_text(config: CorpusConfig, lang_index: int, words: list[str]) -> _Text:
    language = LANGUAGES[lang_index]
    text = _Text(words, _held_out(words, config.seed, lang_index))
    weights = 1.0 / np.sqrt(np.arange(1, len(words) + 1))  # flatter than Zipf: more variety
    train_weights = np.where([w in text.held_out for w in words], 0.0, weights)
    forbidden: set[str] = set()
    # dev and test first, so that train and the LM text can be kept apart from both
    for stream, part in enumerate(("dev", "test", "train", "lm")):
        rng = np.random.default_rng([config.seed, 2, lang_index, stream])
        count = config.lm_phrases_per_language if part == "lm" else config.count(part, language)
        w = train_weights if part == "train" else weights
        text.phrases[part] = _sample_phrases(rng, words, w, count, language, forbidden)
        if part in ("dev", "test"):
            forbidden |= {transcript for _, transcript in text.phrases[part]}
    return text


def list_variants() -> list[str]:
    """espeak-ng's voice variants by file name (e.g. "m3"; "Mr serious" has a space)."""
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True)
    return sorted(set(re.findall(r"!v/(.+?)(?: {2,}| *$)", listing.stdout, re.M)))


def _probe(voice: str) -> str:
    cmd = ["espeak-ng", "-b", "1", "-v", voice, "--stdout", "--", "the quick brown fox jumps over the dog"]
    return hashlib.sha256(subprocess.run(cmd, capture_output=True, check=True).stdout).hexdigest()


def usable_variants() -> tuple[list[str], dict[str, str]]:
    """Variants that sound different from the base voice and from each other, and the dropped ones.

    "fast" (fast_test, "unstable") is the base voice at ordinary speeds, and caleb, klatt and klatt6
    are one voice: kept, such duplicates could put a test speaker into training under another name.
    """
    seen, keep, dropped = {_probe("en"): "the base voice"}, [], {}
    for variant in list_variants():
        digest = _probe(f"en+{variant}")
        if digest in seen:
            dropped[variant] = f"same audio as {seen[digest]}"
        else:
            seen[digest] = variant
            keep.append(variant)
    return keep, dropped


def _split_variants(variants: list[str], seed: int) -> dict[str, list[str]]:
    order = [variants[i] for i in np.random.default_rng([seed, 3]).permutation(len(variants))]
    n_test, n_dev = VARIANTS_PER_SPLIT["test"], VARIANTS_PER_SPLIT["dev"]
    parts = {"train": order[n_test + n_dev:], "dev": order[n_test: n_test + n_dev], "test": order[:n_test]}
    return {split: sorted(names) for split, names in parts.items()}


@dataclass(frozen=True)
class _Job:
    out_dir: str
    seed: int
    split: str
    lang: str
    index: int
    speak: str  # synthesis text: always space-separated words
    text: str  # transcript
    voice: str


def _utterance_rng(seed: int, stream: int, split: str, lang: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, SPLITS.index(split), LANGUAGE_CODES.index(lang), index])


def _trim(samples: np.ndarray) -> np.ndarray:
    """Cut espeak-ng's own leading/trailing silence, so that the random padding alone sets it."""
    loud = np.flatnonzero(np.abs(samples) > max(1e-3, 0.01 * np.abs(samples).max()))
    margin = SAMPLE_RATE // 50
    return samples[max(0, loud[0] - margin): loud[-1] + margin] if loud.size else samples


def _noise(rng: np.random.Generator, n: int, pink: bool) -> np.ndarray:
    if not pink:
        return rng.standard_normal(n)
    size = 1 << (n - 1).bit_length()  # FFTs of awkward (e.g. prime) lengths are several times slower
    spectrum = np.fft.rfft(rng.standard_normal(size)) / np.sqrt(np.maximum(np.arange(size // 2 + 1), 1))
    coloured = np.fft.irfft(spectrum, size)[:n]  # power falls as 1/f
    return coloured / (coloured.std() + 1e-12)


def _augment(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    speech = speech * 10 ** (rng.uniform(-6, 0) / 20)
    lead, tail = rng.integers(0, int(0.15 * SAMPLE_RATE) + 1, size=2)
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(tail)])
    if rng.random() >= CLEAN_FRACTION:
        snr_db, pink = rng.uniform(15, 40), rng.random() < 0.5
        audio += _noise(rng, audio.size, pink) * np.sqrt(np.mean(speech**2) / 10 ** (snr_db / 10))
    return audio.astype(np.float32)


def _espeak(job: _Job, speed: int, options: list[str]) -> tuple[bytes, int]:
    """espeak-ng's WAV output and the speed used. espeak-ng 1.51 segfaults on some Vietnamese phrases
    at high effective speed (-s times the variant's own speed-up): those are retried slower."""
    for slower in (speed, speed - 30, speed - 60):
        cmd = ["espeak-ng", "-b", "1", "-z", "-v", job.voice, "-s", str(slower), *options, "--stdout", "--"]
        result = subprocess.run([*cmd, job.speak], capture_output=True)
        if result.returncode == 0 and result.stdout:
            return result.stdout, slower
    raise RuntimeError(f"espeak-ng failed (exit {result.returncode}): {cmd} {job.speak!r}")


def _synthesize(job: _Job) -> tuple[dict, bool]:
    """Writes one utterance; returns its manifest row and whether espeak-ng had to be slowed down."""
    rng = _utterance_rng(job.seed, 5, job.split, job.lang, job.index)
    speed = int(rng.integers(130, 211))
    options = ["-p", rng.integers(20, 81), "-a", rng.integers(70, 131),
               "-g", rng.choice([0, 0, 0, 1, 2])]  # -g: extra gap between words, sometimes
    wav, used_speed = _espeak(job, speed, [str(option) for option in options])
    samples = _augment(_trim(load_audio(wav)), rng)
    uid = f"{job.lang}-{job.split}-{job.index:06d}"
    audio = f"audio/{job.split}/{job.lang}/{uid}.wav"
    write_wav(Path(job.out_dir) / audio, samples)
    row = {"id": uid, "audio": audio, "text": job.text, "language": job.lang,
           "duration": samples.size / SAMPLE_RATE, "voice": job.voice, "split": job.split}
    return row, used_speed != speed


def _jobs(config: CorpusConfig, split: str, texts: dict[str, _Text], variants: list[str]) -> list[_Job]:
    jobs = []
    for language in LANGUAGES:
        for index, (speak, text) in enumerate(texts[language.code].phrases[split]):
            rng = _utterance_rng(config.seed, 4, split, language.code, index)
            variant = variants[rng.integers(len(variants))]
            jobs.append(_Job(str(config.out_dir), config.seed, split, language.code, index, speak, text,
                             f"{language.espeak_voice}+{variant}"))
    return jobs


def build_corpus(config: CorpusConfig) -> None:
    start = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "features", ignore_errors=True)  # speechllm.data's feature cache of an old build
    variants, dropped = usable_variants()
    split_variants = _split_variants(variants, config.seed)
    manifests, slowed = {}, []
    with Pool(config.workers) as pool:
        vocabularies = _vocabularies(config, pool)
        texts = {code: _language_text(config, i, vocabularies[code]) for i, code in enumerate(LANGUAGE_CODES)}
        for split in SPLITS:
            for code in LANGUAGE_CODES:
                (out / "audio" / split / code).mkdir(parents=True, exist_ok=True)
            jobs = _jobs(config, split, texts, split_variants[split])
            results = list(tqdm(pool.imap(_synthesize, jobs, chunksize=16), total=len(jobs),
                                desc=f"synthesize {split}", unit="utt"))
            manifests[split] = [row for row, _ in results]
            slowed += [row["id"] for row, slow in results if slow]
            write_manifest(out / f"{split}.jsonl", manifests[split])
    lm_rows = [{"language": code, "text": t} for code, text in texts.items() for _, t in text.phrases["lm"]]
    write_manifest(out / "lm_text.jsonl", lm_rows)
    summary = _summary(config, manifests, texts, split_variants, dropped)
    summary["slowed_for_espeak_crash"] = slowed
    summary["build_seconds"] = round(time.perf_counter() - start, 1)
    (out / "corpus.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")


def _summary(config: CorpusConfig, manifests: dict[str, list[dict]], texts: dict[str, _Text],
             split_variants: dict[str, list[str]], dropped: dict[str, str]) -> dict:
    tier_of = {lang.code: lang.tier.value for lang in LANGUAGES}
    summary: dict = {"config": {**asdict(config), "out_dir": str(config.out_dir)}, "counts": {},
                     "tier_counts": {}, "tier_hours": {}, "variants": split_variants,
                     "dropped_variants": dropped, "held_out_word_rate": {}}
    for split, rows in manifests.items():
        summary["counts"][split] = {code: sum(r["language"] == code for r in rows) for code in LANGUAGE_CODES}
        by_tier = {t.value: [r for r in rows if tier_of[r["language"]] == t.value] for t in Tier}
        summary["tier_counts"][split] = {tier: len(part) for tier, part in by_tier.items()}
        summary["tier_hours"][split] = {tier: round(sum(r["duration"] for r in part) / 3600, 3)
                                        for tier, part in by_tier.items()}
    for split in ("dev", "test"):  # share of dev/test word tokens that training never contains
        hits = [w in t.held_out for t in texts.values() for p, _ in t.phrases[split] for w in p.split()]
        summary["held_out_word_rate"][split] = round(sum(hits) / len(hits), 4)
    summary["lm_phrases"] = sum(len(text.phrases["lm"]) for text in texts.values())
    summary["vocabulary_sizes"] = {code: len(text.words) for code, text in texts.items()}
    summary["held_out_words"] = {code: sorted(text.held_out) for code, text in texts.items()}
    return summary


if __name__ == "__main__":
    build_corpus(CorpusConfig())
