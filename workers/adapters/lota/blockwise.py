"""``adapter.kind: lota``: LoTA-QAF as a run's adapter, over the search space's ``int`` codes, one pair of ternary
factors for every configuration (the configuration-aware variant of :mod:`.intk`, on the product's own format).

An ``int`` setting decodes code i of a block with scale ŝ to ŝ·(−1 + 2i/(2^k − 1)) = h·(i − (2^k − 1)/2): an
integer grid of spacing h = 2ŝ/(2^k − 1) and a zero-point fixed at (2^k − 1)/2 (:func:`~workers.quant.blockwise
.grid_steps`). So LoTA-QAF applies to it unchanged, on whatever block sizes and scale formats the configuration
gives each matrix:

    codes' = codes + Ŵ                         each code moved by −1, 0 or +1, never off [0, 2^k − 1]
    μ      = group mean of (ΔW/ω − Ŵ)          the sub-step remainder, in grid steps, per second-level group
    W'     = decode(codes') + h·μ              (h·(ΔW/ω − its detached value) added for the gradient)

Conventions, beside :mod:`.intk`'s:
- μ is kept per second-level group (B0·B1 weights: one fp32 per group, 32/(B0·B1) bits per weight) rather than per
  first-level block, whose 32/B0 bits would cost more than the codes at B0 = 16;
- on the unquantized base (no setting) there is no grid to move codes on: the layer is the frozen base alone;
- the forward decodes the moved codes with the very function a merged export is decoded with
  (:func:`~workers.quant.blockwise.dequantize_shifted`), so the merged model equals the training forward exactly;
- that dense W' stays alive for the backward: LoTA's gradient reaches the factors through a dense out × in
  ∂L/∂W', as full fine-tuning's does, so a step holds one fp32 copy of each target matrix per configuration
  being differentiated (a LoRA step holds none). Measured on MiniLM (K = 1, batch 32 × 48, one thread): 1.49 s
  against 1.24 s for the same step with a LoRA.

The model is a :class:`~workers.adapters.lora.LoRAModel` whose layers hold the ternary factors in ``lora_A`` /
``lora_B``: the driver, the workers, checkpoints and the evaluation reach it through the LoRA family's interface,
and :meth:`BlockwiseLoTAModel.ternary_names` tells the driver which tensors t-SignSGD steps (the others, a task
head, take AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from search.space import QuantSetting, SearchSpace

from ...quant.blockwise import PackedWeight, code_indices, dequantize_shifted, grid_steps, shift_values, with_codes
from ...quant.cache import DEFAULT_CACHE_MB, QuantCache
from ...registry import ModuleRegistry
from ..lora import CoALoRALinear, LoRAModel, _QuantizedLinear
from .ternary import OMEGA_FRACTION, ternary_draw, ternary_moves


@dataclass(frozen=True)
class MergedWeight:
    """One merged matrix: the moved codes in the configuration's own packed form (same bytes as the base) and μ,
    one fp32 zero-point shift per second-level group."""

    packed: PackedWeight
    mu: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.mu.numel() * self.mu.element_size()

    def dequantize(self) -> torch.Tensor:
        return dequantize_shifted(self.packed, self.mu)


Omega = Union[float, Mapping[int, float]]
"""ω: one threshold for every code width, or one per width (bits → ω)."""


class BlockwiseLoTALinear(CoALoRALinear):
    """A frozen target matrix quantized per the active ``int`` setting, with ternary factors (``lora_A``: r × in,
    ``lora_B``: out × r, entries in {−1, 0, 1}) that move its codes by one grid step where |B·A| > ω; ω may depend
    on the setting's code width (``omega`` a mapping bits → ω), so one pair of factors moves fewer codes on a
    coarse grid than on a fine one."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, omega: Omega, init: str = "zero_B",
                 name: str = "linear", cache: QuantCache | None = None, generator: torch.Generator | None = None):
        omegas = {int(k): float(v) for k, v in omega.items()} if isinstance(omega, Mapping) else {None: float(omega)}
        for w in omegas.values():
            if not 0 < w < rank:
                raise ValueError(f"{name}: LoTA's ω must lie in (0, r) = (0, {rank}), got {w:g}")
        super().__init__(base, rank, alpha, init=init, name=name, cache=cache, generator=generator)
        self.omegas = omegas

    def omega(self, bits: int) -> float:
        """ω on a grid of ``bits``-bit codes."""
        if None in self.omegas:
            return self.omegas[None]
        if bits not in self.omegas:
            raise ValueError(f"{self.name}: no ω for {bits}-bit codes; ω is given for {sorted(self.omegas)} bits")
        return self.omegas[bits]

    def reset_lora(self, init: str = "zero_B", generator: torch.Generator | None = None) -> None:
        """A_T ternarised from a normal draw, B_T = 0: step 0 is the quantized base, code for code."""
        if init != "zero_B":
            raise ValueError(f"{self.name}: LoTA starts from B = 0 on quant(W) (init 'zero_B'), not {init!r}")
        with torch.no_grad():
            self.lora_A.copy_(ternary_draw(self.rank, self.in_features, generator))
            self.lora_B.zero_()
        self.residual = self.weight.detach()
        self.cache.drop(self.name)

    def _grid(self, setting: QuantSetting) -> PackedWeight:
        packed = self.packed_weight(setting)
        if not isinstance(packed, PackedWeight) or setting.family != "int":
            raise ValueError(f"{self.name}: LoTA moves integer codes; {setting.code} has no integer grid")
        return packed

    def moves(self, packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, Ŵ, ΔW/ω) over the padded matrix for the grid ``packed`` (Ŵ without gradient)."""
        codes = code_indices(packed)
        pad = packed.padded_numel - packed.numel
        delta = F.pad((self.lora_B @ self.lora_A).reshape(-1), (0, pad))
        top = 2**packed.setting.code_bits - 1
        hard, scaled = ternary_moves(delta, self.omega(packed.setting.code_bits), codes < top, codes > 0)
        return codes, hard, scaled

    def _remainder(self, packed: PackedWeight, hard: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        """μ: the mean of ΔW/ω − Ŵ over each second-level group's real entries (padding has no adapter)."""
        group = packed.setting.group_size
        starts = torch.arange(0, packed.padded_numel, group, device=scaled.device)
        real = (packed.numel - starts).clamp(0, group).float()
        return (scaled.detach() - hard).view(-1, group).sum(1) / real.clamp(min=1)

    def _merged(self, packed: PackedWeight) -> tuple[MergedWeight, torch.Tensor]:
        """The merged matrix on the grid ``packed`` (moved codes, same scales, μ) and ΔW/ω with its gradient."""
        codes, hard, scaled = self.moves(packed)
        mu = self._remainder(packed, hard, scaled)
        return MergedWeight(with_codes(packed, (codes.float() + hard).to(torch.uint8)), mu), scaled

    def merge(self, setting: QuantSetting | None = None) -> MergedWeight:
        """The deployable matrix of ``setting`` (default: the active one): moved codes, same scales, and μ."""
        with torch.no_grad():
            return self._merged(self._grid(self.setting if setting is None else setting))[0]

    def adapted_weight(self) -> torch.Tensor:
        """W' = decode(codes + Ŵ) + h·μ, differentiable in the factors through h·(ΔW/ω) (straight through)."""
        packed = self._grid(self.setting)
        merged, scaled = self._merged(packed)
        weight = merged.dequantize()
        through = shift_values(grid_steps(packed), scaled - scaled.detach(), packed.setting)[: packed.numel]
        return weight + through.view(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.setting is None:  # no grid: the full-precision base alone
            return F.linear(x, self.residual.to(x.dtype), bias)
        if not self.adapter_enabled:
            return _QuantizedLinear.apply(x, self.bias, self.packed_weight(self.setting), self.cache)
        return F.linear(x, self.adapted_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        omega = ", ".join(f"{w:g}" if k is None else f"{k} bits: {w:g}" for k, w in self.omegas.items())
        return f"{self.name}: in={self.in_features}, out={self.out_features}, ternary r={self.rank}, ω={omega}"


class BlockwiseLoTAModel(LoRAModel):
    """Every registry target of a Hugging Face model wrapped in :class:`BlockwiseLoTALinear` (ω = ``omega`` · r, or
    per code width when ``omega`` maps every width of the space to its fraction), plus any trainable head; call it
    like :class:`LoRAModel`: ``model(configuration, **batch)``. Every setting of ``space`` must be of the ``int``
    family."""

    def __init__(self, model: nn.Module, space: SearchSpace, *, rank: int = 8, omega: Omega = OMEGA_FRACTION,
                 trainable_modules: Sequence[str] | None = None, cache_mb: float = DEFAULT_CACHE_MB, seed: int = 0,
                 registry: ModuleRegistry | None = None):
        not_int = sorted({s.code for s in space.settings if s.family != "int"})
        if not_int:
            raise ValueError(f"LoTA moves integer codes by one step: the space must hold int codes only, not "
                             f"{not_int} (conf/space/integer.yaml is one)")
        widths = sorted({s.code_bits for s in space.settings})
        per_width = isinstance(omega, Mapping)
        fractions = {int(k): float(v) for k, v in omega.items()} if per_width else dict.fromkeys(widths, float(omega))
        if set(widths) - set(fractions):
            raise ValueError(f"LoTA's ω per code width misses {sorted(set(widths) - set(fractions))} bits, which "
                             f"the space holds (its widths: {widths})")
        for f in fractions.values():
            if not 0 < f < 1:
                raise ValueError(f"LoTA's ω is a fraction of the rank in (0, 1), got {f:g}")
        super().__init__(model, space, rank=rank, alpha=float(rank), init="zero_B",
                         trainable_modules=trainable_modules, cache_mb=cache_mb, seed=seed, registry=registry,
                         layer=partial(BlockwiseLoTALinear, omega={k: f * rank for k, f in fractions.items()}))
        self.omega = fractions if per_width else float(omega)

    def ternary_names(self) -> set[str]:
        """The trainable tensors t-SignSGD steps: every layer's ternary factors."""
        return {n for n, p in self.named_parameters() if p.requires_grad and n.endswith(("lora_A", "lora_B"))}

    def merge(self, configuration: Any) -> dict[str, MergedWeight]:
        """Target name → its merged matrix under ``configuration``: what a merged export stores."""
        return {layer.name: layer.merge(s) for layer, s in zip(self.layers, self.resolve(configuration))}
