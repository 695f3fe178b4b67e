"""The two offline tasks and evaluation.

(a) Sequence classification of review snippets with the packaged MiniLM; (b) causal LM on Shakespeare with the
packaged SmolLM2-135M. Either task takes any other model spec ``workers.models.resolve_model`` understands (hub id
or local directory), so the same harness runs a tiny random model in tests and a real model in experiments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import data
from .models import load_model, load_tokenizer, resolve_model


@dataclass
class Task:
    """A model in fp32 (not yet wrapped), its tokenizer and fixed train/validation loaders."""

    kind: str  # "classification" | "causal-lm"
    model: nn.Module
    tokenizer: Any
    train_loader: DataLoader
    validation_loader: DataLoader


def build_review_task(
    model: str = "minilm",
    *,
    n_train: int | None = 2048,
    n_validation: int = 500,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
) -> Task:
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    net = load_model(source, task="classification", num_labels=2)
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id  # decoders classify at the last non-pad token
    split = data.load_reviews(n_train, n_validation, seed)
    train = data.classification_loader(
        split.train, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=True, seed=seed
    )
    val = data.classification_loader(split.validation, tokenizer, batch_size=batch_size, max_length=max_length)
    return Task("classification", net, tokenizer, train, val)


def build_shakespeare_task(
    model: str = "smollm2",
    *,
    block_size: int = 64,
    n_train_blocks: int | None = 512,
    n_validation_blocks: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> Task:
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    net = load_model(source, task="causal-lm")
    split = data.load_shakespeare(seed=seed)
    train_blocks = data.token_blocks(split.train, tokenizer, block_size, n_train_blocks)
    val_blocks = data.token_blocks(split.validation, tokenizer, block_size, n_validation_blocks)
    train = data.lm_loader(train_blocks, batch_size=batch_size, shuffle=True, seed=seed)
    val = data.lm_loader(val_blocks, batch_size=batch_size)
    return Task("causal-lm", net, tokenizer, train, val)


@torch.no_grad()
def evaluate(
    model: nn.Module, configuration: Any | None, loader: Iterable[Mapping[str, torch.Tensor]], *, adapter: bool = True
) -> dict[str, float]:
    """Mean loss, perplexity = exp(mean loss), and accuracy for classification batches (1-D labels), of a
    :class:`~workers.coa_model.CoAModel` under ``configuration`` (None: unquantized). ``adapter=False`` is the
    no-adapter baseline on the same quantized base. Batches are weighted by their size."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n, correct, is_classification = 0.0, 0, 0, False
    try:
        model.set_configuration(configuration)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            if adapter:
                out = model.model(**batch)
            else:
                with model.adapters_disabled():
                    out = model.model(**batch)
            size = batch["labels"].shape[0]
            loss_sum += float(out.loss) * size
            n += size
            if batch["labels"].dim() == 1:
                is_classification = True
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation loader is empty")
    mean = loss_sum / n
    metrics = {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
    if is_classification:
        metrics["accuracy"] = correct / n
    return metrics
