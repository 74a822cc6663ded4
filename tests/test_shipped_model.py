"""End to end on the shipped model: real espeak-ng speech in a voice variant the model was never
trained on, through audio decoding, features, encoder, LID, projector, LLM and decoding."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adapters.evaluate import error_rates
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
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    report = json.loads((MODEL_DIR / "eval" / "test.json").read_text())
    assert report["split"] == "test" and set(report["languages"]) == set(model_languages())


def model_languages() -> list[str]:
    return json.loads((MODEL_DIR / "config.json").read_text())["languages"]
