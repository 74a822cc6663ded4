"""The batcher: an async scheduler between the gateway and the engine.

Rows (one per audio window) wait in one FIFO queue; the scheduler takes up to `max_batch_size`
of the oldest rows, waiting at most `max_wait` for more to arrive while other requests are preparing
their audio (`expecting_rows`: with none on the way, waiting could only add latency; in front of an engine that
batches by itself, none at all: server.settings.batch_wait_seconds), and hands them to the
engine as one batch: the speech half always in the engine's own thread, the decoder there too (embedded) or in
vLLM. Both decode continuously: the batch joins the rows already decoding, and the next batch may begin as soon
as it has joined (the embedded engine lets it join once it leaves room for it: `max_rows`). Batches may mix
languages (the engine groups rows by adapter, which also keeps vLLM's LoRA slots from thrashing), and because
rows leave in arrival order, no language starves however skewed the traffic.
The queue is bounded: a request that does not fit is refused whole (503 + Retry-After) before
anything of it is accepted; an accepted row is always run and its future always resolved, unless whoever waits
for it cancels the future (its request gave up): the row is then abandoned, out of the queue or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from server.engine import EngineInput, EngineOutput, SpeechEngine
from server.metrics import Metrics
from server.threads import engine_executor

logger = logging.getLogger("zipper_asr.batcher")

T = TypeVar("T")
# Retry-After divides the rows ahead by the rate rows were answered at while the batcher had work, over at most
# this many seconds. (Batches decode together, so the time one batch takes says little about how fast the queue
# drains.)
DRAIN_WINDOW_S = 30.0
DRAIN_MEASURED_AFTER_S = 1.0  # a rate measured over less than this is not trusted yet
SECONDS_PER_BATCH_UNMEASURED = 1.0  # until then


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class TooManyRows(Exception):
    """A request of more rows than the queue ever holds: it would be refused however long it waited."""

    def __init__(self, rows: int, max_queue: int) -> None:
        super().__init__(f"the audio is cut into {rows} windows, more than the {max_queue} this server queues at once")
        self.rows = rows
        self.max_queue = max_queue


class ExpectedRows:
    """A request whose rows are on their way to the batcher (Batcher.expecting_rows)."""

    def __init__(self, on_arrival: Callable[[], None]) -> None:
        self._on_arrival: Callable[[], None] | None = on_arrival

    def arrived(self) -> None:
        """Its rows are queued (or it ended without any): a batch no longer waits for it. Once only."""
        if self._on_arrival is not None:
            on_arrival, self._on_arrival = self._on_arrival, None
            on_arrival()


@dataclass(eq=False)  # rows are told apart by identity (the queue's remove), never by their tensors
class _Pending:
    item: EngineInput
    future: asyncio.Future
    output: asyncio.Future | None = None  # the engine's, once the row has joined it
    abandoned: bool = False


class Batcher:
    def __init__(self, engine: SpeechEngine, metrics: Metrics, max_batch_size: int, max_wait_s: float,
                 max_queue: int, threads: int = 0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._left = asyncio.Event()  # rows left the queue: submit_when_room looks again
        self._waiting_for_room: deque[object] = deque()  # submit_when_room's line, first come first
        self._executor = engine_executor(threads)  # the one thread that runs the model
        self._task: asyncio.Task | None = None
        # For Retry-After: when each row was answered since the batcher last had work after none, within
        # DRAIN_WINDOW_S, and when that busy period began.
        self._answered: deque[float] = deque()
        self._busy_since = time.monotonic()
        self._in_flight = 0  # rows handed to the engine and not yet answered
        self._on_the_way = 0  # requests preparing their rows (expecting_rows)
        self._closed = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Refuse new rows, answer every accepted one, then stop."""
        self._closed = True
        while self._queue or self._in_flight:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._executor.shutdown)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, items: list[EngineInput], expected: ExpectedRows | None = None) -> list[asyncio.Future]:
        """Queue all rows of one request, or none of them (QueueFull; TooManyRows if they could never fit).
        `expected`: the request's ExpectedRows, if any."""
        if expected is not None:
            expected.arrived()
        if self._closed:
            raise QueueFull(retry_after_s=5)  # shutting down: another replica, or this one restarted, will answer
        if len(items) > self.max_queue:
            raise TooManyRows(len(items), self.max_queue)
        if len(self._queue) + len(items) > self.max_queue:
            # Retry once the rows queued now have left (the first rows to leave make room for others too).
            raise QueueFull(max(1, math.ceil(self.drain_seconds(len(self._queue)))))
        if not self._queue and not self._in_flight:  # work after none: a new busy period, a new rate
            self._busy_since = time.monotonic()
            self._answered.clear()
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            item.enqueued_at = time.monotonic()
            pending = _Pending(item, loop.create_future())
            pending.future.add_done_callback(functools.partial(self._abandon_if_cancelled, pending))
            self._queue.append(pending)
            futures.append(pending.future)
        self.metrics.queue_depth.set(len(self._queue))
        self._arrived.set()
        return futures

    async def submit_when_room(self, items: list[EngineInput], expected: ExpectedRows | None = None
                               ) -> list[asyncio.Future]:
        """`submit`, waiting for room in the queue instead of being refused: for work that has no client to tell to
        come back later (the offline command's files). First come, first queued: while one waits, those after it
        wait behind it, so that a file of many windows is not overtaken for ever by files of one."""
        if expected is not None:
            expected.arrived()  # (waiting for room, its rows are not about to reach a batch)
        turn = object()  # its place in the line
        self._waiting_for_room.append(turn)
        try:
            while True:
                if self._waiting_for_room[0] is turn:
                    try:
                        return self.submit(items)
                    except QueueFull:
                        if self._closed:
                            raise
                self._left.clear()
                await self._left.wait()
        finally:
            self._waiting_for_room.remove(turn)
            self._left.set()  # the next in line looks now

    @contextlib.contextmanager
    def expecting_rows(self) -> Iterator[ExpectedRows]:
        """Around a request from its upload until its `submit` (which passes the ExpectedRows on): while any
        request is on its way, a batch waits up to `max_wait_s` for more rows; when none is, a batch starts at
        once, since waiting could only add latency."""
        self._on_the_way += 1
        expected = ExpectedRows(self._one_arrived)
        try:
            yield expected
        finally:
            expected.arrived()

    def _one_arrived(self) -> None:
        self._on_the_way -= 1
        self._arrived.set()  # a batch that waits for these rows looks again

    def drain_seconds(self, rows: int, now: float | None = None) -> float:
        """About how long until `rows` more rows have been answered, at the rate rows were answered at since the
        batcher had work (at most DRAIN_WINDOW_S back). Until that rate is measured: a second per batch, or as long
        as the batcher has already waited for its first answer, if longer (a stalled engine asks for longer waits
        the longer it stalls)."""
        now = time.monotonic() if now is None else now
        self._forget_answers_before(now - DRAIN_WINDOW_S)
        measured_for = now - max(self._busy_since, now - DRAIN_WINDOW_S)
        if self._answered and measured_for >= DRAIN_MEASURED_AFTER_S:
            return rows * measured_for / len(self._answered)
        return max(SECONDS_PER_BATCH_UNMEASURED * -(-rows // self.max_batch_size), measured_for)

    def _forget_answers_before(self, when: float) -> None:
        while self._answered and self._answered[0] < when:
            self._answered.popleft()

    async def run_exclusive(self, fn: Callable[..., T], *args) -> T:
        """Run other model work (language detection, a realtime window's encoder) in the engine thread, between the
        engine's decoding ticks (the one running ends at its next step: EmbeddedEngine._tick)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:  # its rows were abandoned while it waited for more
                continue
            self._in_flight += len(batch)
            now = time.monotonic()
            for pending in batch:
                self.metrics.queue_seconds.observe(now - pending.item.enqueued_at)
            try:
                outputs = await self.engine.start([p.item for p in batch], self.run_exclusive,
                                                  self._executor.has_waiting_work)
            except Exception as error:
                for pending in batch:
                    self._answer(pending, error=error)
                continue
            # The batch is joining the decoding (both engines): it decodes on while the next batch begins, and
            # each row is answered as soon as the engine has decoded it.
            chained = 0
            try:
                for pending, output in zip(batch, outputs, strict=True):
                    pending.output = output
                    output.add_done_callback(functools.partial(self._answer_from, pending))
                    chained += 1
                    if pending.future.cancelled():  # abandoned while its batch was joining
                        self._abandon(pending)
            except Exception as error:  # an engine that broke its contract: its other rows are answered all the same
                logger.exception("the engine's outputs do not match its batch")
                for pending in batch[chained:]:
                    self._answer(pending, error=error)

    def _abandon_if_cancelled(self, pending: _Pending, future: asyncio.Future) -> None:
        """A row's future cancelled by whoever waits for it means its request gave up (it timed out, its client
        went away, a realtime decode is no longer wanted): the row leaves the queue, or the engine stops decoding it,
        rather than taking a place in the batch that others wait for."""
        if future.cancelled():
            self._abandon(pending)

    def _abandon(self, pending: _Pending) -> None:
        if pending.abandoned:
            return
        if pending.output is not None:
            pending.abandoned = True
            if not pending.output.done():  # (else it was answered just before)
                self.engine.abandon(pending.output)
                self.metrics.abandoned_rows.labels("decoding").inc()
        elif pending in self._queue:
            pending.abandoned = True
            self._queue.remove(pending)
            self.metrics.queue_depth.set(len(self._queue))
            self._left.set()
            self.metrics.abandoned_rows.labels("queued").inc()
        # else: its batch is being handed to the engine, and chaining its output abandons it there

    def _answer_from(self, pending: _Pending, output: asyncio.Future[EngineOutput]) -> None:
        if output.cancelled():
            self._answer(pending, error=RuntimeError("the engine stopped before decoding this row"))
        elif output.exception() is not None:
            self._answer(pending, error=output.exception())
        else:
            now = time.monotonic()
            self._answered.append(now)
            self._forget_answers_before(now - DRAIN_WINDOW_S)
            self._answer(pending, output.result())

    def _answer(self, pending: _Pending, result: EngineOutput | None = None, error: Exception | None = None) -> None:
        """Resolve a row's future: with its output, or with the error (unless it was cancelled: abandoned)."""
        self._in_flight -= 1
        if pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.max_wait_s
        while len(self._queue) < self.max_batch_size and self._on_the_way and time.monotonic() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        self.metrics.queue_depth.set(len(self._queue))
        self._left.set()
        return batch


def resolve(futures: list[asyncio.Future]) -> asyncio.Future[list[EngineOutput]]:
    return asyncio.gather(*futures)
