"""CoA-LoRA's adapter kind (``adapter.kind: coa``): a :class:`~.lora.LoRAModel` plus θ, the configuration
encoder (:mod:`.encoder`) that gives every layer its r×r M for the active configuration.

A configuration is switched by setting each layer's active setting and its M (one batched θ call), so K
configurations per step cost K forward/backward passes and no model reloads (method.md §3.5, §6 B15, B16).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from search.space import QuantSetting, SearchSpace

from .encoder import HIDDEN_DIM, ConfigurationEncoder, encode_settings, no_decay_parameter_names
from .lora import LoRAModel

FIT_LR = 1e-2
"""Adam's rate when θ is fitted to given mixing matrices (:meth:`CoAModel.fit_encoder`): a regression of a small MLP
on a few thousand r×r targets, far from the task's rates."""


class CoAModel(LoRAModel):
    """The trainable system: a :class:`~.lora.LoRAModel` (frozen base, targets wrapped, LoRA pairs, heads) and θ.

    Call ``model(configuration, **batch)``: it activates ``configuration``, computes all M in one θ call and runs
    the wrapped model.

    ``reference`` (a configuration, one setting for every matrix, or None) anchors θ: M(C) = I + γ·(U(C) −
    U(reference)), so the reference maps to M = I exactly and only differences between configurations move M.
    Without it, θ's output bias and every other configuration-independent part of U rescale all adapters alike, a
    change Shared-LoRA can make as well."""

    def __init__(self, model: nn.Module, space: SearchSpace, *,
                 reference: Sequence[QuantSetting] | QuantSetting | None = None, encoder_hidden: int = HIDDEN_DIM,
                 **options: Any):
        """``options`` are :class:`~.lora.LoRAModel`'s (rank, alpha, init, trainable_modules, cache_mb, seed,
        registry); θ's random init is drawn from ``seed + 1``."""
        super().__init__(model, space, **options)
        self.encoder = ConfigurationEncoder.for_model(space, self.registry, self.rank, hidden=encoder_hidden,
                                                      generator=torch.Generator().manual_seed(self.seed + 1))
        self.register_buffer("block_ids", torch.tensor(self.registry.blocks(), dtype=torch.long), persistent=False)
        self.register_buffer(
            "type_ids", torch.tensor(self.registry.module_type_ids(), dtype=torch.long), persistent=False
        )
        self.reference: list[QuantSetting] | None = None
        self.register_buffer("reference_idx", torch.zeros(0, dtype=torch.long), persistent=False)
        if reference is not None:
            uniform = isinstance(reference, QuantSetting)
            self.reference = self.resolve([reference] * len(self.registry) if uniform else reference)
            self.reference_idx = encode_settings(space, self.reference, self.registry.names)

    def mixing_matrices(self, configuration: Sequence[QuantSetting]) -> torch.Tensor:
        """(N, r, r) M matrices of ``configuration`` in one batched θ call."""
        idx = encode_settings(self.space, configuration, self.registry.names).to(self.block_ids.device)
        if self.reference is None:
            return self.encoder(idx, self.block_ids, self.type_ids)
        n, ref = len(idx), self.reference_idx
        both = self.encoder(torch.cat([idx, ref]), self.block_ids.repeat(2), self.type_ids.repeat(2))
        same = (idx == ref).all(-1).view(n, 1, 1)  # exactly I on the reference's own settings, not merely ≈ I
        eye = torch.eye(self.rank, dtype=both.dtype, device=both.device)
        return torch.where(same, eye, both[:n] - both[n:] + eye)

    def fit_encoder(self, configurations: Sequence[Any], targets: torch.Tensor, weights: torch.Tensor, *,
                    steps: int, lr: float = FIT_LR, seed: int = 0) -> float:
        """Start θ from ``seed``'s draw and fit it by Adam so that M(configuration k) of matrix n approaches
        ``targets[k, n]`` (an r×r matrix), each entry's squared error weighted by ``weights[k, n]``; a warm start
        for θ from corrections computed in closed form (``adapter.init: projq-shared``). Returns the final
        weighted error relative to M = I's (1.0: θ learned nothing; 0: exact)."""
        settings = [self.resolve(c) for c in configurations]
        self.encoder.reset_parameters(torch.Generator().manual_seed(seed + 1))
        optimizer = torch.optim.Adam(self.encoder.parameters(), lr=lr)
        eye = torch.eye(self.rank, device=targets.device)
        baseline = float((weights * (targets - eye).square()).sum())
        if baseline == 0.0:
            return 0.0
        loss = torch.tensor(baseline)
        for _ in range(steps):
            mixing = torch.stack([self.mixing_matrices(s) for s in settings])
            loss = (weights * (mixing - targets).square()).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            mixing = torch.stack([self.mixing_matrices(s) for s in settings])
            return float((weights * (mixing - targets).square()).sum()) / baseline

    def no_decay_names(self) -> set[str]:
        """Trainable parameters that take no weight decay: θ's γ, LayerNorm and embeddings, and every bias."""
        return no_decay_parameter_names(self.encoder, "encoder.") | super().no_decay_names()


@torch.no_grad()
def theta_spread(model: LoRAModel, configurations: Sequence[Any]) -> dict[str, float]:
    """How configuration-specific θ's output is over ``configurations`` (RMS over matrices, Frobenius norms):
    ``theta_common`` = ‖M̄ − I‖ (what every configuration gets alike, a rescaling Shared-LoRA could learn too) and
    ``theta_spread`` = ‖M_k − M̄‖ (the configuration-dependent part CoA-LoRA exists for). Zeros without θ."""
    if not isinstance(model, CoAModel) or not configurations:
        return {"theta_common": 0.0, "theta_spread": 0.0}
    ms = torch.stack([model.mixing_matrices(model.resolve(c)) for c in configurations])  # (K, N, r, r)
    mean = ms.mean(0)
    eye = torch.eye(model.rank, dtype=ms.dtype, device=ms.device)
    return {"theta_common": float((mean - eye).square().sum((-2, -1)).mean().sqrt()),
            "theta_spread": float((ms - mean).square().sum((-2, -1)).mean().sqrt())}
