"""An opt-in memory policy for CPU training (``training.low_memory``): large blocks go back to the OS when freed.

glibc serves a block at or above its mmap threshold with its own mapping, returned to the OS on ``free``. The
threshold starts at 128 KiB but rises to the size of every mapped block freed (up to 32 MiB on 64-bit), after
which blocks below it come from the heap, where freed space is kept and fragments. A CoA-LoRA step (K
configurations, each quantizing and decoding hundreds of matrices between the activations) makes the heap grow
that way: on SmolLM2-135M a K = 2 job peaked at about 4 GB with the dynamic threshold and at 2.4 GB with it pinned
at 128 KiB (PEFT LoRA on the same batch: 2.5 GB, or 2.0 GB under the same policy); the live memory is the same.
``mallopt(M_MMAP_THRESHOLD, ...)`` pins it and turns the adjustment off, process-wide. The price is a page fault
per 4 KiB of every large block, activations included, on each allocation: steps ran 30-45% slower (PEFT's too,
measured by ``bench/step.py`` in one process). Hence a choice, off by default.

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
