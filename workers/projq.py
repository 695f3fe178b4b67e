"""ProjQ (shared/docs/projq.md): quantization noise shaped into a low-rank subspace a rank-r adapter can absorb, then
the adapter initialised from the activation-whitened error.

Per matrix W (out × in) with calibration statistics Σ = XᵀX/N and Y with Y·Yᵀ = Σ (:func:`whitening`):

- J_r(Q) = Σ_{i>r} σ_i²((W − Q)·Y) is the output error on the calibration inputs that no rank-r correction can
  remove (:func:`uncorrectable_error`). ProjQ lowers J_r, not the total error.
- :func:`projq_quantize`: Q₀ = GPTQ(W; Σ); then, T times, V̂ = the top-r right singular vectors of (W − Q)·Y and
  Q = GPTQ(W; H_⊥) with H_⊥ = Y·(I − β·V̂·V̂ᵀ)·Yᵀ (:func:`projected_hessian`): the quantizer no longer pays for
  error in the directions the adapter will take. This is majorise–minimise on J_r (J_r(Q) ≤ ‖(W−Q)·Y·(I − V̂V̂ᵀ)‖²,
  with equality at V̂(Q)). The weight-space form of H_⊥ needs no N×N projector; the tests hold it equal to the
  token-space form the released code builds.
- :func:`whitened_svd_init`: (W − Q)·Y = U·S·Vᵀ, B = U_r·S_r^½, A = S_r^½·V_rᵀ·Y⁻¹, so the remaining error
  ‖(W − Q − B·A)·Y‖² is J_r(Q) exactly.

The released code's defects are not copied (projq.md §1): every GPTQ pass starts from the original W (its in-place
edit made J_r rise), one Σ serves Q₀ and every projection (it used only the last batch for the latter), damping is
added once (inside GPTQ), and the best iterate by J_r is returned, not the last, with the stopping rule comparing
J_r itself (not losses under different projectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from search.space import QuantSetting

from .quant.blockwise import PackedWeight, dequantize
from .quant.gptq import gptq_quantize

EIGEN_FLOOR = 1e-6
"""Eigenvalues of Σ are clamped at this share of the largest, so Y⁻¹ exists (inputs that never vary)."""


def whitening(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Y⁻¹) with Y·Yᵀ = Σ (eigenvalues floored at ``EIGEN_FLOOR``·max), in float64."""
    values, vectors = torch.linalg.eigh(sigma.double())
    root = values.clamp(min=EIGEN_FLOOR * float(values.max())).sqrt()
    return vectors * root, vectors.T / root.unsqueeze(1)


def uncorrectable_error(error: torch.Tensor, y: torch.Tensor, rank: int) -> float:
    """J_r: the whitened error's energy beyond its top ``rank`` singular values."""
    s = torch.linalg.svdvals(error.double() @ y)
    return float(s[rank:].square().sum())


def projected_hessian(error: torch.Tensor, y: torch.Tensor, rank: int, beta: float = 1.0) -> torch.Tensor:
    """H_⊥ = Y·(I − β·V̂·V̂ᵀ)·Yᵀ, V̂ the top-``rank`` right singular vectors of error·Y (weight-space form)."""
    _, _, vh = torch.linalg.svd(error.double() @ y, full_matrices=False)
    v = vh[:rank].T
    return y @ y.T - beta * (y @ v) @ (y @ v).T


@dataclass(frozen=True)
class ProjQResult:
    packed: PackedWeight  # the best iterate by J_r
    uncorrectable: list[float]  # J_r of Q₀, Q₁, …
    best: int  # which iterate ``packed`` is


def projq_quantize(weight: torch.Tensor, setting: QuantSetting, sigma: torch.Tensor, rank: int, *,
                   iterations: int = 5, tol: float = 0.02, beta: float = 1.0, name: str = "weight") -> ProjQResult:
    """ProjQ's noise shaping for one matrix and setting (``iterations`` = T; T = 0 or rank = 0 is plain GPTQ)."""
    if rank < 0 or iterations < 0 or not 0 <= beta <= 1:
        raise ValueError(f"{name}: ProjQ needs rank >= 0, iterations >= 0 and 0 <= beta <= 1")
    y, _ = whitening(sigma)
    w = weight.detach().float()
    packed = gptq_quantize(w, setting, sigma, name=name)
    error = w - dequantize(packed).float()
    history = [uncorrectable_error(error, y, rank)]
    best = (history[0], 0, packed)
    for t in range(1, iterations + 1 if rank else 1):
        packed = gptq_quantize(w, setting, projected_hessian(error, y, rank, beta), name=name)  # from W itself
        error = w - dequantize(packed).float()
        history.append(uncorrectable_error(error, y, rank))
        if history[-1] < best[0]:
            best = (history[-1], t, packed)
        if abs(history[-1] - history[-2]) <= tol * history[-2]:
            break
    return ProjQResult(packed=best[2], uncorrectable=history, best=best[1])


def whitened_svd_init(weight: torch.Tensor, quantized: torch.Tensor, sigma: torch.Tensor,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B: out × r, A: r × in) with B·A the best rank-r correction of W − Q measured on the calibration inputs."""
    y, y_inv = whitening(sigma)
    u, s, vh = torch.linalg.svd((weight.double() - quantized.double()) @ y, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root.unsqueeze(1) * vh[:rank] @ y_inv).float()
