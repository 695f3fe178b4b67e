"""LoTA-QAF (shared/docs/lota-qaf.md): ternary adapters trained on an asymmetric INTk base and merged into its
integer codes losslessly, so the deployed model is a plain INTk model with no adapter matmul.

Per target matrix W (out × in), quantized once to INTk with a scale s and zero-point z per group of input columns
(:mod:`workers.quant.intk`), W_q = s·(q − z). With ternary factors B_T (out × r) and A_T (r × in):

    ΔW = B_T·A_T                              integers in [−r, r]
    Ŵ  = sign(ΔW)·1[|ΔW| > ω]·mask             each code moves by at most one grid step, never off [0, 2^k − 1]
    μ  = group mean of (ΔW/ω − Ŵ)             the sub-step remainder, in grid steps
    W' = s·((q + Ŵ) − (z − μ))

Training computes W' with the gradient passed straight through the threshold (∂Ŵ/∂(ΔW/ω) = 1; μ is a constant
of the step). Merging stores q' = q + Ŵ, still k-bit codes with the same scales and groups, and μ beside the
integer zero-points: the merged layer evaluates the same expression on the same float values, so the merged
model's outputs equal the adapted model's.

Conventions where the paper and its code differ, and what we chose:
- μ is in grid-step units (divided by ω), as the official code; our grid is W = s·(q − z), so shifting the codes
  by +μ is the zero-point z − μ (the paper writes the zero-point the other way round, z' = z + s·μ).
- μ averages a group's real columns only: a row padded to a whole number of groups has no adapter on the padding.
- The boundary masks (``q < 2^k − 1`` may go up, ``q > 0`` may go down) come from the frozen codes and apply in
  training and at merge alike, so both compute the same thing.
- t-SignSGD updates exactly the top fraction of entries by |gradient| (:class:`TernarySignSGD`): the deterministic
  form of the paper's per-tensor quantile threshold, so "at most the scheduled fraction" holds with ties too.
- A_T starts as a Kaiming-normal draw ternarised at ±0.75·mean|a|, B_T at 0, so step 0 is the quantized base.

The configuration-aware variant (our extension, issue 17): a matrix built for several bit-widths keeps one INTk base,
one ω and one pair of boundary masks per bit-width and shares its ternary factors across them. A configuration
gives each matrix a bit-width; training averages the loss of a few configurations per step; merging a configuration
gives exactly the INTk model that configuration describes, plus μ. ΔW = B_T·A_T is an integer pattern, so the same
factors move codes on every grid; ω per bit-width decides how readily each grid follows them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import CLASSIFIER_HEADS, has_submodule
from ...quant import packing
from ...quant.files import load_tagged, save_tagged
from ...quant.intk import IntQuantized, dequantize_codes, quantize_int
from ...registry import ModuleRegistry
from ...training import TrainConfig, scheduled_adamw
from .ternary import OMEGA_FRACTION, TernarySignSGD, UpdateSchedule, ternary_draw, ternary_moves



# ---- the layer ----------------------------------------------------------------------------------------------
class LoTALinear(nn.Module):
    """A frozen ``nn.Linear`` quantized to INTk (``bits``, groups of ``group_size`` input columns) with a ternary
    adapter (``lota_A``: r × in, ``lota_B``: out × r, entries in {−1, 0, 1}) moving its codes by ±1.

    ``bits`` may list several bit-widths: the configuration-aware variant. The matrix then holds one frozen INTk base
    per bit-width, each with its own threshold ω (``omega``: one value, or one per bit-width) and boundary masks,
    and one pair of ternary factors shared by all of them; :meth:`set_bits` chooses the base the forward and the
    merge use, as a configuration chooses it."""

    def __init__(self, base: nn.Linear, rank: int, bits: int | Sequence[int], group_size: int, *,
                 omega: float | Mapping[int, float] | None = None, name: str = "linear",
                 generator: torch.Generator | None = None, hessian: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = base.weight.shape
        if rank < 1 or rank > min(out_features, in_features):
            raise ValueError(f"{name}: LoTA rank must be in 1..{min(out_features, in_features)}, got {rank}")
        widths = (bits,) if isinstance(bits, int) else tuple(sorted(set(bits)))
        if not widths:
            raise ValueError(f"{name}: LoTA needs at least one bit-width")
        if isinstance(omega, Mapping) and set(omega) != set(widths):
            raise ValueError(f"{name}: ω per bit-width must name exactly the bit-widths {list(widths)}, got "
                             f"{sorted(omega)}")
        self.omegas = {k: OMEGA_FRACTION * rank if omega is None else
                       float(omega[k] if isinstance(omega, Mapping) else omega) for k in widths}
        for k, w in self.omegas.items():
            if not 0 < w < rank:
                raise ValueError(f"{name}: ω must lie in (0, r) = (0, {rank}), got {w:g} at {k} bits")
        self.name, self.rank = name, rank
        self.in_features, self.out_features = in_features, out_features
        self.grids = {k: quantize_int(base.weight, k, group_size, name=name, hessian=hessian) for k in widths}
        for k, grid in self.grids.items():
            codes = grid.int_codes()
            self.register_buffer(f"codes_{k}", codes.float(), persistent=False)  # exact integers, the training grid
            self.register_buffer(f"can_up_{k}", codes < 2**k - 1, persistent=False)
            self.register_buffer(f"can_down_{k}", codes > 0, persistent=False)
        self.bits = widths[-1]
        real = torch.ones(self.quantized.padded_cols)
        real[in_features:] = 0
        self.register_buffer("real_per_group", real.view(-1, group_size).sum(1), persistent=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.lota_A = nn.Parameter(ternary_draw(rank, in_features, generator))
        self.lota_B = nn.Parameter(torch.zeros(out_features, rank))

    # ---- the active bit-width ---------------------------------------------------------------------------------
    def set_bits(self, bits: int) -> None:
        """Use the INTk base, ω and masks of ``bits`` from now on (one of the bit-widths the layer was built with)."""
        if bits not in self.grids:
            raise ValueError(f"{self.name}: built for {sorted(self.grids)} bits, not {bits}")
        self.bits = bits

    @property
    def quantized(self) -> IntQuantized:
        return self.grids[self.bits]

    @property
    def omega(self) -> float:
        return self.omegas[self.bits]

    @property
    def codes(self) -> torch.Tensor:
        return getattr(self, f"codes_{self.bits}")

    @property
    def can_up(self) -> torch.Tensor:
        return getattr(self, f"can_up_{self.bits}")

    @property
    def can_down(self) -> torch.Tensor:
        return getattr(self, f"can_down_{self.bits}")

    def moves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ŵ, μ) on the padded grid: Ŵ's value is the masked ternary move, its gradient that of ΔW/ω."""
        pad = self.quantized.padded_cols - self.in_features
        hard, scaled = ternary_moves(F.pad(self.lota_B @ self.lota_A, (0, pad)), self.omega, self.can_up,
                                     self.can_down)
        rows, groups = self.quantized.scale.shape
        mu = (scaled.detach() - hard).view(rows, groups, -1).sum(-1) / self.real_per_group
        return hard + (scaled - scaled.detach()), mu

    def adapted_weight(self) -> torch.Tensor:
        """W' = s·((q + Ŵ) − (z − μ)), the weight the forward uses (differentiable in the factors)."""
        hat, mu = self.moves()
        q = self.quantized
        return dequantize_codes(self.codes + hat, q.scale, q.zero - mu, q.group_size)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.adapted_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> "LoTAMerged":
        """The deployable INTk matrix: codes q + Ŵ (in range by the masks), the base's scales and zero-points, μ."""
        hat, mu = self.moves()
        codes = (self.codes + hat).to(torch.uint8)
        merged = replace(self.quantized, codes=packing.pack(codes.reshape(-1), self.quantized.bits))
        return LoTAMerged(merged, mu.contiguous())

    def extra_repr(self) -> str:
        q = self.quantized
        widths = "/".join(str(k) for k in self.grids)
        return f"{self.name}: int{widths} (active {q.bits}) g{q.group_size}, r={self.rank}, ω={self.omega:g}"


@dataclass(frozen=True)
class LoTAMerged:
    """A merged matrix: INTk codes with integer zero-points (the base's container, unchanged in size) plus μ, the
    fractional zero-point shift, one fp32 per group."""

    quantized: IntQuantized
    mu: torch.Tensor  # (rows, groups) fp32

    @property
    def nbytes(self) -> int:
        return self.quantized.nbytes + self.mu.numel() * self.mu.element_size()

    def dequantize(self) -> torch.Tensor:
        q = self.quantized
        return dequantize_codes(q.int_codes().float(), q.scale, q.zero - self.mu, q.group_size)[:, : q.shape[1]]


class MergedLinear(nn.Module):
    """The deployed layer: a plain linear over the merged INTk weight (decoded once), no adapter."""

    def __init__(self, merged: LoTAMerged, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", merged.dequantize())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


# ---- the model ----------------------------------------------------------------------------------------------
class LoTAModel(nn.Module):
    """A Hugging Face model with every registry target wrapped in :class:`LoTALinear`, plus any trainable head (the
    classification head by default). Call it like the model: ``model(**batch)``. With ``hessians`` (target name →
    its inputs' XᵀX/N, :func:`workers.calibration.input_covariances`) the base codes come from GPTQ, as in the
    paper; else from round to nearest.

    ``bits`` is one bit-width (the paper's uniform INTk) or several: the configuration-aware variant, where a
    configuration gives each matrix one of them (:meth:`set_configuration`) and one set of ternary factors serves
    every configuration, each with its bit-width's ω and masks. Training draws configurations per step
    (:func:`train_lota`); :meth:`merge` and :meth:`merged_model` deploy the active one."""

    def __init__(self, model: nn.Module, *, bits: int | Sequence[int], rank: int = 16, group_size: int = 64,
                 omega: float | Mapping[int, float] | None = None, seed: int = 0,
                 registry: ModuleRegistry | None = None,
                 trainable_modules: Sequence[str] | None = None,
                 hessians: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.registry = registry or ModuleRegistry.from_model(model)
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.layers: list[LoTALinear] = []
        for target in self.registry:
            layer = LoTALinear(self.registry.module(model, target), rank, bits, group_size, omega=omega,
                               name=target.name, generator=generator,
                               hessian=None if hessians is None else hessians[target.name])
            _replace(model, target.name, layer)
            self.layers.append(layer)
        if trainable_modules is None:
            trainable_modules = [n for n in CLASSIFIER_HEADS if has_submodule(model, n)]
        for name in trainable_modules:
            model.get_submodule(name).requires_grad_(True)
        self.model = model

    def forward(self, **batch: torch.Tensor):
        return self.model(**batch)

    @property
    def bit_widths(self) -> tuple[int, ...]:
        return tuple(self.layers[0].grids)

    def set_configuration(self, bits: int | Sequence[int]) -> None:
        """Give every target matrix ``bits`` (one bit-width for all, or one per matrix in registry order)."""
        per_matrix = [bits] * len(self.layers) if isinstance(bits, int) else list(bits)
        if len(per_matrix) != len(self.layers):
            raise ValueError(f"a configuration gives one bit-width per target matrix: {len(self.layers)} "
                             f"expected, got {len(per_matrix)}")
        wrong = sorted({int(k) for k in per_matrix} - set(self.bit_widths))
        if wrong:
            raise ValueError(f"this LoTA model was built for {list(self.bit_widths)} bits, not {wrong}")
        for layer, k in zip(self.layers, per_matrix):
            layer.set_bits(int(k))

    def ternary_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.lota_A, layer.lota_B)]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors that are not ternary factors (the task head), trained by AdamW."""
        ternary = {id(p) for p in self.ternary_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in ternary]

    def merge(self) -> dict[str, LoTAMerged]:
        """Every target merged at its active bit-width."""
        return {layer.name: layer.merge() for layer in self.layers}

    def merged_model(self) -> nn.Module:
        """A copy of the model with every target a :class:`MergedLinear` at its active bit-width: what is
        deployed."""
        model = copy.deepcopy(self.model)
        for layer in self.layers:
            _replace(model, layer.name, MergedLinear(layer.merge(), layer.bias))
        return model.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def train_lota(model: LoTAModel, batches: Iterable[Mapping[str, torch.Tensor]], *, steps: int,
               head: TrainConfig | None = None, schedule: UpdateSchedule | None = None,
               configurations: Sequence[int | Sequence[int]] | None = None, configs_per_step: int = 1,
               seed: int = 0) -> list[float]:
    """``steps`` steps (cycling over ``batches``): t-SignSGD on the ternary factors (the paper's schedule over
    ``steps`` unless ``schedule`` says otherwise; no clipping), and AdamW on any other trainable tensor (the task
    head) with ``head``'s rate, warmup, decay and clipping, as the product trains its own. Returns the per-step
    losses.

    With ``configurations`` (the configuration-aware variant) each step draws ``configs_per_step`` of them
    (seeded by ``seed``, with replacement) and its loss is their mean on the step's batch, as CoA-LoRA's steps
    are; without, every step trains the model's active configuration."""
    if configurations is not None and (not configurations or configs_per_step < 1):
        raise ValueError("train_lota: configurations must be non-empty and configs_per_step >= 1")
    head = head or TrainConfig(total_steps=steps)
    draw = torch.Generator().manual_seed(seed)
    ternary = TernarySignSGD(model.ternary_parameters(), schedule or UpdateSchedule(steps))
    dense = model.dense_parameters()
    adamw, decay = scheduled_adamw(dense, head) if dense else (None, None)
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        before = len(losses)
        for batch in batches:
            if configurations is None:
                loss = model(**batch).loss
                loss.backward()
            else:
                picks = torch.randint(len(configurations), (configs_per_step,), generator=draw).tolist()
                loss = torch.zeros(())
                for i in picks:
                    model.set_configuration(configurations[i])
                    part = model(**batch).loss / configs_per_step
                    part.backward()
                    loss = loss + part.detach()
            ternary.step()
            if adamw is not None:
                torch.nn.utils.clip_grad_norm_(dense, head.max_grad_norm)
                adamw.step()
                decay.step()
            model.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if len(losses) >= steps:
                break
        if len(losses) == before:
            raise ValueError("the batch iterable is empty")
    model.eval()
    return losses


# ---- storage ------------------------------------------------------------------------------------------------
MERGED_FORMAT = "lota-int"


def save_merged(merged: Mapping[str, LoTAMerged], path: Path) -> Path:
    """Write merged matrices as safetensors (``NAME.codes`` packed uint8, ``.scale``, ``.zero``, ``.mu``; the
    layout in the metadata), atomically."""
    tensors, layout = {}, {}
    for name, m in merged.items():
        q = m.quantized
        tensors.update({f"{name}.codes": q.codes, f"{name}.scale": q.scale, f"{name}.zero": q.zero,
                        f"{name}.mu": m.mu})
        layout[name] = {"bits": q.bits, "group_size": q.group_size, "shape": list(q.shape),
                        "dtype": str(q.dtype).removeprefix("torch.")}
    return save_tagged(tensors, layout, MERGED_FORMAT, path)


def load_merged(path: Path) -> dict[str, LoTAMerged]:
    """The matrices :func:`save_merged` wrote."""
    layout, tensors = load_tagged(path, MERGED_FORMAT, "a merged LoTA file")
    merged = {}
    for name, spec in layout.items():
        q = IntQuantized(bits=spec["bits"], group_size=spec["group_size"], shape=tuple(spec["shape"]),
                         dtype=getattr(torch, spec["dtype"]), codes=tensors[f"{name}.codes"],
                         scale=tensors[f"{name}.scale"], zero=tensors[f"{name}.zero"])
        merged[name] = LoTAMerged(q, tensors[f"{name}.mu"])
    return merged
