"""Tracking writes that could not reach the MLflow store, kept on disk in order until it answers again.

A cluster job must not stop training because its tracking server restarts or its database fails over, and must not
lose what it logged meanwhile. So a write that fails is not an error: it goes into the run's outbox
(``RUN/tracking-outbox.jsonl``, one JSON write per line, rewritten atomically on every change), and the tracker sends
the outbox, oldest first, whenever the store answers again. Every write coalora makes is idempotent (metrics are
keyed by step and never logged twice, artifacts replace their path, runs are found by tag before they are
created), so a write that reached the store just before a crash and is sent again from the outbox changes nothing.
The file survives the process: a crash, or a store that stays away past the run's end, leaves it for
``coalora resume``, which sends it first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..state import write_atomic

OUTBOX_FILE = "tracking-outbox.jsonl"


class Outbox:
    """The pending writes of one run, oldest first, mirrored to ``path`` (absent when there are none)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ops: list[dict[str, Any]] = []
        if self.path.is_file():
            self.ops = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.ops)

    def add(self, op: dict[str, Any]) -> None:
        self.ops.append(op)
        self._save()

    def sent_first(self) -> None:
        """The oldest write reached the store."""
        self.ops.pop(0)
        self._save()

    def drop(self, unwanted) -> int:
        """Remove the writes for which ``unwanted(op)`` holds; returns how many."""
        kept = [op for op in self.ops if not unwanted(op)]
        dropped = len(self.ops) - len(kept)
        if dropped:
            self.ops = kept
            self._save()
        return dropped

    def _save(self) -> None:
        if self.ops:
            write_atomic(self.path, "".join(json.dumps(op) + "\n" for op in self.ops).encode())
        else:
            self.path.unlink(missing_ok=True)
