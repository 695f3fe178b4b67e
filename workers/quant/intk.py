"""Asymmetric uniform INTk quantization with a per-group scale and zero-point (GPTQ/RTN layout).

LoTA-QAF (``shared/docs/lota-qaf.md``) moves integer codes by ±1 and absorbs a residual into the zero-point, so it
needs this grid rather than the NormalFloat codebook: W ≈ s[g]·(q − z[g]), q ∈ {0..2^k−1}, groups of
``group_size`` consecutive input columns of each row. The zero-point is kept as a float tensor so a fractional
zero-point (LoTA's μ) fits the same container.

A row whose length is not a multiple of ``group_size`` is padded by repeating its last value, which leaves the last
group's min and max unchanged; the padded codes are stored and counted in ``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gptq, packing
from .blockwise import ACCEPTED_DTYPES


@dataclass(frozen=True)
class IntQuantized:
    """Packed INTk matrix: codes (bit-packed, row-major over the padded matrix), fp32 scale and zero per group."""

    bits: int
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype
    codes: torch.Tensor
    scale: torch.Tensor  # (rows, groups) fp32
    zero: torch.Tensor  # (rows, groups) fp32, integer-valued after quantization

    @property
    def padded_cols(self) -> int:
        return self.scale.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def int_codes(self) -> torch.Tensor:
        """Unpacked integer codes, shape (rows, padded_cols), uint8."""
        rows = self.shape[0]
        return packing.unpack(self.codes, self.bits, rows * self.padded_cols).view(rows, self.padded_cols)

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.int_codes(), self.scale, self.zero, self.group_size)[:, : self.shape[1]].to(
            self.dtype
        )


def _validate(weight: torch.Tensor, bits: int, group_size: int, name: str) -> None:
    where = f"{name} with int{bits} group {group_size}"
    if not 2 <= bits <= 8:
        raise ValueError(f"{where}: bits must be in 2..8")
    if group_size < 1:
        raise ValueError(f"{where}: group_size must be positive")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in ACCEPTED_DTYPES:
        raise ValueError(f"{where}: expected a float tensor (fp32/bf16/fp16/fp64)")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{where}: expected a non-empty 2-D matrix, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}: the matrix holds NaN or Inf values")


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """s[g]·(q − z[g]) for (rows, groups·group_size) codes; the single formula training and merging share."""
    rows, cols = codes.shape
    q = codes.float().view(rows, -1, group_size)
    return ((q - zero.unsqueeze(2)) * scale.unsqueeze(2)).view(rows, cols)


def quantize_int(weight: torch.Tensor, bits: int, group_size: int, *, name: str = "weight",
                 hessian: torch.Tensor | None = None) -> IntQuantized:
    """Asymmetric INTk: scale = (max − min)/(2^k − 1), zero = round(−min/scale) per group; codes rounded to nearest,
    or chosen by GPTQ under ``hessian`` (the inputs' XᵀX/N, in × in) with the same scales and zero-points (fixed
    from W up front, where GPTQ's own INT format recomputes them from the error-fed-back weights)."""
    _validate(weight, bits, group_size, name)
    u = None if hessian is None else gptq.inverse_cholesky(hessian, weight.shape[1], name=name)
    rows, cols = weight.shape
    w = weight.detach().float()
    pad = (-cols) % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    groups = w.view(rows, -1, group_size)
    lo = groups.amin(dim=2).clamp(max=0)  # the grid always contains 0, so zero rows stay exact
    hi = groups.amax(dim=2).clamp(min=0)
    qmax = float(2**bits - 1)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    codes = torch.round(groups / scale.unsqueeze(2) + zero.unsqueeze(2)).clamp_(0, qmax).to(torch.uint8)
    if u is not None:
        codes = codes.view(rows, -1)

        def nearest(j: int, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s, z = scale[:, j // group_size], zero[:, j // group_size]
            q = torch.round(column / s + z).clamp_(0, qmax)
            return q.to(torch.uint8), (q - z) * s  # dequantize_codes' arithmetic

        codes[:, :cols] = gptq.sweep(weight, u, nearest)
    return IntQuantized(
        bits=bits,
        group_size=group_size,
        shape=(rows, cols),
        dtype=weight.dtype,
        codes=packing.pack(codes.reshape(-1), bits),
        scale=scale,
        zero=zero,
    )


def fake_quantize_int(weight: torch.Tensor, bits: int, group_size: int, *, name: str = "weight") -> torch.Tensor:
    """The dequantized INTk matrix in the input's shape and dtype."""
    return quantize_int(weight, bits, group_size, name=name).dequantize()
