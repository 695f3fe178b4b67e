"""Memory policies for CPU training: which allocator the worker processes use, and glibc's mmap threshold.

A CoA-LoRA step (K configurations, each quantizing and decoding hundreds of matrices between the activations)
allocates and frees matrix-sized blocks in an order glibc's allocator handles badly. glibc serves a block at or
above its mmap threshold with its own mapping, returned to the OS on ``free``; the threshold starts at 128 KiB but
rises to the size of every mapped block freed (up to 32 MiB on 64-bit), after which blocks below it come from the
heap, where freed space is kept and fragments. On SmolLM2-135M a K = 2 job peaks at 1.6-1.8× PEFT LoRA's memory
that way, though the live memory is about PEFT's plus the packed cache (docs/performance.md, "Memory").

Two remedies, both measured there:

* ``training.allocator``: another allocator preloaded into the Ray worker processes (``LD_PRELOAD`` in the
  actors' runtime environment, so it is in place before Python starts). tcmalloc (Debian/Ubuntu:
  ``libtcmalloc-minimal4``) peaked at 1.13× PEFT with steps no slower; jemalloc at 1.14×; mimalloc (the
  ``cmeel-mimalloc`` wheel, installable by pip) at 1.19× with steps 12-16% slower. A preload cannot change a
  running process: the local executor, which trains in the driver's own process, warns instead.
  ``auto`` (the default) takes tcmalloc when the system has it, else the C library's allocator. Numerics do not
  depend on the allocator: torch aligns its CPU buffers itself.
* ``training.low_memory``: glibc's threshold pinned at 128 KiB (``mallopt``), process-wide: the peak falls under
  PEFT's, but every large block, activations included, is page-faulted in on each allocation and steps run
  30-45% slower. With another allocator preloaded it does nothing.

Where the C library is not glibc (musl, macOS) neither applies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sysconfig
from functools import lru_cache
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024
ALLOCATORS = ("auto", "system", "tcmalloc", "jemalloc", "mimalloc")
"""``training.allocator``'s names; an absolute path to a shared library is accepted too."""
_SONAMES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
_INSTALL = {"tcmalloc": "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu)",
            "jemalloc": "apt-get install libjemalloc2 (Debian/Ubuntu)",
            "mimalloc": "pip install cmeel-mimalloc"}


@lru_cache(maxsize=1)
def pin_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at ``nbytes`` for this process (once); True when applied."""
    if not _glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@lru_cache(maxsize=None)
def _find(name: str) -> str | None:
    """The library that provides allocator ``name`` on this machine, or None (looked up once per process:
    ``find_library`` runs ``ldconfig``, and every configuration built validates its allocator)."""
    if name == "mimalloc":  # the cmeel-mimalloc wheel puts it under <site-packages>/cmeel.prefix/lib
        for where in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
            found = sorted(Path(where, "cmeel.prefix", "lib").glob("libmimalloc.so*"))
            if found:
                return str(found[0])
        return None
    for soname in _SONAMES[name]:
        found = ctypes.util.find_library(soname)  # a soname (libtcmalloc_minimal.so.4): ld.so resolves it
        if found:
            return found
    return None


def preload_library(allocator: str) -> str | None:
    """The shared library ``allocator`` (one of :data:`ALLOCATORS`, or an absolute path to a ``.so``) names on
    this machine, to preload into the workers; None for the C library's own. Raises ValueError, naming what to
    install, when a named allocator is missing: better refused before a run than a run that silently uses another.
    """
    path = Path(allocator)
    if allocator not in ALLOCATORS and not (path.is_absolute() and ".so" in path.name):
        raise ValueError(f"training.allocator must be one of {list(ALLOCATORS)} or an absolute path to a shared "
                         f"library, got {allocator!r}")
    if allocator == "system" or not _glibc():
        return None
    if allocator == "auto":
        return _find("tcmalloc")
    if allocator in ALLOCATORS:
        found = _find(allocator)
        if found is None:
            raise ValueError(f"training.allocator = {allocator!r}, but this machine has no {allocator} library: "
                             f"{_INSTALL[allocator]}, or choose one of {list(ALLOCATORS)}")
        return found
    if not path.is_file():
        raise ValueError(f"training.allocator: no such file {allocator}")
    return str(path)


def worker_env(library: str | None) -> dict[str, str]:
    """Environment variables that make a new worker process allocate through ``library`` (none for None)."""
    return {} if library is None else {"LD_PRELOAD": library}


def actor_options(library: str | None) -> dict[str, dict]:
    """Ray actor options that start the actor's process with ``library`` preloaded; none for None, so actors
    without a preload share Ray's default worker pool."""
    env = worker_env(library)
    return {"runtime_env": {"env_vars": env}} if env else {}


def loaded(library: str) -> bool:
    """Whether ``library`` is mapped into this process (a preload took effect)."""
    name = Path(library).name.split(".so")[0]
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(Path(line.split()[-1]).name.startswith(name + ".so") for line in maps.splitlines() if "/" in line)
