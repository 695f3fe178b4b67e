"""What a source's rows mean: the task (sequence classification, causal language modelling, or instruction tuning on
alpaca / chat / ShareGPT records), which columns hold the text, the optional second text and the label, and the
label map. Inferred when unambiguous, stated otherwise,
and checked before any model work: a missing column lists the available ones, a single class, labels seen only in
validation, or rows that are all empty are errors; empty texts are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .instructions import layout_of
from .sources import DataError, DataSpec, SourceRows

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "sentence", "content", "document", "review", "body")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target")


@dataclass(frozen=True)
class DataPlan:
    """The resolved reading of a source, stored in the run's configuration so workers read it the same way."""

    task: str  # "classification" | "causal-lm" | "instruction"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: tuple[str, ...] | None = None  # class names in id order (classification)
    layout: str | None = None  # instruction records: "alpaca" | "chat" | "sharegpt"

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "DataPlan":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        labels = fields.get("labels")
        return cls(**{**fields, "labels": tuple(labels) if labels else None})


def _pick(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, field: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise DataError(f"data.{field} = {given!r}: the source has no such column; its columns are {columns}")
        return given
    return next((c for c in candidates if c in columns), None)


def _label_names(values: list[Any]) -> list[str]:
    """Class names in id order: integers by value, anything else as sorted strings."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(set(values))]
    return sorted({str(v) for v in values})


def plan_task(rows: SourceRows, spec: DataSpec, task: str | None) -> DataPlan:
    """Decide the task and columns for ``rows`` (``task`` None: infer it)."""
    columns = rows.columns
    if not rows.train:
        raise DataError(f"data.source = {spec.source!r} holds no rows")
    layout = layout_of(columns)
    if task == "instruction" or (task is None and layout and spec.text_column is None):
        if layout is None:
            raise DataError(f"data.source = {spec.source!r}: instruction tuning needs alpaca (instruction, output), "
                            f"chat (messages) or ShareGPT (conversations) records; its columns are {columns}")
        return DataPlan("instruction", layout=layout)
    text = _pick(columns, spec.text_column, TEXT_COLUMNS, "text", "text_column")
    if text is None:
        raise DataError(f"data.source = {spec.source!r}: no text column found; set data.text_column to one of "
                        f"{columns}")
    pair = _pick(columns, spec.text_pair_column, (), "text pair", "text_pair_column")
    label = None if task == "causal-lm" else _pick(columns, spec.label_column, LABEL_COLUMNS, "label", "label_column")
    if task == "classification" and label is None:
        raise DataError(f"data.source = {spec.source!r}: classification needs a label column; set data.label_column to "
                        f"one of {columns}")
    if label is None:
        return DataPlan("causal-lm", text)
    names = list(spec.labels) if spec.labels else _label_names([r[label] for r in rows.train])
    if len(names) < 2:
        raise DataError(f"data.label_column = {label!r}: only one class ({names}) in the training rows; "
                        "classification needs at least two")
    if rows.validation is not None and not spec.labels:
        unseen = sorted({str(r[label]) for r in rows.validation} - set(names))
        if unseen:
            raise DataError(f"data.label_column = {label!r}: validation labels {unseen[:10]} never occur in training")
    return DataPlan("classification", text, pair, label, tuple(names))


def classification_items(rows: list[dict[str, Any]], plan: DataPlan, where: str) -> list[tuple[Any, ...]]:
    """(text[, text_pair], label id) per usable row. Empty texts and labels outside ``plan.labels`` are dropped and
    counted; nothing usable is an error."""
    assert plan.labels is not None and plan.label_column is not None
    ids = {name: i for i, name in enumerate(plan.labels)}
    out: list[tuple[Any, ...]] = []
    empty = other = 0
    for r in rows:
        text = r[plan.text_column]
        if text is None or not str(text).strip():
            empty += 1
            continue
        label = str(r[plan.label_column])
        if label not in ids:
            other += 1
            continue
        pair = () if plan.text_pair_column is None else (str(r[plan.text_pair_column] or ""),)
        out.append((str(text), *pair, ids[label]))
    _report(where, len(rows), empty, other)
    if not out:
        raise DataError(f"{where}: no usable rows (of {len(rows)}: {empty} with empty text, {other} with other labels)")
    return out


def documents(rows: list[dict[str, Any]], plan: DataPlan, where: str) -> list[str]:
    """The non-empty texts of ``rows`` (language modelling); empty ones are dropped and counted."""
    texts = [str(r[plan.text_column]) for r in rows if r[plan.text_column] is not None]
    kept = [t for t in texts if t.strip()]
    _report(where, len(rows), len(rows) - len(kept), 0)
    if not kept:
        raise DataError(f"{where}: every text is empty")
    return kept


def _report(where: str, total: int, empty: int, other: int) -> None:
    if empty:
        log.warning("%s: dropped %d of %d rows with an empty text", where, empty, total)
    if other:
        log.warning("%s: dropped %d of %d rows whose label is not in data.labels", where, other, total)
