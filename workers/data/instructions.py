"""Instruction tuning: alpaca records (``instruction``, optional ``input``, ``output``), chat records (``messages``:
``role``/``content``) and ShareGPT records (``conversations``: ``from``/``value``), rendered the way the model's
tokenizer renders a chat (its chat template), with the loss on the assistant's tokens only: every other token is
labelled -100, the index PyTorch's cross-entropy ignores.

How the assistant's tokens are found: for each assistant turn, the template renders the conversation up to that
turn with the generation prompt, then up to and including it; the characters in between (the reply and the
template's end-of-turn marker) are the response, and a token is a response token when its first character lies in
one. Alpaca records for a model without a chat template use the Stanford Alpaca prompt; chat records need a template.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from .sources import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LAYOUTS: dict[str, tuple[str, ...]] = {"alpaca": ("instruction", "output"), "chat": ("messages",),
                                       "sharegpt": ("conversations",)}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "system": "system"}
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def layout_of(columns: Sequence[str]) -> str | None:
    """The instruction layout whose columns ``columns`` hold, if any."""
    return next((name for name, needed in LAYOUTS.items() if all(c in columns for c in needed)), None)


def to_messages(row: dict[str, Any], layout: str) -> list[dict[str, str]]:
    """One record as a list of {role, content} turns."""
    if layout == "alpaca":
        prompt = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"] or "")}]
    if layout == "chat":
        return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in row["messages"]]
    turns = []
    for m in row["conversations"]:
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise DataError(f"ShareGPT turn from {m['from']!r}: expected one of {sorted(SHAREGPT_ROLES)}")
        turns.append({"role": role, "content": str(m["value"] or "")})
    return turns


def render(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text under the tokenizer's chat template and the character spans of its replies."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        spans.append((len(before), len(upto)))
    return tokenizer.apply_chat_template(messages, tokenize=False), spans


def render_alpaca(row: dict[str, Any], eos_token: str | None) -> tuple[str, list[tuple[int, int]]]:
    """An alpaca record in the Stanford Alpaca prompt (for a model without a chat template) and its reply's span."""
    context = str(row["input"]) if row.get("input") else ""
    prompt = ALPACA_PROMPT.format(context=", paired with an input that provides further context" if context else "",
                                  instruction=row["instruction"], input=f"### Input:\n{context}\n\n" if context else "")
    text = prompt + str(row["output"] or "") + (eos_token or "")
    return text, [(len(prompt), len(text))]


def encode(rows: list[dict[str, Any]], layout: str, tokenizer: Any, max_length: int,
           where: str) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record, truncated to ``max_length``; records without a response are dropped, and
    both counts are reported."""
    out, empty, truncated = [], 0, 0
    for row in rows:
        messages = to_messages(row, layout)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            empty += 1
            continue
        if getattr(tokenizer, "chat_template", None):
            text, spans = render(messages, tokenizer)
        elif layout == "alpaca":
            text, spans = render_alpaca(row, tokenizer.eos_token)
        else:
            raise DataError(f"{layout} records need the model's chat template, and this model's tokenizer has none; "
                            "use an instruct model or alpaca records")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for t, (start, _) in zip(ids, enc["offset_mapping"])]
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            empty += 1  # the response lies entirely beyond max_length
            continue
        out.append((ids, labels))
    if empty:
        log.warning("%s: dropped %d of %d records with no response (or none within max_length)", where, empty, len(rows))
    if truncated:
        log.warning("%s: truncated %d of %d records to max_length = %d tokens", where, truncated, len(rows), max_length)
    if not out:
        raise DataError(f"{where}: no record has a response within max_length = {max_length} tokens")
    return out


class InstructionCollator:
    """Pad (input_ids, labels) records to the batch's longest: pad tokens get attention 0 and label -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
