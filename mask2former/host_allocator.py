"""glibc malloc settings for the engine's processes (train, evaluate, inference, export, quantize, the ranks of a
multi-process training run).

PyTorch's CPU tensors come from ``malloc``. A training or inference step allocates and frees the same large
activation buffers every iteration, and with glibc's defaults those buffers keep going back to the kernel:
blocks above the (adaptive) mmap threshold are unmapped when freed, and the heap is trimmed whenever more
than twice that threshold is free at its top, which the end of every backward pass produces. The next step
then page-faults the same memory in again, zero-filled by the kernel. Measured on the small benchmark
configuration (``bench/bench_training_step.py``, one thread): 1,877 minor page faults per training step
with the defaults, none with these settings; the step is 2 % faster at best and more in the median, when
the faults come in bursts (BENCHMARKS.md); Swin-T training peak RSS +1 %.

The settings: every block up to 32 MiB (glibc's largest mmap threshold on 64-bit) comes from the heap, and
up to 256 MiB of free heap is kept for reuse instead of being returned. Larger tensors are still mapped
and unmapped one by one. Nothing is changed where the user configured malloc already (``MALLOC_*_``
variables, ``GLIBC_TUNABLES``, an ``LD_PRELOAD``-ed allocator such as jemalloc or tcmalloc) or where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Mapping, Optional

log = logging.getLogger(__name__)

#: ``mallopt`` parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

#: Environment variables through which a user has already chosen malloc's behaviour.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                 "GLIBC_TUNABLES", "LD_PRELOAD")

_applied = False


def configure_host_allocator(env: Optional[Mapping[str, str]] = None) -> bool:
    """Apply the settings above to this process once; True when they are in effect."""
    global _applied
    env = os.environ if env is None else env
    user = [name for name in USER_SETTINGS if env.get(name)]
    if user:
        log.debug("malloc left as configured by %s", ", ".join(user))
        return False
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success; the mmap threshold first, since setting it fixes the adaptive thresholds
    applied = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
               and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    _applied = applied
    return applied
