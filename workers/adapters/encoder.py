"""The configuration encoder θ (method.md §3.2–3.3): one shared MLP that maps a matrix's quantization setting,
block index and module type to its r×r mixing matrix M = I + γ·U.

All table sizes come from the space and the registry (method.md §6 A6, B14), and the N matrices of a
configuration are produced by one batched call (method.md §6 B16), never per layer inside the forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from search.space import FIELDS, QuantSetting, SearchSpace

from ..registry import ModuleRegistry

EMBEDDING_DIM = 8
HIDDEN_DIM = 128
LAST_LAYER_STD = 1e-4
"""Std of the last Linear's weights: with zero bias, U ≈ 0 and M ≈ I at init, so CoA-LoRA starts as plain
shared LoRA (method.md §3.3). The official code uses 1e-3; U's entries are then ~1e-3·‖h‖ ≈ 4e-3 and their max over
the r²·N entries of a real model (590k at r = 64 on RoBERTa-large) reaches ~2e-2. 1e-4 keeps max |M − I| ≤ 1e-2 at
every scale we run; AdamW's normalised steps make the initial magnitude irrelevant to how fast U can grow."""


class ConfigurationEncoder(nn.Module):
    """Seven 8-dim embeddings (five setting fields, block index, module type) → LayerNorm(56) → Linear(56, hidden)
    → SiLU → Linear(hidden, r²) → U (hidden = 128 by default); returns M = I + γ·U with a learnable scalar γ (init 1)."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        n_blocks: int,
        n_module_types: int,
        rank: int,
        *,
        hidden: int = HIDDEN_DIM,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if len(cardinalities) != len(FIELDS):
            raise ValueError(f"expected {len(FIELDS)} field cardinalities, got {len(cardinalities)}")
        self.rank = rank
        sizes = [*cardinalities, n_blocks, n_module_types]
        self.embeddings = nn.ModuleList(nn.Embedding(n, EMBEDDING_DIM) for n in sizes)
        width = EMBEDDING_DIM * len(sizes)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, hidden)
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, rank * rank)
        self.gamma = nn.Parameter(torch.ones(()))
        self.reset_parameters(generator)

    @classmethod
    def for_model(
        cls, space: SearchSpace, registry: ModuleRegistry, rank: int, *, hidden: int = HIDDEN_DIM,
        generator: torch.Generator | None = None,
    ) -> "ConfigurationEncoder":
        return cls(space.cardinalities, registry.n_blocks, len(registry.module_types), rank, hidden=hidden,
                   generator=generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Embeddings N(0,1); Linears PyTorch's default uniform(±1/√fan_in) for weight and bias; last Linear
        N(0, LAST_LAYER_STD²) with bias 0. All from ``generator`` so two encoders built with equal seeds are equal."""
        with torch.no_grad():
            for emb in self.embeddings:
                emb.weight.copy_(torch.randn(emb.weight.shape, generator=generator))
            bound = 1.0 / self.hidden.in_features**0.5
            self.hidden.weight.copy_((torch.rand(self.hidden.weight.shape, generator=generator) * 2 - 1) * bound)
            self.hidden.bias.copy_((torch.rand(self.hidden.bias.shape, generator=generator) * 2 - 1) * bound)
            self.out.weight.copy_(torch.randn(self.out.weight.shape, generator=generator) * LAST_LAYER_STD)
            self.out.bias.zero_()
            self.norm.reset_parameters()
            self.gamma.fill_(1.0)

    def forward(self, setting_idx: torch.Tensor, block_ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        """(N, 5) field indices, (N,) block ids, (N,) module-type ids → (N, r, r) mixing matrices."""
        columns = [setting_idx[:, j] for j in range(setting_idx.shape[1])] + [block_ids, type_ids]
        features = torch.cat([emb(col) for emb, col in zip(self.embeddings, columns)], dim=-1)
        u = self.out(self.act(self.hidden(self.norm(features)))).view(-1, self.rank, self.rank)
        eye = torch.eye(self.rank, dtype=u.dtype, device=u.device)
        return eye + self.gamma * u


def encode_settings(space: SearchSpace, settings: Sequence[QuantSetting], names: Sequence[str]) -> torch.Tensor:
    """(N, 5) long tensor of field indices; ValueError naming the matrix whose value is outside the space."""
    return torch.tensor(
        [space.setting_indices(s, matrix=n) for s, n in zip(settings, names)], dtype=torch.long
    ).view(-1, len(FIELDS))


def no_decay_parameter_names(encoder: ConfigurationEncoder, prefix: str = "") -> set[str]:
    """γ, the LayerNorm and the embeddings are excluded from weight decay (method.md §6 A9)."""
    names = {f"{prefix}gamma"}
    names |= {f"{prefix}norm.{n}" for n, _ in encoder.norm.named_parameters()}
    names |= {f"{prefix}embeddings.{n}" for n, _ in encoder.embeddings.named_parameters()}
    return names
