"""How many threads torch uses in the server, and why one.

torch's thread count is process-wide in this build (torch 2.13, libgomp, MKL): after another thread called
`torch.set_num_threads(1)`, the main thread's own `torch.get_num_threads()` said 1 and its GEMVs slowed from 95 to
113 µs. Until stop 17 the gateway set its own count to 1 after giving the engine thread `ZASR_THREADS` (2 by
default here), so the engine ran single-threaded whatever the setting (it reported 1 thread at every tick). Made
to run with two threads, it answered a lone request faster (concurrency 1: 35.1 and 36.6 against 31.1 and 30.4
audio s/s) and served concurrency 16 far slower (66.3 and 66.2 against 93.4 and 91.9): each of the decoder's many
small ops then waits for a second core that the audio worker is using. So the engine runs `ZASR_THREADS` threads,
1 by default, and that count is the whole process's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

DEFAULT_ENGINE_THREADS = torch.get_num_threads()  # torch's own default (physical cores), read before any change


def use_one_thread() -> None:
    """Torch ops of this process run single-threaded (the audio workers' processes: the engine's process keeps
    the cores)."""
    torch.set_num_threads(1)


class EngineExecutor(ThreadPoolExecutor):
    """The one thread that runs the model."""

    def has_waiting_work(self) -> bool:
        """Whether calls wait for the thread, beside the one it runs (the embedded engine's decoding tick ends
        early for them: EmbeddedEngine._tick)."""
        return not self._work_queue.empty()


def engine_executor(threads: int = 0) -> EngineExecutor:
    """The one thread that runs the model; the process then runs torch with `threads` threads (0: the count it
    has)."""
    if threads:
        torch.set_num_threads(threads)
    return EngineExecutor(max_workers=1, thread_name_prefix="engine")
