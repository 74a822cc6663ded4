"""End to end on the shipped model: real espeak-ng speech in a voice variant the model was never
trained on, through audio decoding, features, encoder, LID, projector, LLM and decoding."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adapters.evaluate import error_rates
from adapters.zipper import use_languages
from speechllm.audio import load_audio
from speechllm.features import log_mel_spectrogram, pad_features
from speechllm.inference import transcribe_features
from speechllm.model import SpeechLLM
from tests.conftest import cer_bound

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"
PHRASES = {
    "en": ["the house is very small", "she said that they would come", "where is the water"],
    "de": ["das haus ist sehr klein", "wir haben keine zeit", "wo ist das wasser"],
    "fr": ["la maison est très petite", "nous avons le temps", "où est la voiture"],
    "es": ["la casa es muy pequeña", "tenemos mucho tiempo", "dónde está el agua"],
}
VOICE_VARIANT = "m5"  # one of the test split's variants: never heard in training


@pytest.fixture(scope="module")
def model() -> SpeechLLM:
    assert (MODEL_DIR / "config.json").exists(), "the shipped model is missing from models/default"
    return SpeechLLM.load(MODEL_DIR)


def _speak(text: str, language: str) -> torch.Tensor:
    wav = subprocess.run(["espeak-ng", "-v", f"{language}+{VOICE_VARIANT}", "--stdout", "--", text],
                         capture_output=True, check=True).stdout
    return log_mel_spectrogram(load_audio(wav))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is installed by scripts/setup.sh")
@pytest.mark.parametrize("language", list(PHRASES))
def test_transcribes_an_unseen_voice(model: SpeechLLM, language: str) -> None:
    features = [_speak(text, language) for text in PHRASES[language]]
    batch, lengths = pad_features(features)
    tagged = transcribe_features(model, batch, lengths, [language] * len(features))
    untagged = transcribe_features(model, batch, lengths, [None] * len(features))
    # The shipped model must do what its committed test-split report says it does (plus a margin for
    # three short phrases): this catches broken loading, features or decoding, not a small regression.
    assert error_rates(PHRASES[language], [r.text for r in tagged], language)["cer"] <= cer_bound(language)
    assert sum(r.detected_language == language for r in untagged) >= 2


def test_shipped_model_is_small_and_pickle_free() -> None:
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    committed = [p for p in files if "adapters" not in p.relative_to(MODEL_DIR).parts]  # adapters/: setup's
    assert sum(p.stat().st_size for p in committed) <= 30 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    report = json.loads((MODEL_DIR / "eval" / "test.json").read_text())
    assert report["split"] == "test" and set(report["languages"]) == set(model_languages())


def model_languages() -> list[str]:
    return json.loads((MODEL_DIR / "config.json").read_text())["languages"]


def test_setup_exported_the_shipped_adapters_for_peft(model: SpeechLLM) -> None:
    """scripts/setup.sh writes each language's B(l) as a PEFT adapter into models/default/adapters (derived from
    the Zipper weights, so not kept in git), again whenever those weights change. Loaded by `peft` onto the plain
    HF LLM, one gives that language's Zipper logits, within what its float16 storage allows (the float32 export is
    held to 1e-5 in test_export.py); the adapter's own effect on the logits is thousands of times larger."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapters = MODEL_DIR / "adapters"
    source = hashlib.sha256((MODEL_DIR / "config.json").read_bytes() + (MODEL_DIR / "adapter.safetensors").read_bytes())
    assert (adapters / ".source").read_text().strip() == source.hexdigest()[:16], "stale: run scripts/setup.sh"
    assert {p.name for p in adapters.iterdir() if p.is_dir()} == {*model.config.languages, "shared"}
    language = model.config.languages.index("de")
    ids = torch.randint(0, model.llm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_languages(model.llm, torch.tensor([language, language])):
        zipper_logits = model.llm(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR / "llm", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft_model = peft.PeftModel.from_pretrained(base, adapters / "de").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    assert (peft_logits - zipper_logits).abs().max() <= 5e-3
    assert (base_logits - zipper_logits).abs().max() >= 1.0
