"""Which threads of the server run torch, and with how many OpenMP threads each.

torch's CPU kernels fork and join an OpenMP (libgomp) team for every op. libgomp keeps its idle
threads spinning, ready for the next op, only while all the threads it manages fit on the cores;
as soon as a second OS thread owns a team of its own (the event loop after computing features, the
thread that loaded the model), every fork and join goes through the kernel instead. The decoder runs
thousands of tiny ops per second, and on this 2-core machine that made the engine thread 2.5× slower
than the same code on the main thread (45 vs 113 µs for one 16 × 256 × 768 linear; 48 vs 127 ms per
request). So the engine's thread is the only one with a team; every other thread that touches torch
runs it single-threaded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

DEFAULT_ENGINE_THREADS = torch.get_num_threads()  # torch's own default (physical cores), read before any change


def use_one_thread() -> None:
    """Torch ops from the calling thread, and from threads started after this call, run single-threaded.
    (torch.set_num_threads sets the calling thread's OpenMP team size and the default of new threads;
    threads that already ran torch keep theirs.)"""
    torch.set_num_threads(1)


def engine_executor(threads: int = 0) -> ThreadPoolExecutor:
    """The one thread that runs the model, with `threads` OpenMP threads (0: as many as the calling thread)."""
    caller_threads = torch.get_num_threads()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine", initializer=torch.set_num_threads,
                                  initargs=(threads or caller_threads,))
    executor.submit(int).result()  # the engine thread takes its team size now...
    torch.set_num_threads(caller_threads)  # ...and threads started later get the caller's again
    return executor
