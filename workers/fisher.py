"""Empirical diagonal Fisher of the target matrices (method.md §2.1) and the ILP cost table (method.md §2.2).

F_i = Σ_examples (∂ℓ/∂W_i)², one example per backward pass (batch size 1: the square of a batch gradient is not
the sum of per-example squares). The cost table holds ‖√F_i ⊙ (W_i − Ŵ_c)‖²_F for every target i and every
setting c of the space (plain quantization, the "ranks-None, data-True" table CoA-LoRA uses), or the unweighted
‖W_i − Ŵ_c‖²_F without Fisher.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from search.space import SearchSpace

from .data import on_device
from .quant.formats import fake_quantize_each
from .registry import ModuleRegistry


def _squared_gradient_sum(
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    examples: Iterable[Mapping[str, torch.Tensor]],
    n_examples: int,
) -> dict[str, torch.Tensor]:
    """Σ over (at most ``n_examples``) single-example batches of (∂loss/∂tensor)², per named tensor."""
    fisher = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in tensors.items()}
    device = next(iter(tensors.values())).device
    count = 0
    for batch in examples:
        if count >= n_examples:
            break
        size = batch["labels"].shape[0]
        if size != 1:
            raise ValueError(f"the diagonal Fisher needs batch size 1, got a batch of {size}")
        loss = loss_of(on_device(batch, device))
        for name, g in zip(tensors, torch.autograd.grad(loss, list(tensors.values()))):
            fisher[name] += g.float().square()
        count += 1
    if count == 0:
        raise ValueError("no examples were given for the Fisher estimate")
    return fisher


def diagonal_fisher(
    model: nn.Module,
    registry: ModuleRegistry,
    examples: Iterable[Mapping[str, torch.Tensor]],
    n_examples: int = 128,
) -> dict[str, torch.Tensor]:
    """Per-target fp32 tensors shaped like the weights. ``examples`` yields batches that each hold ONE example
    with labels (ValueError otherwise); at most ``n_examples`` are used. The model's requires_grad flags are
    restored afterwards."""
    weights = {t.name: registry.module(model, t).weight for t in registry}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deployed network
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        return _squared_gradient_sum(lambda batch: model(**batch).loss, weights, examples, n_examples)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def layer_fisher(coa: Any, examples: Iterable[Mapping[str, torch.Tensor]], n_examples: int = 128) -> dict[str, torch.Tensor]:
    """:func:`diagonal_fisher` of an already wrapped :class:`~workers.adapters.lora.LoRAModel`, without unwrapping it.

    With no active configuration and adapters off, each wrapped layer computes x·Wᵀ from its ``residual`` buffer;
    substituting the full-precision weight for that buffer (``functional_call``) gives exactly the original
    network, whose weight gradients are the ones the Fisher needs, whatever the adapter init was."""
    weights = {layer.name: layer.weight.detach().clone().requires_grad_(True) for layer in coa.layers}
    leaves = {f"{name}.residual": w for name, w in weights.items()}
    with coa.adapters_disabled():
        coa.set_configuration(None)
        return _squared_gradient_sum(
            lambda batch: functional_call(coa.model, leaves, args=(), kwargs=batch, strict=False).loss,
            weights, examples, n_examples,
        )


def setting_costs(weight: torch.Tensor, space: SearchSpace, fisher: torch.Tensor | None = None,
                  name: str = "weight", sample: int | None = None) -> np.ndarray:
    """(n_settings,) float64: ‖√F ⊙ (W − quant_c(W))‖²_F for every setting c of ``space`` (plain ‖W − Ŵ_c‖²_F
    without ``fisher``), in ``space.settings`` order — one row of the ILP cost table; +inf for a setting the matrix
    cannot take (:meth:`SearchSpace.allowed`).

    ``sample``: estimate from about this many entries instead of all of them (432 fake-quantizations of every
    matrix dominate a run's start-up on CPU). The estimate takes whole chunks of the largest second-level block
    (B0·B1) at evenly spaced positions, so every block is quantized exactly as in the full matrix except that the
    per-matrix offset (min absmax) is taken over the chunks, and scales the sum by numel / sampled entries. For
    llama.cpp types it takes evenly spaced whole rows, which ggml quantizes exactly as in the full matrix.
    """
    w, f, scale = _sample(weight.detach().float(), fisher, space, sample)
    out = np.full(space.n_settings, np.inf)  # +inf where the rows do not fit a type's blocks: never picked
    columns = np.flatnonzero(space.allowed([weight.shape[-1]])[0])
    for j, quantized in zip(columns, fake_quantize_each(w, [space.settings[j] for j in columns], name=name)):
        diff = (w - quantized).square()
        out[j] = float((diff * f).sum() if f is not None else diff.sum()) * scale
    return out


def _sample(w: torch.Tensor, fisher: torch.Tensor | None, space: SearchSpace,
            sample: int | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(entries, their Fisher weights, numel / sampled entries) for :func:`setting_costs`: whole rows for a gguf
    space (rows are ggml's unit), else whole chunks of the largest second-level block of a flattened matrix."""
    f = None if fisher is None else fisher.to(w.device).float().reshape(w.shape)
    if space.is_gguf:
        if sample is None or w.numel() <= sample:
            return w, f, 1.0
        rows = torch.linspace(0, w.shape[0] - 1, max(1, -(-sample // w.shape[1]))).round().long().unique()
        return w[rows], None if f is None else f[rows], w.shape[0] / rows.numel()
    w, f = w.reshape(-1), None if f is None else f.reshape(-1)
    chunk = max(s.group_size for s in space.settings)
    if sample is None or w.numel() <= max(sample, chunk):
        return w, f, 1.0
    n_chunks = w.numel() // chunk
    starts = torch.linspace(0, n_chunks - 1, max(1, -(-sample // chunk))).round().long().unique() * chunk
    idx = (starts.unsqueeze(1) + torch.arange(chunk)).reshape(-1)
    return w[idx], None if f is None else f[idx], w.numel() / idx.numel()


def cost_table(
    model: nn.Module,
    registry: ModuleRegistry,
    space: SearchSpace,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """(N, n_settings) float64 table: row i, column ``space.flat_index(c)`` = ‖√F_i ⊙ (W_i − quant_c(W_i))‖²_F
    (unweighted without ``fisher``). Columns follow ``space.settings`` order."""
    return np.stack([
        setting_costs(registry.module(model, t).weight, space, None if fisher is None else fisher[t.name], t.name)
        for t in registry
    ])
