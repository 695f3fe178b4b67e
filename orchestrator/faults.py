"""Fault injection at the driver's commit points, for the crash/resume tests.

``COALORA_FAULT_AT=<point>:<n>`` makes the driver SIGKILL itself right after the n-th time (1-based) it commits
``point``: the harshest crash there is (no cleanup, no finally blocks). ``COALORA_FAULT_SLEEP=<point>:<seconds>``
makes it pause after the first commit of ``point`` instead (a window in which a test acts on a live run: a second
process, a dying server). Unset in normal use, they cost two environment lookups per commit.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

COMMIT_POINTS: tuple[str, ...] = ("pool_scored", "trained", "proposed", "evaluated", "checkpoint", "final")
_seen: Counter[str] = Counter()


def commit_point(name: str) -> None:
    """Mark that ``name`` has just been made durable."""
    spec, pause = os.environ.get("COALORA_FAULT_AT"), os.environ.get("COALORA_FAULT_SLEEP")
    if not spec and not pause:
        return
    _seen[name] += 1
    if pause:
        point, _, seconds = pause.partition(":")
        if point == name and _seen[name] == 1:
            time.sleep(float(seconds))
    if spec:
        point, _, nth = spec.partition(":")
        if point == name and _seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
