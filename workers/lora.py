"""The configuration-aware LoRA layer (method.md §3.1): our own module, not PEFT's.

    y = x · W_q(C)ᵀ + bias + s · B · M · A · x,    M = I + γ·U_θ(C),   s = alpha / r

W_q(C) is the active setting's quantized copy of the layer's frozen full-precision weight (of the residual
W − L1·L2 for the SVD/LQ inits, method.md §2.5), produced on demand, so switching configurations re-quantizes
instead of reloading pickled models from disk (method.md §6 B15). What is kept is what a quantized model stores:
packed codes and scales, in a byte-bounded LRU (:class:`QuantCache`) that one model's layers share. The dense W_q
lives only inside the matmul: decoded into a scratch buffer for the forward and decoded again for the backward
(QLoRA's recompute), so memory grows with the quantized size of the cached settings, not with fp32 copies.
A and B are shared by every configuration; the bias is kept (method.md §6 A7).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from search.space import QuantSetting

from .quant.formats import StoredWeight, dequantize, quantize

Init = Literal["zero_B", "svd_of_W"]
DEFAULT_CACHE_MB = 256.0
"""Default ``training.cache_mb``: about four 4-bit configurations of SmolLM2-135M's 210 matrices."""


class QuantCache:
    """LRU of quantized matrices in storage form (:data:`~workers.quant.formats.StoredWeight`), keyed by (matrix name, setting) and
    bounded in bytes. Two configurations that give a matrix the same setting share its entry. It also owns the
    scratch buffer dense weights are decoded into, one per device, grown to the largest matrix seen."""

    def __init__(self, capacity_mb: float = DEFAULT_CACHE_MB):
        if not (isinstance(capacity_mb, (int, float)) and math.isfinite(capacity_mb) and capacity_mb >= 0):
            raise ValueError(f"cache capacity must be a finite number of MB >= 0, got {capacity_mb!r}")
        self.capacity_bytes = int(capacity_mb * 2**20)
        self._entries: OrderedDict[tuple[str, QuantSetting], StoredWeight] = OrderedDict()
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, name: str, setting: QuantSetting, compute: Callable[[], StoredWeight]) -> StoredWeight:
        key = (name, setting)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = compute()
        if value.nbytes <= self.capacity_bytes:  # a matrix larger than the whole budget is used, not kept
            self._entries[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
        return value

    def drop(self, name: str) -> None:
        """Forget every setting of matrix ``name`` (its residual changed)."""
        for key in [k for k in self._entries if k[0] == name]:
            self.nbytes -= self._entries.pop(key).nbytes

    def scratch(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least ``numel`` entries on ``device``, reused by every decode there."""
        buffer = self._scratch.get(device)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer

    def stats(self) -> dict[str, float]:
        """Counters since the last :meth:`reset_counters`, and what is held now."""
        lookups = self.hits + self.misses
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_hit_rate": self.hits / lookups if lookups else 0.0, "cache_mb": self.nbytes / 2**20,
                "cache_entries": len(self._entries)}

    def reset_counters(self) -> None:
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)


def merge_cache_stats(stats: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Several caches' :meth:`QuantCache.stats` as one: counts and bytes add up, the hit rate is recomputed."""
    total: dict[str, float] = {}
    for one in stats:
        for name, value in one.items():
            total[name] = total.get(name, 0) + value
    lookups = total.get("cache_hits", 0) + total.get("cache_misses", 0)
    total["cache_hit_rate"] = total.get("cache_hits", 0) / lookups if lookups else 0.0
    return total


class _QuantizedLinear(torch.autograd.Function):
    """y = x·Ŵᵀ + bias with Ŵ decoded from its packed form into the cache's scratch buffer, in the forward and
    again in the backward: no dense copy of Ŵ outlives the op (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, packed: StoredWeight,
                cache: QuantCache) -> torch.Tensor:
        ctx.packed, ctx.cache = packed, cache
        weight = _decode(packed, cache, x.device)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = _decode(ctx.packed, ctx.cache, grad.device)
        return grad.matmul(weight.to(grad.dtype)), None, None, None


def _decode(packed: StoredWeight, cache: QuantCache, device: torch.device) -> torch.Tensor:
    return dequantize(packed, out=cache.scratch(packed.numel, device))


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
        cache: QuantCache | None = None,
        generator: torch.Generator | None = None,
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
        self.hessian: torch.Tensor | None = None  # inputs' XᵀX/N: set, codes are chosen by GPTQ (quant.method)
        self.adapter_enabled = True
        self.cache = QuantCache() if cache is None else cache  # CoAModel passes one cache to all its layers
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
            self.cache.drop(self.name)
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
        self.cache.drop(self.name)

    def set_hessian(self, hessian: torch.Tensor | None) -> None:
        """Choose codes by GPTQ under ``hessian`` (the layer's input statistics), or by round to nearest (None)."""
        self.hessian = hessian
        self.cache.drop(self.name)

    # ---- configuration ------------------------------------------------------------------------------------
    def packed_weight(self, setting: QuantSetting) -> StoredWeight:
        """The residual quantized under ``setting``, from the cache or quantized now."""
        return self.cache.get(self.name, setting,
                              lambda: quantize(self.residual, setting, name=self.name, hessian=self.hessian))

    def quantized_weight(self, setting: QuantSetting | None = None) -> torch.Tensor:
        """Dense W_q for ``setting`` (default: the active one), a new tensor; the unquantized residual when there
        is none. The forward never materialises this; export and tests do."""
        setting = self.setting if setting is None else setting
        if setting is None:
            return self.residual
        return dequantize(self.packed_weight(setting))

    def folded_A(self) -> torch.Tensor:
        """A' = M·A: the plain-LoRA A that reproduces this layer under the current mixing matrix."""
        if self.mixing is None:
            return self.lora_A.detach().clone()
        return (self.mixing.detach().to(self.lora_A.dtype) @ self.lora_A.detach()).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.setting is None:
            y = F.linear(x, self.residual.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = _QuantizedLinear.apply(x, self.bias, self.packed_weight(self.setting), self.cache)
        if not self.adapter_enabled:
            return y
        h = F.linear(x, self.lora_A.to(x.dtype))
        if self.mixing is not None:
            h = F.linear(h, self.mixing.to(h.dtype))  # h·Mᵀ, i.e. M·(A·x) per row
        return y + self.scaling * F.linear(h, self.lora_B.to(h.dtype))

    def extra_repr(self) -> str:
        return f"{self.name}: in={self.in_features}, out={self.out_features}, r={self.rank}, s={self.scaling:g}"
