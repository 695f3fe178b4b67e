"""workers/allocator.py: which allocator a worker process uses, and glibc's mmap threshold. Each policy is
process-wide, so every check that applies one runs in a child process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from workers.allocator import ALLOCATORS, loaded, preload_library, worker_env

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="preloading an allocator is a glibc/Linux mechanism here")


def _child(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


def test_low_memory_pins_the_allocator_threshold():
    """glibc: mallopt succeeds; elsewhere nothing changes and False is returned."""
    out = _child("from workers.allocator import pin_mmap_threshold as p; print(p(), p(), p.cache_info().currsize)")
    assert out.split() == [str(GLIBC), str(GLIBC), "1"]


@needs_glibc
def test_a_preloaded_allocator_is_the_one_a_new_process_maps():
    """mimalloc from its wheel (a dev dependency): found, and mapped by a process started with worker_env's
    variables, not by one started without them."""
    lib = preload_library("mimalloc")
    assert lib is not None and Path(lib).is_file() and "libmimalloc" in Path(lib).name
    assert worker_env(lib) == {"LD_PRELOAD": lib} and worker_env(None) == {}
    probe = f"from workers.allocator import loaded; print(loaded({lib!r}))"
    assert _child(probe, **worker_env(lib)) == "True"
    assert _child(probe, LD_PRELOAD="") == "False"
    assert not loaded(lib)  # this process started without it
    assert preload_library(lib) == lib  # a path names itself


@needs_glibc
def test_auto_takes_tcmalloc_when_installed_and_system_means_none():
    assert preload_library("system") is None
    tcmalloc = next(iter(_installed("tcmalloc_minimal", "tcmalloc")), None)
    assert preload_library("auto") == tcmalloc  # None on a machine without it: the C library's allocator


def _installed(*sonames: str) -> list[str]:
    import ctypes.util

    return [found for name in sonames if (found := ctypes.util.find_library(name))]


@pytest.mark.parametrize("bad, message", [("tcmallok", "must be one of"), ("libtcmalloc.so", "absolute path"),
                                          ("/no/such/libfast.so", "no such file")])
@needs_glibc
def test_a_wrong_allocator_is_refused_with_what_to_do(bad, message):
    with pytest.raises(ValueError, match=message):
        preload_library(bad)


@needs_glibc
def test_a_named_allocator_that_is_missing_says_how_to_install_it(monkeypatch):
    import workers.allocator as allocator

    monkeypatch.setattr(allocator, "_find", lambda name: None)
    with pytest.raises(ValueError, match="apt-get install libjemalloc2"):
        preload_library("jemalloc")
    assert preload_library("auto") is None  # auto falls back instead
    assert set(ALLOCATORS) >= {"auto", "system", "tcmalloc", "jemalloc", "mimalloc"}
