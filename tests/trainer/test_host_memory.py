"""The trainer's host allocator setting: a re-allocated large tensor faults no pages afresh.

Each case runs in a fresh interpreter, so the allocator of the test process stays as it was
and the first process is a real "before".
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from genrec.trainer.host_memory import reuse_freed_host_memory

# a replicated table's step: the dense gradient of a 262k x 64 fp32 lookup (64 MiB) is
# allocated in backward and freed with the grads, 8 times; count the minor page faults of
# the last 3 (the heap settles in the first few)
PROBE = """
import json, resource, sys, torch
import torch.nn.functional as F
from genrec.trainer.host_memory import reuse_freed_host_memory
note = reuse_freed_host_memory() if sys.argv[1] == "on" else "off"
w = torch.nn.Parameter(torch.zeros(262144, 64))
rows = torch.arange(1000)
for step in range(8):
    if step == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.embedding(rows, w).sum().backward()
    w.grad = None
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "note": note}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_reallocated_gradient_reuses_its_pages():
    pages = 262144 * 64 * 4 // 4096  # 16,384 pages per allocation
    off, on = probe("off"), probe("on")
    # default glibc: every allocation is a fresh mmap, faulted in page by page
    assert off["faults"] >= 3 * pages * 0.9, off
    # heap-served and kept: the same pages come back, (almost) nothing faults
    assert on["faults"] < 0.05 * pages, on
    assert "stay mapped" in on["note"]


def test_limit_is_checked():
    with pytest.raises(ValueError, match="mallopt takes"):
        reuse_freed_host_memory(1 << 31)
