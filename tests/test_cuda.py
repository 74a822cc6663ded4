"""The embedded engine on a GPU (ZASR_DEVICE=cuda). Skipped where torch sees no CUDA device, as in CI: run them on
a GPU node with `python -m pytest tests/test_cuda.py`. What the engine decodes there must be what it decodes on
the CPU, the path every other test checks, and its merged adapters must live on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.zipper import Variant
from server.engine import EmbeddedEngine, EngineInput
from server.metrics import Metrics
from speechllm.model import SpeechLLM
from tests.test_engine import ALWAYS_DETECT, BIG_CACHE, LANGUAGES, _adapted_model, _features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("variant", list(Variant), ids=str)
def test_the_engine_on_cuda_decodes_what_it_decodes_on_the_cpu(tiny_tokenizer, variant: Variant) -> None:
    on_cpu = _adapted_model(tiny_tokenizer, variant)
    on_gpu = copy.deepcopy(on_cpu).to("cuda")
    features = _features()
    outputs = {}
    for device, model in (("cpu", on_cpu), ("cuda", on_gpu)):
        engine = EmbeddedEngine(model, Metrics(), BIG_CACHE, lid_threshold=ALWAYS_DETECT)
        outputs[device] = engine.run([EngineInput(f, language) for f, language in zip(features, LANGUAGES,
                                                                                       strict=True)])
    for cpu, gpu in zip(outputs["cpu"], outputs["cuda"], strict=True):
        assert (gpu.text, gpu.language, gpu.language_source, gpu.adapter) == \
            (cpu.text, cpu.language, cpu.language_source, cpu.adapter)
        assert gpu.avg_logprob == pytest.approx(cpu.avg_logprob, abs=1e-3)
        assert gpu.language_probability == pytest.approx(cpu.language_probability, abs=1e-4)


def test_merged_adapters_are_cached_on_the_gpu(tiny_tokenizer) -> None:
    model: SpeechLLM = _adapted_model(tiny_tokenizer, Variant.SOFT).to("cuda")
    metrics = Metrics()
    engine = EmbeddedEngine(model, metrics, BIG_CACHE, lid_threshold=ALWAYS_DETECT)
    engine.run([EngineInput(f, language) for f, language in zip(_features(), LANGUAGES, strict=True)])
    cached = engine.cache.cached()
    assert {"ja", "en", "de"} <= set(cached)
    for key in cached:
        adapter = engine.cache.get(key)
        assert all(t.device.type == "cuda" for t in (adapter.a or []) + adapter.b)
    assert engine.cache.bytes_used == sum(engine.cache.get(key).nbytes for key in cached)
    assert metrics.registry.get_sample_value("zasr_adapter_cache_bytes") == engine.cache.bytes_used
