"""The server's malloc settings (server/allocator.py): a freed block is reused without new page faults."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest

# In a fresh process: page faults of each of three allocations of a 4 MiB array, each freed before the next.
FAULTS_PER_ALLOCATION = """
import json, resource, sys
import numpy as np
from server.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
counts = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(1 << 20, np.float32)
    del block
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": counts}))
"""


def faults_per_allocation(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux" or "libc.so" not in str(ctypes.util.find_library("c")),
                    reason="glibc's mallopt")
def test_freed_block_is_reused_without_page_faults():
    pages = (4 << 20) // 4096
    default = faults_per_allocation("default")
    # glibc's own policy maps the first block, unmaps it at free and takes the second from fresh heap pages
    assert default["faults"][1] > pages // 4
    tuned = faults_per_allocation("tuned")
    assert tuned["applied"] is True
    assert max(tuned["faults"][1:]) < pages // 50
