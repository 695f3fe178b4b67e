"""Durable run state: an append-only ledger and atomic, checksummed checkpoints.

Ledger (``ledger.jsonl``): one JSON object per line, flushed and fsynced before the driver moves on, so a crash
loses at most the line being written. A torn last line (the process died mid-write) is detected and ignored.

Checkpoints (``checkpoints/round-NNNN/``): tensors in safetensors, everything else in JSON, plus a MANIFEST.json of
SHA-256 digests. A checkpoint is written into a temporary directory and renamed into place, so a directory under
its final name is always complete; on load, a checkpoint whose files do not match their digests is skipped with a
warning and the previous one is used. Nothing is ever unpickled. Each checkpoint also holds a copy of the ledger it
covers, so a ledger that later loses or changes entries is detected on resume and can be restored from it.

Run lock (``.coalora.lock``): an advisory ``flock`` held by the one process that runs or resumes a run directory,
released by the kernel when that process exits however it exits, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
RUN_MARKER = "coalora-run.json"
LOCK_FILE = ".coalora.lock"
LEDGER_COPY = "ledger.jsonl"


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """Exclusive lock on one run directory for the life of this process (or until :meth:`release`).

    ``status`` and ``export`` only read and never take it. The lock file records the holder's pid and command so
    that the refusal can say who holds it.
    """

    def __init__(self, run_dir: Path, holder: str | None = None, wait_s: float = 2.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.holder = holder or " ".join(sys.argv)[:200]
        self.wait_s = wait_s  # rides over the watchdog's brief hold (orchestrator/tracking/watchdog.py)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunInUse(f"run directory {self.path.parent} is in use by {holder}; wait for it to finish or "
                               "stop it (`coalora status` and `coalora export` work meanwhile)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({self.holder})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_marker(directory: Path, name: str, fmt: int, what: str) -> dict[str, Any]:
    """The JSON file ``name`` that marks ``directory`` as a coalora ``what`` (run, sweep) of format ``fmt``."""
    path = Path(directory) / name
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a coalora {what} directory (no {name})")
    data = json.loads(path.read_text())
    if data.get("format") != fmt:
        raise ValueError(f"{path}: unsupported {what} format {data.get('format')!r}")
    return data


def canonical_json(obj: Any) -> str:
    """Sorted, compact JSON; refuses NaN and infinity, which are not JSON and which no ledger entry may hold."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def ledger_text(entries: list[dict[str, Any]]) -> str:
    """The canonical file content of ``entries``: what a checkpoint stores and compares."""
    return "".join(canonical_json(e) + "\n" for e in entries)


class Ledger:
    """Append-only JSON-lines record of everything the driver did, in order."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        entry = {"kind": kind, **fields}
        try:
            line = canonical_json(entry) + "\n"
        except ValueError:
            raise ValueError(f"ledger entry {kind!r} holds a non-finite number; refusing to record it") from None
        with self.path.open("a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def entries(self, strict: bool = True) -> list[dict[str, Any]]:
        """Every entry in order. A torn last line (a crash mid-write) is ignored with a warning; a bad line before
        it raises, unless ``strict`` is False, which returns the entries before the first bad line."""
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_text(errors="replace").split("\n")
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # the last line, torn by a crash mid-write
                    log.warning("ledger %s: ignoring a torn last line", self.path)
                    break
                if not strict:
                    break
                raise ValueError(f"ledger {self.path} is corrupt at line {i + 1}") from None
        return out

    def truncate_to(self, n_entries: int) -> None:
        """Keep the first ``n_entries`` entries (used when resuming from a checkpoint older than the ledger)."""
        write_atomic(self.path, ledger_text(self.entries(strict=False)[:n_entries] if n_entries else []).encode())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries())


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    round: int
    tensors: dict[str, dict[str, torch.Tensor]]  # file stem -> tensors
    meta: dict[str, Any]
    path: Path


class CheckpointStore:
    """Round-indexed checkpoints under ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def _dir(self, round_: int) -> Path:
        return self.root / f"round-{round_:04d}"

    def rounds(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("round-[0-9]*") if p.is_dir())

    def save(self, round_: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
             files: dict[str, bytes] | None = None) -> Path:
        """Write one round's checkpoint; ``files`` are extra verbatim files (e.g. the ledger copy)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self._dir(round_)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".round-{round_:04d}."))
        try:
            for stem, group in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, tmp / f"{stem}.safetensors")
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
            for name, data in (files or {}).items():
                (tmp / name).write_bytes(data)
            names = sorted(p.name for p in tmp.iterdir())
            manifest = {"round": round_, "files": {name: _digest(tmp / name) for name in names}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
            for p in tmp.iterdir():
                with p.open("rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _verify(self, path: Path) -> bool:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            return all(_digest(path / name) == digest for name, digest in manifest["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint whose files match their manifest; corrupt ones are skipped with a warning."""
        for round_ in reversed(self.rounds()):
            path = self._dir(round_)
            if not self._verify(path):
                log.warning("checkpoint %s is corrupt or incomplete; falling back to the previous one", path)
                continue
            tensors = {p.stem: load_file(p) for p in sorted(path.glob("*.safetensors"))}
            meta = json.loads((path / "meta.json").read_text())
            return Checkpoint(round_, tensors, meta, path)
        return None
