"""Seeded train / held-out splits, shared by every source: one explicit generator per split, so a run, its resume
and every worker of a cluster hold out exactly the same examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    train: list[Any]
    validation: list[Any]


def shuffled(items: Sequence[T], seed: int, n: int | None = None) -> list[T]:
    """The first ``n`` (all when None) of a seeded shuffle of ``items``."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order][: len(items) if n is None else n]


def seeded_split(items: Sequence[T], n_train: int | None, n_validation: int, seed: int) -> Split:
    """The first ``n_validation`` items of a seeded shuffle are held out; up to ``n_train`` of the rest train."""
    if n_validation >= len(items):
        raise ValueError(f"validation size {n_validation} leaves no training data out of {len(items)} items")
    order = shuffled(items, seed)
    validation, rest = order[:n_validation], order[n_validation:]
    return Split(rest if n_train is None else rest[:n_train], validation)
