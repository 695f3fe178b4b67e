"""The configuration-aware LoRA layer (method.md §3.1): our own module, not PEFT's.

    y = x · W_q(C)ᵀ + bias + s · B · M · A · x,    M = I + γ·U_θ(C),   s = alpha / r

W_q(C) is the active setting's fake-quantized copy of the layer's frozen full-precision weight (of the residual
W − L1·L2 for the SVD/LQ inits, method.md §2.5), produced on demand and kept in a small LRU cache keyed by setting,
so switching configurations re-quantizes instead of reloading pickled models from disk (method.md §6 B15).
A and B are shared by every configuration; the bias is kept (method.md §6 A7).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from search.space import QuantSetting

from .quant.blockwise import fake_quantize

Init = Literal["zero_B", "svd_of_W"]
Quantizer = Callable[[torch.Tensor, QuantSetting], torch.Tensor]


class QuantCache:
    """Bounded LRU of dequantized weights keyed by setting. Capacity counts settings, not configurations: two
    configurations that give this matrix the same setting share one entry."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[QuantSetting, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, setting: QuantSetting, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if setting in self._entries:
            self._entries.move_to_end(setting)
            self.hits += 1
            return self._entries[setting]
        self.misses += 1
        value = compute()
        self._entries[setting] = value
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r SVD of ``weight`` split symmetrically: L1 = U_r·√S_r (m×r), L2 = √S_r·V_rᵀ (r×n)."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


class CoALoRALinear(nn.Module):
    """A frozen target ``nn.Linear`` with a shared LoRA pair (A: r×in, B: out×r) and an optional r×r mixing
    matrix M set per configuration. With no active setting the base is the full-precision weight; with no
    mixing matrix M = I (plain LoRA)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        init: Init = "zero_B",
        name: str = "linear",
        cache_size: int = 4,
        generator: torch.Generator | None = None,
        quantizer: Quantizer | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        out_features, in_features = base.weight.shape
        if rank > min(out_features, in_features):
            raise ValueError(f"{name}: rank {rank} exceeds min(out, in) = {min(out_features, in_features)}")
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.in_features = in_features
        self.out_features = out_features
        # The full-precision weight is a frozen parameter so ``state_dict`` and ``.to()`` treat it like the
        # original; ``residual`` is what gets quantized (W itself, or W − L1·L2 after an SVD/LQ init).
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.register_buffer("residual", self.weight.detach(), persistent=False)  # shares W's storage
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=base.weight.device))
        self.setting: QuantSetting | None = None
        self.mixing: torch.Tensor | None = None
        self.adapter_enabled = True
        self.cache = QuantCache(cache_size)
        self._quantizer = quantizer or (lambda w, s: fake_quantize(w, s, name=self.name))
        self.reset_lora(init, generator)

    # ---- initialisation -----------------------------------------------------------------------------------
    def reset_lora(self, init: Init = "zero_B", generator: torch.Generator | None = None) -> None:
        """``zero_B``: A Kaiming-uniform (a=√5, PEFT's default), B = 0, base = quant(W).
        ``svd_of_W``: L1·L2 = rank-r SVD of W, A = L2/√s, B = L1/√s, base = quant(W − L1·L2) for every C
        (method.md §2.5: consistent because L1·L2 does not depend on C)."""
        if init == "zero_B":
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on a (r, in) matrix
            with torch.no_grad():
                self.lora_A.copy_(
                    torch.rand(self.lora_A.shape, generator=generator, device=self.lora_A.device) * 2 * bound - bound
                )
                self.lora_B.zero_()
            self.residual = self.weight.detach()  # no copy: the residual is W itself
            self.cache.clear()
        elif init == "svd_of_W":
            l1, l2 = truncated_svd_factors(self.weight, self.rank)
            self.set_decomposition(l1, l2)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; allowed: 'zero_B', 'svd_of_W'")

    def set_decomposition(self, l1: torch.Tensor, l2: torch.Tensor) -> None:
        """Adopt W ≈ Q + L1·L2: A = L2/√s, B = L1/√s (so s·B·A = L1·L2) and quantize the residual W − L1·L2."""
        root = math.sqrt(self.scaling)
        with torch.no_grad():
            self.lora_A.copy_(l2 / root)
            self.lora_B.copy_(l1 / root)
        self.set_residual(self.weight.detach().float() - l1 @ l2)

    def set_residual(self, residual: torch.Tensor) -> None:
        self.residual = residual.detach().to(self.weight.dtype).clone()
        self.cache.clear()

    # ---- configuration ------------------------------------------------------------------------------------
    def quantized_weight(self, setting: QuantSetting | None = None) -> torch.Tensor:
        """W_q for ``setting`` (default: the active one); the unquantized residual when there is none."""
        setting = self.setting if setting is None else setting
        if setting is None:
            return self.residual
        return self.cache.get(setting, lambda: self._quantizer(self.residual, setting))

    def folded_A(self) -> torch.Tensor:
        """A' = M·A: the plain-LoRA A that reproduces this layer under the current mixing matrix."""
        if self.mixing is None:
            return self.lora_A.detach().clone()
        return (self.mixing.detach().to(self.lora_A.dtype) @ self.lora_A.detach()).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if not self.adapter_enabled:
            return y
        h = F.linear(x, self.lora_A.to(x.dtype))
        if self.mixing is not None:
            h = F.linear(h, self.mixing.to(h.dtype))  # h·Mᵀ, i.e. M·(A·x) per row
        return y + self.scaling * F.linear(h, self.lora_B.to(h.dtype))

    def extra_repr(self) -> str:
        return f"{self.name}: in={self.in_features}, out={self.out_features}, r={self.rank}, s={self.scaling:g}"
