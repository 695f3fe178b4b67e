"""Safetensors files of quantized matrices with a format tag and a JSON layout in their metadata: what coalora
writes for a packed base (:mod:`workers.export.peft`) and for a merged LoTA model (:mod:`workers.adapters.lota.intk`).
One writer (atomic: a partial file renamed into place) and one reader (the tag checked before anything is used)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_tagged(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any], fmt: str, path: str | Path) -> Path:
    """Write ``tensors`` with metadata ``{"format": fmt, "layout": JSON of layout}`` to ``path`` atomically."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
              metadata={"format": fmt, "layout": json.dumps(layout)})
    partial.replace(path)
    return path


def load_tagged(path: str | Path, fmt: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(layout, tensors) of a file :func:`save_tagged` wrote with ``fmt``; a ValueError naming ``what`` the file
    should have been when its tag differs."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != fmt:
        raise ValueError(f"{path}: not {what} (no {fmt!r} format tag)")
    return json.loads(metadata["layout"]), load_file(str(path))


def tensor_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file's tensor data (the file less its 8-byte length and JSON header)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return Path(path).stat().st_size - 8 - header
