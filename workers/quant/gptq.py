"""GPTQ for coalora's blockwise formats (NF-k and INT-k codes with double-quantized block scales): the codes are
chosen column by column with error feedback under a Hessian H, so the output is still an ordinary
:class:`~.blockwise.PackedWeight` of the setting, with the same bytes, decoded by the same code.

Why the scales are fixed up front: in GPTQ's own INT format the scale of a group is recomputed from the
error-fed-back weights when the sweep reaches it; here a block scale is one entry of a double-quantized hierarchy
(first-level codes under second-level scales and an offset) over blocks that may span a row's columns, so the
scales are computed from W exactly as round-to-nearest computes them (:func:`.blockwise._encode_scales`) and only
the codes change. With H diagonal nothing is fed back and the codes are round-to-nearest's, bit for bit.

The sweep is the standard one (Frantar et al. 2023): H ← H + λ·mean(diag H)·I, U = the upper Cholesky factor of
H⁻¹, columns in blocks of ``block`` with the within-block feedback done column by column and the rest as one
matrix product per block (lazy batch updates). It minimises tr((W − Q)·H·(W − Q)ᵀ) greedily; H = XᵀX/N over the
layer's calibration inputs makes that the layer's output error on them. Never writes into the caller's W (the
defect ProjQ's released code has: each iteration quantized a drifted W).
"""

from __future__ import annotations

from typing import Callable

import torch

from search.space import QuantSetting

from . import packing
from .blockwise import PackedWeight, _encode_scales, _flat, _padded, validate_weight
from .codebooks import codebook, midpoints, nearest_code

DAMP = 0.01
"""λ: the share of H's mean diagonal added to it (GPTQ's ``percdamp``), so H stays invertible."""


def gptq_quantize(weight: torch.Tensor, setting: QuantSetting, hessian: torch.Tensor, *, damp: float = DAMP,
                  block: int = 128, name: str = "weight") -> PackedWeight:
    """``weight`` (out × in) in ``setting``'s blockwise storage form, codes chosen by GPTQ under ``hessian``
    (in × in, symmetric positive semi-definite)."""
    validate_weight(weight, setting, name)
    if setting.family == "gguf":
        raise ValueError(f"{name}: GPTQ covers the blockwise NF/INT settings; {setting.code} is a llama.cpp type "
                         "quantized by ggml itself")
    if weight.dim() != 2:
        raise ValueError(f"{name}: GPTQ needs a 2-D matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if damp < 0 or block < 1:
        raise ValueError(f"{name}: damp must be >= 0 and block >= 1")
    u = inverse_cholesky(hessian, cols, damp, name=name)

    flat = _flat(weight)
    scales = _encode_scales(flat, setting, name, None)
    per_entry = scales.scales.repeat_interleave(setting.block0)[: rows * cols].view(rows, cols)
    safe = torch.where(per_entry > 0, per_entry, torch.ones_like(per_entry))
    book, mids = codebook(setting.code, str(weight.device)), midpoints(setting.code, str(weight.device))

    def nearest(j: int, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one bucketize over the midpoints: the count of thresholds strictly below the value, as
        # codebooks.nearest_code defines it, in one op for a column this short
        code = torch.bucketize(column / safe[:, j], mids, right=False)
        return code, book[code] * per_entry[:, j]

    codes = sweep(flat.view(rows, cols), u, nearest, block)
    padded = torch.zeros(_padded(flat, setting).numel(), dtype=torch.uint8, device=flat.device)
    padded[: rows * cols] = codes.reshape(-1)
    padded[rows * cols:] = nearest_code(flat.new_zeros(padded.numel() - rows * cols), setting.code)
    return PackedWeight(setting=setting, shape=(rows, cols), dtype=weight.dtype,
                        codes=packing.pack(padded, setting.code_bits),
                        scale_codes=packing.pack(scales.scale_codes, setting.scale_bits),
                        scale2=scales.scale2, offset=scales.offset.reshape(1))


def inverse_cholesky(hessian: torch.Tensor, cols: int, damp: float = DAMP, *, name: str = "weight") -> torch.Tensor:
    """U with UᵀU = (H + λI)⁻¹ (upper triangular), λ = ``damp``·mean(diag H), in float32 for the sweep; a
    ValueError naming the matrix for a Hessian that is not ``cols`` × ``cols`` or not finite."""
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{name}: the Hessian must be {cols}×{cols} (the matrix's input size), "
                         f"got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: the Hessian holds NaN or Inf values")
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: any code will do, so no feedback through them
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


RoundColumn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(column index j, the column's error-fed-back weights) → (its uint8 codes, their dequantized values)."""


def sweep(weight: torch.Tensor, u: torch.Tensor, round_column: RoundColumn, block: int = 128) -> torch.Tensor:
    """GPTQ's column sweep over ``weight`` (out × in; not modified) with ``u`` from :func:`inverse_cholesky`:
    each column rounded by ``round_column`` in turn, its error fed forward. Returns the (out × in) uint8 codes."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        errors = w.new_empty(rows, end - start)
        for j in range(start, end):
            codes[:, j], values = round_column(j, w[:, j])
            error = (w[:, j] - values) / u[j, j]
            w[:, j + 1: end] -= error.unsqueeze(1) * u[j, j + 1: end].unsqueeze(0)
            errors[:, j - start] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return codes
