"""Calibration statistics: Σ = XᵀX/N of every target matrix's inputs, gathered once per replica, for GPTQ.

X is what each target layer receives when the model runs in full precision with its adapters off, on the first
``quant.calibration_examples`` training examples (padding positions excluded, as they never reach a prediction).
One Σ per matrix (in × in, float32) serves every setting and every configuration: GPTQ's Hessian depends on the
inputs, not on the codes. Computed the same way on every worker and in ``coalora export``, from the same seeded
examples, so all of them quantize identically.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .coa_model import CoAModel


@torch.no_grad()
def input_covariances(model: CoAModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Layer name → Σ of its inputs over ``batches`` (accumulated in float64, returned as float32)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(layer, args, _output):
        x = args[0].reshape(-1, args[0].shape[-1])
        if mask[0] is not None and mask[0].numel() == x.shape[0]:
            x = x[mask[0]]
        x = x.double()
        sums[layer.name] = sums.get(layer.name, 0) + x.T @ x
        counts[layer.name] = counts.get(layer.name, 0) + x.shape[0]

    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    was_training = model.training
    model.eval()
    try:
        with model.adapters_disabled():
            model.set_configuration(None)
            for batch in batches:
                attention = batch.get("attention_mask")
                mask[0] = None if attention is None else attention.reshape(-1).bool()
                model.model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not counts:
        raise ValueError("no calibration tokens: the calibration batches are empty")
    return {name: (sums[name] / counts[name]).float() for name in sums}
