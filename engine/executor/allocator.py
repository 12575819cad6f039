"""Keep freed memory mapped in a worker process, so tensors reuse pages instead of faulting.

glibc serves every allocation above its mmap threshold (128 KiB at first, raised only as
large blocks are freed) with a fresh ``mmap`` and returns it to the OS on free. A
denoising step allocates and frees its activations, and each collective its buffers, at
the same sizes step after step; every one of them then page-faults its memory in again.
Measured on a 2-core CPU: writing 1 MiB into freshly allocated memory costs about 0.4 ms
against 0.04 ms for memory already mapped, and a 1 MiB all_to_all between two workers
takes 2.2 ms instead of 0.29 ms. Raising the mmap threshold to its maximum (32 MiB) and the
trim threshold to 1 GiB keeps freed blocks in the heap for the next step. GPU memory is
unaffected (the CUDA caching allocator already reuses its blocks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for this process; False (and nothing changed) without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): leave the allocator alone
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        logger.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
