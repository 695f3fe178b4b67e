"""Batches: tokenised classification examples (single texts or text pairs) padded to each batch's longest, and
language-modelling token blocks. Padding to the longest rather than to ``max_length`` makes short examples far
cheaper on CPU."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader


def on_device(tensors: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A batch (or any name → tensor mapping) on ``device``; tensors already there are the same objects, not
    copies."""
    return {k: v.to(device) for k, v in tensors.items()}


class ClassificationCollator:
    """Tokenise (text, label) or (text, text_pair, label) items, truncating to ``max_length`` and padding to the
    batch's longest."""

    def __init__(self, tokenizer: Any, max_length: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
        columns = list(zip(*items))
        texts, labels = list(columns[0]), columns[-1]
        pairs = list(columns[1]) if len(columns) == 3 else None
        enc = self.tokenizer(
            texts, pairs, truncation=True, max_length=self.max_length, padding="longest", return_tensors="pt"
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
