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

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from search.space import QuantSetting

from ..adapters.coa import CoAModel
from ..adapters.lora import LoRAModel
from ..quant.blockwise import PackedWeight, dequantize
from ..quant.gptq import gptq_quantize

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


# ---- one initialisation for a set of configurations (projq.md §4 b, B1) --------------------------------------
SHARED_INIT = "projq-shared"
"""``adapter.init`` value of :func:`apply_shared_init`: the layers are built as ``zero_B`` (base = quant(W)) and the
factors are set once the training configurations are known."""
HOOI_SWEEPS = 3
"""Alternating refinements of (U, V) after V's first estimate; the shared residual stops moving after two or three."""
CORE_FLOOR = 1e-2
"""Singular values of the mean core are floored at this share of the largest before it is split into B and A, so
the per-configuration targets stay finite when the configurations' errors cancel in some direction."""


@dataclass(frozen=True)
class SharedSubspace:
    """One matrix's common rank-r subspace of several configurations' whitened errors Ẽ_k = (W − Q_k)·Y:
    Ẽ_k ≈ U·M_k·Vᵀ, U (out × r) and V (in × r) orthonormal, one r×r core M_k per configuration."""

    left: torch.Tensor  # U, float64
    right: torch.Tensor  # V, float64, in the whitened input space
    cores: torch.Tensor  # (K, r, r) float64
    energy: torch.Tensor  # (K,) ‖Ẽ_k‖²: the step-0 error of a zero-initialised adapter

    def residual(self) -> torch.Tensor:
        """(K,) ‖Ẽ_k − U·M_k·Vᵀ‖² = ‖Ẽ_k‖² − ‖M_k‖² (U, V orthonormal): the error left with each exact core."""
        return self.energy - self.cores.square().sum((-2, -1))


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(-1)  # largest first


def shared_subspace(errors: list[torch.Tensor], y: torch.Tensor, rank: int,
                    sweeps: int = HOOI_SWEEPS) -> SharedSubspace:
    """The (U, V) maximising Σ_k w_k·‖Uᵀ·Ẽ_k·V‖² with w_k = 1/‖Ẽ_k‖² (each configuration counts by its share of
    error removed, so the low-bit ones do not decide alone): V from Σ w_k·Ẽ_kᵀẼ_k, then ``sweeps`` alternating
    (HOOI) refinements; the cores M_k = Uᵀ·Ẽ_k·V are each configuration's best correction inside the subspace."""
    if not errors or rank < 1:
        raise ValueError("a shared subspace needs at least one configuration's error and rank >= 1")
    whitened = torch.stack([e.double() @ y for e in errors])  # (K, out, in)
    energy = whitened.square().sum((-2, -1))
    w = (1.0 / energy.clamp(min=torch.finfo(torch.float64).tiny)).view(-1, 1, 1)
    right = _top_eigenvectors((w * whitened.transpose(1, 2) @ whitened).sum(0), rank)
    left = _top_eigenvectors((w * whitened @ whitened.transpose(1, 2)).sum(0), rank)
    for _ in range(sweeps):
        projected = whitened @ right  # (K, out, r)
        left = _top_eigenvectors((w * projected @ projected.transpose(1, 2)).sum(0), rank)
        projected = whitened.transpose(1, 2) @ left  # (K, in, r)
        right = _top_eigenvectors((w * projected @ projected.transpose(1, 2)).sum(0), rank)
    cores = left.T @ whitened @ right
    return SharedSubspace(left=left, right=right, cores=cores, energy=energy)


@dataclass(frozen=True)
class SharedInit:
    """LoRA factors and per-configuration targets for M with s·B·T_k·A = U·M_k·Vᵀ·Y⁻¹ for every k, normalised
    so that the mean of the T_k is I: M = I (plain shared LoRA, or θ at its start) applies the mean correction, and
    what θ must learn is each configuration's departure from it."""

    lora_B: torch.Tensor  # out × r, float32
    lora_A: torch.Tensor  # r × in, float32
    targets: torch.Tensor  # (K, r, r) float32
    weights: torch.Tensor  # (r,) float32: how much each target row/column is worth in error (Λ of the mean core)


def shared_init(subspace: SharedSubspace, y_inv: torch.Tensor, scaling: float) -> SharedInit:
    """Split the mean core M̄ = P·Λ·Qᵀ (Λ floored at ``CORE_FLOOR``·max) between the factors:
    B = U·P·Λ^½/√s, A = Λ^½·Qᵀ·Vᵀ·Y⁻¹/√s, T_k = Λ^-½·Pᵀ·M_k·Q·Λ^-½."""
    w = 1.0 / subspace.energy.clamp(min=torch.finfo(torch.float64).tiny)
    p, lam, qh = torch.linalg.svd((w.view(-1, 1, 1) * subspace.cores).sum(0) / w.sum())
    lam = lam.clamp(min=CORE_FLOOR * float(lam.max()) if float(lam.max()) > 0 else 1e-12)
    root, inv_root, s_root = lam.sqrt(), lam.rsqrt(), math.sqrt(scaling)
    lora_B = subspace.left @ p * root / s_root
    lora_A = (root.unsqueeze(1) * qh @ subspace.right.T @ y_inv) / s_root
    targets = inv_root.view(-1, 1) * (p.T @ subspace.cores @ qh.T) * inv_root.view(1, -1)
    return SharedInit(lora_B=lora_B.float(), lora_A=lora_A.float(), targets=targets.float(), weights=lam.float())


def apply_shared_init(model: LoRAModel, configurations: Sequence[Any], covariances: Mapping[str, torch.Tensor], *,
                      fit_steps: int, seed: int = 0) -> dict[str, float]:
    """``adapter.init: projq-shared`` on a built model, for the training configurations ``configurations``: every
    target's B and A from :func:`shared_init` over the configurations' quantization errors (under each target's
    input statistics ``covariances``, the same Σ as GPTQ's), the base left at quant(W); θ, if the model has one,
    fitted to the per-configuration targets (:meth:`CoAModel.fit_encoder`).

    Returns the step-0 compensation error, ‖(W − Q_k − ΔW_k)·Y‖² / ‖(W − Q_k)·Y‖² averaged over matrices and
    configurations, for a zero-initialised adapter (1.0), the exact per-configuration cores (the best this
    subspace allows), M = I (the shared correction, what a plain LoRA starts from), and θ as fitted."""
    settings = [model.resolve(c) for c in configurations]
    targets, weights, exact, shared_excess = [], [], [], []
    for i, layer in enumerate(model.layers):
        y, y_inv = whitening(covariances[layer.name])
        weight = layer.weight.detach().float()
        errors: dict[Any, torch.Tensor] = {}
        for s in settings:  # one quantization per distinct setting of this matrix
            if s[i] not in errors:
                errors[s[i]] = weight - layer.quantized_weight(s[i]).float()
        subspace = shared_subspace([errors[s[i]] for s in settings], y, layer.rank)
        init = shared_init(subspace, y_inv, layer.scaling)
        with torch.no_grad():
            layer.lora_A.copy_(init.lora_A)
            layer.lora_B.copy_(init.lora_B)
        lam = init.weights.double()
        w = (lam.view(-1, 1) * lam.view(1, -1)) / subspace.energy.view(-1, 1, 1)  # (K, r, r): relative error
        eye = torch.eye(layer.rank, dtype=torch.float64, device=weight.device)
        targets.append(init.targets)
        weights.append(w.float())
        exact.append(subspace.residual() / subspace.energy)
        shared_excess.append((w * (init.targets.double() - eye).square()).sum((-2, -1)))
    targets_t, weights_t = torch.stack(targets, 1), torch.stack(weights, 1)  # (K, N, r, r)
    exact_t = torch.stack(exact, 1)  # (K, N)
    stats = {"init_error_zero": 1.0, "init_error_exact": float(exact_t.mean()),
             "init_error_shared": float((exact_t + torch.stack(shared_excess, 1)).mean())}
    if isinstance(model, CoAModel):
        model.fit_encoder(configurations, targets_t, weights_t, steps=fit_steps, seed=seed)
        with torch.no_grad():
            mixing = torch.stack([model.mixing_matrices(s) for s in settings]).double()
        excess = (weights_t.double() * (mixing - targets_t.double()).square()).sum((-2, -1))
        stats["init_error_fitted"] = float((exact_t + excess).mean())
    return stats
