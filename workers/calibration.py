"""Calibration statistics: Σ = XᵀX/N of every target matrix's inputs, gathered once per replica, for GPTQ.

X is what each target layer receives when the model runs in full precision with its adapters off, on the first
``quant.calibration_examples`` training examples (padding positions excluded, as they never reach a prediction).
One Σ per matrix (in × in, float32) serves every setting and every configuration: GPTQ's Hessian depends on the
inputs, not on the codes. Computed the same way on every worker and in ``coalora export``, from the same seeded
examples, so all of them quantize identically.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapters.lora import LoRAModel


@torch.no_grad()
def input_covariances(model: nn.Module, names: Sequence[str],
                      batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Submodule name → Σ of its inputs while ``model(**batch)`` runs over ``batches`` (labels withheld; padding
    positions left out by the attention mask), accumulated in float64 and returned as float32."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1])
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                x = x[mask[0]]
            x = x.double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            attention = batch.get("attention_mask")
            mask[0] = None if attention is None else attention.reshape(-1).bool()
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not counts:
        raise ValueError("no calibration tokens: the calibration batches are empty")
    return {name: (sums[name] / counts[name]).float() for name in names}


def coa_covariances(model: LoRAModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Σ of every target of a CoA-LoRA model, in full precision with its adapters off (the original model's
    inputs), keyed by registry name."""
    with model.adapters_disabled():
        model.set_configuration(None)
        return input_covariances(model.model, model.registry.names, batches)
