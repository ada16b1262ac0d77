"""Host allocator setting for training processes: reuse freed large blocks.

PyTorch's CPU tensors come from glibc malloc. glibc serves a block above its mmap threshold
(32 MiB at most under its dynamic threshold) with a fresh mmap and returns it with munmap
on free, so a step that allocates the same large tensor again (a replicated table's dense
gradient: 262k x 64 fp32 is 64 MiB, twice per step with two hashes, plus the optimizer's
and DDP's temporaries) pays one page fault per 4 KiB page, every step. On the SASRec Sports
recipe that was half of the training process's CPU time, spent in the kernel.

`reuse_freed_host_memory` raises the mmap and trim thresholds (glibc's mallopt) so such
blocks come from the heap and stay mapped after free: the next allocation of that size
reuses pages already faulted in. The cost is that the process keeps its peak heap mapped.
Numerics do not change. It is a no-op off glibc (macOS, musl) and reports what it did.
The trainer applies it per process from `trainer.reuse_freed_host_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
# blocks up to this size come from the heap; mallopt takes a C int
REUSE_UP_TO_BYTES = 1 << 30


def reuse_freed_host_memory(limit_bytes: int = REUSE_UP_TO_BYTES) -> str:
    """Keep freed blocks of up to `limit_bytes` mapped for reuse; returns what was done."""
    if not 0 < limit_bytes < 1 << 31:
        raise ValueError(f"limit_bytes={limit_bytes}: mallopt takes 1 .. 2**31 - 1")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError, TypeError):
        return f"host allocator unchanged (no glibc mallopt in {name!r})"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, limit_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, limit_bytes) == 1
    if not ok:
        return "host allocator unchanged (glibc refused the mmap/trim thresholds)"
    return f"host allocator: freed blocks up to {limit_bytes >> 20} MiB stay mapped for reuse"
