"""Fault injection at the driver's commit points, for the crash/resume tests.

``COALORA_FAULT_AT=<point>:<n>`` makes the driver SIGKILL itself right after the n-th time (1-based) it commits
``point``: the harshest crash there is (no cleanup, no finally blocks). Unset in normal use, it costs one
environment lookup per commit.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

COMMIT_POINTS: tuple[str, ...] = ("pool_scored", "trained", "proposed", "evaluated", "checkpoint", "final")
_seen: Counter[str] = Counter()


def commit_point(name: str) -> None:
    """Mark that ``name`` has just been made durable."""
    spec = os.environ.get("COALORA_FAULT_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    _seen[name] += 1
    if point == name and _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
