"""How the server's processes keep freed memory: in the heap, for the next allocation, not given back to the kernel.

glibc's malloc serves large blocks (from 128 KiB, a threshold it then raises as such blocks are freed) with mmap
and gives them back with munmap at free, and gives a heap's free top back (above `trim_threshold`). The decoder
allocates blocks of that size at every step (the logits of 16 rows are 256 KiB; KV caches are rebuilt as rows join
and leave), so the kernel kept handing it fresh pages, and each first touch of a page is a page fault: 200,000
of them in the engine thread over 768 requests at concurrency 16, against 39,000 with the settings below. In an
A/B (benchmarks.serving's c16 and c1 loads, twelve rounds alternating) throughput rose 162 → 168 audio s/s at
concurrency 16 and 48 → 51 at concurrency 1 (docs/serving.md, *Memory allocator*).

All three together: setting any of them turns off glibc's raising of the mmap threshold, so the trim threshold or
the top pad alone left every block from 128 KiB on to mmap (2.3 and 2.9 million page faults, 125 and 118 audio s/s
at concurrency 16), and the mmap threshold alone still gave the heap's top back (179,000 faults, no faster).

The cost: a process keeps up to TRIM_THRESHOLD_BYTES of freed heap memory that it would have given back, and
blocks under MMAP_THRESHOLD_BYTES come from the heap, where they can fragment it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("zipper_asr.allocator")

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 16 << 20  # blocks from this size on still get their own mapping
TRIM_THRESHOLD_BYTES = 256 << 20
TOP_PAD_BYTES = 16 << 20  # the heap grows by at least this much at a time


def keep_freed_memory() -> bool:
    """Set this process's malloc to reuse freed memory (see the module's docstring). False where the C library is
    not glibc (musl, macOS), which keeps its own behaviour."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(parameter, value) == 1 for parameter, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_TOP_PAD, TOP_PAD_BYTES)))
    if not applied:
        logger.warning("malloc settings not applied: freed memory goes back to the kernel as usual")
    return applied
