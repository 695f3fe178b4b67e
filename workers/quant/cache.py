"""The quantized-weight cache the adapted layers share: what a quantized model stores (packed codes and scales) per
(matrix, setting), in an LRU bounded in bytes (``training.cache_mb``), plus the scratch buffer dense weights are
decoded into for one matmul. CoA-LoRA switches configuration every step, so most settings are met again soon; the
cache makes that a lookup instead of a re-quantization while memory grows with the quantized size, not with fp32
copies.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable, Mapping

import torch

from search.space import QuantSetting

from .formats import StoredWeight

DEFAULT_CACHE_MB = 256.0
"""Default ``training.cache_mb``: about four 4-bit configurations of SmolLM2-135M's 210 matrices."""


class QuantCache:
    """LRU of quantized matrices in storage form (:data:`~workers.quant.formats.StoredWeight`), keyed by (matrix name, setting) and
    bounded in bytes. Two configurations that give a matrix the same setting share its entry. It also owns the
    scratch buffer dense weights are decoded into, one per device, grown to the largest matrix seen."""

    def __init__(self, capacity_mb: float = DEFAULT_CACHE_MB):
        if not (isinstance(capacity_mb, (int, float)) and math.isfinite(capacity_mb) and capacity_mb >= 0):
            raise ValueError(f"cache capacity must be a finite number of MB >= 0, got {capacity_mb!r}")
        self.capacity_bytes = int(capacity_mb * 2**20)
        self._entries: OrderedDict[tuple[str, QuantSetting], StoredWeight] = OrderedDict()
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, name: str, setting: QuantSetting, compute: Callable[[], StoredWeight]) -> StoredWeight:
        key = (name, setting)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = compute()
        if value.nbytes <= self.capacity_bytes:  # a matrix larger than the whole budget is used, not kept
            self._entries[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
        return value

    def drop(self, name: str) -> None:
        """Forget every setting of matrix ``name`` (its residual changed)."""
        for key in [k for k in self._entries if k[0] == name]:
            self.nbytes -= self._entries.pop(key).nbytes

    def scratch(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least ``numel`` entries on ``device``, reused by every decode there."""
        buffer = self._scratch.get(device)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer

    def stats(self) -> dict[str, float]:
        """Counters since the last :meth:`reset_counters`, and what is held now."""
        lookups = self.hits + self.misses
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_hit_rate": self.hits / lookups if lookups else 0.0, "cache_mb": self.nbytes / 2**20,
                "cache_entries": len(self._entries)}

    def reset_counters(self) -> None:
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)


def merge_cache_stats(stats: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Several caches' :meth:`QuantCache.stats` as one: counts and bytes add up, the hit rate is recomputed."""
    total: dict[str, float] = {}
    for one in stats:
        for name, value in one.items():
            total[name] = total.get(name, 0) + value
    lookups = total.get("cache_hits", 0) + total.get("cache_misses", 0)
    total["cache_hit_rate"] = total.get("cache_hits", 0) / lookups if lookups else 0.0
    return total
