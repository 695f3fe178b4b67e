"""Batch helpers that every loop shares."""

from __future__ import annotations

import torch

from workers.data import on_device


def test_on_device_moves_every_tensor_and_keeps_those_already_there():
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.tensor([0, 1])}
    moved = on_device(batch, "cpu")
    assert moved.keys() == batch.keys()
    assert all(moved[k] is batch[k] for k in batch)  # already on the CPU: no copies
    as_meta = on_device(batch, torch.device("meta"))
    assert all(t.device.type == "meta" and t.shape == batch[k].shape for k, t in as_meta.items())
