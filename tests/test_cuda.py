"""The embedded engine on a GPU (ZASR_DEVICE=cuda). Skipped where torch sees no CUDA device, as in CI: run them on
a GPU node with `python -m pytest tests/test_cuda.py`. What the engine decodes there must be what it decodes on
the CPU, the path every other test checks, and its merged adapters must live on the GPU."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from adapters.zipper import Variant
from server.batcher import Batcher
from server.engine import EmbeddedEngine, EngineInput
from server.metrics import Metrics
from speechllm.model import SpeechLLM
from tests.test_batcher import MIXED, TIMEOUT_S, _items
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


def test_rows_that_join_a_running_batch_on_cuda_decode_as_on_the_cpu(tiny_tokenizer) -> None:
    """The server's path: the batcher hands the engine groups of rows that join the rows already decoding
    (continuous batching: their KV cache and per-row adapters appended, finished rows dropped) on the GPU."""
    on_cpu = _adapted_model(tiny_tokenizer, Variant.SOFT)
    on_gpu = copy.deepcopy(on_cpu).to("cuda")
    cpu_engine = EmbeddedEngine(on_cpu, Metrics(), BIG_CACHE, lid_threshold=ALWAYS_DETECT)
    gpu_engine = EmbeddedEngine(on_gpu, Metrics(), BIG_CACHE, lid_threshold=ALWAYS_DETECT)
    items = _items((MIXED * 2)[:20] + [None, None])
    alone = [cpu_engine.run([EngineInput(item.features, item.language)])[0] for item in items]

    async def served() -> list:
        batcher = Batcher(gpu_engine, Metrics(), max_batch_size=4, max_wait_s=0.01, max_queue=64)
        await batcher.start()
        futures: list[asyncio.Future] = []
        start = 0
        for size in (1, 3, 5, 2, 4, 5, 2):  # requests of several rows, arriving while others decode
            futures += batcher.submit(items[start:start + size])
            start += size
            await asyncio.sleep(0)
        outputs = await asyncio.gather(*futures)
        await batcher.stop()
        return outputs

    outputs = asyncio.run(asyncio.wait_for(served(), TIMEOUT_S))
    assert len({output.text for output in alone}) > 1  # distinct texts: a mix-up between rows would show
    for gpu, cpu in zip(outputs, alone, strict=True):
        assert (gpu.text, gpu.language, gpu.language_source, gpu.adapter) == \
            (cpu.text, cpu.language, cpu.language_source, cpu.adapter)
