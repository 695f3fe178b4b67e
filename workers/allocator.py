"""The process's memory policy for CoA-LoRA training on the CPU: large temporaries go back to the OS when freed.

glibc serves a block at or above its mmap threshold with its own mapping, returned to the OS on ``free``. The
threshold starts at 128 KiB but rises to the size of every mapped block freed (up to 32 MiB on 64-bit), after
which blocks below it come from the heap, where freed space is kept and fragments. Quantizing a configuration
allocates and frees matrix-sized temporaries of many sizes for each of hundreds of matrices per step, exactly the
pattern that makes the heap grow: on SmolLM2-135M a K = 2 job peaked at 4.2 GB with the dynamic threshold and at
2.4 GB with it pinned at 128 KiB (PEFT LoRA on the same batch: 2.5 GB; 2.0 GB under the same policy).
``mallopt(M_MMAP_THRESHOLD, ...)`` pins it and turns the adjustment off, process-wide. The cost is a page fault
per 4 KiB of each large block on its first touch, which ``bench/step.py`` includes in its timings.

Where the C library is not glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import lru_cache

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024


@lru_cache(maxsize=1)
def pin_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at ``nbytes`` for this process (once); True when applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
