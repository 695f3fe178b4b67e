"""Tasks and evaluation.

The two offline tasks: (a) sequence classification of review snippets with the packaged MiniLM; (b) causal LM on
Shakespeare with the packaged SmolLM2-135M. A user's own data (``data.source``: a file, a folder, a saved or cached
Hugging Face dataset) becomes an N-class classification or causal-LM task through :func:`build_source_task`. Any
task takes any model spec ``workers.models.resolve_model`` understands (hub id or local directory), so the same
harness runs a tiny random model in tests and a real model in experiments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import data
from .models import load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)


@dataclass
class Task:
    """A model in fp32 (not yet wrapped), its tokenizer and fixed train/validation loaders."""

    kind: str  # "classification" | "causal-lm" | "instruction"
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


def _held_out(items: list, n_train: int | None, n_validation: int, seed: int, what: str) -> data.Split:
    if n_validation >= len(items):
        raise data.DataError(f"{what}: only {len(items)} usable, but data.val_examples + data.score_examples = "
                             f"{n_validation} are held out; lower them or add data")
    return data.seeded_split(items, n_train, n_validation, seed)


def _shuffled(items: list, n: int | None, seed: int) -> list:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order][: len(items) if n is None else n]


def build_source_task(
    model: str,
    spec: data.DataSpec,
    plan: data.DataPlan,
    *,
    n_train: int | None,
    n_validation: int,
    batch_size: int,
    max_length: int,
    seed: int = 0,
) -> Task:
    """A task on the user's source, read as ``plan`` says. The held-out examples are the source's validation split
    (seeded shuffle) when it has one, else the first ``n_validation`` of a seeded shuffle of all usable examples
    (for language modelling: of the token blocks)."""
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    rows = data.read_source(spec)

    def split(examples: Callable[[list, str], list], what: str = str(spec.source)) -> data.Split:
        train = examples(rows.train, f"{spec.source} (train)")
        if rows.validation is None:
            return _held_out(train, n_train, n_validation, seed, what)
        held = examples(rows.validation, f"{spec.source} (validation)")
        return data.Split(_shuffled(train, n_train, seed), _shuffled(held, n_validation, seed))

    if plan.task == "classification":
        assert plan.labels is not None
        net = load_model(source, task="classification", num_labels=len(plan.labels))
        net.config.id2label = dict(enumerate(plan.labels))
        net.config.label2id = {name: i for i, name in enumerate(plan.labels)}
        if getattr(net.config, "pad_token_id", None) is None:
            net.config.pad_token_id = tokenizer.pad_token_id

        def items(rows_: list, where: str) -> list:
            out = data.classification_items(rows_, plan, where)
            _report_truncation(out, tokenizer, max_length, where)
            return out

        parts = split(items)
        train = data.classification_loader(parts.train, tokenizer, batch_size=batch_size, max_length=max_length,
                                           shuffle=True, seed=seed)
        val = data.classification_loader(parts.validation, tokenizer, batch_size=batch_size, max_length=max_length)
        return Task("classification", net, tokenizer, train, val)
    net = load_model(source, task="causal-lm")
    if plan.task == "instruction":
        assert plan.layout is not None
        layout = plan.layout
        parts = split(lambda rows_, where: data.encode_instructions(rows_, layout, tokenizer, max_length, where))
        collate = data.InstructionCollator(tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(parts.train, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)
        val = DataLoader(parts.validation, batch_size=batch_size, collate_fn=collate)
        return Task("instruction", net, tokenizer, train, val)
    parts = split(lambda rows_, where: list(data.token_blocks(data.documents(rows_, plan, where), tokenizer, max_length)),
                  f"{spec.source} ({max_length}-token blocks)")
    train = data.lm_loader(torch.stack(parts.train), batch_size=batch_size, shuffle=True, seed=seed)
    val = data.lm_loader(torch.stack(parts.validation), batch_size=batch_size)
    return Task("causal-lm", net, tokenizer, train, val)


def _report_truncation(items: list[tuple], tokenizer: Any, max_length: int, where: str) -> None:
    """Say how many examples are longer than ``max_length`` tokens (the collator truncates them)."""
    texts = [item[0] for item in items]
    pairs = [item[1] for item in items] if len(items[0]) == 3 else None
    lengths = [len(ids) for ids in tokenizer(texts, pairs)["input_ids"]]
    longer = sum(n > max_length for n in lengths)
    if longer:
        log.warning("%s: %d of %d examples are longer than data.max_length = %d tokens and are truncated", where,
                    longer, len(items), max_length)


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class absent from both predictions and labels counts as 0)."""
    f1 = []
    for c in range(n_classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1) / n_classes


@torch.no_grad()
def evaluate(
    model: nn.Module, configuration: Any | None, loader: Iterable[Mapping[str, torch.Tensor]], *, adapter: bool = True
) -> dict[str, float]:
    """Mean loss, perplexity = exp(mean loss), and accuracy and macro-F1 for classification batches (1-D labels), of a
    :class:`~workers.coa_model.CoAModel` under ``configuration`` (None: unquantized). ``adapter=False`` is the
    no-adapter baseline on the same quantized base. Batches are weighted by their size."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n, correct, is_classification = 0.0, 0, 0, False
    predicted, gold, n_classes = [], [], 0
    try:
        model.set_configuration(configuration)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            if adapter:
                out = model.model(**batch)
            else:
                with model.adapters_disabled():
                    out = model.model(**batch)
            labels = batch["labels"]
            # token-weighted for language modelling (the loss is a mean over the batch's target tokens)
            size = labels.shape[0] if labels.dim() == 1 else int((labels[:, 1:] != data.IGNORE_INDEX).sum())
            loss_sum += float(out.loss) * size
            n += size
            if batch["labels"].dim() == 1:
                is_classification = True
                n_classes = out.logits.shape[-1]
                predicted.append(out.logits.argmax(-1).cpu())
                gold.append(batch["labels"].cpu())
                correct += int((predicted[-1] == gold[-1]).sum())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation loader is empty")
    mean = loss_sum / n
    metrics = {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
    if is_classification:
        metrics["accuracy"] = correct / n
        metrics["macro_f1"] = macro_f1(torch.cat(predicted), torch.cat(gold), n_classes)
    return metrics
