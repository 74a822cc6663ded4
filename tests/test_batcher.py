"""The batcher (server/batcher.py): FIFO batches of mixed languages through a real (tiny, random)
engine, all-or-nothing admission, failure isolation, the engine thread, and a clean stop.

Plain `asyncio.run` drives each test (no pytest-asyncio dependency).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import torch

from adapters.zipper import Variant, ZipperConfig
from server.batcher import Batcher, QueueFull, TooManyRows
from server.engine import EmbeddedEngine, EngineInput, PreparedBatch
from server.metrics import Metrics
from server.service import abandoned_unless_answered
from server.settings import Settings, batch_wait_seconds
from speechllm.model import SpeechLLM
from tests.conftest import tiny_speech_llm

T = TypeVar("T")
TIMEOUT_S = 15.0  # a broken batcher must fail a test, never hang the suite
MIXED = ["en", "ja", "de", "ar", "ja", "en", "th", "de", "ko", "en"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingEngine(EmbeddedEngine):
    """The real engine, recording which rows each batch held (each group of rows that joined the decoding), when
    the engine thread worked, and in which thread. (It only observes: everything still runs as it would.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[EngineInput]] = []
        self.intervals: list[tuple[float, float]] = []
        self.threads: list[str] = []

    def prepare(self, batch: list[EngineInput]) -> PreparedBatch:
        self.batches.append(list(batch))
        self.threads.append(threading.current_thread().name)
        return super().prepare(batch)

    def _tick(self, joining: list, *args) -> None:
        start = time.monotonic()
        try:
            super()._tick(joining, *args)
        finally:
            self.intervals.append((start, time.monotonic()))


@pytest.fixture(scope="module")
def model(tiny_tokenizer) -> SpeechLLM:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:  # so that each language's adapter changes the text
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def _engine(model: SpeechLLM, metrics: Metrics) -> RecordingEngine:
    # Threshold above 1: untagged rows deterministically take the fallback path.
    return RecordingEngine(model, metrics, cache_bytes=1 << 30, lid_threshold=1.01)


def _items(languages: list[str | None], seed: int = 0, frames: int = 24) -> list[EngineInput]:
    # Short windows keep decoding short (its token limit follows the audio length).
    generator = torch.Generator().manual_seed(seed)
    return [EngineInput(torch.randn(80, frames + 4 * (row % 3), generator=generator), language)
            for row, language in enumerate(languages)]


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _record_completion(futures: list[asyncio.Future], order: list[int], first_index: int = 0) -> None:
    for offset, future in enumerate(futures):
        future.add_done_callback(lambda _, index=first_index + offset: order.append(index))


def _run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def _batch_of(engine: RecordingEngine) -> dict[int, int]:
    """id(EngineInput) → index of the engine batch that ran it."""
    return {id(item): index for index, batch in enumerate(engine.batches) for item in batch}


# ---- ordering and batch sizes ------------------------------------------------------------------------------

def test_results_reach_their_futures(model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = _engine(model, metrics)
    items = _items((MIXED * 2)[:20])
    reference_engine = _engine(model, Metrics())  # its own metrics: the histograms below count the batcher's
    alone = [reference_engine.run([EngineInput(item.features, item.language)])[0] for item in items]
    sizes = [1, 3, 5, 2, 4, 5]  # requests of several rows each, 20 in all

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=4, max_wait_s=0.01, max_queue=64)
        await batcher.start()
        futures: list[asyncio.Future] = []
        completed: list[int] = []
        start = 0
        for size in sizes:
            request = batcher.submit(items[start:start + size])
            _record_completion(request, completed, start)
            futures += request
            start += size
            await asyncio.sleep(0)  # let the scheduler interleave with arrivals
        outputs = await asyncio.gather(*futures)
        await batcher.stop()

        for item, output, reference in zip(items, outputs, alone, strict=True):
            assert output.language == item.language
            assert output.text == reference.text  # decoded beside others, each row as it decodes alone
        assert sorted(completed) == list(range(len(items)))

    _run(scenario)
    assert len({o.text for o in alone}) > 1  # distinct texts: a mix-up between rows would show
    assert all(len(batch) <= 4 for batch in engine.batches)
    assert [id(item) for batch in engine.batches for item in batch] == [id(item) for item in items]  # FIFO
    batches = _sample(metrics, "zasr_batch_size_rows_count")
    assert batches == len(engine.batches) >= 5
    assert _sample(metrics, "zasr_batch_size_rows_bucket", {"le": "4.0"}) == batches  # every batch ≤ 4 rows
    assert _sample(metrics, "zasr_batch_size_rows_bucket", {"le": "2.0"}) < batches  # and not all tiny
    assert _sample(metrics, "zasr_batch_size_rows_sum") == len(items)
    assert _sample(metrics, "zasr_queue_wait_seconds_count") == len(items)
    assert _sample(metrics, "zasr_queue_depth_rows") == 0


@pytest.mark.parametrize(("settings", "device", "wait_s"), [
    ({}, "cpu", 0.0),  # the embedded engine, its rows heard by the audio workers: it batches between its steps
    ({"max_wait_ms": 4}, "cpu", 0.004),  # as set
    ({}, "cuda", 0.01),  # the speech half in the engine, a batch at once
    ({"audio_workers": 0}, "cpu", 0.01),
    ({"encoder_in_workers": False}, "cpu", 0.01),
    ({"backend": "vllm"}, "cpu", 0.01),
])
def test_the_batcher_waits_by_default_only_where_a_batch_s_speech_half_runs_at_once(settings: dict, device: str,
                                                                                     wait_s: float) -> None:
    assert batch_wait_seconds(Settings(**settings), device) == pytest.approx(wait_s)


@pytest.mark.parametrize("expected", [False, True])
def test_a_batch_waits_only_for_rows_on_their_way(model: SpeechLLM, expected: bool) -> None:
    """With a request preparing its audio (expecting_rows), the first row waits up to max_wait for its rows;
    with none on the way, it starts at once."""
    engine = _engine(model, Metrics())
    first, second = _items(["en", "de"])

    async def scenario() -> None:
        batcher = Batcher(engine, Metrics(), max_batch_size=8, max_wait_s=2.0, max_queue=16)
        await batcher.start()
        futures = batcher.submit([first])
        if expected:
            with batcher.expecting_rows():  # the second request, preparing its audio
                await asyncio.sleep(0.1)
                futures += batcher.submit([second])
        else:
            await asyncio.sleep(0.1)
            futures += batcher.submit([second])
        await asyncio.gather(*futures)
        await batcher.stop()

    _run(scenario)
    assert [len(batch) for batch in engine.batches] == ([2] if expected else [1, 1])



class PausingEngine(RecordingEngine):
    """Holds the engine thread once the first row has been answered, until the test has seen that answer: the
    other rows of its batch are then certainly still decoding (or, if they ended at the same step, unanswered)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answered = 0
        self.seen = threading.Event()

    def _answer_row(self, *args) -> None:
        super()._answer_row(*args)
        self.answered += 1
        if self.answered == 1:
            self.seen.wait(TIMEOUT_S)


def test_a_row_is_answered_when_it_is_decoded_not_when_its_batch_is(model: SpeechLLM) -> None:
    """Two rows of one batch: the first to finish decoding is answered while the other is not (the engine thread
    is held right after that first answer). Before stop 19 a batch's rows were answered together, so a short
    request waited for the longest one it was batched with (48 ms a row on average at concurrency 16 in the
    serving benchmark)."""
    engine = PausingEngine(model, Metrics(), cache_bytes=1 << 30, lid_threshold=1.01)

    async def scenario() -> None:
        batcher = Batcher(engine, Metrics(), max_batch_size=8, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        short = batcher.submit(_items(["en"], frames=8))
        long = batcher.submit(_items(["de"], seed=1, frames=120))
        done, _ = await asyncio.wait(short + long, timeout=TIMEOUT_S / 3, return_when=asyncio.FIRST_COMPLETED)
        unanswered = [future for future in short + long if not future.done()]
        engine.seen.set()
        await asyncio.gather(*short, *long)
        await batcher.stop()
        assert len(done) == 1 and len(unanswered) == 1
        assert [len(batch) for batch in engine.batches] == [2]  # the two rows were one batch

    _run(scenario)

# ---- admission ---------------------------------------------------------------------------------------------

def test_queue_full_refuses_the_whole_request(model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=3)
        # Not started yet, so nothing drains the queue while requests arrive.
        with pytest.raises(TooManyRows):  # more rows than the queue ever holds: no Retry-After would help
            batcher.submit(_items(["en", "ja", "de", "en"]))
        assert batcher.depth == 0 and _sample(metrics, "zasr_queue_depth_rows") == 0  # none of its rows

        first = batcher.submit(_items(["en", "ja"], seed=1))
        with pytest.raises(QueueFull) as refused:
            batcher.submit(_items(["de", "ar"], seed=2))  # 2 + 2 > 3: refused whole, not half queued
        assert refused.value.retry_after_s >= 1
        assert batcher.depth == 2
        second = batcher.submit(_items(["ko"], seed=3))  # a smaller request still fits
        assert batcher.depth == 3 and _sample(metrics, "zasr_queue_depth_rows") == 3

        await batcher.start()
        outputs = await asyncio.gather(*first, *second)
        assert [o.language for o in outputs] == ["en", "ja", "ko"]
        third = batcher.submit(_items(["de", "ar"], seed=2))  # once drained, the refused request fits
        assert [o.language for o in await asyncio.gather(*third)] == ["de", "ar"]
        await batcher.stop()

    _run(scenario)


def test_submit_when_room_waits_for_the_queue_to_drain(model: SpeechLLM) -> None:
    """The offline command's files wait for room instead of being refused (it crashed on QueueFull)."""
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=3)
        first = batcher.submit(_items(["en", "ja", "de"], seed=1))
        waiting = [asyncio.ensure_future(batcher.submit_when_room(_items(languages, seed=2)))
                   for languages in (["ar", "ko"], ["th"])]
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in waiting) and batcher.depth == 3  # nothing drains the queue yet
        await batcher.start()
        second, third = await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT_S)
        outputs = await asyncio.gather(*first, *second, *third)
        assert [o.language for o in outputs] == ["en", "ja", "de", "ar", "ko", "th"]
        with pytest.raises(TooManyRows):  # would wait forever
            await batcher.submit_when_room(_items(["en", "ja", "de", "ar"]))
        await batcher.stop()

    _run(scenario)


def test_submit_when_room_is_first_come_first_queued(model: SpeechLLM) -> None:
    """A request of many rows waiting for room is not overtaken by a one-row request that came after it (each
    batch leaves room for one row, never for three, so the three-row request would have waited for ever)."""
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=3)
        first = batcher.submit(_items(["en", "ja", "de"], seed=1))
        queued: list[str] = []
        many = asyncio.ensure_future(batcher.submit_when_room(_items(["ar", "ko", "th"], seed=2)))
        one = asyncio.ensure_future(batcher.submit_when_room(_items(["fr"], seed=3)))
        many.add_done_callback(lambda _: queued.append("many"))
        one.add_done_callback(lambda _: queued.append("one"))
        await batcher.start()
        rows = await asyncio.wait_for(asyncio.gather(many, one), TIMEOUT_S)
        assert queued == ["many", "one"]
        await asyncio.gather(*first, *rows[0], *rows[1])
        await batcher.stop()

    _run(scenario)


# ---- abandoned rows (their request gave up) ----------------------------------------------------------------

def test_a_cancelled_row_leaves_the_queue(model: SpeechLLM) -> None:
    """Rows whose futures are cancelled while they wait (their request timed out, or its client went away) leave
    the queue: the engine never sees them, and the other rows run as usual."""
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=4, max_wait_s=0.01, max_queue=8)
        first = batcher.submit(_items(["de"], seed=1))  # not started: the rows wait
        given_up = batcher.submit(_items(["en", "ja"]))  # behind a row, and one behind the other
        last = batcher.submit(_items(["ko"], seed=2))
        for future in given_up:
            future.cancel()
        await asyncio.sleep(0)  # (done callbacks run on the loop)
        assert batcher.depth == 2 and _sample(metrics, "zasr_queue_depth_rows") == 2
        await batcher.start()
        assert [(await future).language for future in first + last] == ["de", "ko"]
        await batcher.stop()
        assert [item.language for batch in engine.batches for item in batch] == ["de", "ko"]

    _run(scenario)
    assert _sample(metrics, "zasr_abandoned_rows_total", {"stage": "queued"}) == 2


def test_a_request_that_times_out_abandons_the_rows_not_answered() -> None:
    """TranscriptionService waits for a request's rows inside `abandoned_unless_answered`: a wait that ends without
    them (here a timeout) cancels those not answered yet, which is what takes them out of the batcher and the
    engine; a wait that ends with them cancels nothing."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answered, waiting = loop.create_future(), loop.create_future()
        answered.set_result("text")
        with pytest.raises(TimeoutError), abandoned_unless_answered([answered, waiting]):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(answered, waiting)), 0.01)
        assert waiting.cancelled() and answered.result() == "text"
        both = [loop.create_future(), loop.create_future()]
        for future in both:
            future.set_result("text")
        with abandoned_unless_answered(both):
            await asyncio.gather(*both)
        assert not any(future.cancelled() for future in both)

    _run(scenario)


def _decoded_alone(model: SpeechLLM, items: list[EngineInput]) -> tuple[list[str], float]:
    """Texts of rows decoded alone through a batcher, and the decoding steps that took."""
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> list[str]:
        batcher = Batcher(engine, metrics, max_batch_size=8, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        outputs = await asyncio.gather(*batcher.submit(items))
        await batcher.stop()
        return [output.text for output in outputs]

    return _run(scenario), _sample(metrics, "zasr_decode_step_rows_count")


def test_a_cancelled_row_stops_decoding(model: SpeechLLM) -> None:
    """A row cancelled while it decodes leaves the engine's batch at its next step instead of decoding to its end;
    the row beside it keeps its own output, and the batcher's books balance (stop returns)."""
    long_frames, short_frames = 200, 8
    _, steps_to_its_end = _decoded_alone(model, _items(["de"], seed=1, frames=long_frames))
    (short_text,), _ = _decoded_alone(model, _items(["en"], frames=short_frames))
    metrics = Metrics()
    engine = PausingEngine(model, metrics, cache_bytes=1 << 30, lid_threshold=1.01)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=8, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        short = batcher.submit(_items(["en"], frames=short_frames))
        long = batcher.submit(_items(["de"], seed=1, frames=long_frames))
        assert (await short[0]).text == short_text  # the engine thread now waits for `seen`
        long[0].cancel()
        await asyncio.sleep(0)
        engine.seen.set()
        await batcher.stop()
        assert batcher._in_flight == 0 and not engine._row_group
        assert [len(batch) for batch in engine.batches] == [2]  # the two rows decoded together

    _run(scenario)
    assert steps_to_its_end > 20  # a long row, so that stopping early shows
    assert _sample(metrics, "zasr_decode_step_rows_count") < steps_to_its_end / 2
    assert _sample(metrics, "zasr_abandoned_rows_total", {"stage": "decoding"}) == 1


class HeldAtFirstStep(RecordingEngine):
    """Holds the engine thread after its first decoding step, before it looks for groups waiting to join, until
    the test says that one waits (`let_go`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stepped = threading.Event()
        self.let_go = threading.Event()

    def _take_waiting(self) -> list:
        in_engine_thread = threading.current_thread().name.startswith("engine")  # (the event loop takes too)
        if in_engine_thread and not self.stepped.is_set():
            self.stepped.set()
            self.let_go.wait(TIMEOUT_S)
        return super()._take_waiting()


def test_a_group_joins_between_steps_inside_the_tick(model: SpeechLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that arrives while rows decode joins them between two steps, in the engine thread, without the
    tick ending first (one tick for both batches), and each row decodes as it does alone. Until stop 34 the tick
    ended so that the event loop could let the batch join, and the engine thread idled meanwhile (5 % of its time
    at concurrency 16)."""
    long_items, short_items = _items(["de"], seed=1, frames=200), _items(["ja"], seed=2, frames=24)
    (long_text,), _ = _decoded_alone(model, long_items)
    (short_text,), _ = _decoded_alone(model, short_items)
    monkeypatch.setattr("server.engine.TICK_S", TIMEOUT_S)
    engine = HeldAtFirstStep(model, Metrics(), cache_bytes=1 << 30, lid_threshold=1.01)

    async def scenario() -> None:
        batcher = Batcher(engine, Metrics(), max_batch_size=8, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        long = batcher.submit(long_items)
        assert await asyncio.to_thread(engine.stepped.wait, TIMEOUT_S / 3)  # (the old engine never gets there)
        short = batcher.submit(short_items)
        while not engine._waiting:  # the batcher hands the second batch to the engine
            await asyncio.sleep(0.001)
        engine.let_go.set()
        order: list[int] = []
        _record_completion(long + short, order)
        assert [output.text for output in await asyncio.gather(*long, *short)] == [long_text, short_text]
        await batcher.stop()
        assert order == [1, 0]  # the short row decoded beside the long one, and ended first
        assert [len(batch) for batch in engine.batches] == [1, 1]
        assert len(engine.intervals) == 1

    _run(scenario)


def test_other_work_for_the_engine_thread_ends_the_tick_early(model: SpeechLLM,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Work handed to the engine thread while rows decode (language detection, a realtime window's encoder: both
    through run_exclusive) runs at the tick's next step, not once the tick's TICK_S is over: here the long row is
    still decoding when that work is done."""
    monkeypatch.setattr("server.engine.TICK_S", TIMEOUT_S)
    engine = HeldAtFirstStep(model, Metrics(), cache_bytes=1 << 30, lid_threshold=1.01)

    async def scenario() -> None:
        batcher = Batcher(engine, Metrics(), max_batch_size=8, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        long = batcher.submit(_items(["de"], seed=1, frames=200))
        assert await asyncio.to_thread(engine.stepped.wait, TIMEOUT_S / 3)
        other_work = asyncio.ensure_future(batcher.run_exclusive(threading.current_thread))
        while not batcher._executor.has_waiting_work():
            await asyncio.sleep(0.001)
        engine.let_go.set()
        assert (await other_work).name.startswith("engine")
        assert not long[0].done()
        await asyncio.gather(*long)
        await batcher.stop()
        assert len(engine.intervals) == 2  # the tick ended for the other work, and the next one decoded on

    _run(scenario)


class FailingAfterFirstAnswer(RecordingEngine):
    """Its first decoding step after a row has been answered raises."""

    def _answer_row(self, *args) -> None:
        super()._answer_row(*args)

        def fail() -> None:
            raise RuntimeError("step failed")

        self._generation.step = fail  # this Generation only: the engine starts a fresh one after the failure


def test_a_failed_step_fails_only_the_rows_not_yet_answered(model: SpeechLLM) -> None:
    """A step that fails leaves the batch's state in doubt: the rows still decoding get the error, the rows already
    answered keep their outputs, and every accepted row is answered (stop returns)."""
    engine = FailingAfterFirstAnswer(model, Metrics(), cache_bytes=1 << 30, lid_threshold=1.01)

    async def scenario() -> None:
        batcher = Batcher(engine, Metrics(), max_batch_size=8, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        futures = [future for seed, frames in enumerate((8, 60, 120))
                   for future in batcher.submit(_items(["en"], seed=seed, frames=frames))]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        failed = [result for result in results if isinstance(result, Exception)]
        assert 0 < len(failed) < len(results)
        assert all(str(error) == "step failed" for error in failed)
        assert batcher._in_flight == 0
        assert [len(batch) for batch in engine.batches] == [3]

    _run(scenario)


def test_retry_after_follows_the_rate_rows_are_answered_at(model: SpeechLLM) -> None:
    """Retry-After is the time until the rows queued now have left, at the rate rows were answered at since the
    batcher had work: a busy engine that answers fast asks for a short wait, a stalled one for a longer wait the
    longer it stalls, and before any rate is measured, a second per batch."""
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=8)
        await batcher.start()
        first = batcher.submit(_items(["en", "ja", "de"]))
        await asyncio.gather(*first, *batcher.submit(_items(["ko", "ar"], seed=1)))
        assert len(batcher._answered) == 5  # every row answered in this busy period counts toward the rate
        await asyncio.gather(*batcher.submit(_items(["th"], seed=2)))
        assert len(batcher._answered) == 1  # work after none: a new busy period, a new rate
        await batcher.stop()

    _run(scenario)
    batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=3)
    start = batcher._busy_since
    assert batcher.drain_seconds(4, start + 0.5) == 2.0  # not measured yet: a second per batch of 2
    assert batcher.drain_seconds(4, start + 5.0) == 5.0  # no answer for 5 s: at least as long again
    batcher._answered.extend([start + 2.0] * 20 + [start + 6.0] * 30 + [start + 9.0] * 50)
    assert batcher.drain_seconds(50, start + 10.0) == pytest.approx(5.0)  # 100 rows in 10 s
    assert batcher.drain_seconds(50, start + 20.0) == pytest.approx(10.0)  # no answers since: the rate halves
    assert batcher.drain_seconds(50, start + 40.0) == pytest.approx(30.0)  # 50 rows in the last 30 s
    assert batcher.drain_seconds(50, start + 60.0) == pytest.approx(30.0)  # none in the window: stalled 30 s
    executor = batcher._executor
    executor.shutdown()


def test_the_engine_runs_with_the_configured_threads(model: SpeechLLM) -> None:
    """torch's thread count is process-wide: the engine thread must see ZASR_THREADS, not the count of whoever
    created it (server/threads.py; until stop 17 it always saw 1)."""
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=8, threads=2)
        try:
            assert await batcher.run_exclusive(torch.get_num_threads) == 2
        finally:
            await batcher.stop()

    _run(scenario)


# ---- fairness ------------------------------------------------------------------------------------------------

def test_no_starvation_under_skewed_traffic(model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = _engine(model, metrics)
    english_before = _items(["en"] * 30, seed=1)
    arabic = _items(["ar"] * 2, seed=2)
    english_after = _items(["en"] * 30, seed=3)
    items = english_before + arabic + english_after

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=4, max_wait_s=0.01, max_queue=100)
        await batcher.start()
        completed: list[int] = []
        futures: list[asyncio.Future] = []
        for index, item in enumerate(english_before):  # 30 single-row requests
            futures += batcher.submit([item])
            _record_completion(futures[-1:], completed, index)
        await asyncio.sleep(0)  # the scheduler takes a first batch while the rest keeps arriving
        for index, item in enumerate(arabic + english_after, start=len(english_before)):
            futures += batcher.submit([item])
            _record_completion(futures[-1:], completed, index)
        outputs = await asyncio.gather(*futures)
        await batcher.stop()

        assert [o.language for o in outputs] == [item.language for item in items]

    _run(scenario)
    # Rows join the decoding in arrival order, whatever the language: each Arabic row joins no later than the row
    # queued just before it. (They finish when their transcripts end, which need not be in that order.)
    batch_of = _batch_of(engine)
    for row in arabic:
        assert batch_of[id(row)] <= batch_of[id(english_before[-1])]
    assert [batch_of[id(item)] for item in items] == sorted(batch_of[id(item)] for item in items)
    assert all(len(batch) <= 4 for batch in engine.batches)


# ---- failures ------------------------------------------------------------------------------------------------

def _bad_item() -> EngineInput:
    return EngineInput(torch.randn(7, 100), "en")  # 7 mel bins where the encoder expects 80


def test_wrong_mel_bins_raise_inside_the_engine(model: SpeechLLM) -> None:
    """Precondition of the next test: the bad row fails for real, in the engine, without any mock."""
    with pytest.raises(RuntimeError):
        _engine(model, Metrics()).run([_bad_item()])


def test_engine_error_fails_only_its_batch(model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = _engine(model, metrics)

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        (alone,) = batcher.submit([_bad_item()])  # a batch of its own
        with pytest.raises(RuntimeError):
            await alone
        after = batcher.submit(_items(["ja", "de"]))
        assert [o.language for o in await asyncio.gather(*after)] == ["ja", "de"]

        # Queued together before the scheduler runs: batches [bad, en], [ja, de]. The bad row's batch
        # fails as a whole (with the engine's own exception); the next batch is untouched.
        shared_batch = batcher.submit([_bad_item(), *_items(["en"], seed=4)])
        next_batch = batcher.submit(_items(["ja", "de"], seed=5))
        results = await asyncio.gather(*shared_batch, *next_batch, return_exceptions=True)
        await batcher.stop()

        assert isinstance(results[0], RuntimeError)
        assert results[1] is results[0]
        assert [r.language for r in results[2:]] == ["ja", "de"]

    _run(scenario)
    assert [len(batch) for batch in engine.batches] == [1, 2, 2, 2]


# ---- the engine thread ------------------------------------------------------------------------------------------

def test_run_exclusive_runs_in_the_engine_thread_between_batches(model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = _engine(model, metrics)
    exclusive: list[tuple[float, float]] = []

    def other_model_work() -> str:
        start = time.monotonic()
        time.sleep(0.05)  # long enough that an overlap with a batch could not go unnoticed
        exclusive.append((start, time.monotonic()))
        return threading.current_thread().name

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=2, max_wait_s=0.0, max_queue=16)
        await batcher.start()
        futures = batcher.submit(_items(MIXED[:6]))
        await asyncio.sleep(0)  # the first batch is on its way to the engine
        names = await asyncio.gather(batcher.run_exclusive(other_model_work),
                                     batcher.run_exclusive(other_model_work))
        guesses = await batcher.run_exclusive(engine.detect, _items(["en", "ja"]))
        await asyncio.gather(*futures)
        await batcher.stop()

        assert all(name.startswith("engine") for name in names)
        assert len(guesses) == 2 and all(g.language in model.config.languages for g in guesses)

    _run(scenario)
    assert engine.threads and all(name.startswith("engine") for name in engine.threads)
    intervals = sorted(engine.intervals + exclusive)
    for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False):
        assert end <= next_start, "model work overlapped a batch"


# ---- stop -------------------------------------------------------------------------------------------------------

def test_stop_finishes_accepted_rows(model: SpeechLLM) -> None:
    metrics = Metrics()
    engine = _engine(model, metrics)
    items = _items(MIXED[:6])

    async def scenario() -> None:
        batcher = Batcher(engine, metrics, max_batch_size=4, max_wait_s=0.01, max_queue=16)
        await batcher.start()
        futures = batcher.submit(items)
        await batcher.stop()  # returns only once every accepted row has its answer

        assert sum(len(batch) for batch in engine.batches) == len(items)  # the engine did run every row
        unresolved = [index for index, future in enumerate(futures) if not future.done()]
        assert not unresolved, f"rows {unresolved} were accepted but never answered after stop()"
        assert [f.result().language for f in futures] == [item.language for item in items]

    _run(scenario)
